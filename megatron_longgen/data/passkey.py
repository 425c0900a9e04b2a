"""Synthetic passkey-retrieval documents (seeded and reproducible).

A sample is filler text with the needle "The pass key is NNNNN. Remember it." inserted at a
chosen depth, followed by the question; the answer is the passkey::

    <filler ...> The pass key is 48213. Remember it. <filler ...>
    What is the pass key? The pass key is 48213

`prompt` ends with "The pass key is"; `answer` is " 48213" (the text that completes it), so
`text == prompt + answer`. A sample carries the character span of the answer in `text` and its
token span in `token_ids` (= tokenizer.encode(text), no BOS/EOS), so a scorer can check either
generated text (`score_passkey`) or teacher-forced predictions at the answer tokens.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_longgen.data.tokenizer import Tokenizer

DEFAULT_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key? The pass key is"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PasskeyFormat:
    """How the needle and the question read and how long the key is.

    The answer is ``answer_prefix + key``; the question ends where the answer begins.
    """

    needle: str = NEEDLE
    question: str = QUESTION
    answer_prefix: str = " "
    digits: int = 5


STANDARD_FORMAT = PasskeyFormat()
# For tiny models with a byte-level vocabulary: a one-digit key after "#" (a token of its own
# that the filler never uses), repeated by the question: retrieving it is a one-token lookup
# by content, which a tiny model learns within a CPU budget (a 3-digit key, which needs an
# induction circuit per digit, was not learned in several hundred steps).
MARKED_FORMAT = PasskeyFormat(needle="The pass key is #{key}. Remember it.",
                              question="What is the pass key? The pass key is #",
                              answer_prefix="", digits=1)
# The marked key in a short needle and question (18 tokens instead of 45): at a short training
# length most of the item is filler, so the needle's distance from the question varies widely
# and the lookup learned there is one by content, not by one narrow band of distances.
COMPACT_FORMAT = PasskeyFormat(needle="The key is #{key}.", question="The key is #",
                               answer_prefix="", digits=1)
PASSKEY_FORMATS = {"standard": STANDARD_FORMAT, "marked": MARKED_FORMAT, "compact": COMPACT_FORMAT}


@dataclass
class PasskeySample:
    text: str
    prompt: str
    answer: str
    passkey: str
    depth: float
    """Requested needle depth in [0, 1] (0: start of the filler, 1: end)."""
    token_ids: List[int]
    answer_char_span: Tuple[int, int]
    """`text[a:b]` is the passkey's digits."""
    answer_token_span: Tuple[int, int]
    """`token_ids[a:b]` carry the passkey digits; a token that is only the separating space stays
    on the prompt side, so `token_ids[:a]` may differ from `tokenizer.encode(prompt)`."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> List[int]:
        """The context for teacher-forced scoring of the answer tokens."""
        return self.token_ids[: self.answer_token_span[0]]

    @property
    def answer_token_ids(self) -> List[int]:
        return self.token_ids[self.answer_token_span[0] : self.answer_token_span[1]]


class PasskeyTooShort(ValueError):
    """``num_tokens`` cannot hold the needle and the question; ``needed`` tokens can."""

    def __init__(self, num_tokens: int, needed: int):
        super().__init__(f"num_tokens={num_tokens} is too small for the needle and the question "
                         f"(they need {needed} tokens)")
        self.needed = needed


def split_sentences(text: str) -> List[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _filler_sentences(sentences: Sequence[str], offset: int, count: int) -> List[str]:
    """`count` filler sentences: the corpus cycled from `offset`."""
    return [sentences[(offset + i) % len(sentences)] for i in range(count)]


def _compose(fill: Sequence[str], depth: float, needle: str, question: str = QUESTION) -> str:
    at = round(depth * len(fill))
    return " ".join(list(fill[:at]) + [needle] + list(fill[at:]) + [question])


def make_passkey_sample(
    tokenizer: Tokenizer,
    num_tokens: int,
    depth: float,
    seed: int,
    filler_text: Optional[str] = None,
    fmt: PasskeyFormat = STANDARD_FORMAT,
) -> PasskeySample:
    """One sample of at most `num_tokens` tokens (within a filler sentence of it).

    The passkey and the filler offset come from `random.Random(seed)` only, so equal arguments
    give equal samples.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    passkey = str(rng.randrange(10 ** (fmt.digits - 1), 10**fmt.digits))
    needle = fmt.needle.format(key=passkey)
    answer = fmt.answer_prefix + passkey

    sentences = split_sentences(filler_text or DEFAULT_FILLER)
    if not sentences:
        raise ValueError("filler text has no sentences")
    offset = rng.randrange(len(sentences)) if filler_text else 0

    def length(n_fill: int) -> int:
        fill = _filler_sentences(sentences, offset, n_fill)
        return len(tokenizer.encode(_compose(fill, depth, needle, fmt.question) + answer))

    if length(0) > num_tokens:
        raise PasskeyTooShort(num_tokens, length(0))
    # Double an upper bound on the filler sentences, then binary-search the largest that fits.
    lo, hi = 0, 8
    while length(hi) <= num_tokens:
        lo, hi = hi, hi * 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if length(mid) <= num_tokens:
            lo = mid
        else:
            hi = mid
    prompt = _compose(_filler_sentences(sentences, offset, lo), depth, needle, fmt.question)
    return _finish(tokenizer, prompt, answer, passkey, depth)


