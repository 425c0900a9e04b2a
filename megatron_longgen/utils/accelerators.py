"""Optional GPU-cluster accelerators: detected at run time, never required.

Megatron-Core itself picks up apex / TransformerEngine fused optimizers and kernels when they
import; this module only reports what is there so a run's log says what it used.
"""

from __future__ import annotations

import importlib.util
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
