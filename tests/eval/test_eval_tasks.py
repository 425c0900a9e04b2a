"""Task generators: deterministic, within their token budget, answers checkable in the prompt."""

import re

import pytest

from megatron_longgen.data.passkey import split_sentences
from megatron_longgen.eval import tasks
from megatron_longgen.eval.tasks import NIAH_NEEDLE, build_items, load_haystack
from megatron_longgen.utils.cli import UsageError

LENGTHS, DEPTHS = [256, 512], [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def items(tokenizer):
    return build_items(tokenizer, tasks.TASKS, LENGTHS, DEPTHS, seed=3, haystack=load_haystack())


def test_deterministic_and_seed_sensitive(tokenizer, items):
    again = build_items(tokenizer, tasks.TASKS, LENGTHS, DEPTHS, seed=3, haystack=load_haystack())
    assert [(i.prompt, i.answers, i.metadata) for i in items] == \
           [(i.prompt, i.answers, i.metadata) for i in again]
    other = build_items(tokenizer, ["niah"], [256], [0.5], seed=4, haystack=load_haystack())
    assert other[0].prompt != next(i for i in items if i.task == "niah").prompt


def test_grid_shape_and_budget(tokenizer, items):
    for task in tasks.TASKS:
        got = [i for i in items if i.task == task]
        cells = len(LENGTHS) * (len(DEPTHS) if task in tasks.DEPTH_TASKS else 1)
        assert len(got) == cells, task
    for it in items:
        n = len(tokenizer.encode(it.prompt + " " + ", ".join(it.answers)))
        # Filled to the budget, within a haystack sentence (or a list round) of it.
        assert it.length - 80 < n <= it.length, (it.task, n)


def _depth_of(prompt, needle):
    """(haystack sentences before the needle, haystack sentences) with the question and every
    inserted fact left out."""
    body = prompt[:prompt.rindex("What ")]
    fact = re.compile(r"special magic numbers|pass key is|^Remember it")
    before = split_sentences(body[:body.index(needle)])
    filler = [x for x in split_sentences(body) if not fact.search(x)]
    return len([x for x in before if not fact.search(x)]), len(filler)


def test_needles_at_their_depth(items):
    for it in items:
        if it.task == "passkey":
            needle = f"The pass key is {it.answers[0]}. Remember it."
        elif it.task.startswith("niah"):
            needle = NIAH_NEEDLE.format(key=it.metadata["key"], value=it.answers[0])
            # The queried key is asked for, and every expected value is in the text once.
            assert it.prompt.endswith(f"for {it.metadata['key']} are:")
            for v in it.answers:
                assert it.prompt.count(v) == 1
            assert it.prompt.count(f"numbers for {it.metadata['key']} is:") == len(it.answers)
        else:
            continue
        assert it.prompt.count(needle) == 1
        before, total = _depth_of(it.prompt, needle)
        assert before == round(it.depth * total), (it.task, it.depth, before, total)


def test_multikey_has_distractors(items):
    it = next(i for i in items if i.task == "niah_multikey")
    assert len(re.findall(r"special magic numbers for \w+ is:", it.prompt)) == 4


def test_variable_tracking_chain_resolves(items):
    for it in (i for i in items if i.task == "variable_tracking"):
        assigned = dict(re.findall(r"VAR (\w+) = (\w+|VAR \w+)\.", it.prompt))
        def value(name):
            v = assigned[name]
            return value(v[4:]) if v.startswith("VAR ") else v
        holders = sorted(n for n in assigned if value(n) == it.metadata["value"])
        assert holders == sorted(it.answers)


def test_word_extraction_answers_are_most_common(items):
    for it in (i for i in items if i.task in ("common_words", "frequent_words")):
        words = re.findall(r"\d+\. (\w+)", it.prompt)
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts, key=counts.get, reverse=True)[:len(it.answers)]
        assert sorted(top) == sorted(it.answers)
        rest = max(c for w, c in counts.items() if w not in it.answers)
        assert min(counts[w] for w in it.answers) > rest


@pytest.mark.parametrize("task", tasks.TASKS)
def test_too_small_length_says_the_minimum(tokenizer, task):
    """The reported minimum is exact: that length builds an item within it, one less fails."""
    depth = 0.5 if task in tasks.DEPTH_TASKS else None
    with pytest.raises(UsageError, match=f"length 8 is too small for task {task}") as err:
        tasks.make_item(task, tokenizer, 8, depth, seed=1)
    needed = int(re.search(r"need at least (\d+) tokens; raise --lengths", str(err.value)).group(1))
    item = tasks.make_item(task, tokenizer, needed, depth, seed=1)
    assert len(tokenizer.encode(item.prompt)) <= needed
    with pytest.raises(UsageError, match=f"length {needed - 1} is too small .* at least {needed} "):
        tasks.make_item(task, tokenizer, needed - 1, depth, seed=1)


def test_unknown_task_is_a_usage_error(tokenizer):
    with pytest.raises(UsageError, match="unknown task 'ruler' .--tasks.; choose from passkey, niah"):
        tasks.make_item("ruler", tokenizer, 256, None, seed=0)
