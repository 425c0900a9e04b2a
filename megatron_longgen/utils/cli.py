"""How every command-line entry point reports a mistake: one line, one documented exit status.

- ``UsageError``: bad flags, values, files or settings that a person can fix. The entry point
  prints ``error: <message>`` once (on rank 0 under torchrun) and exits with ``USAGE_ERROR``,
  the status argparse itself uses for an unknown flag, so every usage error exits alike.
- Ctrl-C: ``interrupted`` on one line and ``INTERRUPTED``; the command has cleaned up what it
  was writing before the interrupt reaches here.
- Anything else is a bug or a failure of the machine and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence

USAGE_ERROR = 2
INTERRUPTED = 1
# torchrun stops every rank as soon as one exits. The ranks that print nothing wait this long
# before exiting, so rank 0's line is out first; once rank 0 exits, torchrun stops them.
SILENT_RANK_DELAY_S = 5.0


class UsageError(ValueError):
    """A mistake in what the command was given; the message says what to change."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad value) are UsageErrors: one line on rank 0
    under torchrun instead of a usage text from every rank; same exit status, 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def check_output_directory(path: str, flag: str) -> None:
    """Before any work: ``path`` (a directory the command creates or writes into) must not be a
    file, nor lie under one."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag}: {path} is a file, not a directory; choose another path")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"{flag}: {path} cannot be created: {parent} is a file, not a directory")


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job (or a plain process), without needing torch.distributed."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch is a requirement
        pass
    return os.environ.get("RANK", "0") == "0"


def report_error(message: str) -> None:
    if is_rank_zero():
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(SILENT_RANK_DELAY_S)


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point's ``main(argv)`` and turn usage errors and Ctrl-C into exit statuses."""
    try:
        return int(main(argv) or 0)
    except UsageError as err:
        report_error(str(err))
        return USAGE_ERROR
    except KeyboardInterrupt:
        if is_rank_zero():
            print("interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
