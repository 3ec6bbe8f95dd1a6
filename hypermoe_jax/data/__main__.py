"""``python -m hypermoe_jax.data``: see :mod:`hypermoe_jax.data.cli`."""

import sys

from hypermoe_jax.data import cli

sys.exit(cli.main())
