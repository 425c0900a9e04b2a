"""Where each token lives under context parallelism, and the batch sharding that puts it there.

Megatron's load-balanced split: the sequence of length L is cut into 2*CP equal chunks and CP
rank r holds chunks r and 2*CP-1-r (an early and a late chunk, so causal work is balanced).
Everything here is static arithmetic on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron.core.packed_seq_params import PackedSeqParams


def check_seq_len(seq_len: int, cp_size: int) -> int:
    """Chunk length L / (2*CP); a clear error when L does not split that way."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"context parallelism splits the sequence into 2 x CP = {2 * cp_size} equal chunks, "
            f"but the sequence length {seq_len} is not divisible by {2 * cp_size}; pad the "
            f"sequence or change --seq-length / --context-parallel-size")
    return seq_len // (2 * cp_size)


def chunk_ids(cp_rank: int, cp_size: int) -> Tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_positions(cp_rank: int, cp_size: int, seq_len: int) -> torch.Tensor:
    """Global positions [2c] of the tokens rank ``cp_rank`` holds, in its local order."""
    c = check_seq_len(seq_len, cp_size)
    first, second = chunk_ids(cp_rank, cp_size)
    return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])


def owner_and_index(pos: torch.Tensor, cp_size: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CP rank holding each global position, and its index in that rank's local order."""
    c = check_seq_len(seq_len, cp_size)
    chunk = pos // c
    late = chunk >= cp_size
    owner = torch.where(late, 2 * cp_size - 1 - chunk, chunk)
    index = pos % c + late.long() * c
    return owner, index


def doc_relative(pos: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Document id and document-relative position of global positions (one document if None)."""
    if cu_seqlens is None:
        return torch.zeros_like(pos), pos
    cu = cu_seqlens.to(device=pos.device, dtype=torch.long)
    doc = torch.bucketize(pos, cu[1:], right=True)
    return doc, pos - cu[doc]


@dataclass
class ContextParallelPackedParams(PackedSeqParams):
    """Packed documents under CP. ``cu_seqlens_q/kv`` are the document boundaries of the *whole*
    (unsharded) sequence, so every rank can place any global position in its document.

    ``qkv_format`` stays ``sbhd``: the model then applies RoPE at global positions, sliced per
    CP rank as for an unpacked batch. Attention never crosses a document, and RoPE scores depend
    only on q - k, so that equals RoPE restarted per document; the sparse patterns, which do
    depend on absolute positions, use the document-relative ones derived from ``cu_seqlens``.
    """

    doc_ids: Optional[torch.Tensor] = None  # [2c] document of each local token
    doc_positions: Optional[torch.Tensor] = None  # [2c] its position within the document


def shard_batch_for_context_parallel(
    batch: Dict[str, torch.Tensor],
    packed_seq_params: Optional[PackedSeqParams] = None,
    cp_size: Optional[int] = None,
    cp_rank: Optional[int] = None,
) -> Tuple[Dict[str, torch.Tensor], Optional[PackedSeqParams]]:
    """This CP rank's share of a [b, s, ...] batch (chunks r and 2*CP-1-r along dim 1), and the
    packed-document params rewritten for CP (see ContextParallelPackedParams).

    ``packed_seq_params`` must describe the whole sequence (compute it before sharding).
    """
    if cp_size is None or cp_rank is None:
        from megatron.core import parallel_state

        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
    seq_lens = {v.shape[1] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 2}
    if len(seq_lens) != 1:
        raise ValueError(f"batch tensors disagree on the sequence length: {sorted(seq_lens)}")
    seq_len = seq_lens.pop()
    if cp_size == 1:
        return batch, packed_seq_params
    c = check_seq_len(seq_len, cp_size)
    first, second = chunk_ids(cp_rank, cp_size)

    def shard(v):
        if not isinstance(v, torch.Tensor) or v.dim() < 2:
            return v
        return torch.cat([v[:, first * c:(first + 1) * c], v[:, second * c:(second + 1) * c]], dim=1)

    out = {k: shard(v) for k, v in batch.items()}
    if packed_seq_params is None:
        return out, None
    if packed_seq_params.cu_seqlens_kv is not None and not torch.equal(
            packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv):
        raise ValueError("context parallelism needs cu_seqlens_q == cu_seqlens_kv (self-attention)")
    cu = packed_seq_params.cu_seqlens_q
    if int(cu[-1]) != seq_len:
        raise ValueError(f"packed cu_seqlens end at {int(cu[-1])}, not at the sequence length {seq_len}: "
                         "compute them on the whole sequence, before sharding")
    pos = local_positions(cp_rank, cp_size, seq_len).to(cu.device)
    doc, rel = doc_relative(pos, cu)
    return out, ContextParallelPackedParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        max_seqlen_q=seq_len, max_seqlen_kv=seq_len,  # RoPE tables must cover the whole sequence
        doc_ids=doc, doc_positions=rel)
