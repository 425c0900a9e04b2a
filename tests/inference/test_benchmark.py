"""The inference benchmark's CPU smoke mode: the fast path on a tiny model (Triton interpreter),
one table with the ratios to the all-full model, and its JSON rows."""

import json

from benchmarks import inference as bench


def test_inference_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--device", "cpu", "--lengths", "40", "--batch-length", "24",
                       "--variants", "full", "attn_sink", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["batch"], r["length"]) for r in rows] == [
        ("full", 1, 40), ("attn_sink", 1, 40), ("full", 2, 24), ("attn_sink", 2, 24)]
    assert all(r["prefill_s"] > 0 and r["decode_ms"] > 0 for r in rows)
    # The window (16) and sinks (4) hold less than a 40-token prompt: the cache is smaller.
    assert rows[1]["kv_gb"] < rows[0]["kv_gb"]
    table = capsys.readouterr().out
    assert "KV/full" in table and "attn_sink" in table
