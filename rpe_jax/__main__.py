"""`python -m rpe_jax <command>`: see ``rpe_jax.cli``."""

import sys

from rpe_jax.cli import main

sys.exit(main())
