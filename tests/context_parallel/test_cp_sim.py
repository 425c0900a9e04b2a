"""benchmarks/cp_sim.py --tiny (CPU): the one-rank simulation runs the real CP layers under the
fake process group, and its byte counts equal the independent per-rank byte calculator."""

import json

import pytest
import torch.distributed as dist

from benchmarks import cp_sim
from megatron_longgen.parallel.cp.plan import exchange_bytes_sent, ring_bytes_sent


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    path = tmp_path_factory.mktemp("cp_sim") / "sim.json"
    cp_sim.main(["--tiny", "--json", str(path)])
    return json.loads(path.read_text())


def test_every_pattern_and_layout_is_simulated(result):
    got = {(r["pattern"], r["seq_len"], r["cp"]) for r in result["records"]}
    assert got == {(p, L, cp) for p in ("causal", "attn_sink", "block_sparse") for L, cp in cp_sim.TINY_LAYOUTS}
    assert set(result["baselines"]) == {"causal", "attn_sink", "block_sparse"}
    assert set(result["hybrid_over_full"]) == {"attn_sink", "block_sparse"}


def test_bytes_match_the_calculator_and_prediction_adds_communication(result):
    heads, kv_heads, d = 4, 2, 16
    pats = cp_sim.layer_patterns(heads, kv_heads, tiny=True)
    for r in result["records"]:
        L, cp = r["seq_len"], r["cp"]
        ring = ring_bytes_sent(L, cp, 1, kv_heads, d, 4)
        if r["pattern"] == "causal":
            assert r["fwd_bytes_sent"] == ring
            assert r["bwd_bytes_sent"] > ring  # K/V again plus fp32 dK/dV
        else:
            assert r["fwd_bytes_sent"] == exchange_bytes_sent(pats[r["pattern"]], L, cp, 1, kv_heads, d, 4)[r["rank"]]
            assert 0 < r["fwd_bytes_sent"] < ring
        assert r["predicted_ms"] >= r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0  # CPU timings are noisy
        assert r["predicted_ms"] == pytest.approx(r["fwd_bwd_ms"] + r["exposed_comm_ms"])


def test_pair_count_closed_form_equals_the_patterns_count():
    from megatron_longgen.attention.patterns import BlockSparsePattern, allowed_pair_count

    for pattern in [BlockSparsePattern(16, 2, 4, False, 4, 2), BlockSparsePattern(4, 3, 3, True, 4, 2),
                    BlockSparsePattern(16, 2, 8, False, 6, 3, "legacy")]:
        heads = pattern.num_heads
        assert cp_sim.pair_count(pattern, 512, heads) == allowed_pair_count(pattern, 512, range(heads), heads)


def test_rows_record_their_kernels(result):
    """CPU: ring pairs and the exchange take the chunk reference unless a ring backend is forced."""
    assert result["ring_backend"] == "auto"
    for r in result["records"]:
        kind = "ring" if r["pattern"] == "causal" else "exchange"
        assert r["backends"] == {kind: "reference"}, r


def test_forced_ring_backend_is_recorded(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    path = tmp_path / "sim.json"
    cp_sim.main(["--tiny", "--ring-backend", "dense_reference", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["ring_backend"] == "dense_reference"
    for r in result["records"]:
        want = {"ring": "dense_reference"} if r["pattern"] == "causal" else {"exchange": "reference"}
        assert r["backends"] == want, r
    with pytest.raises(SystemExit):  # argparse: not a registered name
        cp_sim.main(["--tiny", "--ring-backend", "nonsense"])