def _finish(tokenizer: Tokenizer, prompt: str, answer: str, passkey: str, depth: float) -> PasskeySample:
    text = prompt + answer
    ids = tokenizer.encode(text)
    char_span = (len(text) - len(passkey), len(text))
    # First token whose decoded prefix reaches past the prompt: monotone, so binary search.
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1]).rstrip()) > len(prompt):
            hi = mid
        else:
            lo = mid + 1
    return PasskeySample(
        text=text,
        prompt=prompt,
        answer=answer,
        passkey=passkey,
        depth=depth,
        token_ids=list(ids),
        answer_char_span=char_span,
        answer_token_span=(lo, len(ids)),
    )


def build_passkey_samples(
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_cell: int = 1,
    seed: int = 0,
    filler_text: Optional[str] = None,
) -> List[PasskeySample]:
    """A grid of samples: every (length, depth) cell gets `samples_per_cell` distinct seeds."""
    out = []
    for li, n in enumerate(lengths):
        for di, d in enumerate(depths):
            for k in range(samples_per_cell):
                cell_seed = seed * 1_000_003 + (li * len(depths) + di) * samples_per_cell + k
                out.append(make_passkey_sample(tokenizer, n, d, cell_seed, filler_text))
    return out


def build_passkey_pairs(tokenizer: Tokenizer, lengths, depths, samples_per_cell=1, seed=0, filler_text=None):
    """`(prompt, answer)` pairs of the grid above, for generation-based evaluation."""
    return [(s.prompt, s.answer) for s in build_passkey_samples(tokenizer, lengths, depths, samples_per_cell, seed, filler_text)]


def score_passkey(generated: str, passkey: str) -> bool:
    """True when the first number in the generated continuation is the passkey."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group(0) == passkey


class PasskeyTrainingSet:
    """Passkey samples as training items of exactly ``seq_length`` tokens.

    Item ``i`` is ``make_passkey_sample`` with a seed and a depth derived from ``i`` (depths
    uniform in ``depth_range``), BOS at position 0 as in a prompt at inference, padded with EOD
    after the answer to length (causal attention: the padding never reaches the answer; left
    padding would move the prompt away from position 0 and fill the sparse layers' sink tokens
    with EOD, which no prompt at inference has). The loss covers the answer tokens only (the
    filler around the needle is not what the task teaches) unless ``loss_on_filler``;
    ``answer_mask`` always marks the answer, for scoring.
    """

    def __init__(self, tokenizer: Tokenizer, seq_length: int, num_samples: int, seed: int = 0,
                 filler_text: Optional[str] = None, depth_range: Tuple[float, float] = (0.0, 1.0),
                 fmt: PasskeyFormat = STANDARD_FORMAT, loss_on_filler: bool = False):
        self.tokenizer, self.seq_length, self.num_samples = tokenizer, seq_length, num_samples
        self.seed, self.filler_text, self.depth_range = seed, filler_text, depth_range
        self.fmt, self.loss_on_filler = fmt, loss_on_filler

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, idx: int) -> PasskeySample:
        rng = random.Random(self.seed * 1_000_003 + idx)
        depth = rng.uniform(*self.depth_range)
        return make_passkey_sample(self.tokenizer, self.seq_length, depth, rng.randrange(1 << 30),
                                   self.filler_text, self.fmt)

    def __getitem__(self, idx: int):
        import torch

        sample = self.sample(idx)
        ids = [self.tokenizer.bos] + sample.token_ids
        pad = self.seq_length + 1 - len(ids)
        ids = torch.tensor(ids + [self.tokenizer.eod] * pad)
        a, b = sample.answer_token_span
        answer_mask = torch.zeros(self.seq_length)
        answer_mask[a:b] = 1.0  # labels[j] is ids[j + 1], and ids[0] is the BOS
        loss_mask = answer_mask.clone()
        if self.loss_on_filler:
            loss_mask[:self.seq_length - pad] = 1.0
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": loss_mask,
                "answer_mask": answer_mask, "position_ids": torch.arange(self.seq_length)}
