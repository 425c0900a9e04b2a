from megatron_longgen.utils.accelerators import available_accelerators, describe


def test_detection_reports_every_optional_package():
    found = available_accelerators()
    assert set(found) == {"transformer_engine", "apex", "flash_attn", "triton"}
    assert found["triton"]  # a required package: must be detected
    assert "transformer_engine" in describe()


def test_fallback_warnings_are_hidden_and_nothing_else(monkeypatch):
    import subprocess
    import sys
    import warnings

    from megatron_longgen.utils.accelerators import quiet_fallback_warnings

    def shown(message, module, category=UserWarning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the filters a test run installs, reset
            quiet_fallback_warnings()
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return len(caught)

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert shown(te, "megatron.core.optimizer") == 0
    assert shown("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends") == 0
    assert shown(te, "some.other.package") == 1  # only Megatron-Core's own
    assert shown("full scope is deprecated. Use empty cuda_graph_scope", "megatron.core.transformer") == 0
    assert shown("`load_state_dict` is deprecated", "megatron.core.dist_checkpointing", FutureWarning) == 0
    assert shown("`load_state_dict` is deprecated", "megatron.core.dist_checkpointing") == 1  # category too
    assert shown("cuda_graph_scope must be a string", "megatron.core.transformer") == 1  # only these messages
    # Processes started from here (checkpoint writers, subprocesses) hide them too.
    child = "import warnings; warnings.warn({!r}); warnings.warn('another warning')"
    proc = subprocess.run([sys.executable, "-c", child.format(te)], capture_output=True, text=True,
                          timeout=60)
    assert "not installed" not in proc.stderr and "another warning" in proc.stderr


def test_train_command_hides_known_warnings_and_names_the_accelerators_once():
    """``python -m megatron_longgen.train``, one step on mock data: none of Megatron-Core's
    known warnings, and one line naming the accelerators."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # a filter set here
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_longgen.train", "--device", "cpu", "--mock-data",
         "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "1",
         "--train-iters", "1", "--sink-tokens", "2", "--sliding-window-size", "8"],
        cwd=repo, env=dict(env, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr
    assert sum("accelerators: " in line for line in proc.stdout.splitlines()) == 1
