"""Command-line flags of the trainer, named as Megatron names them, plus the LongGen flags.

A YAML file (``--config``) may set the same keys (with dashes or underscores); flags given on
the command line win. The result is two dataclasses: the model's ``LongGenConfig`` (built from
a preset and the model flags) and the run's ``TrainConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_longgen.config import ATTENTION_BACKENDS, PLACEMENTS, SPARSE_PATTERNS, LongGenFields


@dataclass
class TrainConfig:
    # model shape
    model: str = "tiny"
    seq_length: int = 256
    vocab_size: Optional[int] = None
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # batch and schedule
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    # precision and memory
    bf16: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # data
    data_path: List[str] = field(default_factory=list)
    mock_data: bool = False
    split: str = "99,1,0"
    tokenizer_model: Optional[str] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    data_cache_path: Optional[str] = None
    # checkpoints
    save: Optional[str] = None
    load: Optional[str] = None
    finetune: bool = False
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    # evaluation and logging
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    metrics_log: bool = True  # JSON lines, --no-metrics-log: off
    metrics_log_path: Optional[str] = None  # default: SAVE/metrics.jsonl
    peak_tflops: Optional[float] = None
    device: str = "cuda"
    # LongGen model fields (None = the preset's / LongGenConfig's default)
    rotary_base: Optional[float] = None
    sparse_attention: Optional[str] = None
    sink_tokens: Optional[int] = None
    sliding_window_size: Optional[int] = None
    sparse_block_size: Optional[int] = None
    local_blocks: Optional[int] = None
    vert_stride: Optional[int] = None
    homo_head: Optional[bool] = None
    full_attention_layers: Optional[List[int]] = None
    full_attention_placement: Optional[str] = None
    full_attention_ratio: Optional[float] = None
    core_attention_backend: Optional[str] = None
    # model shape overrides (for scaled-down tests of a preset)
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None

    def validate(self, world_size: int, datasets_given: bool = False) -> None:
        """Impossible settings fail here, before any work starts, with the fix in the message.
        The parallel layout (world size, heads, layers, sequence slices) is checked by
        ``validate_train_layout``; the rest here."""
        from megatron_longgen.parallel.layout import validate_train_layout

        validate_train_layout(self, world_size)
        dp = world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                            * self.context_parallel_size)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} must be a multiple of "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}")
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size < 2:
            raise ValueError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size >= 2")
        if not (self.mock_data or self.data_path or datasets_given):
            raise ValueError("give --data-path (prefixes from tools/preprocess_data.py) or --mock-data")
        if self.finetune and not self.load:
            raise ValueError("--finetune loads weights from --load; give --load")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}")
        decay_iters = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay_iters:
            raise ValueError(f"--lr-warmup-iters {self.lr_warmup_iters} must be below the decay "
                             f"length ({decay_iters} iterations: --lr-decay-iters or --train-iters)")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError("--recompute-granularity must be full or selective")


MODEL_FIELDS = (
    "rotary_base", "sparse_attention", "sink_tokens", "sliding_window_size", "sparse_block_size",
    "local_blocks", "vert_stride", "homo_head", "full_attention_layers",
    "full_attention_placement", "full_attention_ratio", "core_attention_backend",
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
)

_CHOICES = {
    "sparse_attention": SPARSE_PATTERNS,
    "full_attention_placement": PLACEMENTS,
    "core_attention_backend": ATTENTION_BACKENDS,
    "recompute_granularity": ("full", "selective"),
    "recompute_method": ("uniform", "block"),
    "lr_decay_style": ("cosine", "linear", "constant"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_longgen_arguments(group) -> None:
    """Flags for every LongGenFields field, with its default (for tools other than the
    trainer, whose flags default to the model preset's values)."""
    for f in dataclasses.fields(LongGenFields):
        kwargs: Dict[str, Any] = {"default": f.default, "dest": f.name, "help": " "}
        if f.type in (bool, "bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in str(f.type):
            kwargs.update(nargs="+", type=int, help="0-based; overrides the placement")
        else:
            kwargs["type"] = type(f.default)
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        group.add_argument(_flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_longgen.py",
        description="LongGen length-extension training on Megatron-Core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with the same keys as these flags")
    for f in dataclasses.fields(TrainConfig):
        kwargs: Dict[str, Any] = {"default": None, "dest": f.name}
        base = f.type if isinstance(f.type, str) else str(f.type)
        if "bool" in base:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in base:
            kwargs.update(nargs="+", type=int)
        elif "List[str]" in base:
            kwargs.update(nargs="+", type=str)
        elif "float" in base:
            kwargs["type"] = float
        elif "int" in base:
            kwargs["type"] = int
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs["help"] = f"(default: {default})"
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if ns.config:
        with open(ns.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{ns.config}: expected a mapping of flag names to values")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in known:
                parser.error(f"{ns.config}: unknown key {key!r}")
            values[name] = value
    for f in dataclasses.fields(TrainConfig):
        given = getattr(ns, f.name)
        if given is not None:
            values[f.name] = given
    if isinstance(values.get("data_path"), str):
        values["data_path"] = values["data_path"].split()
    return TrainConfig(**values)
