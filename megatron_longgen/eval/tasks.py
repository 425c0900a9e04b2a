"""Synthetic long-context tasks, generated locally (seeded and reproducible).

Every generator returns an :class:`EvalItem`: the prompt text, the expected answers and
metadata (task, target length in tokens, needle depth). A prompt is built from haystack
sentences (a user's corpus or the bundled essays) around the task's facts, with as many
sentences as fit in ``num_tokens`` tokens, answer budget included.

Tasks:

* ``passkey``: one 5-digit pass key in filler text (``megatron_longgen.data.passkey``).
* ``niah``: needle-in-a-haystack, "One of the special magic numbers for <key> is: <value>.";
  ``num_keys > 1`` adds distractor needles with other keys (multi-key), ``num_values > 1``
  gives the queried key several values, all expected (multi-value).
* ``variable_tracking``: a chain ``VAR A = 12345. VAR B = VAR A. ...`` spread through the
  haystack, plus a distractor chain; the answer is every variable holding the value.
* ``common_words``: a numbered word list where a few words repeat often; the answer is them.
* ``frequent_words``: random nonsense words with Zipf-like counts; the answer is the top 3.

The depth of a needle is the fraction of haystack sentences before it (0: start, 1: end), as
in ``make_passkey_sample``.
"""

from __future__ import annotations

import os
import random
import string
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

from megatron_longgen.data.passkey import (DEFAULT_FILLER, PasskeyTooShort, make_passkey_sample,
                                           split_sentences)
from megatron_longgen.data.tokenizer import Tokenizer
from megatron_longgen.utils.cli import fail

TASKS = ("passkey", "niah", "niah_multikey", "niah_multivalue", "variable_tracking",
         "common_words", "frequent_words")
# Tasks whose items sweep the needle depth (the others only sweep length).
DEPTH_TASKS = ("passkey", "niah", "niah_multikey", "niah_multivalue")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED_HAYSTACK = os.path.join(_REPO, "examples", "data", "essays.txt")

# Keys of the NIAH needles and the word pool of common-words extraction: plain lowercase words
# so that any tokenizer can spell them.
WORDS = (
    "apple river castle garden silver winter rocket forest candle mirror harbor pepper "
    "violet tunnel meadow anchor lantern marble falcon orchard copper saddle thunder velvet "
    "basket cactus dragon ember glacier hammer island jacket kettle lemon magnet needle "
    "oyster pillow quartz ribbon spider tiger umbrella walnut yogurt zebra beacon cobalt "
    "donkey feather goblet hollow igloo jungle koala ladder mango nectar olive parrot "
    "quiver raven salmon tulip"
).split()


@dataclass
class EvalItem:
    task: str
    prompt: str
    answers: List[str]
    """Every expected item (all of them make an exact match)."""
    metadata: Dict[str, object] = field(default_factory=dict)
    """``length`` (target tokens), ``depth`` (needle depth or None), ``seed`` and per task."""
    max_new_tokens: int = 16

    @property
    def length(self) -> int:
        return int(self.metadata["length"])

    @property
    def depth(self) -> Optional[float]:
        return self.metadata.get("depth")


def load_haystack(path: Optional[str] = None) -> str:
    """The haystack corpus: a text file (or .jsonl with a "text" field) or the bundled essays."""
    path = path or BUNDLED_HAYSTACK
    if not os.path.exists(path):
        return DEFAULT_FILLER  # installed without the examples: the passkey filler still works
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            import json

            return "\n".join(json.loads(line)["text"] for line in f if line.strip())
        return f.read()


def _too_small(task: str, num_tokens: int, needed: int) -> NoReturn:
    fail(f"length {num_tokens} is too small for task {task}: its facts and question need at "
         f"least {needed} tokens; raise --lengths to {needed} or more")


def _fit(tokenizer: Tokenizer, num_tokens: int, build: Callable[[int], str], answer: str,
         task: str, least: int = 0) -> int:
    """Largest filler count n >= ``least`` with ``build(n) + answer`` within ``num_tokens``
    tokens; a length too small even for ``least`` is a usage error that says the minimum."""
    def tokens(n: int) -> int:
        return len(tokenizer.encode(build(n) + answer))

    def fits(n: int) -> bool:
        return tokens(n) <= num_tokens

    if not fits(least):
        _too_small(task, num_tokens, tokens(least))
    lo, hi = least, max(8, 2 * least)
    while fits(hi):
        lo, hi = hi, hi * 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _cycle(sentences: Sequence[str], offset: int, count: int) -> List[str]:
    return [sentences[(offset + i) % len(sentences)] for i in range(count)]


