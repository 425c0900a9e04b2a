"""Checkpoint conversion between HF Llama folders and Megatron-Core torch_dist checkpoints.

* ``hf_to_megatron``: HF Llama (safetensors or .bin, sharded or not) -> the trainer's
  checkpoint layout, with the LongGen settings recorded next to it.
* ``megatron_to_hf``: a trainer or converted checkpoint (any TP/PP layout) -> an HF folder
  that runs the hybrid model (``trust_remote_code=True``) or a plain Llama.
* ``load_hf_as_megatron``: an HF folder as an in-memory Megatron model (what evaluation runs).
"""

from megatron_longgen.checkpoint.convert import (
    ExportOptions,
    ImportOptions,
    hf_to_megatron,
    load_hf_as_megatron,
    megatron_to_hf,
)
from megatron_longgen.checkpoint.errors import ConversionError

__all__ = ["ConversionError", "ExportOptions", "ImportOptions", "hf_to_megatron", "load_hf_as_megatron",
           "megatron_to_hf"]
