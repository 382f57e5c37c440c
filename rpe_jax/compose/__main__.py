"""`python -m rpe_jax.compose`: the main job's command line (``rpe_jax.cli.compose``)."""

import sys

from rpe_jax.cli.compose import main

sys.exit(main())
