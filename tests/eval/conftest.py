"""A tiny SentencePiece tokenizer (trained once) and a tiny random LongGen model."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from megatron_longgen.data.tokenizer import build_tokenizer, train_sentencepiece

    data = os.path.join(REPO, "examples", "data")
    model = train_sentencepiece([os.path.join(data, "essays.txt"), os.path.join(data, "stories.jsonl")],
                                str(tmp_path_factory.mktemp("tok") / "tiny"), vocab_size=512)
    return build_tokenizer(model)
