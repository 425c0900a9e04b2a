"""``python -m megatron_longgen.train [flags]``: LongGen length-extension training.

Same flags as ``pretrain_longgen.py`` (run with ``--help``). Start one process per GPU with
torchrun, or submit ``launch/pretrain_longgen.sh`` with sbatch.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a command, not imported: before Megatron-Core is imported
    from megatron_longgen.utils.accelerators import quiet_fallback_warnings

    quiet_fallback_warnings()  # the trainer's banner names the accelerators found

import dataclasses
import os
import sys
from typing import List, Optional, Sequence, Tuple

from megatron_longgen.data.blend import load_blend
from megatron_longgen.data.datasets import DataConfig, build_train_valid_datasets
from megatron_longgen.data.tokenizer import build_tokenizer
from megatron_longgen.training.arguments import TrainConfig, parse_args
from megatron_longgen.training.preflight import (
    check_dataset_token_ids,
    check_files,
    check_tokenizer_vocabulary,
)
from megatron_longgen.training.setup import initialize_for, vocab_size_for
from megatron_longgen.training.trainer import Trainer, TrainResult, stage
from megatron_longgen.utils.cli import fail, run_main


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``--data-path`` as Megatron takes it: a blend file written by preprocessing, prefixes,
    or ``W1 PREFIX1 W2 PREFIX2 ...``."""
    if len(data_path) == 1 and data_path[0].endswith(".json"):
        if not os.path.isfile(data_path[0]):
            fail(f"--data-path {data_path[0]}: no such blend file")
        try:
            return load_blend(data_path[0])
        except (ValueError, KeyError) as err:
            fail(f"--data-path {data_path[0]}: {err}")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        return list(data_path), None
    if len(data_path) % 2:
        fail(f"--data-path with weights needs pairs 'WEIGHT PREFIX', got {list(data_path)}")
    return list(data_path[1::2]), weights


def build_datasets(train: TrainConfig, blend, tokenizer):
    """(train, valid) datasets from ``blend`` (see ``parse_data_path``), after checking that
    every token id fits the model's vocabulary."""
    check_dataset_token_ids(blend[0], vocab_size_for(train))
    data_config = DataConfig(
        seq_length=train.seq_length, global_batch_size=train.global_batch_size,
        train_iters=train.train_iters, blend=blend, seed=train.seed,
        split=train.split, eval_iters=train.eval_iters if train.eval_interval else 0,
        eval_interval=train.eval_interval, reset_position_ids=train.reset_position_ids,
        reset_attention_mask=train.reset_attention_mask, eod_mask_loss=train.eod_mask_loss,
        path_to_cache=train.data_cache_path)
    return build_train_valid_datasets(data_config, tokenizer)


def prepare(train: TrainConfig):
    """Every check that needs no process group, before any start-up cost: flags, files, the
    tokenizer. Returns (train with the tokenizer's vocabulary, blend, tokenizer); blend and
    tokenizer are None with ``--mock-data``."""
    blend = None if train.mock_data or not train.data_path else parse_data_path(train.data_path)
    train.validate(int(os.environ.get("WORLD_SIZE", "1")), datasets_given=blend is not None)
    check_files(train, blend[0] if blend else ())
    if blend is None:
        return train, None, None
    tokenizer = build_tokenizer(train.tokenizer_model)
    if train.vocab_size is None:
        train = dataclasses.replace(train, vocab_size=tokenizer.vocab_size)
    check_tokenizer_vocabulary(tokenizer.vocab_size, vocab_size_for(train), train.tokenizer_model)
    return train, blend, tokenizer


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    from megatron_longgen.parallel.initialize import destroy_parallel

    train, blend, tokenizer = prepare(parse_args(argv))
    initialize_for(train)  # the dataset builder coordinates ranks through torch.distributed
    try:
        datasets = None
        if blend is not None:
            with stage("building the datasets"):
                datasets = build_datasets(train, blend, tokenizer)
        eod_id = tokenizer.eod if tokenizer is not None else None
        return Trainer(train, datasets=datasets, eod_id=eod_id).fit()
    finally:
        destroy_parallel()


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: exit status 0, or ``USAGE_ERROR`` with one ``error:`` line."""
    def train_only(args) -> None:  # the TrainResult is for callers in Python
        main(args)

    return run_main(train_only, argv)


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
