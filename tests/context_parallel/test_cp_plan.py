"""The per-rank exchange plan equals the whole CP x CP plan built from the token mask (the
former builder, kept here as the oracle): same rows, same order, same slots, for every rank."""

import pytest
import torch

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, token_mask
from megatron_longgen.parallel.cp.layout import local_positions, owner_and_index
from megatron_longgen.parallel.cp.plan import exchange_bytes_sent, exchange_plan, representative_heads

SEQ = 128
DOCS = (0, 13, 40, 77, 100, 128)  # boundaries inside chunks at CP 2, 4 and 8


def full_plan_oracle(pattern, seq_len, cp_size, kv_heads, docs):
    """send[s][d], slot[d][s], extra[d] of every rank pair, from [CP, heads, L] token-mask needs."""
    c2 = seq_len // cp_size
    heads = representative_heads(pattern, kv_heads)
    cu = torch.tensor(docs) if docs else None
    owner, index = owner_and_index(torch.arange(seq_len), cp_size, seq_len)
    needs = torch.zeros(cp_size, len(heads), seq_len, dtype=torch.bool)
    for i, h in enumerate(heads):
        mask = token_mask(pattern, seq_len, [h], cu, num_heads=getattr(pattern, "num_heads", 1))[-1]
        for r in range(cp_size):
            needs[r, i] = mask[local_positions(r, cp_size, seq_len)].any(0) & (owner != r)
    send = [[None] * cp_size for _ in range(cp_size)]
    slot = [[None] * cp_size for _ in range(cp_size)]
    extra = []
    for d in range(cp_size):
        columns = needs[d].any(0).nonzero().flatten()
        extra.append(columns)
        column = torch.full((seq_len,), -1, dtype=torch.long)
        column[columns] = torch.arange(len(columns))
        for s in range(cp_size):
            h, pos = (needs[d] & (owner == s)).nonzero(as_tuple=True)  # head-major, pos ascending
            send[s][d] = h * c2 + index[pos]
            slot[d][s] = h * len(columns) + column[pos]
    return send, slot, extra


def _bs(heads, groups, stride, homo=False, rule="cover", local=2):
    return BlockSparsePattern(4, local, stride, homo, heads, groups, vert_stride_rule=rule)


CASES = {  # pattern, this TP rank's KV heads
    "sink": (AttnSinkPattern(3, 5), (0, 1)),
    "sink_window_over_chunks": (AttnSinkPattern(2, 37), (0,)),
    "block_homo": (_bs(4, 2, 3, homo=True), (0, 1)),
    "block_hetero_gqa": (_bs(8, 4, 4), (0, 1, 2, 3)),
    "block_hetero_tp_slice": (_bs(8, 4, 4), (2, 3)),
    "block_cover_few_groups": (_bs(6, 3, 8), (0, 1, 2)),
    "block_legacy_few_groups": (_bs(4, 2, 8, rule="legacy"), (0, 1)),
    "block_more_groups_than_stride": (_bs(8, 8, 3, local=1), tuple(range(8))),
}


@pytest.mark.parametrize("docs", [None, DOCS], ids=["one_doc", "packed"])
@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_rank_plan_equals_full_plan(case, cp, docs):
    pattern, kv_heads = CASES[case]
    send, slot, extra = full_plan_oracle(pattern, SEQ, cp, kv_heads, docs)
    moved = 0
    for r in range(cp):
        plan = exchange_plan.__wrapped__(pattern, SEQ, cp, r, kv_heads, docs)
        assert plan.send_splits == tuple(len(send[r][d]) for d in range(cp)), r
        assert plan.recv_splits == tuple(len(slot[r][s]) for s in range(cp)), r
        assert torch.equal(plan.send_index, torch.cat([send[r][d] for d in range(cp)])), r
        assert torch.equal(plan.recv_slot, torch.cat([slot[r][s] for s in range(cp)])), r
        assert torch.equal(plan.extra_pos, extra[r]), r
        moved += sum(plan.send_splits)
    assert moved > 0


def test_calculator_agrees_with_plan():
    pattern = _bs(8, 4, 4)
    for cp in (2, 4, 8):
        calc = exchange_bytes_sent(pattern, SEQ, cp, 2, 4, 8, 4)
        assert calc == [exchange_plan(pattern, SEQ, cp, r, (0, 1, 2, 3)).bytes_sent(2, 8, 4)
                        for r in range(cp)]


def test_plan_is_cached_per_layout():
    pattern = AttnSinkPattern(3, 5)
    assert exchange_plan(pattern, SEQ, 4, 1, (0,), DOCS) is exchange_plan(pattern, SEQ, 4, 1, (0,), DOCS)
    assert exchange_plan(pattern, SEQ, 4, 1, (0,)) is not exchange_plan(pattern, SEQ, 4, 1, (0,), DOCS)
