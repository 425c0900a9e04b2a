"""Megatron's MLP whose fused SwiGLU can be our Triton kernel.

With ``bias_activation_fusion`` (``--bias-swiglu-fusion``) Megatron runs its own
``bias_swiglu_impl`` (torch.compile); ``swiglu_fusion_impl="triton"`` runs
``models/fused_ops.swiglu`` instead, one pass forward and one backward on CUDA.
"""

import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from megatron_longgen.models import fused_ops


def plain_swiglu(mlp) -> bool:
    """The MLP's activation is silu(gate) * up of fc1's [gate, up] halves, nothing more (no
    TE activation, clamp or offset): what the SwiGLU kernel computes."""
    c = mlp.config
    return (c.gated_linear_unit and mlp.activation_func is F.silu
            and not getattr(c, "use_te_activation_func", False)
            and getattr(c, "activation_func_clamp_value", None) is None
            and getattr(c, "glu_linear_offset", 0.0) == 0.0)


def uses_triton_swiglu(config) -> bool:
    """The config asks for our fused SwiGLU (``--bias-swiglu-fusion --swiglu-fusion-impl triton``)."""
    return bool(config.bias_activation_fusion) and getattr(config, "swiglu_fusion_impl", None) == "triton"


class _HideUnknownMLPNotice(logging.Filter):
    """Megatron's TransformerLayer logs "Unknown MLP type ... Using default kwargs" once per layer
    for any MLP class but its own, and then builds it with the default tensor-parallel group:
    for ``LongGenMLP`` that is the group it passes its own MLP, so the notice says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def hide_unknown_mlp_notice() -> None:
    """Called where a layer spec uses ``LongGenMLP`` (idempotent)."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _HideUnknownMLPNotice) for f in logger.filters):
        logger.addFilter(_HideUnknownMLPNotice())


class LongGenMLP(MLP):
    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.triton_swiglu = uses_triton_swiglu(config) and plain_swiglu(self)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.triton_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2F]: gate then up
        if bias is not None:
            intermediate = intermediate + bias
        if intermediate.is_cuda:
            intermediate = fused_ops.swiglu(intermediate)
        else:  # the exact path, as Megatron's unfused glu
            gate, up = torch.chunk(intermediate, 2, dim=-1)
            intermediate = F.silu(gate) * up
        return self.linear_fc2(intermediate)
