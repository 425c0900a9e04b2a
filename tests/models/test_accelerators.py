from megatron_longgen.utils.accelerators import available_accelerators, describe


def test_detection_reports_every_optional_package():
    found = available_accelerators()
    assert set(found) == {"transformer_engine", "apex", "flash_attn", "triton"}
    assert found["triton"]  # a required package: must be detected
    assert "transformer_engine" in describe()
