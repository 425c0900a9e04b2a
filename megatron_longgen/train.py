"""``python -m megatron_longgen.train [flags]``: LongGen length-extension training.

Same flags as ``pretrain_longgen.py`` (run with ``--help``). Start one process per GPU with
torchrun, or submit ``launch/pretrain_longgen.sh`` with sbatch.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import List, Optional, Sequence, Tuple

from megatron_longgen.data.blend import load_blend
from megatron_longgen.data.datasets import DataConfig, build_train_valid_datasets
from megatron_longgen.data.tokenizer import build_tokenizer
from megatron_longgen.training.arguments import TrainConfig, parse_args
from megatron_longgen.training.setup import initialize_for
from megatron_longgen.training.trainer import Trainer, TrainResult, stage
from megatron_longgen.utils.cli import run_main


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``--data-path`` as Megatron takes it: a blend file written by preprocessing, prefixes,
    or ``W1 PREFIX1 W2 PREFIX2 ...``."""
    if len(data_path) == 1 and data_path[0].endswith(".json"):
        return load_blend(data_path[0])
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        return list(data_path), None
    if len(data_path) % 2:
        raise ValueError(f"--data-path with weights needs pairs 'WEIGHT PREFIX', got {list(data_path)}")
    return list(data_path[1::2]), weights


def build_datasets(train: TrainConfig):
    """(train config with the tokenizer's vocabulary, (train, valid) datasets, EOD id).
    With ``--mock-data``: no datasets and no EOD."""
    if train.mock_data:
        return train, None, None
    if not train.tokenizer_model:
        raise ValueError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
    tokenizer = build_tokenizer(train.tokenizer_model)
    if train.vocab_size is None:
        train = dataclasses.replace(train, vocab_size=tokenizer.vocab_size)
    data_config = DataConfig(
        seq_length=train.seq_length, global_batch_size=train.global_batch_size,
        train_iters=train.train_iters, blend=parse_data_path(train.data_path), seed=train.seed,
        split=train.split, eval_iters=train.eval_iters if train.eval_interval else 0,
        eval_interval=train.eval_interval, reset_position_ids=train.reset_position_ids,
        reset_attention_mask=train.reset_attention_mask, eod_mask_loss=train.eod_mask_loss,
        path_to_cache=train.data_cache_path)
    return train, build_train_valid_datasets(data_config, tokenizer), tokenizer.eod


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    from megatron_longgen.parallel.initialize import destroy_parallel

    train = parse_args(argv)
    initialize_for(train)  # the dataset builder coordinates ranks through torch.distributed
    with stage("building the datasets"):
        train, datasets, eod_id = build_datasets(train)
    try:
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
