"""RMSNorm with Megatron's norm signature that also works under sequence parallelism.

Megatron's WrappedTorchNorm refuses sequence parallel; this one marks its weight
``sequence_parallel`` so Megatron all-reduces its gradient across the TP group.
"""

import torch


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
