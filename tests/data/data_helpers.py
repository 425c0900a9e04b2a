"""Shared helpers for the data tests: a tiny SentencePiece model trained once per session."""

import atexit
import functools
import json
import os
import shutil
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_DIR = os.path.join(REPO, "examples", "data")


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_model() -> str:
    from megatron_longgen.data.tokenizer import train_sentencepiece

    tmp = tempfile.mkdtemp(prefix="longgen-tok-")
    atexit.register(shutil.rmtree, tmp, True)
    return train_sentencepiece(
        [os.path.join(CORPUS_DIR, "essays.txt"), os.path.join(CORPUS_DIR, "stories.jsonl")],
        os.path.join(tmp, "tiny"),
        vocab_size=512,
    )


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)


def read_documents(prefix):
    """All documents of an indexed dataset, as lists of ints."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]
