"""Scoring of generated text against an item's expected answers.

``partial`` is the fraction of expected items found in the generation (RULER's "match all"
averaged per item); ``exact`` is 1 only when every one is found. Matching is case-insensitive
and on whole tokens, so "12345" is not found in "123456" and "cat" not in "category".
Passkey keeps its stricter rule: the first number generated must be the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from megatron_longgen.data.passkey import score_passkey


@dataclass(frozen=True)
class Score:
    exact: float
    partial: float


def found(expected: str, generated: str) -> bool:
    pattern = r"(?<![\w])" + re.escape(expected.strip().lower()) + r"(?![\w])"
    return re.search(pattern, generated.lower()) is not None


def partial_match(generated: str, expected: Sequence[str]) -> float:
    if not expected:
        raise ValueError("an item needs at least one expected answer")
    return sum(found(e, generated) for e in expected) / len(expected)


def exact_match(generated: str, expected: Sequence[str]) -> float:
    return float(partial_match(generated, expected) == 1.0)


def score(task: str, generated: str, expected: Sequence[str]) -> Score:
    if task == "passkey":
        hit = float(score_passkey(generated, expected[0]))
        return Score(hit, hit)
    return Score(exact_match(generated, expected), partial_match(generated, expected))
