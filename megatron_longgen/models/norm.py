"""RMSNorm with Megatron's norm signature that also works under sequence parallelism.

Megatron's WrappedTorchNorm refuses sequence parallel; this one marks its weight
``sequence_parallel`` so Megatron all-reduces its gradient across the TP group. With the
config's ``rms_norm_fusion`` (``--rms-norm-fusion``) CUDA inputs run the one-pass Triton
kernels of ``models/fused_ops.py`` (forward and backward); CPU inputs always run torch's.
"""

import torch

from megatron_longgen.models import fused_ops


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self.fused = bool(getattr(config, "rms_norm_fusion", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.is_cuda and x.dtype == self.weight.dtype:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)
