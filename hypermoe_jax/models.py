"""T5X-protocol models wrapping the architectures: losses, metrics, scoring, decoding.

``EncoderDecoderModel`` and ``DecoderOnlyModel`` follow T5X's ``BaseTransformerModel`` protocol
(``loss_fn``, ``eval_fn``, ``predict_batch``, ``predict_batch_with_aux``, ``score_batch``,
``get_initial_variables``, ``FEATURE_CONVERTER_CLS``) so the same objects can be configured with
gin for this project's ``train`` module or for upstream ``t5x.train`` (T5X is not imported here).

Batches use the seqio feature-converter keys: ``encoder_input_tokens``, ``decoder_input_tokens``,
``decoder_target_tokens``, ``decoder_loss_weights`` and, for packed examples,
``{encoder,decoder}_segment_ids`` / ``{encoder,decoder}_positions`` (decoder-only prefix LMs:
``decoder_causal_attention``).

Trainable and non-trainable variables. HyperRouter's hypernetwork and SMoE-Dropout's random
router are weights that are saved but never trained; they live in the ``frozen`` variable
collection, next to ``params``. ``get_initial_variables`` returns both
(``{'params': ..., 'frozen': ...}``, boxed with logical partitioning metadata). Every entry point
takes ``params`` -- the ``params`` collection only, the tree an optimizer updates -- and the other
collections as the keyword ``flax_mutables`` (the name T5X's train state uses for them):

    variables = nn.unbox(model.get_initial_variables(rng, shapes))
    params, mutables = variables.pop('params'), variables           # {'frozen': ...} or {}
    loss, metrics = model.loss_fn(params, batch, rng, flax_mutables=mutables, step=step)

Passing the whole variable dict as ``params`` (no ``flax_mutables``) works too, which is what a
caller that knows nothing about ``frozen`` (e.g. a plain T5X train state) would do when it keeps
the variables together; gradients of ``frozen`` leaves are then exactly zero.

Experts per token: SMoE-Dropout grows k during training. With a ``KSchedule`` the model computes
``k = linear_k_schedule(step, ...)`` from the ``step`` keyword of ``loss_fn``; a training call
without a step is an error (it would train at k_max without a word). Evaluation, scoring and
decoding use ``eval_active_k``
(None = all ``num_selected``), or the ``active_k`` keyword of each call (any-k inference).

MoE aux losses (``losses``): the load-balance and router z-losses of all MoE layers (both stacks)
are averaged over layers (``router_loss_pooling='hf'``: pooled per stack and summed, as Hugging
Face), scaled by ``aux_loss_factor`` (0.01) and ``router_z_loss_factor``
(0.001), and added to the loss. Per-layer routing metrics are reported as
``moe/<stack>/layer_<i>/<name>`` with i the block index within the stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hypermoe_jax import architectures as arch
from hypermoe_jax import decoding, losses
from hypermoe_jax.layers.routing import linear_k_schedule

Array = jax.Array
PyTree = Any
# Collections created only while applying (never part of a model's state).
_TRANSIENT = (arch.CACHE, arch.INTERMEDIATES)


class _SeqioClass:
    """Class attribute resolved lazily to ``seqio.<name>`` (importing seqio pulls TensorFlow)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        import seqio

        return getattr(seqio, self.name)


@dataclasses.dataclass(frozen=True)
class KSchedule:
    """SMoE-Dropout's growing number of experts per token:
    ``k_t = round((k_max - k_min) * t / total_steps) + k_min`` (k_max: the layers' num_selected)."""

    total_steps: int | None
    k_min: int = 1
    k_max: int | None = None


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


