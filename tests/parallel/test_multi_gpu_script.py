"""benchmarks/multi_gpu.py end to end on CPU ranks (gloo): the same torchrun jobs, checkpoint
resharding and comparison that validate the layouts on a GPU node."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "multi_gpu.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_parity_on_cpu_ranks_matches_single_process():
    proc = run("parity", "--device", "cpu", "--nproc", "2", "--patterns", "block_sparse",
               "--layouts", "single", "cp2", "cp4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| block_sparse")]
    assert len(rows) == 3, proc.stdout
    single, cp2, cp4 = rows
    assert single.endswith("| ok |") and cp2.endswith("| ok |")
    assert "skipped: needs 4 devices" in cp4
    # the runs really trained: three different losses per run, printed with the table
    losses = [line for line in proc.stdout.splitlines() if line.startswith("parity block_sparse cp2")]
    values = losses[0].split("losses ")[1].split("  grad")[0].split()
    assert len(set(values)) == 3


def test_bad_requests_fail_cleanly():
    proc = run("parity", "--device", "cpu", "--layouts", "tp3")
    assert proc.returncode == 2 and "unknown parity layouts ['tp3']" in proc.stderr
    proc = run("throughput", "--device", "cpu")
    assert proc.returncode == 2 and "throughput runs on GPUs only" in proc.stderr
