"""Implementation choices by backend: one table, one explicit override per choice.

Some computations have several exact implementations whose speed depends on the hardware. Each
such option takes ``"auto"`` (the default: what the table below picks for the backend JAX runs on)
or the name of one implementation (the override, e.g. to benchmark or to reproduce a run):

=====================  =================  =================  ==========
choice                 TPU                GPU                CPU
=====================  =================  =================  ==========
``dispatch``           einsum             gather             gather
``grouped_matmul``     ragged_dot         ragged_dot         blocked
``dropless_exchange``  ragged_all_to_all  ragged_all_to_all  all_to_all
=====================  =================  =================  ==========

Set by ``DispatchConfig.impl``, ``HyperExpertsConfig.grouped_impl`` and
``DispatchConfig.dropless_exchange``.

* dispatch: one-hot einsums feed the MXU on TPU (flaxformer's choice there); index gathers move
  ``E * C * d`` values instead of ``S * E * C * d`` MACs elsewhere.
* grouped matmul (HyperExperts of the dense placement): ``jax.lax.ragged_dot`` is the native
  grouped matmul on TPU and GPU; on CPU it lowers to a masked dense product, and the sorted
  capacity/blocked layouts of ``grouped.py`` are 4-10x faster (``benchmarks/hyper_layer.py``).
* dropless exchange (``dropless_exchange``; the expert-parallel all-to-all of
  ``DispatchConfig(impl='dropless')``): ``ragged_all_to_all`` sends only the routed rows; XLA:CPU
  has no ragged all-to-all, so CPU pads each device's run to the worst case and uses
  ``all_to_all`` (exact, n_expert times the volume; ``layers/dropless.py``).

The choice is made when the layer is traced, from ``jax.default_backend()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

AUTO = "auto"

DEFAULTS: Mapping[str, Mapping[str, str]] = {
    "dispatch": {"tpu": "einsum", "gpu": "gather", "cpu": "gather"},
    "grouped_matmul": {"tpu": "ragged_dot", "gpu": "ragged_dot", "cpu": "blocked"},
    "dropless_exchange": {"tpu": "ragged_all_to_all", "gpu": "ragged_all_to_all",
                          "cpu": "all_to_all"},
}


def platform() -> str:
    """``tpu``, ``gpu`` or ``cpu`` (JAX's default backend; ``cuda`` / ``rocm`` count as gpu)."""
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm") else backend


def check(choice: str, value: str, allowed: Sequence[str], where: str) -> None:
    """Raises a ValueError naming ``where`` when ``value`` is neither ``auto`` nor allowed."""
    if value != AUTO and value not in allowed:
        raise ValueError(
            f"{where} must be 'auto' (by backend: {dict(DEFAULTS[choice])}) or one of "
            f"{tuple(allowed)}, got {value!r}.")


def resolve(choice: str, value: str) -> str:
    """``value`` itself, or -- for ``auto`` -- the table's pick for the current backend."""
    if value != AUTO:
        return value
    table = DEFAULTS[choice]
    return table.get(platform(), table["cpu"])
