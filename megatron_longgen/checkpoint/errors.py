"""The one error type of the converters, and the staging of their output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from megatron_longgen.utils.cli import UsageError


class ConversionError(UsageError):
    """A checkpoint cannot be converted as asked; the message says why and what to change."""


@contextlib.contextmanager
def staged_output(final_dir: str, overwrite: bool = False):
    """Yield a temporary sibling of ``final_dir``; rename it into place only on success.

    On any failure the temporary directory is removed, so no half-written output is left.
    """
    final_dir = os.path.abspath(final_dir)
    if os.path.exists(final_dir) and (not os.path.isdir(final_dir) or os.listdir(final_dir)):
        if not overwrite:
            raise ConversionError(f"output {final_dir} exists and is not empty; remove it or pass --overwrite")
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
