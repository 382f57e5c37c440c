"""`python -m rpe_jax.compose`: the main job's command line (``rpe_jax.pipeline``)."""

import sys

from rpe_jax.pipeline import main

sys.exit(main())
