"""The README's main job, shortened: every stage runs and the result table is printed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--workdir", str(tmp_path / "qs"),
         "--base-iters", "5", "--extend-iters", "5", "--eval-samples", "4", "--batch", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in proc.stdout
    assert "| LongGen hybrid (1/3 full) |" in proc.stdout
    assert "| every layer sparse |" in proc.stdout
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    for r in results.values():
        assert 0.0 <= r["token_accuracy"] <= 1.0 and r["valid_loss"] > 0
    assert (tmp_path / "qs" / "middle" / "latest_checkpointed_iteration.txt").read_text() == "5"
