"""The one convention of every entry point: usage errors are one line and exit 2."""

import pytest

from megatron_longgen.utils.cli import INTERRUPTED, USAGE_ERROR, UsageError, fail, run_main


def test_usage_error_is_one_line_and_exit_status_2(capsys):
    def main(argv):
        fail("--seq-length must be > 0, got 0")

    assert run_main(main, []) == USAGE_ERROR == 2
    err = capsys.readouterr().err
    assert err == "error: --seq-length must be > 0, got 0\n"


def test_interrupt_is_one_line_and_exit_status_1(capsys):
    def main(argv):
        raise KeyboardInterrupt

    assert run_main(main, []) == INTERRUPTED == 1
    assert capsys.readouterr().err == "interrupted\n"


def test_only_rank_zero_prints(capsys, monkeypatch):
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # rank from RANK
    monkeypatch.setenv("RANK", "3")
    assert run_main(lambda argv: fail("bad"), []) == USAGE_ERROR
    assert capsys.readouterr().err == ""


def test_other_errors_keep_their_traceback():
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_main(main, [])
    assert run_main(lambda argv: 0, []) == 0
    assert issubclass(UsageError, ValueError)
