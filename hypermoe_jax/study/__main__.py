"""``python -m hypermoe_jax.study``: see ``hypermoe_jax.study``."""

import sys

from hypermoe_jax.study.cli import main

sys.exit(main())
