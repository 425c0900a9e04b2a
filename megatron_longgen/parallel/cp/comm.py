"""Context-parallel communication: ring P2P, all-to-all-v, and a byte counter.

Every send goes through here so the counter sees it. Counting reads only tensor metadata
(no device sync). On NCCL, the async P2P and all-to-all run on NCCL's own stream and
``wait()`` only orders the compute stream after it, so compute issued between start and wait
overlaps the transfer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger("megatron_longgen.context_parallel")


class CommCounter:
    """Bytes this process sent, per (layer number, kind, phase). A test hook and a log source."""

    def __init__(self):
        self.bytes: Dict[Tuple[int, str, str], int] = defaultdict(int)

    def add(self, layer: int, kind: str, phase: str, nbytes: int) -> None:
        self.bytes[(layer, kind, phase)] += nbytes

    def total(self, layer: Optional[int] = None, kind: Optional[str] = None,
              phase: Optional[str] = None) -> int:
        return sum(n for (l, k, p), n in self.bytes.items()
                   if (layer is None or l == layer) and (kind is None or k == kind)
                   and (phase is None or p == phase))

    def reset(self) -> None:
        self.bytes.clear()


COMM = CommCounter()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Ring:
    """Neighbours of this rank in the CP group's ring (global ranks, as P2P needs)."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, send: torch.Tensor, layer: int, kind: str, phase: str):
        """Send ``send`` to the next rank and receive the same shape from the previous one.
        Returns (receive buffer, requests); the buffer is valid after ``wait``."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        COMM.add(layer, kind, phase, nbytes(send))
        return recv, dist.batch_isend_irecv(ops)


def wait(requests) -> None:
    for r in requests:
        r.wait()


def all_to_all_rows(send: torch.Tensor, send_splits: List[int], recv_splits: List[int], group,
                    layer: int, kind: str, phase: str) -> torch.Tensor:
    """All-to-all-v over dim 0: ``send_splits[d]`` rows go to rank d, ``recv_splits[s]`` come
    from rank s. Split sizes are static plan numbers (Python ints), so NCCL needs no sync."""
    recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
    COMM.add(layer, kind, phase, nbytes(send))  # plans never send a rank to itself
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return recv
