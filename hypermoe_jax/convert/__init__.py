"""Conversion between Hugging Face model folders and this library's parameters.

* ``hf_io``: reading and writing Hugging Face folders (``config.json``, safetensors and torch
  ``pytorch_model.bin`` weights, sharded or not) with numpy only: no torch, ``safetensors`` or
  ``transformers`` needed.
"""
