"""``python -m hypermoe_jax.train`` (and the ``hypermoe-train`` console script): gin-configured
pretrain / finetune / evaluate / infer runs. ``--help`` prints the usage; the code is in
``hypermoe_jax.training`` (``cli.main``).
"""

import sys

# The imported module's main, not code of this ``__main__`` copy: gin bindings and the error
# classes raised by the run functions belong to the ``hypermoe_jax.training`` modules.
from hypermoe_jax.training.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