def _insert(fill: List[str], inserts: Sequence[tuple]) -> List[str]:
    """Put (depth, sentence) pairs into the filler; equal depths keep their given order."""
    out = list(fill)
    # Insert from the deepest so earlier indices stay valid.
    placed = sorted(enumerate(inserts), key=lambda p: (p[1][0], p[0]), reverse=True)
    for _, (depth, sentence) in placed:
        out.insert(round(depth * len(fill)), sentence)
    return out


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


# ---- passkey ----


def passkey_item(tokenizer: Tokenizer, num_tokens: int, depth: float, seed: int,
                 haystack: Optional[str] = None) -> EvalItem:
    try:
        s = make_passkey_sample(tokenizer, num_tokens, depth, seed, haystack)
    except PasskeyTooShort as err:
        _too_small("passkey", num_tokens, err.needed)
    return EvalItem("passkey", s.prompt, [s.passkey],
                    {"length": num_tokens, "depth": depth, "seed": seed, "tokens": s.num_tokens},
                    max_new_tokens=8)


# ---- needle in a haystack ----

NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What are all the special magic numbers for {key} mentioned in the text? "
                 "The special magic numbers for {key} are:")


def niah_item(tokenizer: Tokenizer, num_tokens: int, depth: float, seed: int,
              haystack: Optional[str] = None, num_keys: int = 1, num_values: int = 1,
              task: str = "niah") -> EvalItem:
    """The queried key's needles sit at ``depth`` (several values: consecutively); distractor
    keys at random depths."""
    rng = random.Random(seed)
    sentences = split_sentences(haystack or DEFAULT_FILLER)
    offset = rng.randrange(len(sentences))
    keys = rng.sample(WORDS, num_keys)
    values = [_number(rng) for _ in range(num_values)]
    inserts = [(depth, NIAH_NEEDLE.format(key=keys[0], value=v)) for v in values]
    inserts += [(rng.random(), NIAH_NEEDLE.format(key=k, value=_number(rng))) for k in keys[1:]]
    question = NIAH_QUESTION.format(key=keys[0])

    def build(n: int) -> str:
        return " ".join(_insert(_cycle(sentences, offset, n), inserts) + [question])

    answer_room = " " + ", ".join(values)
    prompt = build(_fit(tokenizer, num_tokens, build, answer_room, task))
    return EvalItem(task, prompt, values,
                    {"length": num_tokens, "depth": depth, "seed": seed, "key": keys[0],
                     "num_keys": num_keys, "num_values": num_values},
                    max_new_tokens=8 * num_values + 4)


# ---- RULER-style variable tracking ----

VT_QUESTION = ("Find all variables that are assigned the value {value} in the text above. "
               "Answer: the variables assigned the value {value} are:")


def _var_names(rng: random.Random, count: int) -> List[str]:
    names = set()
    while len(names) < count:
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
    return sorted(names, key=lambda _: rng.random())


