"""The Triton chunk path of context parallelism (``attend`` / ``attend_backward`` forced to the
``triton`` chunk backend, run by Triton's interpreter on CPU) equals the exact reference on
real CP chunk pairs: ring diagonal and off-diagonal pairs, and the sparse exchange's compact
key layout from a real plan; both patterns, GQA, heterogeneous BlockSparse heads, packed
documents. Also: the compact layout holds exactly the keys the plan promises, and the tile
states the kernels skip by are conservative."""

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

from megatron_longgen.attention.backends import CHUNK_BACKEND_ENV
from megatron_longgen.attention.patterns import EMPTY, FULL, AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.parallel.cp import compute
from megatron_longgen.parallel.cp.exchange import compact_keys
from megatron_longgen.parallel.cp.layout import local_positions
from megatron_longgen.parallel.cp.plan import exchange_plan, needed_keys, query_ranges

pytest.importorskip("triton")
from megatron_longgen.parallel.cp.triton_chunk import tile_states  # noqa: E402

SEQ = 384
DOCS = (0, 40, 330, 384)  # a document across chunks 1..6 of CP 4, edges inside chunks
HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5
SINK = AttnSinkPattern(4, 40)


def _bs(num_heads, groups, homo=False):
    return BlockSparsePattern(block_size=16, local_blocks=2, vert_stride=3, homo_head=homo,
                              num_heads=num_heads, num_query_groups=groups)


@dataclass(frozen=True)
class Pair:
    name: str
    pattern: object
    q_pos: torch.Tensor
    k_pos: torch.Tensor  # [sk] or [hkv, sk]
    heads: Tuple[int, ...] = (0, 1, 2, 3)
    kv_heads: int = 2
    docs: Optional[Tuple[int, ...]] = None
    whole: bool = False  # the pair holds every key its queries read (exchange): final LSE = its own


def _chunk(i, c):
    return torch.arange(i * c, (i + 1) * c)


def _ring(name, q_chunk, k_chunk, docs=None):
    c = SEQ // 8  # CP 4: rank 1 holds chunks 1 and 6
    return Pair(name, CausalPattern(), _chunk(q_chunk, c), _chunk(k_chunk, c), docs=docs)


def _exchange(name, pattern, cp, rank, heads=(0, 1, 2, 3), kv_heads=(0, 1), docs=None):
    plan = exchange_plan(pattern, SEQ, cp, rank, kv_heads, docs)
    q_pos = local_positions(rank, cp, SEQ)
    _, key_pos = compact_keys(plan, q_pos)
    return Pair(name, pattern, q_pos, key_pos, heads, len(kv_heads), docs, whole=True)


PAIRS = [
    _ring("ring_diagonal", 6, 6),
    _ring("ring_off_diagonal", 6, 1),
    _ring("ring_diagonal_packed", 6, 6, DOCS),
    _ring("ring_off_diagonal_packed", 6, 1, DOCS),
    _exchange("exchange_sink_gqa", SINK, 4, 1),
    _exchange("exchange_sink_packed", SINK, 2, 1, docs=DOCS),
    _exchange("exchange_block_homo", _bs(4, 2, homo=True), 4, 2),
    # Heterogeneous heads: the second TP rank's 4 of 8 heads (KV groups 2, 3 of 4).
    _exchange("exchange_block_hetero_tp_slice", _bs(8, 4), 4, 2, heads=(4, 5, 6, 7), kv_heads=(2, 3)),
    _exchange("exchange_block_hetero_packed", _bs(4, 2), 2, 0, docs=DOCS),
]


def _tensors(pair: Pair, seed: int):
    g = torch.Generator().manual_seed(seed)
    hq, sq, sk = len(pair.heads), len(pair.q_pos), pair.k_pos.shape[-1]
    q = torch.randn(1, hq, sq, HEAD_DIM, generator=g)
    k = torch.randn(1, pair.kv_heads, sk, HEAD_DIM, generator=g)
    v = torch.randn(1, pair.kv_heads, sk, HEAD_DIM, generator=g)
    dout = torch.randn(1, hq, sq, HEAD_DIM, generator=g)
    other_lse = torch.randn(1, hq, sq, generator=g)  # the softmax mass of other pairs' keys
    return q, k, v, dout, other_lse


def _args(pair: Pair):
    cu = torch.tensor(pair.docs) if pair.docs else None
    return pair.q_pos, pair.k_pos, pair.pattern, torch.tensor(pair.heads), SCALE, cu


def _close(a, b, tol=2e-5):
    assert a.shape == b.shape
    err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
    assert err < tol, err


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv(CHUNK_BACKEND_ENV, "triton")


@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_kernel_path_equals_reference(pair, triton_path):
    q, k, v, dout, other_lse = _tensors(pair, seed=len(pair.name))
    args = _args(pair)
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
    pattern, cp, rank, kv_heads = _bs(8, 4), 4, 2, (2, 3)
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


@pytest.mark.parametrize("pattern", [CausalPattern(), SINK, _bs(4, 2)], ids=["causal", "sink", "block"])
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
