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
    table = capsys.readouterr().out
    assert "| 1 | 48 | hybrid attn_sink |" in table and "KV vs full" in table
