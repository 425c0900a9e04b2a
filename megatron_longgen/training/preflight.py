"""Checks of what a run reads and writes, made before any work so a mistake costs seconds.

``check_files`` needs no process group (paths of ``--save``, ``--data-path``...; ``--load`` is
read, and so checked, by ``parse_args``).
``check_tokenizer_vocabulary`` and ``check_dataset_token_ids`` compare the tokenizer and the
data with the model's vocabulary: a token id beyond the embedding table would otherwise fail
inside the first step (an ``IndexError`` on CPU, a device-side assert on GPU).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from megatron_longgen.training.arguments import TrainConfig
from megatron_longgen.utils.cli import check_output_directory, fail

# Tokens per chunk of the token-id scan (128 MiB of uint16), and the size that earns progress lines.
SCAN_CHUNK = 1 << 26
SCAN_REPORT = 1 << 30


def check_files(train: TrainConfig, prefixes: Sequence[str] = ()) -> None:
    """Output directories that are files, data prefixes without their files."""
    for flag, path in (("--save", train.save), ("--tensorboard-dir", train.tensorboard_dir),
                       ("--data-cache-path", train.data_cache_path)):
        if path:
            check_output_directory(path, flag)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                fail(f"--data-path prefix {prefix}: {prefix + suffix} does not exist (a prefix is "
                     f"the path tools/preprocess_data.py wrote, without .bin / .idx)")


def check_tokenizer_vocabulary(tokenizer_vocab: int, model_vocab: int, tokenizer_model: str) -> None:
    if tokenizer_vocab > model_vocab:
        fail(f"--tokenizer-model {tokenizer_model} has {tokenizer_vocab} tokens, more than the "
             f"model's vocabulary of {model_vocab} (padded); raise --vocab-size to at least "
             f"{tokenizer_vocab} or leave it out to take the tokenizer's")


def check_dataset_token_ids(prefixes: Sequence[str], model_vocab: int) -> None:
    """Every token id of every dataset must be below ``model_vocab``. Each rank reads its share
    of the chunks and the maxima are reduced, so the job reads the data once and every rank
    fails alike."""
    import torch
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    largest = torch.tensor([largest_token_id(p, model_vocab, rank, world) for p in prefixes],
                           dtype=torch.int64)
    if world > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        largest = largest.to(device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    for prefix, top in zip(prefixes, largest.tolist()):
        if top >= model_vocab:
            fail(f"--data-path {prefix} holds token id {top}, beyond the model's vocabulary of "
                 f"{model_vocab} (padded): it was made with a larger tokenizer; give the tokenizer "
                 f"it was made with and --vocab-size > {top}, or preprocess it again")


def largest_token_id(prefix: str, model_vocab: int, rank: int = 0, world: int = 1) -> int:
    """The largest token id in chunks ``rank, rank + world, ...`` of ``prefix``.bin (-1 if none,
    or if the file's integer type cannot hold an id as large as ``model_vocab``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(prefix).index.dtype
    if np.iinfo(dtype).max < model_vocab:
        return -1
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    starts = range(rank * SCAN_CHUNK, len(tokens), world * SCAN_CHUNK)
    report = rank == 0 and len(tokens) >= SCAN_REPORT
    largest = -1
    for i, start in enumerate(starts):
        largest = max(largest, int(tokens[start:start + SCAN_CHUNK].max()))
        if report and i % 16 == 15:
            print(f"checking token ids of {prefix}.bin: {100 * (i + 1) / len(starts):.0f}%",
                  file=sys.stderr, flush=True)
    return largest
