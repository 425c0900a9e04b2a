import os

import numpy
import pytest
import torch
from data_helpers import CORPUS_DIR, read_documents, tiny_tokenizer_model

from megatron_longgen.data.datasets import DataConfig, build_train_valid_datasets, iterate_batches
from megatron_longgen.data.preprocess import PreprocessConfig, preprocess
from megatron_longgen.data.tokenizer import build_tokenizer

SEQ = 128


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tiny_tokenizer_model())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    return preprocess(PreprocessConfig(
        inputs=[("stories", os.path.join(CORPUS_DIR, "stories.jsonl")), ("essays", os.path.join(CORPUS_DIR, "essays.txt"))],
        output_prefix=str(out), tokenizer_model=tiny_tokenizer_model(), text_document="paragraph",
        upsample_long_min_tokens=2048, upsample_factor=3, progress=False,
    ))


def _is_slice_of_some_document(piece, doc_strings):
    key = "," + ",".join(map(str, piece)) + ","
    return any(key in d for d in doc_strings)


def test_batches_come_from_the_written_data(tok, prepared):
    cfg = DataConfig(seq_length=SEQ, global_batch_size=4, train_iters=20, blend_path=prepared.blend_path,
                     eval_iters=2, eval_interval=10, split="90,10,0")
    train, valid = build_train_valid_datasets(cfg, tok)
    assert len(train) >= 80 and valid is not None and len(valid) >= 12
    docs = [d for p in prepared.prefixes for d in read_documents(p)]
    doc_strings = ["," + ",".join(map(str, d)) + "," for d in docs]
    batches = list(iterate_batches(train, micro_batch_size=2))
    assert len(batches) == len(train) // 2
    for batch in batches[:5]:
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
        for k in ("tokens", "labels", "position_ids"):
            assert batch[k].shape == (2, SEQ) and batch[k].dtype == torch.long
        assert batch["loss_mask"].shape == (2, SEQ)
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
        for row in range(2):
            stream = batch["tokens"][row].tolist() + [batch["labels"][row, -1].item()]
            # Split at EOS: each piece (EOS kept) must be a contiguous run of one written document.
            piece = []
            for t in stream:
                piece.append(t)
                if t == tok.eos_id:
                    assert _is_slice_of_some_document(piece, doc_strings)
                    piece = []
            if piece:
                assert _is_slice_of_some_document(piece, doc_strings)


def test_document_boundary_options(tok, prepared):
    cfg = DataConfig(seq_length=SEQ, global_batch_size=2, train_iters=10, blend_path=prepared.blend_path,
                     split="100,0,0", reset_position_ids=True, eod_mask_loss=True, reset_attention_mask=True,
                     create_attention_mask=True)
    train, valid = build_train_valid_datasets(cfg, tok)
    assert valid is None
    seen_eos = 0
    for batch in iterate_batches(train, micro_batch_size=2):
        tokens, pos, loss_mask = batch["tokens"], batch["position_ids"], batch["loss_mask"]
        assert batch["attention_mask"].shape == (2, 1, SEQ, SEQ)
        assert torch.all(loss_mask[tokens == tok.eos_id] == 0)
        for row in range(2):
            for i in (tokens[row] == tok.eos_id).nonzero().flatten().tolist():
                seen_eos += 1
                if i + 1 < SEQ:
                    assert pos[row, i + 1] == 0
                    # Megatron's mask is True where attention is blocked.
                    assert batch["attention_mask"][row, 0, i + 1, i].item() is True
    assert seen_eos > 0


def test_blend_weights_drive_sampling(tok, prepared):
    cfg = DataConfig(seq_length=SEQ, global_batch_size=8, train_iters=100, blend_path=prepared.blend_path,
                     split="100,0,0")
    train, _ = build_train_valid_datasets(cfg, tok)
    counts = numpy.bincount(train.dataset_index, minlength=len(prepared.weights))
    numpy.testing.assert_allclose(counts / counts.sum(), prepared.weights, atol=0.02)


def test_data_parallel_slices(tok, prepared):
    cfg = DataConfig(seq_length=SEQ, global_batch_size=4, train_iters=5, blend=(prepared.prefixes, prepared.weights),
                     split="100,0,0")
    train, _ = build_train_valid_datasets(cfg, tok)
    whole = list(iterate_batches(train, micro_batch_size=4))
    r0 = list(iterate_batches(train, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2))
    r1 = list(iterate_batches(train, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2))
    assert len(r0) == len(r1) == len(whole)
    for w, a, b in zip(whole, r0, r1):
        assert torch.equal(torch.cat([a["tokens"], b["tokens"]]), w["tokens"])
    resumed = next(iterate_batches(train, micro_batch_size=4, consumed_samples=8))
    assert torch.equal(resumed["tokens"], whole[2]["tokens"])


def test_empty_split_is_a_clear_error(tok, prepared):
    # The long subset has 5 documents: a 1% validation share rounds to none, which Megatron's
    # GPTDataset would otherwise try to fill forever.
    cfg = DataConfig(seq_length=SEQ, global_batch_size=2, train_iters=4, blend_path=prepared.blend_path,
                     split="99,1,0", eval_iters=1, eval_interval=2)
    with pytest.raises(ValueError, match="valid split of .*corpus_stories_long_document has no documents"):
        build_train_valid_datasets(cfg, tok)
