"""``python -m hypermoe_jax.quickstart``: fetch real text, train a tiny HyperMoE LM on it and
evaluate the checkpoint. ``--help`` prints the options; the code is in
``hypermoe_jax.training.quickstart``.
"""

import sys

from hypermoe_jax.training.quickstart import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
