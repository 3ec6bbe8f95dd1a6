"""T5X checkpoints of converted weights, for fine-tuning with the upstream ``t5x.train``.

T5X restores ``INITIAL_CHECKPOINT_PATH`` as a whole train state (parameters, the other variable
collections and the optimizer state) in its own checkpoint format. ``write_t5x_checkpoint`` builds
that state for the ``MODEL`` of a T5X model gin (``T5XModel`` with its optimizer): the given
parameters where they exist, the model's initialisation elsewhere (e.g. HyperMoE's generator on
Switch weights), fresh optimizer state, step 0; and saves it as ``<dest>/checkpoint_0`` with the
orbax checkpoint manager ``t5x.train`` saves with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

_INPUT_SHAPES = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8),
                 "decoder_target_tokens": (1, 8), "decoder_loss_weights": (1, 8)}


def _merge(init: Mapping, given: Mapping) -> tuple[dict, list[str]]:
    """``init`` with every leaf that ``given`` has (same path) replaced; returns the merged tree
    and the paths that kept ``init``."""
    flat_init = traverse_util.flatten_dict(dict(init))
    flat_given = traverse_util.flatten_dict(dict(given))
    unknown = sorted("/".join(k) for k in flat_given if k not in flat_init)
    if unknown:
        raise ValueError(f"{len(unknown)} given parameter(s) are not in the T5X model, e.g. "
                         f"{unknown[:3]}; the gin does not describe the converted model.")
    merged, kept = {}, []
    for key, value in flat_init.items():
        if key in flat_given:
            new = np.asarray(flat_given[key])
            if new.shape != value.shape:
                raise ValueError(f"{'/'.join(key)}: {new.shape} given, {value.shape} in the "
                                 "T5X model.")
            merged[key] = new.astype(value.dtype)
        else:
            merged[key] = value
            kept.append("/".join(key))
    return traverse_util.unflatten_dict(merged), kept


def write_t5x_checkpoint(gin_files: Sequence[str], params: Mapping, dest: str | Path, *,
                         mutables: Mapping[str, Any] | None = None, seed: int = 0,
                         bindings: Sequence[str] = ()) -> tuple[Path, list[str]]:
    """Writes ``<dest>/checkpoint_0`` for the T5X model of ``gin_files``; returns its path and the
    variables that kept their initialisation."""
    from t5x import train_state as train_state_lib
    from t5x import utils as t5x_utils

    from hypermoe_jax.t5x_support import partitioning
    from hypermoe_jax.training import gin_utils

    model = gin_utils.model_from_gin(gin_files, bindings)
    variables = jax.jit(lambda rng: model.get_initial_variables(rng, _INPUT_SHAPES))(
        jax.random.PRNGKey(seed))
    variables = dict(variables)
    kept: list[str] = []
    variables["params"], kept_params = _merge(variables["params"], params)
    kept += [f"params/{k}" for k in kept_params]
    for name, tree in dict(mutables or {}).items():
        variables[name], kept_m = _merge(variables[name], tree)
        kept += [f"{name}/{k}" for k in kept_m]
    state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
    partitioner = partitioning.ExpertPartitioner(num_expert_partitions=1, num_partitions=1)
    dest = Path(dest).absolute()
    dest.mkdir(parents=True, exist_ok=True)  # (T5X's manager takes a missing one's parent)
    # The orbax checkpoint manager t5x.train itself saves with.
    manager = t5x_utils.create_orbax_checkpoint_manager(
        save_cfg=t5x_utils.SaveCheckpointConfig(dtype="float32", period=1), restore_cfg=None,
        train_state=state, partitioner=partitioner, model_dir=str(dest))
    manager.save(state)
    manager.wait_until_finished()
    manager.close()
    return dest / "checkpoint_0", kept
