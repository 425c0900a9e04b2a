"""The real pipeline end to end: tokenizer -> preprocessing -> Megatron datasets -> training."""

import pytest

from megatron_longgen.data.preprocess import PreprocessConfig, preprocess
from megatron_longgen.data.tokenizer import train_sentencepiece
from megatron_longgen.train import main, parse_data_path
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = str(REPO / "examples" / "data" / "essays.txt")
    model = train_sentencepiece([corpus], str(root / "tok"), vocab_size=512)
    report = preprocess(PreprocessConfig(inputs=[("essays", corpus)], output_prefix=str(root / "corpus"),
                                         tokenizer_model=model, text_document="paragraph"))
    return root, model, report


def test_trains_on_preprocessed_data_with_validation(prepared, tmp_path):
    root, model, report = prepared
    blend = str(root / "corpus_blend.json")
    result = main(["--device", "cpu", "--model", "tiny", "--seq-length", "64",
                   "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
                   "--data-path", blend, "--tokenizer-model", model, "--split", "90,10,0",
                   "--eval-interval", "4", "--eval-iters", "1", "--eod-mask-loss",
                   "--sink-tokens", "4", "--sliding-window-size", "16", "--save", str(tmp_path / "ckpt")])
    assert sorted(result.losses) == [1, 2, 3, 4]
    assert 4 in result.eval_losses
    assert result.checkpoint.endswith("iter_0000004")


def test_data_path_forms(tmp_path):
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="pairs"):
        parse_data_path(["0.3", "a", "0.7"])


def test_data_needs_tokenizer():
    with pytest.raises(ValueError, match="--tokenizer-model"):
        main(["--device", "cpu", "--data-path", "x"])
