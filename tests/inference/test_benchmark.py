"""The inference benchmark's CPU smoke run: the fast path on the tiny model (Triton
interpreter), one table with the ratios to the all-full model, and its JSON rows."""

import json

from benchmarks import inference as bench


def test_inference_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["--device", "cpu", "--tiny", "--attention", "fast", "--lengths", "48",
                "--batch", "2", "--batch-lengths", "40", "--steps", "2", "--warmup-length", "16",
                "--chunk-size", "16", "--variants", "full", "hybrid attn_sink", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["model"], r["batch"], r["length"]) for r in rows] == [
        ("full", 1, 48), ("full", 2, 40), ("hybrid attn_sink", 1, 48), ("hybrid attn_sink", 2, 40)]
    assert all(r["prefill_s"] > 0 and r["decode_ms"] > 0 for r in rows)
    # Sinks (4) and window (32) hold less than a 48-token prompt in the sparse layers.
    assert rows[2]["kv_by_kind"]["attn_sink"] < rows[0]["kv_by_kind"]["causal"] * 4 / 6
    assert rows[2]["kv_bytes"] < rows[0]["kv_bytes"]
    # The bandwidth model: the tiny model's weights (6 layers, hidden 64, 4 heads in 2 groups
    # of 16, FFN 176, vocabulary 512, untied; float32), one embedding row per sequence, and
    # the cache, per step.
    layer = (4 + 2 * 2) * 16 * 64 + 64 * 64 + 3 * 176 * 64 + 2 * 64
    for r in rows:
        assert r["weight_bytes"] == (6 * layer + 64 + 512 * 64 + r["batch"] * 64) * 4
        assert r["read_bytes_per_step"] == r["weight_bytes"] + r["kv_bytes"]
        assert abs(r["floor_ms"] * r["read_bandwidth_gbs"] * 1e6 - r["read_bytes_per_step"]) \
            < 1e-6 * r["read_bytes_per_step"]
        assert r["decode_vs_floor"] == r["decode_ms"] / r["floor_ms"]
    table = capsys.readouterr().out
    assert "| 1 | 48 | hybrid attn_sink |" in table and "KV vs full" in table and "x floor" in table

