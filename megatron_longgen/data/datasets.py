"""Blended Megatron-Core GPT datasets from preprocessed data, and a micro-batch iterator.

Packing: GPTDataset concatenates documents (each `[BOS] ... [EOS]`) and cuts them into
`seq_length + 1` token windows, so one sample can span document boundaries. The three switches
below decide whether the model may see across them:
  * reset_position_ids: positions restart at 0 after every EOS,
  * reset_attention_mask: the (dense) attention mask blocks attention across EOS,
  * eod_mask_loss: no loss on positions whose input token is EOS (predicting the next document's
    first token from the previous document is not learnable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_longgen.data.blend import load_blend
from megatron_longgen.data.tokenizer import Tokenizer
from megatron_longgen.utils.cli import fail


@dataclass
class DataConfig:
    seq_length: int
    global_batch_size: int
    train_iters: int
    blend: Optional[Tuple[List[str], List[float]]] = None
    """(prefixes, weights); weights may be None to weight by size."""
    blend_path: Optional[str] = None
    """A blend file written by preprocessing (used when `blend` is None)."""
    seed: int = 1234
    split: str = "99,1,0"
    """train,valid,test percentages of every source's documents."""
    eval_iters: int = 0
    eval_interval: Optional[int] = None
    """Validation runs every `eval_interval` iterations for `eval_iters` global batches."""
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    """Dense [1, s, s] masks; only needed by core attentions that do not build their own."""
    path_to_cache: Optional[str] = None
    """Where Megatron caches its sample indices (None: build in memory, nothing written)."""

    def resolved_blend(self) -> Tuple[List[str], Optional[List[float]]]:
        if self.blend is not None:
            prefixes, weights = self.blend
            return list(prefixes), None if weights is None else [float(w) for w in weights]
        if self.blend_path is not None:
            return load_blend(self.blend_path)
        raise ValueError("DataConfig needs a blend or a blend_path")

    def num_samples(self) -> List[int]:
        """Samples per split, as Megatron-LM computes them."""
        train = self.train_iters * self.global_batch_size
        if self.eval_iters > 0:
            interval = self.eval_interval or self.train_iters
            valid = (self.train_iters // interval + 1) * self.eval_iters * self.global_batch_size
        else:
            valid = 0
        return [train, valid, 0]


def gpt_dataset_config(cfg: DataConfig, tokenizer: Tokenizer) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=cfg.resolved_blend(),
        split=cfg.split,
        path_to_cache=cfg.path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.create_attention_mask,
    )


def build_train_valid_datasets(cfg: DataConfig, tokenizer: Tokenizer, is_built_on_rank=None):
    """Build `(train, valid)` datasets (valid is None when eval_iters is 0 or the split is empty).

    Call on every rank (the builder synchronises ranks when torch.distributed is initialised).
    Each item is a dict of tensors: tokens, labels, loss_mask, position_ids (and attention_mask
    when `create_attention_mask`), each of length `seq_length`.
    """
    sizes = cfg.num_samples()
    config = gpt_dataset_config(cfg, tokenizer)
    _check_splits_have_documents(config, sizes)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    train, valid, _ = builder.build()
    if train is None or len(train) == 0:
        fail(f"the train split is empty: check --data-path and --split {cfg.split!r}")
    if sizes[1] == 0 or (valid is not None and len(valid) == 0):
        valid = None
    return train, valid


def _check_splits_have_documents(config: GPTDatasetConfig, sizes: Sequence[int]) -> None:
    """Fail clearly where Megatron would loop forever: a requested split with no documents.

    GPTDataset adds epochs until it has enough tokens, which never happens with zero documents
    (e.g. a small "long" subset whose 1% validation share rounds down to nothing).
    """
    prefixes, weights = config.blend
    for prefix, weight in zip(prefixes, weights or [1.0] * len(prefixes)):
        n_docs = len(IndexedDataset(prefix).document_indices) - 1
        for split, bookends in zip(Split, config.split_matrix):
            if not sizes[split.value] or not weight:
                continue
            beg, end = bookends or (0.0, 0.0)
            count = int(round(end * n_docs)) - int(round(beg * n_docs))
            if count <= 0:
                fail(
                    f"{split.name} split of {prefix} has no documents ({n_docs} documents, split "
                    f"{config.split!r}); give that split a larger share or request no {split.name} samples"
                )


_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack per-sample dicts into `[b, s]` tensors (attention_mask: `[b, 1, s, s]`)."""
    return {k: torch.stack([s[k] for s in samples]) for k in _BATCH_KEYS if k in samples[0]}


def iterate_batches(
    dataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield this data-parallel rank's micro-batches in order, as Megatron's pretraining sampler.

    Samples are taken in blocks of `micro_batch_size * data_parallel_size`; rank r gets the r-th
    slice of each block. `consumed_samples` (counted over all ranks) resumes mid-epoch. The
    iterator stops when fewer than a full block remains.
    """
    if consumed_samples % (micro_batch_size * data_parallel_size):
        raise ValueError("consumed_samples must be a multiple of micro_batch_size * data_parallel_size")
    block = micro_batch_size * data_parallel_size
    start = consumed_samples
    while start + block <= len(dataset):
        first = start + data_parallel_rank * micro_batch_size
        yield collate([dataset[i] for i in range(first, first + micro_batch_size)])
        start += block
