"""LongGenConfig: Megatron-Core's TransformerConfig plus the LongGen fields.

This dataclass is the one source of truth for the hybrid stack: which layers keep full
attention, which sparse pattern the others use and its parameters, the RoPE base, and which
attention backend runs it. Patterns are built from it with ``layer_pattern``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.utils.cli import UsageError

from megatron_longgen.attention.patterns import (
    VERT_STRIDE_RULES,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    Pattern,
)

SPARSE_PATTERNS = ("attn_sink", "block_sparse")
PLACEMENTS = ("middle", "top", "bottom", "interleave", "all", "none")
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "flex", "triton", "fa4")
# TransformerConfig.cross_entropy_fusion_impl: Megatron's two, and "linear" (Megatron-LM's name
# for output layer + loss in one op), which LongGenGPTModel implements in chunks.
CROSS_ENTROPY_FUSION_IMPLS = ("native", "te", "linear")
# Which fused SwiGLU bias_activation_fusion runs: Megatron's bias_swiglu_impl or our kernel.
SWIGLU_FUSION_IMPLS = ("native", "triton")


def full_attention_layer_indices(
    num_layers: int, placement: str = "middle", ratio: float = 1 / 3
) -> Tuple[int, ...]:
    """0-based indices of the full-attention layers for a named placement.

    ``round(num_layers * ratio)`` layers are full: the middle ones (default), the top (last)
    ones, the bottom (first) ones, or spread evenly (``interleave``).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"full_attention_placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "all":
        return tuple(range(num_layers))
    if placement == "none":
        return ()
    n_full = int(math.floor(num_layers * ratio + 0.5))
    if placement == "bottom":
        return tuple(range(n_full))
    if placement == "top":
        return tuple(range(num_layers - n_full, num_layers))
    if placement == "middle":
        start = (num_layers - n_full) // 2
        return tuple(range(start, start + n_full))
    # interleave: the centre of each of n_full equal slices of the stack.
    return tuple(int((i + 0.5) * num_layers / n_full) for i in range(n_full))


@dataclass
class LongGenFields:
    """The hybrid-attention settings of a LongGen model: pattern, its parameters, placement.

    The one definition of these fields and their defaults: LongGenConfig inherits them and
    the checkpoint tools record them.
    """

    sparse_attention: str = "attn_sink"
    """Pattern of the sparse layers: ``attn_sink`` or ``block_sparse``."""

    sink_tokens: int = 64
    """AttnSink: number of leading tokens every query reads."""

    sliding_window_size: int = 4096
    """AttnSink: number of most recent tokens (the query included) every query reads. Named
    apart from TransformerConfig.window_size, which is Megatron's own (left, right) window."""

    sparse_block_size: int = 64
    """BlockSparse: tokens per block (a power of two, at least 16, for the GPU kernels)."""

    local_blocks: int = 16
    """BlockSparse: most recent key blocks each query block reads (its own included)."""

    vert_stride: int = 8
    """BlockSparse: a head reads one key block in every ``vert_stride`` (besides its local
    blocks), or more with ``vert_stride_rule=cover`` and fewer query groups."""

    homo_head: bool = False
    """BlockSparse: True gives every head the same vertical blocks; False shifts them per
    query group (see ``vert_stride_rule``)."""

    vert_stride_rule: str = "cover"
    """BlockSparse heterogeneous heads: ``cover`` lets each query group read ``ceil(vert_stride
    / num_query_groups)`` blocks in every ``vert_stride`` so that the groups together read every
    block; ``legacy`` gives each group one (with fewer groups than ``vert_stride`` some blocks
    are read by no head). Settings recorded without this field mean ``legacy``."""

    full_attention_layers: Optional[List[int]] = None
    """Explicit 0-based indices of the full-attention layers; overrides the placement."""

    full_attention_placement: str = "middle"
    """``middle``, ``top``, ``bottom``, ``interleave``, ``all`` or ``none``."""

    full_attention_ratio: float = 1 / 3
    """Fraction of layers kept full by a named placement."""


# What a LongGenFields field meant in checkpoints and exports recorded before it existed.
UNRECORDED_FIELDS = {"vert_stride_rule": "legacy"}


def with_unrecorded_fields(recorded: Dict[str, Any]) -> Dict[str, Any]:
    """Recorded LongGen settings (a record, a saved train_config, an HF config) with the values
    that fields missing from them meant when they were written."""
    return {**UNRECORDED_FIELDS, **recorded}


def longgen_fields(obj) -> Dict[str, Any]:
    """The LongGenFields values of any object that has them (a config, a record, args)."""
    return {f.name: getattr(obj, f.name) for f in fields(LongGenFields)}


