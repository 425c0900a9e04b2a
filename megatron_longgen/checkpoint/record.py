"""What a converted checkpoint records about itself: ``longgen_config.json``.

Written next to the trainer's ``latest_checkpointed_iteration.txt``: the model shape, the
LongGen settings (pattern, placement resolved to layer indices, RoPE base), the vocabulary
(true and padded sizes), the dtype, the target TP/PP, the source HF config (so an export
restores its token ids) and the trainer flags that rebuild the same model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import torch

from megatron_longgen.checkpoint.errors import ConversionError
from megatron_longgen.checkpoint.hf_files import LlamaShape
from megatron_longgen.config import LongGenFields, full_attention_layer_indices, with_unrecorded_fields

RECORD_FILE = "longgen_config.json"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass
class LongGenSettings(LongGenFields):
    """LongGenConfig's hybrid-attention fields (same names and defaults) plus the RoPE base."""

    rotary_base: Optional[float] = None  # None: keep the HF model's rope_theta

    def resolved_full_layers(self, num_layers: int) -> List[int]:
        if self.full_attention_layers is not None:
            return sorted(int(i) for i in self.full_attention_layers)
        return list(full_attention_layer_indices(num_layers, self.full_attention_placement,
                                                 self.full_attention_ratio))


def _option_flags(options: dict) -> List[str]:
    """Trainer flags of the architecture options that differ from Llama-2's."""
    llama2 = LlamaShape(0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, False).model_options()
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value != llama2[name]:
                flags.append(flag if value else "--no-" + flag[2:])
        elif name not in llama2:
            flags.append(f"{flag} {value:g}")
    return flags


@dataclass
class CheckpointRecord:
    shape: LlamaShape
    longgen: LongGenSettings
    padded_vocab_size: int
    dtype: str = "fp32"
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    hf_config: dict = field(default_factory=dict)

    @property
    def full_layers(self) -> List[int]:
        return self.longgen.resolved_full_layers(self.shape.num_layers)

    @property
    def rotary_base(self) -> float:
        return float(self.longgen.rotary_base if self.longgen.rotary_base is not None
                     else self.shape.rope_theta)

    def trainer_flags(self, load_dir: str) -> str:
        s, g = self.shape, self.longgen
        flags = [
            f"--num-layers {s.num_layers}", f"--hidden-size {s.hidden_size}",
            f"--ffn-hidden-size {s.ffn_hidden_size}", f"--num-attention-heads {s.num_attention_heads}",
            f"--num-query-groups {s.num_query_groups}", f"--kv-channels {s.head_dim}",
            f"--vocab-size {s.vocab_size}",
            f"--rotary-base {self.rotary_base:g}", f"--sparse-attention {g.sparse_attention}",
            f"--sink-tokens {g.sink_tokens}", f"--sliding-window-size {g.sliding_window_size}",
            f"--sparse-block-size {g.sparse_block_size}", f"--local-blocks {g.local_blocks}",
            f"--vert-stride {g.vert_stride}", "--homo-head" if g.homo_head else "--no-homo-head",
            f"--vert-stride-rule {g.vert_stride_rule}",
            "--full-attention-layers " + " ".join(map(str, self.full_layers))
            if self.full_layers else "--full-attention-placement none",
            *_option_flags(s.model_options()),
            f"--tensor-model-parallel-size {self.target_tensor_parallel_size}",
            f"--pipeline-model-parallel-size {self.target_pipeline_parallel_size}",
            f"--load {load_dir} --finetune",
        ]
        return " ".join(flags)

    def to_json(self, load_dir: str = "<this directory>") -> dict:
        longgen = asdict(self.longgen)
        longgen["full_attention_layers"] = self.full_layers
        longgen["rotary_base"] = self.rotary_base
        return {
            "format_version": FORMAT_VERSION,
            "model": asdict(self.shape),
            "longgen": longgen,
            "padded_vocab_size": self.padded_vocab_size,
            "dtype": self.dtype,
            "target_tensor_parallel_size": self.target_tensor_parallel_size,
            "target_pipeline_parallel_size": self.target_pipeline_parallel_size,
            "trainer_flags": self.trainer_flags(load_dir),
            "hf_config": self.hf_config,
        }

    def save(self, directory: str, load_dir: str) -> None:
        with open(os.path.join(directory, RECORD_FILE), "w") as fh:
            json.dump(self.to_json(load_dir), fh, indent=2)
            fh.write("\n")

    @classmethod
    def from_json(cls, data: dict) -> "CheckpointRecord":
        if data.get("format_version") != FORMAT_VERSION:
            raise ConversionError(f"{RECORD_FILE}: unknown format_version {data.get('format_version')!r}")
        known = {f.name for f in fields(LongGenSettings)}
        longgen = with_unrecorded_fields(data["longgen"])
        return cls(
            shape=LlamaShape(**data["model"]),
            longgen=LongGenSettings(**{k: v for k, v in longgen.items() if k in known}),
            padded_vocab_size=int(data["padded_vocab_size"]),
            dtype=data["dtype"],
            target_tensor_parallel_size=int(data["target_tensor_parallel_size"]),
            target_pipeline_parallel_size=int(data["target_pipeline_parallel_size"]),
            hf_config=data.get("hf_config") or {},
        )

    @classmethod
    def load(cls, directory: str) -> Optional["CheckpointRecord"]:
        path = os.path.join(directory, RECORD_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as fh:
            return cls.from_json(json.load(fh))
