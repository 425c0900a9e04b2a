"""The Triton chunk path of context parallelism (``attend`` / ``attend_backward`` forced to the
``triton`` chunk backend, run by Triton's interpreter on CPU) equals the exact reference on
real CP chunk pairs (cp_pairs.py): ring diagonal and off-diagonal pairs, and the sparse
exchange's compact key layout from a real plan; both patterns, GQA, heterogeneous BlockSparse
heads, packed documents; and the exchange's autograd op on both paths. Also: the compact
layout holds exactly the keys the plan promises, and the tile states the kernels skip by are
conservative."""

import pytest
import torch

from cp_pairs import DOCS, PAIRS, SEQ, SINK, block_sparse, pair_args, pair_tensors
from megatron_longgen.attention.backends import CHUNK_BACKEND_ENV
from megatron_longgen.attention.patterns import EMPTY, FULL, BlockSparsePattern, CausalPattern
from megatron_longgen.parallel.cp import compute
from megatron_longgen.parallel.cp.exchange import compact_keys
from megatron_longgen.parallel.cp.layout import local_positions
from megatron_longgen.parallel.cp.plan import exchange_plan, needed_keys, query_ranges

pytest.importorskip("triton")
from megatron_longgen.parallel.cp.triton_chunk import tile_states  # noqa: E402


def _close(a, b, tol=2e-5):
    assert a.shape == b.shape
    err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
    assert err < tol, err


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv(CHUNK_BACKEND_ENV, "triton")


@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_kernel_path_equals_reference(pair, triton_path):
    q, k, v, dout, other_lse = pair_tensors(pair, seed=len(pair.name))
    args = pair_args(pair)
    out, lse = compute.attend(q, k, v, *args)
    ref_out, ref_lse = compute._reference_forward(q, k, v, *args)
    assert out.dtype == torch.float32
    _close(out, ref_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    _close(lse[finite], ref_lse[finite])
    # Backward with the final LSE and delta: for a ring pair other keys hold softmax mass too.
    final_lse = ref_lse if pair.whole else torch.logaddexp(ref_lse, other_lse)
    delta = torch.randn_like(ref_lse)
    grads = compute.attend_backward(q, k, v, *args, final_lse, dout, delta)
    ref_grads = compute._reference_backward(q, k, v, *args, final_lse, dout, delta)
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        _close(got, ref)


def test_compact_layout_holds_exactly_the_planned_keys():
    """Per KV head: sorted, local keys plus every key the plan says its queries read."""
    pattern, cp, rank, kv_heads = block_sparse(8, 4), 4, 2, (2, 3)
    plan = exchange_plan(pattern, SEQ, cp, rank, kv_heads, DOCS)
    q_pos = local_positions(rank, cp, SEQ)
    index, key_pos = compact_keys(plan, q_pos)
    for h, kv in enumerate(kv_heads):
        row = key_pos[h][key_pos[h] < compute.NO_KEY]
        assert torch.equal(row, row.sort().values)
        needed = needed_keys(pattern, SEQ, query_ranges(rank, cp, SEQ), kv * 2, DOCS)
        needed[q_pos] = True
        assert torch.equal(row, needed.nonzero().flatten())
        local = index[h][: len(row)] < len(kv_heads) * len(q_pos)
        assert int(local.sum()) == len(q_pos)  # local rows are this head's own


@pytest.mark.parametrize("pattern", [CausalPattern(), SINK, block_sparse(4, 2)], ids=["causal", "sink", "block"])
@pytest.mark.parametrize("docs", [None, DOCS], ids=["plain", "packed"])
def test_tile_states_are_conservative(pattern, docs):
    """EMPTY tiles hold no allowed pair and FULL tiles only allowed ones (random sorted key
    sets, so tiles straddle blocks and documents), and some tiles are skipped."""
    g = torch.Generator().manual_seed(0)
    q_pos = torch.arange(200, 296)
    k_pos = torch.stack([torch.randperm(SEQ, generator=g)[:160].sort().values for _ in range(2)])
    heads = torch.arange(4)
    cu = torch.tensor(docs) if docs else None
    offsets = pattern.head_offsets(heads[::2]) if isinstance(pattern, BlockSparsePattern) else torch.zeros(2, dtype=torch.long)
    states, needs_mask = tile_states(pattern, q_pos, k_pos, offsets, 16, 16, cu)
    mask = compute.pair_mask(pattern, q_pos, k_pos, heads, cu)[::2]  # one query head per KV head
    tiles = mask.reshape(2, 6, 16, -1, 16).permute(0, 1, 3, 2, 4).flatten(-2)
    assert not tiles[states == EMPTY].any()
    assert tiles[states == FULL].all()
    assert not needs_mask[states == FULL].any()
    assert (states == EMPTY).any() and (states != EMPTY).any()



def test_chunk_attention_autograd_on_the_kernel_path(monkeypatch):
    """The exchange's layer op (``chunk_attention``: forward + explicit backward with its own
    LSE) on the kernel path gives the reference path's output and q/k/v gradients (one case:
    the kernels themselves are checked on every case above)."""
    pair = next(p for p in PAIRS if p.name == "exchange_block_hetero_tp_slice")
    q, k, v, w, _ = pair_tensors(pair, seed=7)
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv(CHUNK_BACKEND_ENV, backend)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = compute.chunk_attention(*leaves, *pair_args(pair))
        (out * w).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, ref in zip(*results):
        _close(got, ref)
