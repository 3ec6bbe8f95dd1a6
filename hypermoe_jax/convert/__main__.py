"""``python -m hypermoe_jax.convert`` (see ``convert.cli``)."""

import sys

from hypermoe_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
