"""Context-parallel attention layers on spawned gloo ranks equal the unsharded layer, and the
sparse layers send exactly the plan's bytes, far fewer than a ring; static plans are exact."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cp_cases import CASES, DOCS, SEQ, layer_worker
from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern, token_mask
from megatron_longgen.parallel.context_parallel import (
    exchange_bytes_sent,
    needed_keys,
    ring_bytes_sent,
    shard_batch_for_context_parallel,
)
from megatron_longgen.parallel.cp.layout import local_positions
from megatron_longgen.parallel.cp.plan import query_ranges

TOL = 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def layer_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(layer_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return world, [json.loads((out / f"layer_cp{world}_rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_layer_matches_unsharded(layer_results, case):
    world, ranks = layer_results
    for rank, res in enumerate(ranks):
        errs = {n: res[case][n] for n in ("out", "dq", "dk", "dv")}
        assert max(errs.values()) < TOL, (world, rank, errs)
        if case in SINK_CASES:  # on CPU, auto keeps the AttnSink exchange on the chunk path
            assert not res[case]["sink_window"]


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def sink_window_results(request, tmp_path_factory):
    """The same layers with the AttnSink exchange forced onto the sink-window path (its exact
    dense-pair reference on CPU) wherever the layout allows it."""
    world, backend = request.param, "dense_reference"
    out = tmp_path_factory.mktemp(f"cp{world}sw")
    mp.spawn(layer_worker, args=(world, _free_port(), str(out), backend), nprocs=world, join=True)
    return world, [json.loads((out / f"layer_cp{world}{backend}_rank{r}.json").read_text()) for r in range(world)]


SINK_CASES = [c.name for c in CASES if isinstance(c.pattern, AttnSinkPattern)]


@pytest.mark.parametrize("case", SINK_CASES)
def test_sink_window_path_matches_unsharded(sink_window_results, case):
    world, ranks = sink_window_results
    for rank, res in enumerate(ranks):
        errs = {n: res[case][n] for n in ("out", "dq", "dk", "dv")}
        assert max(errs.values()) < TOL, (world, rank, errs)
        # Which ranks took the path: documents never; a window wider than a chunk's start not.
        c = SEQ // (2 * world)
        starts = [i * c for i in (rank, 2 * world - 1 - rank)]
        sink, window = CASES_BY_NAME[case].pattern.sink_tokens, CASES_BY_NAME[case].pattern.window_size
        expect = CASES_BY_NAME[case].docs is None and not any(0 < s < sink + window - 1 for s in starts)
        assert res[case]["sink_window"] is expect, (world, rank)
    if case == "sink_gqa":
        assert all(r[case]["sink_window"] for r in ranks)


CASES_BY_NAME = {c.name: c for c in CASES}


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_bytes_sent_match_plan(layer_results, case):
    world, ranks = layer_results
    for rank, res in enumerate(ranks):
        r = res[case]
        if "plan_bytes" in r:  # sparse: exactly the plan; backward returns what was received
            assert r["fwd_bytes"] == r["plan_bytes"], (rank, r)
            assert r["bwd_bytes"] == r["plan_bwd_bytes"], (rank, r)
            assert r["fwd_bytes"] < r["ring_bytes"], (rank, r)
        else:  # ring: CP - 1 K/V hops forward
            assert r["fwd_bytes"] == r["ring_bytes"], (rank, r)
            assert r["bwd_bytes"] > r["fwd_bytes"]  # K/V again plus fp32 dK/dV
    if not case.startswith("full"):
        assert sum(r[case]["fwd_bytes"] for r in ranks) > 0
    if not case.startswith("full") and "packed" not in case and case != "sink_window_over_chunks":
        total = sum(r[case]["fwd_bytes"] for r in ranks)
        assert total <= 0.75 * sum(r[case]["ring_bytes"] for r in ranks), (world, case)


# ---------------------------------------------------------------- static plans, no ranks

PATTERNS = [CausalPattern(), AttnSinkPattern(3, 5), AttnSinkPattern(2, 21),
            BlockSparsePattern(4, 2, 3, False, 8, 4), BlockSparsePattern(8, 1, 2, True, 4, 2),
            BlockSparsePattern(4, 1, 8, False, 6, 3),
            BlockSparsePattern(4, 2, 8, False, 4, 2, vert_stride_rule="legacy")]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: repr(p)[:40])
@pytest.mark.parametrize("docs", [None, DOCS], ids=["one_doc", "packed"])
def test_needed_keys_equal_token_mask(pattern, docs):
    """The closed-form plan reads exactly the keys the token mask allows, per head."""
    heads = getattr(pattern, "num_heads", 1)
    cu = torch.tensor(docs) if docs else None
    for h in range(heads):
        mask = token_mask(pattern, SEQ, [h], cu, num_heads=heads)[-1]
        for cp in (2, 4):
            for r in range(cp):
                queries = torch.zeros(SEQ, dtype=torch.bool)
                queries[local_positions(r, cp, SEQ)] = True
                want = mask[queries].any(0)
                got = needed_keys(pattern, SEQ, query_ranges(r, cp, SEQ), h, docs)
                assert torch.equal(got, want), (h, cp, r)


@pytest.mark.parametrize("pattern", [
    AttnSinkPattern(4, 32),  # 128K / CP 8 / window 4K scaled down 128x (sink 64 -> 4, generous)
    BlockSparsePattern(4, 16, 8, False, 32, 32),  # block 64, 16 local, stride 8: 16x
], ids=["attn_sink", "block_sparse"])
def test_scaled_128k_cp8_exchange_is_under_a_third_of_ring(pattern):
    seq = 131072 // (128 if isinstance(pattern, AttnSinkPattern) else 16)
    sparse = exchange_bytes_sent(pattern, seq, 8, 1, 32, 128, 2)
    ring = ring_bytes_sent(seq, 8, 1, 32, 128, 2)
    assert max(sparse) <= ring / 3, (max(sparse), ring)


def test_sharding_layout_and_errors():
    batch = {"tokens": torch.arange(32)[None].repeat(2, 1), "loss_mask": torch.ones(2, 32)}
    local, packed = shard_batch_for_context_parallel(batch, None, cp_size=4, cp_rank=1)
    assert local["tokens"][0].tolist() == [4, 5, 6, 7, 24, 25, 26, 27] and packed is None
    with pytest.raises(ValueError, match="not divisible by 8"):
        shard_batch_for_context_parallel({"tokens": torch.zeros(1, 36)}, cp_size=4, cp_rank=0)
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, 5, 32], dtype=torch.int32)
    _, p = shard_batch_for_context_parallel(batch, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                                   cu_seqlens_kv=cu), cp_size=4, cp_rank=1)
    assert p.qkv_format == "sbhd" and p.max_seqlen_q == 32 and torch.equal(p.cu_seqlens_q, cu)
    assert p.doc_ids.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert p.doc_positions.tolist() == [4, 0, 1, 2, 19, 20, 21, 22]


def test_thd_packing_under_cp_is_refused():
    """Megatron's own THD layout splits each document separately; ours shards whole sequences."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_longgen.parallel.context_parallel import ContextParallelAttention

    attn = ContextParallelAttention.__new__(ContextParallelAttention)
    attn.cp_size = 2
    cu = torch.tensor([0, 5, 32], dtype=torch.int32)
    with pytest.raises(ValueError, match="shard_batch_for_context_parallel"):
        attn._documents(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu), 1, 32)
    with pytest.raises(ValueError, match="must be even"):
        attn(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4))