class BaseTransformerModel:
    """Shared logic of the encoder-decoder and decoder-only models.

    Args:
      module: ``arch.EncoderDecoder`` / ``arch.DecoderOnly``.
      input_vocabulary, output_vocabulary: seqio vocabularies (EOS id for decoding).
      optimizer_def: kept for the T5X protocol (the trainer applies it to ``params`` only).
      decode_fn: ``decoding.beam_search`` or ``decoding.temperature_sample``.
      label_smoothing: on the target distribution.
      z_loss: output (softmax) z-loss factor.
      loss_normalizing_factor: None (sum over tokens, T5X's default), a number, or
        ``NUM_REAL_TARGET_TOKENS`` (mean over real target tokens; the default here, which keeps
        the token loss and the MoE aux losses on the same scale) / ``NUM_TOTAL_TARGET_TOKENS`` /
        ``AVERAGE_PER_SEQUENCE``.
      aux_loss_factor / router_z_loss_factor: weights of the MoE aux losses.
      router_loss_pooling: ``layer_mean`` -- each router loss averaged over all MoE layers of
        both stacks | ``hf`` -- as Hugging Face ``SwitchTransformers``: per stack, pooled over
        its MoE layers, summed over the stacks; a stack whose sparse step is 1 adds none
        (``losses.moe_losses_and_metrics``).
      k_schedule: SMoE-Dropout's growing k (training); None = all ``num_selected``.
      eval_active_k: experts per token in eval / scoring / decoding (None = all).
      default_decoder_params: default keyword arguments of ``decode_fn``.
      clu_metrics: return metrics as ``clu.metrics.Average`` objects (vectors split into
        ``<name>/<i>`` scalars), the form upstream T5X trainers merge; default: plain arrays.
    """

    FEATURE_CONVERTER_CLS: Any = None

    def __init__(
        self,
        module: nn.Module,
        input_vocabulary: Any = None,
        output_vocabulary: Any = None,
        optimizer_def: Any = None,
        decode_fn: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 1e-4,
        loss_normalizing_factor: float | str | None = losses.NUM_REAL_TARGET_TOKENS,
        aux_loss_factor: float = 0.01,
        router_z_loss_factor: float = 0.001,
        router_loss_pooling: str = "layer_mean",
        k_schedule: KSchedule | None = None,
        eval_active_k: int | None = None,
        default_decoder_params: Mapping[str, Any] | None = None,
        clu_metrics: bool = False,
    ):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        loss_normalizing_factor = losses.factor_name(loss_normalizing_factor)
        if isinstance(loss_normalizing_factor, str) and (
            loss_normalizing_factor not in losses.SPECIAL_FACTORS
        ):
            raise ValueError(
                f"Unknown loss_normalizing_factor {loss_normalizing_factor!r}; use None, a number "
                f"or one of {losses.SPECIAL_FACTORS}."
            )
        self.module = module
        self.input_vocabulary = input_vocabulary
        self.output_vocabulary = output_vocabulary
        self.optimizer_def = optimizer_def
        self._decode_fn = decode_fn or self._default_decode_fn()
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.loss_normalizing_factor = loss_normalizing_factor
        self.aux_loss_factor = aux_loss_factor
        self.router_z_loss_factor = router_z_loss_factor
        if router_loss_pooling not in losses.ROUTER_LOSS_POOLINGS:
            raise ValueError(f"Unknown router_loss_pooling {router_loss_pooling!r}; use one of "
                             f"{losses.ROUTER_LOSS_POOLINGS}.")
        self.router_loss_pooling = router_loss_pooling
        self.k_schedule = k_schedule
        self.eval_active_k = eval_active_k
        self.default_decoder_params = dict(default_decoder_params or {})
        self.clu_metrics = clu_metrics

    # -- subclass hooks ---------------------------------------------------------------------

    def _default_decode_fn(self):
        return decoding.beam_search

    def _stacks(self) -> dict[str, tuple[int, int | None]]:
        """stack name -> (num_layers, sparse_step)."""
        raise NotImplementedError

    def _module_inputs(self, batch: Mapping[str, Array]) -> tuple[tuple, dict]:
        raise NotImplementedError

    # -- variables --------------------------------------------------------------------------

    @property
    def config(self) -> arch.TransformerConfig:
        return self.module.config

    @staticmethod
    def _variables(params: PyTree, flax_mutables: PyTree | None) -> dict:
        """``{'params': params, **flax_mutables}``; ``params`` may already be a variable dict."""
        if flax_mutables is None and isinstance(params, Mapping) and "params" in params:
            return dict(params)
        return {"params": params, **dict(flax_mutables or {})}

    def _apply(self, params, flax_mutables, *args, **kwargs):
        variables = self._variables(params, flax_mutables)
        try:
            return self.module.apply(variables, *args, **kwargs)
        except Exception as e:  # a missing 'frozen' collection gives an obscure flax error
            if arch.FROZEN not in variables and arch.FROZEN in str(e):
                raise ValueError(
                    f"This model has non-trainable variables in the {arch.FROZEN!r} collection "
                    "(HyperRouter / SMoE-Dropout routers); pass them as "
                    "flax_mutables={'frozen': ...} or pass the full variable dict as params."
                ) from e
            raise

    def get_initial_variables(
        self,
        rng: Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> dict:
        """Initial ``{'params': ..., 'frozen': ...}`` (boxed with logical axis metadata)."""
        input_types = dict(input_types or {})
        batch = {
            k: jnp.ones(shape, input_types.get(k, jnp.int32))
            for k, shape in input_shapes.items()
        }
        args, kwargs = self._module_inputs(batch)
        params_rng, dropout_rng, jitter_rng = jax.random.split(rng, 3)
        variables = self.module.init(
            {arch.PARAMS: params_rng, arch.DROPOUT: dropout_rng, arch.JITTER: jitter_rng},
            *args, **kwargs, enable_dropout=False,
        )
        return {k: v for k, v in variables.items() if k not in _TRANSIENT}

    # -- k ----------------------------------------------------------------------------------

    def train_active_k(self, step: Array | int | None) -> Array | None:
        """Experts per token at training step ``step`` (None without a schedule or a step)."""
        if self.k_schedule is None or step is None:
            return None
        sched = self.k_schedule
        if sched.total_steps is None:
            raise ValueError(
                "KSchedule.total_steps is None: training with a growing k needs the length of "
                "the schedule (model gins bind it to TRAIN_STEPS).")
        k_max = sched.k_max or self.config.moe.num_selected
        return linear_k_schedule(step, sched.total_steps, sched.k_min, k_max)

    def _eval_k(self, active_k):
        return self.eval_active_k if active_k is None else active_k

    # -- losses -----------------------------------------------------------------------------

    def _moe_losses_and_metrics(self, aux):
        """``losses.moe_losses_and_metrics`` of this model's stacks (``router_loss_pooling``)."""
        placement = self.config.sparse_placement
        layer_indices = {name: arch.sparse_layer_indices(n, step, placement)
                         for name, (n, step) in self._stacks().items()}
        return losses.moe_losses_and_metrics(
            aux, layer_indices, pooling=self.router_loss_pooling,
            sparse_steps={name: step for name, (_, step) in self._stacks().items()})

    def _compute_logits(self, params, batch, dropout_rng=None, *, flax_mutables=None,
                        active_k=None):
        args, kwargs = self._module_inputs(batch)
        rngs = None
        if dropout_rng is not None:
            drop, jitter = jax.random.split(dropout_rng)
            rngs = {arch.DROPOUT: drop, arch.JITTER: jitter}
        return self._apply(
            params, flax_mutables, *args, **kwargs, enable_dropout=dropout_rng is not None,
            active_k=active_k, rngs=rngs,
        )

    def _loss_and_metrics(self, logits, aux, batch, active_k):
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        weights = weights.astype(jnp.float32)
        token_weights = weights
        factor, weights = losses.loss_normalizing_factor_and_weights(
            self.loss_normalizing_factor, targets, weights
        )
        token_loss, token_z = losses.cross_entropy_with_logits(
            logits, targets, self.label_smoothing, self.z_loss
        )
        loss = jnp.sum(token_loss * weights)
        z_loss = jnp.sum(token_z * weights)
        if factor is not None:
            loss = loss / factor
            z_loss = z_loss / factor
        lb, rz, moe_metrics = self._moe_losses_and_metrics(aux)
        total = loss + self.aux_loss_factor * lb + self.router_z_loss_factor * rz
        num_tokens = jnp.sum(batch["decoder_target_tokens"] > 0).astype(jnp.float32)
        weight_sum = jnp.sum(weights)
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        # Negative log-likelihood per weighted target token in bits (no label smoothing, no
        # z-loss, whatever the normalising factor): bits per character for byte-level tasks.
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        token_weight_sum = jnp.maximum(jnp.sum(token_weights), 1e-9)
        ce_per_token = jnp.sum(nll * token_weights) / token_weight_sum
        metrics = {
            "loss": total,
            "cross_ent_loss": loss - z_loss,
            "bits_per_token": ce_per_token / np.log(2.0),
            "z_loss": z_loss,
            "accuracy": jnp.sum(correct * weights) / jnp.maximum(weight_sum, 1e-9),
            "num_real_target_tokens": num_tokens,
            "nonpadding_fraction": num_tokens / float(np.prod(targets.shape)),
            "moe/load_balance_loss": lb,
            "moe/router_z_loss": rz,
            **moe_metrics,
        }
        if active_k is not None:
            metrics["moe/active_k"] = jnp.asarray(active_k, jnp.float32)
        return total, losses.as_clu_metrics(metrics) if self.clu_metrics else metrics

    def loss_fn(
        self,
        params: PyTree,
        batch: Mapping[str, Array],
        dropout_rng: Array | None,
        *,
        flax_mutables: PyTree | None = None,
        step: Array | int | None = None,
        active_k: Array | int | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Training loss (dropout / jitter on when ``dropout_rng`` is given) and metrics.

        ``step`` drives the ``k_schedule``; ``active_k`` overrides it.
        """
        loss, metrics, _ = self.forward(params, batch, dropout_rng, flax_mutables=flax_mutables,
                                        step=step, active_k=active_k)
        return loss, metrics

    def forward(self, params, batch, dropout_rng, *, flax_mutables=None, step=None,
                active_k=None) -> tuple[Array, dict[str, Any], Array]:
        """``loss_fn``'s loss and metrics, and the logits they come from.

        A training call (``dropout_rng`` given) of a model with a ``k_schedule`` needs ``step``
        (or an explicit ``active_k``): without it the schedule could not grow k, and training
        at k_max instead would silently lose what SMoE-Dropout / HyperRouter are.
        """
        if active_k is None:
            if dropout_rng is None:
                active_k = self._eval_k(None)
            elif self.k_schedule is not None and step is None:
                raise ValueError(
                    "This model grows the number of experts per token during training "
                    f"({self.k_schedule}), but loss_fn was called without the training step. "
                    "Pass step=<the optimizer step> (the trainers here do; under upstream T5X "
                    "use the model gins in gin/t5x/, whose model tracks the step itself), or "
                    "pass active_k explicitly.")
            else:
                active_k = self.train_active_k(step)
        logits, aux = self._compute_logits(
            params, batch, dropout_rng, flax_mutables=flax_mutables, active_k=active_k
        )
        loss, metrics = self._loss_and_metrics(logits, aux, batch, active_k)
        return loss, metrics, logits

    def eval_fn(self, params, batch, *, flax_mutables=None, active_k=None):
        """Eval loss and metrics (no dropout, eval capacity factor, ``eval_active_k``)."""
        return self.loss_fn(
            params, batch, None, flax_mutables=flax_mutables, active_k=self._eval_k(active_k)
        )

    def score_batch(self, params, batch, return_intermediates: bool = False, *,
                    flax_mutables=None, active_k=None):
        """Log-likelihood of each target sequence, ``sum_i w_i log p(target_i)`` <float32>[B].

        With ``return_intermediates``: ``(scores, {'token_scores': [B, L], 'moe_metrics': ...})``.
        """
        active_k = self._eval_k(active_k)
        logits, aux = self._compute_logits(
            params, batch, None, flax_mutables=flax_mutables, active_k=active_k
        )
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        token_scores = token_scores * weights.astype(jnp.float32)
        scores = jnp.sum(token_scores, axis=-1)
        if not return_intermediates:
            return scores
        _, _, moe_metrics = self._moe_losses_and_metrics(aux)
        return scores, {"token_scores": token_scores, "moe_metrics": moe_metrics}

    # -- decoding ---------------------------------------------------------------------------

    def predict_batch(self, params, batch, rng=None, **kwargs) -> Array:
        """Decoded output tokens <int32>[B, L] (see ``predict_batch_with_aux``)."""
        return self.predict_batch_with_aux(params, batch, rng=rng, **kwargs)[0]

    def _eos_id(self) -> int:
        vocab = self.output_vocabulary
        eos = getattr(vocab, "eos_id", None)
        return 1 if eos is None else int(eos)

    def _decode(self, prompt, cache, tokens_to_logits, rng, decoder_params, num_decodes,
                return_all_decodes):
        params = {**self.default_decoder_params, **dict(decoder_params or {})}
        seqs, scores = decoding.decode(self._decode_fn, prompt, cache, tokens_to_logits,
                                       eos_id=self._eos_id(), rng=rng, num_decodes=num_decodes,
                                       **params)
        if return_all_decodes:
            return seqs, {"scores": scores}
        return seqs[:, -1], {"scores": scores[:, -1]}


# --------------------------------------------------------------------------------------------
# Encoder-decoder
# --------------------------------------------------------------------------------------------


class EncoderDecoderModel(BaseTransformerModel):
    """T5 / Switch / HyperMoE encoder-decoder (``arch.EncoderDecoder``)."""

    FEATURE_CONVERTER_CLS = _SeqioClass("EncDecFeatureConverter")

    def _stacks(self):
        cfg = self.config
        return {
            "encoder": (cfg.num_encoder_layers, cfg.encoder_sparse_step),
            "decoder": (cfg.num_decoder_layers, cfg.decoder_sparse_step),
        }

    def _module_inputs(self, batch):
        args = (
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch.get("decoder_target_tokens", batch["decoder_input_tokens"]),
        )
        kwargs = {
            k: batch.get(k)
            for k in ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
                      "decoder_positions")
        }
        return args, kwargs

    def predict_batch_with_aux(
        self,
        params,
        batch,
        rng=None,
        decoder_params=None,
        return_all_decodes: bool = False,
        num_decodes: int = 1,
        prompt_with_targets: bool = False,
        *,
        flax_mutables=None,
        active_k=None,
    ) -> tuple[Array, dict[str, Array]]:
        """Decodes the targets of ``batch`` (beam search by default; ``num_decodes`` beams).

        Returns ``(tokens <int32>[B, L], {'scores': [B]})`` -- or all decodes
        ``[B, num_decodes, L]`` sorted by ascending score with ``return_all_decodes``.
        """
        active_k = self._eval_k(active_k)
        enc_tokens = batch["encoder_input_tokens"]
        dec_shape = batch["decoder_input_tokens"].shape
        encoded, _ = self._apply(
            params, flax_mutables, enc_tokens, enable_dropout=False, active_k=active_k,
            method=arch.EncoderDecoder.encode,
        )
        dummy = jnp.zeros(dec_shape, jnp.int32)
        _, init_vars = self._apply(
            params, flax_mutables, encoded, enc_tokens, dummy, dummy, enable_dropout=False,
            decode=True, active_k=active_k, mutable=[arch.CACHE],
            method=arch.EncoderDecoder.decode,
        )
        cache = init_vars[arch.CACHE]
        encoded_x = decoding.flat_batch_beam_expand(encoded, num_decodes)
        enc_tokens_x = decoding.flat_batch_beam_expand(enc_tokens, num_decodes)
        variables = self._variables(params, flax_mutables)

        def tokens_to_logits(state: decoding.DecodingState):
            (logits, _), new_vars = self.module.apply(
                {**variables, arch.CACHE: state.cache}, encoded_x, enc_tokens_x,
                state.cur_token, state.cur_token, enable_dropout=False, decode=True,
                active_k=active_k, mutable=[arch.CACHE],
                method=arch.EncoderDecoder.decode,
            )
            return logits[:, -1], new_vars[arch.CACHE]

        if prompt_with_targets:
            prompt = decoding.shift_left(batch["decoder_input_tokens"])
        else:
            prompt = jnp.zeros(dec_shape, jnp.int32)
        return self._decode(prompt, cache, tokens_to_logits, rng, decoder_params, num_decodes,
                            return_all_decodes)


# --------------------------------------------------------------------------------------------
# Decoder-only
# --------------------------------------------------------------------------------------------


class DecoderOnlyModel(BaseTransformerModel):
    """Decoder-only LM / prefix LM (``arch.DecoderOnly``).

    Decoding continues the prompt (the prefix marked by ``decoder_causal_attention``; with
    ``prompt_with_targets`` all of ``decoder_input_tokens``) and returns the continuation only.
    """

    FEATURE_CONVERTER_CLS = _SeqioClass("DecoderFeatureConverter")

    def _default_decode_fn(self):
        return decoding.temperature_sample

    def _stacks(self):
        cfg = self.config
        return {"decoder": (cfg.num_decoder_layers, cfg.decoder_sparse_step)}

    def _module_inputs(self, batch):
        args = (batch["decoder_input_tokens"], batch.get("decoder_target_tokens"))
        kwargs = {
            k: batch.get(k)
            for k in ("decoder_segment_ids", "decoder_positions", "decoder_causal_attention")
        }
        return args, kwargs

    def predict_batch_with_aux(
        self,
        params,
        batch,
        rng=None,
        decoder_params=None,
        return_all_decodes: bool = False,
        num_decodes: int = 1,
        prompt_with_targets: bool = False,
        *,
        flax_mutables=None,
        active_k=None,
    ) -> tuple[Array, dict[str, Array]]:
        """Samples continuations (temperature sampling by default; greedy with
        ``decoder_params={'temperature': 0.0}``) of the prompts in ``batch``."""
        active_k = self._eval_k(active_k)
        inputs = batch["decoder_input_tokens"]
        if prompt_with_targets:
            prompt_inputs = inputs
        elif batch.get("decoder_causal_attention") is not None:
            prompt_inputs = inputs * batch["decoder_causal_attention"]
        else:
            prompt_inputs = jnp.zeros_like(inputs)
        prompt = decoding.shift_left(prompt_inputs).astype(jnp.int32)
        prompt_len = jnp.sum(prompt > 0, axis=-1)

        dummy = jnp.zeros(inputs.shape, jnp.int32)
        _, init_vars = self._apply(
            params, flax_mutables, dummy, dummy, enable_dropout=False, decode=True,
            active_k=active_k, mutable=[arch.CACHE],
        )
        cache = init_vars[arch.CACHE]
        variables = self._variables(params, flax_mutables)

        def tokens_to_logits(state: decoding.DecodingState):
            (logits, _), new_vars = self.module.apply(
                {**variables, arch.CACHE: state.cache}, state.cur_token,
                enable_dropout=False, decode=True, active_k=active_k,
                mutable=[arch.CACHE],
            )
            return logits[:, -1], new_vars[arch.CACHE]

        seqs, aux = self._decode(prompt, cache, tokens_to_logits, rng, decoder_params,
                                 num_decodes, True)
        seqs = decoding.remove_prompt(seqs, prompt_len)
        if return_all_decodes:
            return seqs, aux
        return seqs[:, -1], {"scores": aux["scores"][:, -1]}

