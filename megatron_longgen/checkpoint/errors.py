"""The one error type of the converters, and the staging of their output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from megatron_longgen.utils.cli import UsageError, check_output_directory


class ConversionError(UsageError):
    """A checkpoint cannot be converted as asked; the message says why and what to change."""


def check_separate(source: str, source_flag: str, output: str, output_flag: str) -> None:
    """Refuse an output that is the source, or lies inside it or around it: writing (and with
    ``--overwrite`` replacing) it would destroy the model being read. Symlinks and relative
    spellings are resolved first."""
    src, out = os.path.realpath(source), os.path.realpath(output)
    if os.path.commonpath([src, out]) in (src, out):
        where = "is" if src == out else "lies inside" if out.startswith(src) else "holds"
        raise ConversionError(f"{output_flag} {output} {where} {source_flag} {source} (resolved: "
                              f"{out} and {src}); write the output to a separate directory")


def check_output_dir(final_dir: str, flag: str, overwrite: bool = False) -> None:
    """Before any work: ``final_dir`` must be a directory or not exist, and be empty unless
    ``overwrite``."""
    try:
        check_output_directory(final_dir, flag)
    except UsageError as err:
        raise ConversionError(str(err)) from None
    if os.path.isdir(final_dir) and os.listdir(final_dir) and not overwrite:
        raise ConversionError(f"{flag} {final_dir} exists and is not empty; remove it or pass "
                              "--overwrite")


@contextlib.contextmanager
def staged_output(final_dir: str, overwrite: bool = False, flag: str = "output"):
    """Yield a temporary sibling of ``final_dir``; rename it into place only on success.

    The target is checked first (see ``check_output_dir``); on any failure the temporary
    directory is removed, so no half-written output is left.
    """
    check_output_dir(final_dir, flag, overwrite)
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    created = parent  # the outermost folder this call creates, removed again on failure
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(parent) else created
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
