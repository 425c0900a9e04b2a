"""What the training loop needs beyond the data package: packed-document parameters for
Megatron and random-token data for ``--mock-data``."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron.core.packed_seq_params import PackedSeqParams


def packed_seq_params_from_eod(tokens: torch.Tensor, eod_id: int) -> Optional[PackedSeqParams]:
    """Document boundaries (after each EOD) of a [1, s] sample as THD packed-sequence params,
    so attention stays inside each document and RoPE positions restart per document."""
    if tokens.shape[0] != 1:
        raise ValueError("--reset-attention-mask (packed documents) needs --micro-batch-size 1")
    seq = tokens.shape[1]
    ends = (tokens[0] == eod_id).nonzero().flatten() + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=tokens.device), ends[ends < seq],
                        torch.full((1,), seq, dtype=torch.long, device=tokens.device)])
    cu = bounds.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class RandomTokenDataset:
    """``--mock-data``: seeded random token sequences, for benchmarks and smoke tests."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(self.seq_length), "position_ids": torch.arange(self.seq_length)}