def variable_tracking_item(tokenizer: Tokenizer, num_tokens: int, seed: int,
                           haystack: Optional[str] = None, hops: int = 4,
                           num_chains: int = 1) -> EvalItem:
    """Chain 0 is queried, others distract; the statements of every chain are spread in order through the text."""
    rng = random.Random(seed)
    sentences = split_sentences(haystack or DEFAULT_FILLER)
    offset = rng.randrange(len(sentences))
    names = _var_names(rng, (hops + 1) * num_chains)
    inserts, chains = [], []
    for c in range(num_chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        value = _number(rng, 5)
        statements = [f"VAR {chain[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        # Increasing depths keep each chain in assignment order.
        depths = sorted(rng.random() for _ in statements)
        inserts += list(zip(depths, statements))
        chains.append((chain, value))
    answers, value = chains[0]
    question = VT_QUESTION.format(value=value)

    def build(n: int) -> str:
        return " ".join(_insert(_cycle(sentences, offset, n), inserts) + [question])

    answer_room = " " + " ".join(answers)
    prompt = build(_fit(tokenizer, num_tokens, build, answer_room, "variable_tracking"))
    return EvalItem("variable_tracking", prompt, list(answers),
                    {"length": num_tokens, "depth": None, "seed": seed, "value": value,
                     "hops": hops, "num_chains": num_chains},
                    max_new_tokens=4 * len(answers) + 8)


# ---- RULER-style common / frequent words extraction ----

CWE_QUESTION = ("What are the {k} most common words in the list above? "
                "Answer: the top {k} words that appear most often in the list are:")


def _word_list_item(tokenizer, num_tokens, seed, task, draw: Callable[[random.Random], tuple],
                    k: int) -> EvalItem:
    """``draw(rng)`` -> (word pool, common words, how often a common word repeats per
    rare word); the list is as long as fits in ``num_tokens``."""
    rng = random.Random(seed)
    pool, common, weight = draw(rng)
    rare = [w for w in pool if w not in common]
    question = CWE_QUESTION.format(k=k)

    def words(n: int) -> List[str]:
        # n rounds: every common word `weight` times, one rare word; shuffled per round so the
        # counts stay exact whatever n is.
        out = []
        for r in range(n):
            block = list(common) * weight + [rare[r % len(rare)]]
            random.Random(seed * 7919 + r).shuffle(block)
            out += block
        return out

    def build(n: int) -> str:
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words(n)))
        return f"Below is a numbered list of words. {listing} {question}"

    answer_room = " " + ", ".join(common)
    rounds = _fit(tokenizer, num_tokens, build, answer_room, task, least=1)
    return EvalItem(task, build(rounds), list(common),
                    {"length": num_tokens, "depth": None, "seed": seed, "rounds": rounds},
                    max_new_tokens=6 * k + 4)


def common_words_item(tokenizer: Tokenizer, num_tokens: int, seed: int, k: int = 3,
                      repeats: int = 3) -> EvalItem:
    """Dictionary words: ``k`` common ones each ``repeats`` times per rare word."""
    def draw(rng):
        pool = rng.sample(WORDS, len(WORDS))
        return pool, pool[:k], repeats

    return _word_list_item(tokenizer, num_tokens, seed, "common_words", draw, k)


def frequent_words_item(tokenizer: Tokenizer, num_tokens: int, seed: int, k: int = 3) -> EvalItem:
    """Random nonsense words (no prior from pretraining helps); the ``k`` frequent ones repeat
    twice per rare word."""
    def draw(rng):
        pool = set()
        while len(pool) < 40:
            pool.add("".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou")
                             for _ in range(3)))
        pool = sorted(pool, key=lambda _: rng.random())
        return pool, pool[:k], 2

    return _word_list_item(tokenizer, num_tokens, seed, "frequent_words", draw, k)


# ---- grids ----


def make_item(task: str, tokenizer: Tokenizer, num_tokens: int, depth: Optional[float], seed: int,
              haystack: Optional[str] = None) -> EvalItem:
    if task == "passkey":
        return passkey_item(tokenizer, num_tokens, depth, seed, haystack)
    if task == "niah":
        return niah_item(tokenizer, num_tokens, depth, seed, haystack)
    if task == "niah_multikey":
        return niah_item(tokenizer, num_tokens, depth, seed, haystack, num_keys=4, task=task)
    if task == "niah_multivalue":
        return niah_item(tokenizer, num_tokens, depth, seed, haystack, num_values=3, task=task)
    if task == "variable_tracking":
        return variable_tracking_item(tokenizer, num_tokens, seed, haystack)
    if task == "common_words":
        return common_words_item(tokenizer, num_tokens, seed)
    if task == "frequent_words":
        return frequent_words_item(tokenizer, num_tokens, seed)
    fail(f"unknown task {task!r} (--tasks); choose from {', '.join(TASKS)}")


def build_items(tokenizer: Tokenizer, tasks: Sequence[str], lengths: Sequence[int],
                depths: Sequence[float], samples_per_cell: int = 1, seed: int = 0,
                haystack: Optional[str] = None) -> List[EvalItem]:
    """Every task over lengths x depths (depth-free tasks over lengths only), with a distinct
    seed per (task, cell, sample) derived from ``seed``."""
    items = []
    for t, task in enumerate(tasks):
        task_depths = list(depths) if task in DEPTH_TASKS else [None]
        for li, n in enumerate(lengths):
            for di, d in enumerate(task_depths):
                for k in range(samples_per_cell):
                    cell = ((t * len(lengths) + li) * len(task_depths) + di) * samples_per_cell + k
                    items.append(make_item(task, tokenizer, n, d, seed * 1_000_003 + cell, haystack))
    return items
