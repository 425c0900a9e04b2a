"""Named model shapes: Llama-2 7B and 70B, and a tiny one for tests and the CPU quickstart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch.nn.functional as F

from megatron_longgen.config import LongGenConfig

# What makes a Megatron TransformerConfig a Llama: RMSNorm, SwiGLU, no biases, no dropout.
# Fusions that need apex/TE kernels stay off; training turns on what the machine has.
LLAMA_ARCH: Dict[str, Any] = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    add_qkv_bias=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    init_method_std=0.02,
)


@dataclass(frozen=True)
class ModelPreset:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def kv_width(self) -> int:  # width of K (or V): query groups x head dim
        return self.num_query_groups * (self.hidden_size // self.num_attention_heads)

    @property
    def params_per_layer(self) -> int:
        """Llama layer: fused QKV, output projection, gated MLP (3 matrices), two RMSNorms."""
        h = self.hidden_size
        return h * (h + 2 * self.kv_width) + h * h + 3 * h * self.ffn_hidden_size + 2 * h

    @property
    def num_params(self) -> int:  # untied input and output embeddings, final norm
        return (self.num_layers * self.params_per_layer + 2 * self.vocab_size * self.hidden_size
                + self.hidden_size)

    def config_kwargs(self) -> Dict[str, Any]:
        return dict(
            LLAMA_ARCH,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            **self.extra,
        )


PRESETS: Dict[str, ModelPreset] = {
    "llama2-7b": ModelPreset(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama2-70b": ModelPreset(80, 8192, 64, 8, 28672, 32000, 4096),
    "tiny": ModelPreset(6, 64, 4, 2, 176, 512, 256),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def longgen_config(preset: str, **overrides) -> LongGenConfig:
    """A LongGenConfig for a named shape; ``overrides`` set any TransformerConfig/LongGen field."""
    return LongGenConfig(**{**get_preset(preset).config_kwargs(), **overrides})
