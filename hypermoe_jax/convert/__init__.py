"""Conversion between Hugging Face model folders and this library's parameters.

* ``hf_io``: reading and writing Hugging Face folders (``config.json``, safetensors and torch
  ``pytorch_model.bin`` weights, sharded or not) with numpy only: no torch, ``safetensors`` or
  ``transformers`` needed;
* ``hf_switch``: Hugging Face ``SwitchTransformers`` / ``T5`` configs and weights <-> ours;
* ``upcycle``: sparse upcycling, an MoE model from a dense T5 checkpoint;
* ``checkpoint_files`` and ``cli``: what ``python -m hypermoe_jax.convert`` writes, and the
  command itself.
"""