@dataclass
class LongGenConfig(TransformerConfig, LongGenFields):
    """TransformerConfig with the LongGen hybrid-attention fields."""

    rotary_base: float = 10000.0
    """RoPE base; length extension raises it (e.g. 10000 -> 500000 for 4K -> 128K)."""

    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer (Llama-2/3.1-8B+); False ties them (Llama-3.2
    1B/3B, small Qwen2.5): Megatron's ``share_embeddings_and_output_weights``."""

    use_rope_scaling: bool = False
    """Llama-3.x RoPE scaling of the inverse frequencies, with the four parameters below.
    Megatron-Core 0.16.1's RotaryEmbedding takes only the factor (the others hard-coded to
    1, 4 and 8192); ``build_longgen_model`` applies all four."""

    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192

    core_attention_backend: str = "auto"
    """``auto``, ``reference`` (exact, pure torch), ``sdpa`` (full layers), ``flex``, ``triton``,
    ``fa4`` (flash-attn-4, optional: full and AttnSink layers on sm90+ GPUs)."""

    linear_cross_entropy_chunk_mb: float = 512.0
    """With ``cross_entropy_loss_fusion`` and ``cross_entropy_fusion_impl="linear"``: MiB of
    fp32 logits one chunk of tokens may hold per TP rank (tokens = this / (vocab / TP x 4 B)).
    The loss's logits then take at most 1.5x this (the bf16 product beside its fp32 copy),
    whatever the sequence length."""

    rms_norm_fusion: bool = False
    """RMSNorm of CUDA inputs as the one-pass Triton kernels of ``models/fused_ops.py``
    (forward and backward); CPU inputs run torch.nn.RMSNorm regardless."""

    swiglu_fusion_impl: str = "triton"
    """With ``bias_activation_fusion``: ``triton``, the one-pass kernel of
    ``models/fused_ops.py``, or ``native``, Megatron's ``bias_swiglu_impl`` (torch.compile)."""

    def __post_init__(self):
        if self.apply_rope_fusion:  # TransformerConfig checks that a fused RoPE is installed
            from megatron_longgen.models.fused_ops import install_fused_rope

            install_fused_rope()
        super().__post_init__()
        self._validate_longgen()

    def _validate_longgen(self):
        def fail(msg):
            raise UsageError(f"LongGenConfig: {msg}")

        if self.sparse_attention not in SPARSE_PATTERNS:
            fail(f"sparse_attention must be one of {SPARSE_PATTERNS}, got {self.sparse_attention!r}")
        if self.sink_tokens < 0:
            fail(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.sliding_window_size < 1:
            fail(f"sliding_window_size must be >= 1, got {self.sliding_window_size}")
        b = self.sparse_block_size
        if b < 16 or b & (b - 1):
            fail(f"sparse_block_size must be a power of two >= 16, got {b}")
        if self.local_blocks < 1:
            fail(f"local_blocks must be >= 1 (a block reads itself), got {self.local_blocks}")
        if self.vert_stride < 1:
            fail(f"vert_stride must be >= 1, got {self.vert_stride}")
        if self.vert_stride_rule not in VERT_STRIDE_RULES:
            fail(f"vert_stride_rule must be one of {VERT_STRIDE_RULES}, got {self.vert_stride_rule!r}")
        if (self.sparse_attention == "block_sparse" and not self.homo_head
                and self.vert_stride_rule == "cover" and self.num_query_groups == 1
                and self.vert_stride > 1):
            fail("block_sparse with one query group, heterogeneous heads and vert_stride_rule "
                 "'cover' reads every key block (full attention); set homo_head to read every "
                 f"vert_stride={self.vert_stride}-th block")
        if self.full_attention_placement not in PLACEMENTS:
            fail(
                f"full_attention_placement must be one of {PLACEMENTS}, "
                f"got {self.full_attention_placement!r}"
            )
        if not 0.0 <= self.full_attention_ratio <= 1.0:
            fail(f"full_attention_ratio must be in [0, 1], got {self.full_attention_ratio}")
        if self.full_attention_layers is not None:
            layers = list(self.full_attention_layers)
            bad = [i for i in layers if not 0 <= int(i) < self.num_layers]
            if bad:
                fail(f"full_attention_layers {bad} out of range for num_layers={self.num_layers} "
                     "(indices are 0-based)")
            if len(set(layers)) != len(layers):
                fail(f"full_attention_layers has duplicates: {layers}")
        if self.rotary_base <= 0:
            fail(f"rotary_base must be > 0, got {self.rotary_base}")
        if self.use_rope_scaling and not (
                self.rope_scaling_factor > 0
                and 0 < self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor
                and self.rope_scaling_original_max_position_embeddings > 0):
            fail("llama3 RoPE scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor "
                 f"and original_max_position_embeddings > 0, got {self.rope_scaling_factor}, "
                 f"{self.rope_scaling_low_freq_factor}, {self.rope_scaling_high_freq_factor}, "
                 f"{self.rope_scaling_original_max_position_embeddings}")
        if self.core_attention_backend not in ATTENTION_BACKENDS:
            fail(f"core_attention_backend must be one of {ATTENTION_BACKENDS}, "
                 f"got {self.core_attention_backend!r}")
        if self.attention_dropout != 0.0:
            fail(f"attention_dropout must be 0 (LongGen attention has no dropout; Llama uses "
                 f"none), got {self.attention_dropout}")
        if self.cross_entropy_fusion_impl not in CROSS_ENTROPY_FUSION_IMPLS:
            fail(f"cross_entropy_fusion_impl must be one of {CROSS_ENTROPY_FUSION_IMPLS}, "
                 f"got {self.cross_entropy_fusion_impl!r}")
        if self.swiglu_fusion_impl not in SWIGLU_FUSION_IMPLS:
            fail(f"swiglu_fusion_impl must be one of {SWIGLU_FUSION_IMPLS}, "
                 f"got {self.swiglu_fusion_impl!r}")
        if self.linear_cross_entropy_chunk_mb <= 0:
            fail(f"linear_cross_entropy_chunk_mb must be > 0, got {self.linear_cross_entropy_chunk_mb}")
        if self.uses_linear_cross_entropy and self.mtp_num_layers:
            fail("cross_entropy_fusion_impl='linear' does not cover multi-token prediction "
                 f"(mtp_num_layers={self.mtp_num_layers}); use 'native' or drop MTP")
        if self.num_attention_heads % self.num_query_groups:
            fail(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                 f"num_query_groups={self.num_query_groups}")

    # ---- derived views (never stored, so the fields above stay the only truth) ----

    @property
    def uses_linear_cross_entropy(self) -> bool:
        """The loss comes from ``linear_cross_entropy`` (no whole-sequence logits)."""
        return self.cross_entropy_loss_fusion and self.cross_entropy_fusion_impl == "linear"

    @property
    def full_layer_indices(self) -> Tuple[int, ...]:
        """0-based indices of the full-attention layers."""
        if self.full_attention_layers is not None:
            return tuple(sorted(int(i) for i in self.full_attention_layers))
        return full_attention_layer_indices(
            self.num_layers, self.full_attention_placement, self.full_attention_ratio
        )

    def is_full_layer(self, layer_number: int) -> bool:
        """``layer_number`` is Megatron's: 1-based and global (pipeline offset included)."""
        return (layer_number - 1) in self.full_layer_indices

    def sparse_pattern(self) -> Pattern:
        if self.sparse_attention == "attn_sink":
            return AttnSinkPattern(self.sink_tokens, self.sliding_window_size)
        return BlockSparsePattern(
            block_size=self.sparse_block_size,
            local_blocks=self.local_blocks,
            vert_stride=self.vert_stride,
            homo_head=self.homo_head,
            num_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            vert_stride_rule=self.vert_stride_rule,
        )

    def sparse_reads_everything(self, seq_length: int) -> Optional[str]:
        """Why the sparse layers would read every earlier token at ``seq_length`` (so that the
        hybrid silently trains an all-full model), or None when they are sparse there."""
        if len(self.full_layer_indices) == self.num_layers:
            return None  # no sparse layers
        if self.sparse_attention == "attn_sink":
            seen = self.sink_tokens + self.sliding_window_size
            if seen >= seq_length:
                fix = (f"use a window below {seq_length - self.sink_tokens}"
                       if seq_length - self.sink_tokens > 1 else "use fewer sink tokens")
                return (f"--sink-tokens {self.sink_tokens} + --sliding-window-size "
                        f"{self.sliding_window_size} = {seen} >= --seq-length {seq_length}: every "
                        f"query of the sparse layers sees every key; {fix} (LongGen trains "
                        f"64 sinks + a 4K window at 128K)")
            return None
        local = self.local_blocks * self.sparse_block_size
        if local >= seq_length:
            return (f"--local-blocks {self.local_blocks} x --sparse-block-size "
                    f"{self.sparse_block_size} = {local} >= --seq-length {seq_length}: every query "
                    f"block of the sparse layers reads every key block; use --local-blocks below "
                    f"{-(-seq_length // self.sparse_block_size)}")
        if self.vert_stride == 1:
            return ("--vert-stride 1 makes every key block a vertical one that all later blocks "
                    "read, i.e. full attention; use a stride >= 2 (LongGen uses 8)")
        return None

    def layer_pattern(self, layer_number: int) -> Pattern:
        """The attention pattern of Megatron layer ``layer_number`` (1-based, global)."""
        return CausalPattern() if self.is_full_layer(layer_number) else self.sparse_pattern()
