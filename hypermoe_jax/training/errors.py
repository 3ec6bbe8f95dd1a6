"""The errors a run reports to its user.

Each means bad input -- a config, data or a checkpoint -- and its message says what to fix.
Entry points print ``USER_ERRORS`` as one ``error: ...`` line instead of a traceback.
``CheckpointMismatchError`` lives here, not in ``checkpoints`` (which raises it): ``checkpoints``
needs ``state``, which needs ``RunError``, so this module imports neither.
"""

from __future__ import annotations

from hypermoe_jax.training import gin_utils


class RunError(RuntimeError):
    """A run cannot proceed (bad input); the message says what to fix."""


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is restored into."""


USER_ERRORS = (gin_utils.GinConfigError, RunError, CheckpointMismatchError, FileNotFoundError)
