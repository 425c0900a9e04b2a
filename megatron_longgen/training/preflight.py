"""Checks of what a run reads and writes, made before any work so a mistake costs seconds.

``check_files`` needs no process group (paths of ``--save``, ``--data-path``, ``--load``...);
``check_vocabulary`` compares the tokenizer and the data with the model's vocabulary, where a
token id beyond the embedding table would otherwise fail deep inside the first step (an
``IndexError`` on CPU, a device-side assert on GPU).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Optional, Sequence

import numpy as np

from megatron_longgen.training.arguments import TrainConfig
from megatron_longgen.training.checkpointing import TRACKER, checkpoint_name
from megatron_longgen.utils.cli import fail

# Tokens per chunk of the token-id scan (128 MiB of uint16), and the size that earns progress lines.
SCAN_CHUNK = 1 << 26
SCAN_REPORT = 1 << 30


def check_files(train: TrainConfig, prefixes: Sequence[str] = ()) -> None:
    """Output directories that are files, data prefixes without their files, ``--load`` folders
    that hold no Megatron checkpoint."""
    for flag, path in (("--save", train.save), ("--tensorboard-dir", train.tensorboard_dir),
                       ("--data-cache-path", train.data_cache_path)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            fail(f"{flag} {path} is a file; give a directory (it is created if missing)")
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                fail(f"--data-path prefix {prefix}: {prefix + suffix} does not exist (a prefix is "
                     f"the path tools/preprocess_data.py wrote, without .bin / .idx)")
    if train.load:
        check_checkpoint_dir(train.load)


def check_checkpoint_dir(root: str) -> None:
    """``root`` must be what ``--save`` wrote (a tracker and its iteration) or one checkpoint."""
    if not os.path.isdir(root):
        fail(f"--load {root} " + ("is a file; give a checkpoint directory" if os.path.exists(root)
                                  else "does not exist"))
    if os.path.isfile(os.path.join(root, "metadata.json")):
        return  # one checkpoint, e.g. iter_0000100
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if not text.isdigit():
            fail(f"--load {root}: {TRACKER} should hold an iteration number, found {text!r}")
        if not os.path.isdir(checkpoint_name(root, int(text))):
            fail(f"--load {root}: {TRACKER} names iteration {text}, but "
                 f"{checkpoint_name(root, int(text))} does not exist")
        return
    if os.path.isfile(os.path.join(root, "config.json")) and (
            glob.glob(os.path.join(root, "*.safetensors")) or glob.glob(os.path.join(root, "*.bin"))):
        fail(f"--load {root} is a Hugging Face model, not a Megatron checkpoint; convert it first: "
             f"python tools/convert_hf_to_megatron.py --hf-dir {root} --megatron-dir DIR, "
             f"then --load DIR")
    fail(f"--load {root} holds no checkpoint: neither {TRACKER} nor a checkpoint's metadata.json "
         f"(give the --save directory of an earlier run, or one iter_XXXXXXX folder in it)")


def check_tokenizer_vocabulary(tokenizer_vocab: int, model_vocab: int, tokenizer_model: str) -> None:
    if tokenizer_vocab > model_vocab:
        fail(f"--tokenizer-model {tokenizer_model} has {tokenizer_vocab} tokens, more than the "
             f"model's vocabulary of {model_vocab} (padded); raise --vocab-size to at least "
             f"{tokenizer_vocab} or leave it out to take the tokenizer's")


def check_dataset_token_ids(prefixes: Sequence[str], model_vocab: int) -> None:
    """Every token id of every dataset must be below ``model_vocab``. Run on all ranks: rank 0
    scans, the others wait for its verdict, so all of them fail alike."""
    import torch.distributed as dist

    verdict = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        verdict[0] = _first_out_of_range(prefixes, model_vocab)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        fail(verdict[0])


def _first_out_of_range(prefixes: Sequence[str], model_vocab: int) -> Optional[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        dtype = IndexedDataset(prefix).index.dtype
        if np.iinfo(dtype).max < model_vocab:
            continue  # the file's integer type cannot hold an id that large
        largest = max_token_id(prefix + ".bin", dtype)
        if largest >= model_vocab:
            return (f"--data-path {prefix} holds token id {largest}, beyond the model's vocabulary "
                    f"of {model_vocab} (padded): it was made with a larger tokenizer; give the "
                    f"tokenizer it was made with and --vocab-size > {largest}, or preprocess again")
    return None


def max_token_id(bin_path: str, dtype) -> int:
    """The largest token id in an indexed dataset's .bin, read in chunks (memory stays small)."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    largest, report = -1, len(tokens) >= SCAN_REPORT
    for start in range(0, len(tokens), SCAN_CHUNK):
        largest = max(largest, int(tokens[start:start + SCAN_CHUNK].max()))
        if report and (start // SCAN_CHUNK) % 16 == 15:
            print(f"checking token ids of {bin_path}: {100 * (start + SCAN_CHUNK) / len(tokens):.0f}%",
                  file=sys.stderr, flush=True)
    return largest
