"""``T5XModel``: one of this project's models, speaking upstream T5X's model protocol.

T5X's binaries call a model as follows (``t5x/trainer.py``, ``t5x/utils.py``):

* ``get_initial_variables(rng, input_shapes, input_types)`` -> variables in which every
  collection ``c`` has a ``c_axes`` twin of ``flax.linen.partitioning.AxisMetadata`` leaves
  (``params_axes`` is what T5X's train state and partitioner read; ``frozen_axes`` and
  ``k_schedule_axes`` partition the other collections);
* ``loss_fn(params, batch, dropout_rng)`` -> ``(loss, metrics)`` when the train state has no
  other collections, and ``loss_fn(params, batch, dropout_rng, flax_mutables)`` ->
  ``(loss, (metrics, flax_mutables))`` when it has (HyperRouter's and SMoE-Dropout's frozen
  routers, the step counter below); ``eval_fn(params, batch[, flax_mutables])`` ->
  ``(loss, metrics)``;
* ``predict_batch(params, batch, rng, flax_mutables=...)``,
  ``predict_batch_with_aux(...)`` and ``score_batch(params, batch, flax_mutables=...)``
  (T5X passes ``flax_mutables`` only to functions whose signature names it);
* metrics are ``clu.metrics`` objects; T5X's base metrics (``timing/steps_per_second``,
  ``timing/seqs_per_second``, ``loss_per_nonpadding_target_token``, ...) are among them;
* ``t5x.train`` checks that the task's vocabulary is the model's (``isinstance`` of T5X's
  ``BaseTransformerModel``, which ``T5XModel`` is).

The training step under T5X. T5X's trainer never passes the step to the model, and SMoE-Dropout /
HyperRouter grow the number of experts per token with it. A model with a ``k_schedule`` therefore
keeps its own step in the ``k_schedule`` collection (``{'step', 'rows'}``, int32, saved in
checkpoints with the rest of the train state): every training call of ``loss_fn`` adds the rows of
its batch and advances ``step`` by whole global batches (``batch_size``, bound to T5X's
``BATCH_SIZE``), so microbatched steps count once. It equals T5X's optimizer step when both start
together (a run from scratch, or from a checkpoint of the same model). A training call without
the counter, or with no ``batch_size``, is an error -- never a silent run at k_max.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from flax.core import meta
from flax.linen import partitioning as flax_partitioning
from t5x import adafactor
from t5x import models as t5x_models

from hypermoe_jax import losses
from hypermoe_jax import models as hm_models
from hypermoe_jax import partitioning as part

Array = jax.Array
PyTree = Any

# The collection holding the training step of a model with a k schedule.
K_SCHEDULE = "k_schedule"
_AXES = "_axes"
# Names of this project's metrics that T5X's base metrics report under the same name.
_BASE_METRIC_NAMES = ("loss", "accuracy", "z_loss", "cross_ent_loss")


def logical_factor_rules() -> flax.core.FrozenDict:
    """T5X Adafactor factorization rules for every logical axis name of this project's
    parameters: T5X's standard rules plus experts (``expert`` and ``layers`` are batch dims: one
    factored second moment per expert and per scanned layer), expert MLP hidden dims (columns)
    and the small hypernetwork / router dims (not factored)."""
    dim = adafactor.FactorDim
    rules = dict(adafactor.standard_logical_factor_rules())
    rules.update({
        part.EMBED: dim.ROW,
        part.MLP: dim.COLUMN,
        part.HEADS: dim.COLUMN,
        part.KV: dim.COLUMN,
        part.VOCAB: dim.COLUMN,
        part.LAYERS: dim.BATCH,
        part.EXPERTS: dim.BATCH,
        part.EXPERT_MLP: dim.COLUMN,
        part.UNMODELED: dim.NONE,
        part.HYPER: dim.NONE,
        part.RELPOS_BUCKETS: dim.NONE,
    })
    return flax.core.freeze(rules)


def _axes_tree(boxed: Mapping[str, Any]) -> dict:
    """``AxisMetadata`` twin of a (boxed) variable tree, leaf names suffixed ``_axes``."""
    flat = traverse_util.flatten_dict(
        flax.core.unfreeze(boxed), is_leaf=lambda _, x: isinstance(x, meta.AxisMetadata)
    )
    axes = {}
    for path, leaf in flat.items():
        if isinstance(leaf, nn.LogicallyPartitioned):
            names = tuple(leaf.names)
        else:
            names = (None,) * jnp.ndim(leaf)
        axes[path[:-1] + (path[-1] + _AXES,)] = flax_partitioning.AxisMetadata(names=names)
    return traverse_util.unflatten_dict(axes)


class T5XModel(t5x_models.BaseTransformerModel):
    """A ``hypermoe_jax.models`` model under T5X's protocol (see the module docstring).

    Args:
      model: ``hypermoe_jax.models.EncoderDecoderModel`` / ``DecoderOnlyModel`` (its gin bindings
        -- module, vocabularies, losses, k schedule, decoding -- are used as they are).
      optimizer_def: the T5X optimizer (``adafactor.Adafactor`` with ``logical_factor_rules()``
        in the gin files).
      batch_size: the global batch size (T5X's ``BATCH_SIZE``): the unit in which the step of a
        k schedule advances; only needed to train a model with a k schedule.
    """

    def __init__(self, model: hm_models.BaseTransformerModel, optimizer_def: Any = None,
                 batch_size: int | None = None):
        if not isinstance(model, hm_models.BaseTransformerModel):
            raise TypeError(
                "T5XModel wraps a hypermoe_jax.models model (EncoderDecoderModel or "
                f"DecoderOnlyModel); got {type(model).__name__}.")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        super().__init__(
            module=model.module,
            input_vocabulary=model.input_vocabulary,
            output_vocabulary=model.output_vocabulary,
            optimizer_def=optimizer_def,
            decode_fn=model._decode_fn,
            label_smoothing=model.label_smoothing,
            z_loss=model.z_loss,
            loss_normalizing_factor=model.loss_normalizing_factor,
        )
        self.model = model
        self.batch_size = batch_size

    @property
    def FEATURE_CONVERTER_CLS(self):  # noqa: N802 (T5X's attribute name)
        return type(self.model).FEATURE_CONVERTER_CLS

    @property
    def tracks_step(self) -> bool:
        """Whether the model keeps its training step (it has a k schedule)."""
        return self.model.k_schedule is not None

    # -- variables --------------------------------------------------------------------------

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        boxed = dict(self.model.get_initial_variables(rng, input_shapes, input_types))
        if self.tracks_step:
            boxed[K_SCHEDULE] = {"step": jnp.zeros((), jnp.int32),
                                 "rows": jnp.zeros((), jnp.int32)}
        variables = {}
        for name, tree in boxed.items():
            variables[name] = meta.unbox(tree)
            variables[name + _AXES] = _axes_tree(tree)
        return flax.core.freeze(variables)

    # -- the step ---------------------------------------------------------------------------

    def _split(self, flax_mutables) -> tuple[dict | None, dict | None]:
        """(the model's collections, the step counter)."""
        if flax_mutables is None:
            return None, None
        mutables = dict(flax.core.unfreeze(flax_mutables))
        counter = mutables.pop(K_SCHEDULE, None)
        return mutables, counter

    def _training_step(self, counter) -> Array:
        if counter is None:
            raise ValueError(
                f"This model grows the number of experts per token with the training step "
                f"({self.model.k_schedule}) and keeps the step in its {K_SCHEDULE!r} collection, "
                "but loss_fn got no such collection (T5X passes it as flax_mutables when the "
                "train state has it). Initialise the train state with get_initial_variables, or "
                "restore a checkpoint of this model; a checkpoint without it (another model's) "
                "cannot give the step.")
        if self.batch_size is None:
            raise ValueError(
                "T5XModel.batch_size is None: a model with a k schedule counts its training "
                "step in global batches. Bind T5XModel.batch_size = %BATCH_SIZE (the model gins "
                "in gin/t5x/ do).")
        return counter["step"]

    def _advance(self, counter, rows: int) -> dict:
        total = counter["rows"] + rows
        return {"step": counter["step"] + total // self.batch_size,
                "rows": total % self.batch_size}

    # -- losses -----------------------------------------------------------------------------

    def _compute_logits(self, params, batch, dropout_rng=None):
        logits, _ = self.model._compute_logits(params, batch, dropout_rng)
        return logits

    def _t5x_metrics(self, logits, batch, loss, metrics) -> dict:
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        mask = (targets > 0) if weights is None else weights
        segment_ids = {k[: -len("_segment_ids")]: v for k, v in batch.items()
                       if k.endswith("_segment_ids")}
        if not segment_ids:
            segment_ids = {k: v != 0 for k, v in batch.items()
                           if k in ("encoder_input_tokens", "decoder_target_tokens")}
        out = dict(t5x_models.compute_base_metrics(
            logits=logits, targets=targets, mask=mask, loss=loss, z_loss=metrics["z_loss"],
            segment_ids=segment_ids))
        extra = {k: v for k, v in metrics.items() if k not in _BASE_METRIC_NAMES}
        out.update(losses.as_clu_metrics(extra))
        return out

    def loss_fn(self, params, batch, dropout_rng, flax_mutables=None):
        """T5X's ``loss_fn``: ``(loss, metrics)``, or ``(loss, (metrics, flax_mutables))`` when
        called with ``flax_mutables`` (the step counter advanced by a training call)."""
        mutables, counter = self._split(flax_mutables)
        training = dropout_rng is not None
        step = self._training_step(counter) if training and self.tracks_step else None
        loss, metrics, logits = self.model.forward(params, batch, dropout_rng,
                                                   flax_mutables=mutables, step=step)
        metrics = self._t5x_metrics(logits, batch, loss, metrics)
        if flax_mutables is None:
            return loss, metrics
        new = dict(flax.core.unfreeze(flax_mutables))
        if counter is not None and training:
            new[K_SCHEDULE] = self._advance(counter, batch["decoder_target_tokens"].shape[0])
        if isinstance(flax_mutables, flax.core.FrozenDict):
            new = flax.core.freeze(new)
        return loss, (metrics, new)

    def eval_fn(self, params, batch, flax_mutables=None):
        """T5X's ``eval_fn``: ``(loss, metrics)`` with the model's eval settings."""
        mutables, _ = self._split(flax_mutables)
        loss, metrics, logits = self.model.forward(params, batch, None, flax_mutables=mutables)
        return loss, self._t5x_metrics(logits, batch, loss, metrics)

    # -- inference --------------------------------------------------------------------------

    def score_batch(self, params, batch, return_intermediates: bool = False,
                    flax_mutables=None):
        mutables, _ = self._split(flax_mutables)
        return self.model.score_batch(params, batch, return_intermediates,
                                      flax_mutables=mutables)

    def predict_batch(self, params, batch, rng=None, flax_mutables=None):
        return self.predict_batch_with_aux(params, batch, rng=rng,
                                           flax_mutables=flax_mutables)[0]

    def predict_batch_with_aux(self, params, batch, rng=None, decoder_params=None,
                               return_all_decodes: bool = False, num_decodes: int = 1,
                               prompt_with_targets: bool = False, flax_mutables=None):
        mutables, _ = self._split(flax_mutables)
        return self.model.predict_batch_with_aux(
            params, batch, rng=rng, decoder_params=decoder_params,
            return_all_decodes=return_all_decodes, num_decodes=num_decodes,
            prompt_with_targets=prompt_with_targets, flax_mutables=mutables)


