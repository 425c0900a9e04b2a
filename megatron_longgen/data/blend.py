"""The blend file: which indexed datasets to mix, and with what weights.

The JSON file written by preprocessing looks like::

    {
      "format": "megatron-longgen-blend/1",
      "prefixes": ["corpus_books_document", "corpus_books_long_document", ...],
      "weights":  [0.41, 0.37, ...],             # normalised, sum to 1
      "entries":  [{"source": "books", "subset": "base", "prefix": ..., "tokens": ..., "documents": ...,
                    "weight_factor": 1.0, "source_weight": 1.0, "weight": 0.41}, ...]
    }

Prefixes are stored relative to the blend file's folder so a data folder can be moved as a whole;
`load_blend` turns them back into paths that `BlendedMegatronDatasetConfig(blend=...)` accepts.
"""

from __future__ import annotations

import json
import os
from typing import List, Tuple

BLEND_FORMAT = "megatron-longgen-blend/1"


def load_blend(path: str) -> Tuple[List[str], List[float]]:
    """Read a blend file and return `(prefixes, weights)` with prefixes resolved to paths."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != BLEND_FORMAT:
        raise ValueError(f"{path}: not a blend file (format {data.get('format')!r}, expected {BLEND_FORMAT!r})")
    base = os.path.dirname(os.path.abspath(path))
    prefixes = [os.path.normpath(os.path.join(base, p)) for p in data["prefixes"]]
    weights = [float(w) for w in data["weights"]]
    if len(prefixes) != len(weights) or not prefixes:
        raise ValueError(f"{path}: prefixes and weights must be non-empty and equal in number")
    return prefixes, weights


def blend_to_data_path(prefixes: List[str], weights: List[float]) -> List[str]:
    """The same blend in Megatron-LM's `--data-path W1 P1 W2 P2 ...` form."""
    out: List[str] = []
    for prefix, weight in zip(prefixes, weights):
        out += [repr(float(weight)), prefix]
    return out
