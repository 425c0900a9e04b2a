"""Named model shapes: Llama-2 7B and 70B, Llama-3.1 8B and 70B, Qwen2.5-7B, Qwen3-8B,
Mistral-7B, and a tiny one for tests and the CPU quickstart.

A preset is the model's shape and architecture options; a converted checkpoint under
``--load`` brings its own (its record), and the preset only names the shape of a run.
"""

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
    def head_dim(self) -> int:  # kv_channels when set (Qwen3), else hidden / heads
        return self.extra.get("kv_channels") or self.hidden_size // self.num_attention_heads

    @property
    def kv_width(self) -> int:  # width of K (or V): query groups x head dim
        return self.num_query_groups * self.head_dim

    @property
    def params_per_layer(self) -> int:
        """Llama layer: fused QKV (and its bias, Qwen2), output projection, gated MLP
        (3 matrices), two RMSNorms (and the q/k norms, Qwen3)."""
        h, q = self.hidden_size, self.num_attention_heads * self.head_dim
        qkv = q + 2 * self.kv_width
        extra = (qkv if self.extra.get("add_qkv_bias") else 0) + (
            2 * self.head_dim if self.extra.get("qk_layernorm") else 0)
        return h * qkv + q * h + 3 * h * self.ffn_hidden_size + 2 * h + extra

    @property
    def num_params(self) -> int:  # input and (unless tied) output embeddings, final norm
        tables = 2 if self.extra.get("untie_embeddings_and_output_weights", True) else 1
        return (self.num_layers * self.params_per_layer + tables * self.vocab_size * self.hidden_size
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


# Llama-3.1/3.2/3.3: RoPE base 500000 with llama3 scaling (factor 8 over an 8K original).
LLAMA3_ROPE: Dict[str, Any] = dict(
    rotary_base=500000.0, use_rope_scaling=True, rope_scaling_factor=8.0,
    rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
    rope_scaling_original_max_position_embeddings=8192)

PRESETS: Dict[str, ModelPreset] = {
    "llama2-7b": ModelPreset(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama2-70b": ModelPreset(80, 8192, 64, 8, 28672, 32000, 4096),
    "llama3.1-8b": ModelPreset(32, 4096, 32, 8, 14336, 128256, 131072, LLAMA3_ROPE),
    "llama3.1-70b": ModelPreset(80, 8192, 64, 8, 28672, 128256, 131072, LLAMA3_ROPE),
    # Qwen2.5-7B: QKV biases, untied (the 0.5B-3B sizes tie), RMSNorm eps 1e-6.
    "qwen2.5-7b": ModelPreset(28, 3584, 28, 4, 18944, 152064, 32768, dict(
        add_qkv_bias=True, rotary_base=1000000.0, layernorm_epsilon=1e-6)),
    # Qwen3-8B: per-head q/k RMSNorm, head_dim 128 set explicitly (kv_channels).
    "qwen3-8b": ModelPreset(36, 4096, 32, 8, 12288, 151936, 32768, dict(
        qk_layernorm=True, kv_channels=128, rotary_base=1000000.0, layernorm_epsilon=1e-6)),
    # Mistral-7B-v0.1 (its native 4096-token sliding window is a LongGen pattern, not a shape).
    "mistral-7b": ModelPreset(32, 4096, 32, 8, 14336, 32000, 8192),
    "tiny": ModelPreset(6, 64, 4, 2, 176, 512, 256),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def longgen_config(preset: str, **overrides) -> LongGenConfig:
    """A LongGenConfig for a named shape; ``overrides`` set any TransformerConfig/LongGen field."""
    return LongGenConfig(**{**get_preset(preset).config_kwargs(), **overrides})
