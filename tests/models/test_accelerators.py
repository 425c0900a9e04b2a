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

    def shown(message, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the filters a test run installs, reset
            quiet_fallback_warnings()
            warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module)
        return len(caught)

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert shown(te, "megatron.core.optimizer") == 0
    assert shown("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends") == 0
    assert shown(te, "some.other.package") == 1  # only Megatron-Core's own
    assert shown("full scope is deprecated.", "megatron.core.transformer") == 1  # only these messages
    # Processes started from here (checkpoint writers, subprocesses) hide them too.
    child = "import warnings; warnings.warn({!r}); warnings.warn('another warning')"
    proc = subprocess.run([sys.executable, "-c", child.format(te)], capture_output=True, text=True,
                          timeout=60)
    assert "not installed" not in proc.stderr and "another warning" in proc.stderr
