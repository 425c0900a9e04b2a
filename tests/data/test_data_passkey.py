import pytest
from data_helpers import CORPUS_DIR, tiny_tokenizer_model

from megatron_longgen.data.passkey import (
    COMPACT_FORMAT,
    DEFAULT_FILLER,
    MARKED_FORMAT,
    PasskeyTrainingSet,
    build_passkey_pairs,
    build_passkey_samples,
    make_passkey_sample,
    score_passkey,
)
from megatron_longgen.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tiny_tokenizer_model())


@pytest.fixture(scope="module")
def corpus():
    with open(f"{CORPUS_DIR}/essays.txt", encoding="utf-8") as f:
        return f.read()


def test_deterministic(tok, corpus):
    a = make_passkey_sample(tok, 1000, 0.3, seed=11, filler_text=corpus)
    b = make_passkey_sample(tok, 1000, 0.3, seed=11, filler_text=corpus)
    c = make_passkey_sample(tok, 1000, 0.3, seed=12, filler_text=corpus)
    assert a == b
    assert a.passkey != c.passkey or a.text != c.text


@pytest.mark.parametrize("num_tokens", [200, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_length_and_answer(tok, corpus, num_tokens, depth):
    s = make_passkey_sample(tok, num_tokens, depth, seed=5, filler_text=corpus)
    assert s.text == s.prompt + s.answer and s.answer == " " + s.passkey
    assert s.prompt.endswith("What is the pass key? The pass key is")
    assert f"The pass key is {s.passkey}. Remember it." in s.prompt
    assert s.token_ids == tok.encode(s.text)
    # At most the target, and within a filler sentence of it.
    assert num_tokens - 80 <= s.num_tokens <= num_tokens
    a, b = s.answer_char_span
    assert s.text[a:b] == s.passkey and b == len(s.text)
    ta, tb = s.answer_token_span
    assert tok.decode(s.answer_token_ids).strip() == s.passkey
    assert tok.decode(s.prompt_token_ids).rstrip() == s.prompt
    assert tb == s.num_tokens and ta < tb


def test_depth_moves_the_needle(tok):
    pos = [make_passkey_sample(tok, 2000, d, seed=1).text.find("The pass key is ") for d in (0.0, 0.5, 1.0)]
    assert pos[0] == 0 and pos[0] < pos[1] < pos[2]
    n = len(make_passkey_sample(tok, 2000, 0.5, seed=1).text)
    assert 0.4 < pos[1] / n < 0.6


def test_scoring_and_grid(tok):
    s = make_passkey_sample(tok, 300, 0.5, seed=3)
    assert score_passkey(s.answer + ". Remember it.", s.passkey)
    assert not score_passkey(" 1" + s.passkey, s.passkey)
    assert not score_passkey(" I do not know.", s.passkey)
    grid = build_passkey_samples(tok, [256, 512], [0.0, 0.5, 1.0], samples_per_cell=2, seed=0)
    assert len(grid) == 12 and len({g.passkey for g in grid}) > 6
    pairs = build_passkey_pairs(tok, [256, 512], [0.0, 0.5, 1.0], samples_per_cell=2, seed=0)
    assert pairs == [(g.prompt, g.answer) for g in grid]
    with pytest.raises(ValueError, match="too small"):
        make_passkey_sample(tok, 10, 0.5, seed=0)


def test_marked_format(tok, corpus):
    s = make_passkey_sample(tok, 300, 0.4, seed=3, filler_text=corpus, fmt=MARKED_FORMAT)
    assert len(s.passkey) == 1 and s.answer == s.passkey
    assert f"#{s.passkey}." in s.prompt and s.prompt.endswith("The pass key is #")
    assert s.prompt.count("#") == 2 and len(s.answer_token_ids) == 1
    assert tok.decode(s.answer_token_ids).strip() == s.passkey


def test_compact_format_puts_the_key_at_many_distances_in_a_short_item(tok, corpus):
    """What the quickstart's short stage needs to learn a lookup by content: in 64 tokens the
    45-token marked wording in essay filler leaves the key at one distance from the question;
    the compact wording in the classic filler spreads it."""
    def distances(fmt, filler):
        items = PasskeyTrainingSet(tok, 64, 100, seed=1, filler_text=filler, fmt=fmt)
        return {len(tok.encode(s.prompt[s.prompt.index("#") + 2:])) for s in map(items.sample, range(100))}

    assert len(distances(MARKED_FORMAT, corpus)) <= 2
    assert len(distances(COMPACT_FORMAT, DEFAULT_FILLER)) >= 8


@pytest.mark.parametrize("loss_on_filler", [False, True])
def test_training_items_mark_the_answer(tok, corpus, loss_on_filler):
    ds = PasskeyTrainingSet(tok, 128, 4, seed=1, filler_text=corpus, fmt=MARKED_FORMAT,
                            loss_on_filler=loss_on_filler)
    item = ds[2]
    answer = item["answer_mask"] > 0
    assert tok.decode(item["labels"][answer].tolist()).strip() == ds.sample(2).passkey
    assert bool((item["loss_mask"][answer] == 1).all())
    # Filler counts only when asked; the EOD padding after the answer never does.
    assert (int(item["loss_mask"].sum()) > int(answer.sum())) == loss_on_filler
    assert item["tokens"][-1] == tok.eod and item["loss_mask"][-1] == 0
    # The prompt starts at position 0, as at inference: the sink tokens hold the text.
    sample = ds.sample(2)
    assert item["tokens"][0] == tok.bos
    assert item["tokens"][1:1 + len(sample.token_ids)].tolist() == sample.token_ids
