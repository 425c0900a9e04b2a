"""Megatron-Core layer specs of the hybrid LongGen stack.

Every layer is a Llama layer built from Megatron-Core's local modules; the core attention
is ours, the RMSNorm a thin subclass that can run a fused Triton kernel, and so is the MLP
when the config asks for our fused SwiGLU. ``LongGenCoreAttention`` reads its layer number to act full or sparse, so
the per-layer list below only has to be sliced per pipeline stage.
"""

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_longgen.attention.core_attention import LongGenCoreAttention
from megatron_longgen.models.mlp import LongGenMLP, hide_unknown_mlp_notice, uses_triton_swiglu
from megatron_longgen.models.norm import RMSNorm


def longgen_layer_spec(qk_layernorm: bool = False, triton_swiglu: bool = False) -> ModuleSpec:
    """One Llama layer (RMSNorm, RoPE attention with GQA, SwiGLU MLP) with LongGen attention;
    ``qk_layernorm``: per-head RMSNorm on queries and keys before RoPE (Qwen3);
    ``triton_swiglu``: the MLP is ``LongGenMLP`` (our fused SwiGLU), else Megatron's own.
    (Megatron's TransformerLayer logs "Unknown MLP type" for a subclass and builds it with
    the default tensor-parallel group, the one it would pass: that notice is hidden.)"""
    qk_norm = RMSNorm if qk_layernorm else IdentityOp
    if triton_swiglu:
        hide_unknown_mlp_notice()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=LongGenCoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=LongGenMLP if triton_swiglu else MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def longgen_block_spec(
    config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> TransformerBlockSubmodules:
    """Per-layer specs of the layers this pipeline stage (and virtual stage) builds."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[longgen_layer_spec(config.qk_layernorm, uses_triton_swiglu(config))
                     for _ in range(num_layers)], layer_norm=RMSNorm)
