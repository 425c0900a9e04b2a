"""LongGenCoreAttention: Megatron-Core ``core_attention`` for the hybrid stack.

Plugs into ``SelfAttentionSubmodules.core_attention``. Its global, 1-based ``layer_number``
and the LongGenConfig decide whether the layer is full (causal) or sparse; the pattern and
the backend are fixed at construction. Under tensor parallelism each rank holds a slice of
the heads, and patterns are evaluated with the *global* head index so that heterogeneous
heads keep their pattern whatever the layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_longgen.attention.backends import resolve_backend
from megatron_longgen.attention.patterns import CausalPattern


class LongGenCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if not hasattr(config, "layer_pattern"):
            raise TypeError("LongGenCoreAttention needs a LongGenConfig")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"LongGen attention is causal; got attn_mask_type={attn_mask_type}")
        if attention_dropout:
            raise ValueError("LongGen attention has no dropout; set attention_dropout=0")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size, tp_rank = pg_collection.tp.size(), pg_collection.tp.rank()

        self.layer_number = layer_number
        self.pattern = config.layer_pattern(layer_number)
        self.heads_per_rank = divide(config.num_attention_heads, tp_size)
        self.groups_per_rank = divide(config.num_query_groups, tp_size)
        first = tp_rank * self.heads_per_rank
        # Kept on the CPU: patterns are static, so looking them up must not sync the GPU.
        self.global_heads = torch.arange(first, first + self.heads_per_rank)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self._backend_cache = {}
        # A CP-sharded sequence: ring attention (full layers) or pattern-aware K/V exchange.
        self.context_parallel = None
        if config.context_parallel_size > 1:
            from megatron_longgen.parallel.context_parallel import for_core_attention

            self.context_parallel = for_core_attention(
                config, self.pattern, self.global_heads, tp_rank, self.groups_per_rank,
                self.softmax_scale, layer_number, pg_collection)

    @property
    def is_full(self) -> bool:
        return isinstance(self.pattern, CausalPattern)

    def backend_for(self, device: torch.device):
        if device not in self._backend_cache:
            self._backend_cache[device] = resolve_backend(
                self.config.core_attention_backend, self.pattern, device)
        return self._backend_cache[device]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """q [s, b, hq, d], k/v [s, b, hkv, d] (or [t, h, d] when packed as thd) ->
        [s, b, hq * d] (or [t, hq * d])."""
        if attention_bias is not None:
            raise ValueError("LongGen attention does not take an attention bias")
        if self.context_parallel is not None:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = self.context_parallel(q, k, v, packed_seq_params).permute(2, 0, 1, 3)
            return out.reshape(out.shape[0], out.shape[1], -1)
        cu_seqlens = None
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None:
            cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
            if cu_kv is not None and not torch.equal(cu_q, cu_kv):
                raise ValueError("self-attention needs cu_seqlens_q == cu_seqlens_kv")
            cu_seqlens = cu_q
        if packed:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if packed_seq_params is not None and query.shape[1] != 1:
            raise ValueError("packed documents (cu_seqlens) need micro-batch size 1")
        # Megatron's [s, b, h, d] -> the kernels' [b, h, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        backend = self.backend_for(q.device)
        out = backend.fn(q, k, v, pattern=self.pattern, heads=self.global_heads,
                         scale=self.softmax_scale, cu_seqlens=cu_seqlens)
        out = out.permute(2, 0, 1, 3)  # [s, b, h, d]
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out.squeeze(1) if packed else out
