"""Exact and partial match on hand-made generations."""

import pytest

from megatron_longgen.eval.scoring import Score, exact_match, found, partial_match, score


def test_found_is_whole_token_and_case_insensitive():
    assert found("12345", "the number is 12345.")
    assert not found("12345", "the number is 123456")
    assert found("CCFWH", "variables: ccfwh, ABCDE")
    assert not found("cat", "category")


def test_exact_and_partial():
    expected = ["111", "222", "333"]
    assert partial_match("111, 222, 333", expected) == 1.0
    assert exact_match("333 111 222 and more", expected) == 1.0
    assert partial_match("111 and 333", expected) == pytest.approx(2 / 3)
    assert exact_match("111 and 333", expected) == 0.0
    assert partial_match("nothing here", expected) == 0.0
    with pytest.raises(ValueError):
        partial_match("x", [])


def test_task_scores():
    assert score("niah", " 4871800, 1234567", ["4871800"]) == Score(1.0, 1.0)
    assert score("niah_multivalue", " 1, 2", ["1", "2", "3"]) == Score(0.0, pytest.approx(2 / 3))
    # Passkey: the first number must be the key.
    assert score("passkey", " 48585. Remember", ["48585"]) == Score(1.0, 1.0)
    assert score("passkey", " 11111 48585", ["48585"]) == Score(0.0, 0.0)
