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


# Warnings every run prints that no flag can act on, hidden by the entry points (each names the
# accelerators on one line instead): Megatron-Core's "falling back to torch" when TransformerEngine
# / Apex are missing (about ten lines at import, repeated in every worker process), the
# deprecation its own TransformerConfig default raises, and the deprecations its checkpoint code
# hits in torch on every load. Each is (start of the message, category, module that warns or None
# for any); nothing else is hidden.
KNOWN_WARNINGS = (
    ("Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core"),
    ("Apex is not installed", UserWarning, r"megatron\.core"),
    ("full scope is deprecated", UserWarning, r"megatron\.core"),  # cuda_graph_scope's default
    ("`load_state_dict` is deprecated", FutureWarning, r"megatron\.core"),
    ("Please use DTensor instead", FutureWarning, None),  # torch, inside Megatron's checkpoint load
)


def quiet_fallback_warnings() -> None:
    """Hide ``KNOWN_WARNINGS`` in this process and in the processes it starts (checkpoint
    writers, subprocesses), for entry points that report ``describe()`` on one line instead.
    Call it before Megatron-Core is imported."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category,
                                module=module or "")
    # Children read PYTHONWARNINGS at start-up: "action:message-prefix:category".
    child = [f"ignore:{message}:{category.__name__}" for message, category, _ in KNOWN_WARNINGS]
    given = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(given + [w for w in child if w not in given])
