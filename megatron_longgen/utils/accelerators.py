"""Optional GPU-cluster accelerators: detected at run time, never required.

Megatron-Core itself picks up apex / TransformerEngine fused optimizers and kernels when they
import; this module reports what is there so a run's log says what it used, and lets entry
points hide Megatron-Core's warnings about what is not.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from typing import Dict


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_accelerators() -> Dict[str, bool]:
    return {
        "transformer_engine": _has("transformer_engine"),
        "apex": _has("apex"),
        "flash_attn": _has("flash_attn"),
        "triton": _has("triton"),
    }


def describe() -> str:
    found = available_accelerators()
    return ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in found.items())


# Megatron-Core warns at import, once per module and per process, that it falls back to torch
# when TransformerEngine / Apex are missing (about ten lines, repeated in every worker process).
# These are the start of those messages; nothing else is hidden.
FALLBACK_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed")


def quiet_fallback_warnings() -> None:
    """Hide Megatron-Core's known "not installed ... falling back" warnings in this process and
    in the processes it starts (checkpoint writers, subprocesses), for entry points that report
    ``describe()`` on one line instead. Call it before Megatron-Core is imported."""
    for message in FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning,
                                module=r"megatron\.core")
    # Children read PYTHONWARNINGS at start-up: "action:message-prefix:category".
    child = [f"ignore:{message}:UserWarning" for message in FALLBACK_WARNINGS]
    given = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(given + [w for w in child if w not in given])
