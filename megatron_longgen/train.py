"""``python -m megatron_longgen.train [flags]``: LongGen length-extension training.

Same flags as ``pretrain_longgen.py`` (run with ``--help``). Start one process per GPU with
torchrun, or submit ``launch/pretrain_longgen.sh`` with sbatch.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_longgen.training.arguments import parse_args
from megatron_longgen.training.trainer import Trainer, TrainResult


def build_datasets(train):
    """Train/valid datasets from ``--data-path`` (None with ``--mock-data``) and the EOD id."""
    if train.mock_data:
        return None, None
    from megatron_longgen.data.datasets import build_train_valid_datasets

    return build_train_valid_datasets(train)


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    from megatron_longgen.parallel.initialize import destroy_parallel

    train = parse_args(argv)
    datasets, eod_id = build_datasets(train)
    try:
        return Trainer(train, datasets=datasets, eod_id=eod_id).fit()
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1:])
