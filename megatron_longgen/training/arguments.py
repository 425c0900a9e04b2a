"""Command-line flags of the trainer, named as Megatron names them, plus the LongGen flags.

A YAML file (``--config``) may set the same keys (with dashes or underscores); flags given on
the command line win. With ``--load``, the checkpoint's model settings fill in the flags left
out and check the ones given (``checkpoint_args.py``). The result is two dataclasses: the
model's ``LongGenConfig`` (built from a preset and the model flags) and the run's ``TrainConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_longgen.config import (
    ATTENTION_BACKENDS,
    CROSS_ENTROPY_FUSION_IMPLS,
    PLACEMENTS,
    SPARSE_PATTERNS,
    SWIGLU_FUSION_IMPLS,
    LongGenConfig,
    VERT_STRIDE_RULES,
    LongGenFields,
)
from megatron_longgen.utils.cli import ArgumentParser, UsageError, fail


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
    cross_entropy_loss_fusion: Optional[bool] = None
    cross_entropy_fusion_impl: Optional[str] = None
    linear_cross_entropy_chunk_mb: Optional[float] = None
    # fused layer ops (None: on for CUDA, off on CPU)
    rms_norm_fusion: Optional[bool] = None
    rope_fusion: Optional[bool] = None
    bias_swiglu_fusion: Optional[bool] = None
    swiglu_fusion_impl: Optional[str] = None
    bias_dropout_fusion: Optional[bool] = None
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
    metrics_log: bool = True
    metrics_log_path: Optional[str] = None
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
    vert_stride_rule: Optional[str] = None
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
    kv_channels: Optional[int] = None
    layernorm_epsilon: Optional[float] = None
    # architecture options of the Llama-3.x / Mistral / Qwen families (Megatron's names)
    add_qkv_bias: Optional[bool] = None
    qk_layernorm: Optional[bool] = None
    untie_embeddings_and_output_weights: Optional[bool] = None
    use_rope_scaling: Optional[bool] = None
    rope_scaling_factor: Optional[float] = None
    rope_scaling_low_freq_factor: Optional[float] = None
    rope_scaling_high_freq_factor: Optional[float] = None
    rope_scaling_original_max_position_embeddings: Optional[int] = None

    def validate(self, world_size: int, datasets_given: bool = False) -> None:
        """Impossible settings fail here, before any work starts, with the fix in the message.
        Sizes first (the layout arithmetic divides by them), then the parallel layout (world
        size, heads, layers, sequence slices: ``validate_train_layout``), then the rest, and
        last the model itself (``LongGenConfig``'s checks and its sparse pattern)."""
        from megatron_longgen.parallel.layout import validate_train_layout
        from megatron_longgen.training.setup import model_config_from

        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(f"{_flag(name)} must be > 0, got {value}")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if value is not None and value < 0:
                fail(f"{_flag(name)} must be >= 0, got {value}")
        if self.min_lr > self.lr:
            fail(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        validate_train_layout(self, world_size)
        dp = world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                            * self.context_parallel_size)
        if self.global_batch_size % (self.micro_batch_size * dp):
            fail(f"--global-batch-size {self.global_batch_size} must be a multiple of "
                 f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}")
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size < 2:
            fail("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            fail("--sequence-parallel needs --tensor-model-parallel-size >= 2")
        if not (self.mock_data or self.data_path or datasets_given):
            fail("give --data-path (prefixes from tools/preprocess_data.py) or --mock-data")
        if self.data_path and not self.mock_data and not self.tokenizer_model:
            fail("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
        if self.finetune and not self.load:
            fail("--finetune loads weights from --load; give --load")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            fail(f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}")
        decay_iters = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay_iters:
            fail(f"--lr-warmup-iters {self.lr_warmup_iters} must be below the decay "
                 f"length ({decay_iters} iterations: --lr-decay-iters or --train-iters)")
        if self.recompute_granularity not in (None, "full", "selective"):
            fail("--recompute-granularity must be full or selective")
        if self.swiglu_fusion_impl and self.bias_swiglu_fusion is False:
            fail(f"--swiglu-fusion-impl {self.swiglu_fusion_impl} takes effect only with "
                 "--bias-swiglu-fusion; drop --no-bias-swiglu-fusion (or the impl)")
        if self.cross_entropy_fusion_impl and not self.cross_entropy_loss_fusion:
            fail(f"--cross-entropy-fusion-impl {self.cross_entropy_fusion_impl} takes effect only "
                 "with --cross-entropy-loss-fusion; add it (or drop the impl)")
        try:
            model = model_config_from(self)
        except UsageError:  # LongGenConfig's own checks say what to change
            raise
        except (ValueError, AssertionError) as err:  # Megatron's TransformerConfig checks
            fail(f"model settings rejected by Megatron-Core: {err}")
        # The training length decides: a window that covers it trains full attention only.
        reason = model.sparse_reads_everything(self.seq_length)
        if reason:
            fail(reason)


# Sizes and counts that must be positive when given (None: the preset's or not used).
_POSITIVE = (
    "seq_length", "vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "context_parallel_size", "micro_batch_size",
    "global_batch_size", "lr_decay_iters", "recompute_num_layers",
    "save_interval", "exit_interval", "eval_interval", "log_interval",
    "sliding_window_size", "sparse_block_size", "local_blocks", "vert_stride", "rotary_base",
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
)
# --train-iters 0 saves the initial weights (with --save) and trains nothing.
_NON_NEGATIVE = ("train_iters", "lr", "min_lr", "sink_tokens", "lr_warmup_iters", "eval_iters",
                 "weight_decay", "clip_grad")


# Llama-3.x / Mistral / Qwen options: the preset's, else LongGenConfig's (Llama-2) defaults.
ARCHITECTURE_FIELDS = (
    "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights", "use_rope_scaling",
    "rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
    "rope_scaling_original_max_position_embeddings",
)
MODEL_FIELDS = (
    "rotary_base", "sparse_attention", "sink_tokens", "sliding_window_size", "sparse_block_size",
    "local_blocks", "vert_stride", "homo_head", "vert_stride_rule", "full_attention_layers",
    "full_attention_placement", "full_attention_ratio", "core_attention_backend",
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "cross_entropy_loss_fusion", "cross_entropy_fusion_impl", "linear_cross_entropy_chunk_mb",
    "swiglu_fusion_impl", "kv_channels", "layernorm_epsilon", *ARCHITECTURE_FIELDS,
)

# One line per flag for --help; the default is appended by the parser.
HELP: Dict[str, str] = {
    "model": "named model shape (tiny, llama2-7b, llama2-70b, llama3.1-8b, llama3.1-70b, qwen2.5-7b, "
             "qwen3-8b, mistral-7b); a checkpoint under --load brings its own",
    "seq_length": "tokens per training sequence (a resume keeps the checkpoint's)",
    "vocab_size": "vocabulary size before padding to a multiple of 128 x TP",
    "tensor_model_parallel_size": "tensor-parallel size: GPUs that split every layer's matrices",
    "pipeline_model_parallel_size": "pipeline-parallel size: stages the layers are divided into",
    "virtual_pipeline_model_parallel_size": "model chunks per pipeline stage (interleaved schedule)",
    "context_parallel_size": "context-parallel size: GPUs that split every sequence",
    "sequence_parallel": "shard norms and dropout along the sequence over the TP group (needs TP >= 2)",
    "use_distributed_optimizer": "shard the optimizer state over the data-parallel ranks",
    "micro_batch_size": "sequences per micro-batch on one data-parallel rank",
    "global_batch_size": "sequences per optimizer step, over all data-parallel ranks",
    "train_iters": "optimizer steps to train for (counted from iteration 0, also on resume)",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the decay",
    "lr_warmup_iters": "steps of linear warm-up from 0 to --lr",
    "lr_decay_iters": "steps of the decay to --min-lr (unset: --train-iters)",
    "lr_decay_style": "shape of the learning-rate decay",
    "weight_decay": "AdamW weight decay",
    "adam_beta1": "Adam beta1",
    "adam_beta2": "Adam beta2",
    "adam_eps": "Adam epsilon",
    "clip_grad": "clip the global gradient norm to this value",
    "seed": "random seed of the weights, dropout and mock data",
    "bf16": "train in bf16 with fp32 master weights",
    "recompute_granularity": "activation recomputation: full layers or the attention core only",
    "recompute_method": "with full recomputation: uniform chunks or the first N layers per stage",
    "recompute_num_layers": "layers per recomputed chunk (uniform) or recomputed layers (block)",
    "data_path": "dataset prefixes from tools/preprocess_data.py, 'W1 P1 W2 P2 ...', or a blend .json",
    "mock_data": "train on random tokens (no --data-path needed)",
    "split": "train,valid,test weights of each dataset",
    "tokenizer_model": "tokenizer the data was made with (HF folder or SentencePiece model)",
    "reset_position_ids": "restart position ids after every EOD token",
    "reset_attention_mask": "keep attention inside each document (EOD-separated, packed THD)",
    "eod_mask_loss": "no loss on EOD tokens",
    "data_cache_path": "where the dataset index files are cached",
    "save": "directory to save checkpoints to",
    "load": "checkpoint directory to resume (or, with --finetune, start) from; its model settings are used",
    "finetune": "load weights only and start at iteration 0; length-extension settings may change",
    "save_interval": "save a checkpoint every N iterations (and always at the end)",
    "exit_interval": "stop after iteration N (for jobs that must end before a time limit)",
    "eval_interval": "validation loss every N iterations",
    "eval_iters": "batches per validation",
    "log_interval": "print and record metrics every N iterations",
    "tensorboard_dir": "write TensorBoard scalars here",
    "metrics_log": "write every logged iteration and validation as a JSON line (tools/plot.py training reads it)",
    "metrics_log_path": "where the JSON-lines metrics log goes (unset: SAVE/metrics.jsonl, none without --save)",
    "wandb_project": "log to this Weights & Biases project (needs wandb)",
    "peak_tflops": "peak TFLOP/s per GPU for MFU (unset: known from the GPU name)",
    "device": "cuda, or cpu (gloo) for tests",
    "rotary_base": "RoPE base; length extension raises it (e.g. 10000 -> 500000 for 128K)",
    "sparse_attention": "pattern of the sparse layers",
    "sink_tokens": "AttnSink: leading tokens every query reads",
    "sliding_window_size": "AttnSink: most recent tokens every query reads (itself included)",
    "sparse_block_size": "BlockSparse: tokens per block (a power of two >= 16)",
    "local_blocks": "BlockSparse: most recent key blocks each query block reads (its own included)",
    "vert_stride": "BlockSparse: every N-th key block is read by all later query blocks",
    "homo_head": "BlockSparse: the same vertical blocks for every head (else shifted per group)",
    "vert_stride_rule": "BlockSparse, per-group vertical blocks: cover (the groups read every block) "
                        "or legacy (one block in every vert_stride per group)",
    "full_attention_layers": "0-based indices of the full-attention layers; overrides the placement",
    "full_attention_placement": "which layers keep full attention",
    "full_attention_ratio": "fraction of the layers a named placement keeps full",
    "core_attention_backend": "kernels that run the attention",
    "num_layers": "transformer layers",
    "hidden_size": "hidden size",
    "num_attention_heads": "attention (query) heads",
    "num_query_groups": "key/value heads (GQA groups)",
    "ffn_hidden_size": "width of the SwiGLU MLP",
    "kv_channels": "width of one attention head (a preset's is hidden size / heads)",
    "layernorm_epsilon": "RMSNorm epsilon",
    "add_qkv_bias": "biases on the query, key and value projections only (Qwen2)",
    "qk_layernorm": "per-head RMSNorm on queries and keys before RoPE (Qwen3)",
    "untie_embeddings_and_output_weights": "separate input embedding and output layer; "
                                           "--no-untie-... ties them (Llama-3.2 1B/3B, small Qwen2.5)",
    "use_rope_scaling": "Llama-3.x RoPE scaling of the low frequencies (rope_type llama3)",
    "rope_scaling_factor": "llama3 RoPE scaling: factor the low frequencies are divided by",
    "rope_scaling_low_freq_factor": "llama3 RoPE scaling: low_freq_factor",
    "rope_scaling_high_freq_factor": "llama3 RoPE scaling: high_freq_factor",
    "rope_scaling_original_max_position_embeddings": "llama3 RoPE scaling: the pretraining "
                                                     "length the wavelengths are measured against",
    "cross_entropy_loss_fusion": "fused cross-entropy loss, of --cross-entropy-fusion-impl",
    "cross_entropy_fusion_impl": "native: Megatron's fused vocab-parallel loss; te: "
                                 "TransformerEngine's; linear: output layer and loss in "
                                 "chunks of tokens, never the whole sequence's logits",
    "linear_cross_entropy_chunk_mb": "linear: MiB of fp32 logits per chunk of tokens and TP rank",
    "rms_norm_fusion": "RMSNorm as one Triton kernel each way on CUDA",
    "rope_fusion": "fused RoPE through Megatron's apply_rope_fusion: TransformerEngine's when "
                   "installed, else our Triton kernel",
    "bias_swiglu_fusion": "fused SwiGLU (Megatron's bias_activation_fusion), of "
                          "--swiglu-fusion-impl",
    "swiglu_fusion_impl": "triton: one Triton kernel each way; native: Megatron's "
                          "bias_swiglu_impl (torch.compile)",
    "bias_dropout_fusion": "Megatron's fused bias-dropout-add of the residuals (torch.compile)",
}

# Fused layer ops: TrainConfig flag -> the LongGenConfig / TransformerConfig field it sets.
FUSION_FLAGS = {
    "rms_norm_fusion": "rms_norm_fusion",
    "rope_fusion": "apply_rope_fusion",
    "bias_swiglu_fusion": "bias_activation_fusion",
    "bias_dropout_fusion": "bias_dropout_fusion",
}


def _default_text(f: dataclasses.Field) -> str:
    """The default --help shows. Model settings left unset come from the checkpoint under
    --load, else from the preset (shape) or LongGenConfig (the LongGen fields)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if f.name in FUSION_FLAGS:
        return "on for CUDA, off on CPU"
    if default is not None or f.name not in MODEL_FIELDS + ("vocab_size",):
        return str(default)
    if f.name in ("core_attention_backend", "swiglu_fusion_impl"):  # how to run, not what the model is
        return getattr(LongGenConfig, f.name)
    longgen = {g.name for g in dataclasses.fields(LongGenFields)} | {"rotary_base", *ARCHITECTURE_FIELDS}
    fallback = getattr(LongGenConfig, f.name) if f.name in longgen else None
    if fallback is None:
        fallback = "the placement's" if f.name == "full_attention_layers" else "the --model preset's"
    elif isinstance(fallback, float):
        fallback = f"{fallback:g}"
    return f"the --load checkpoint's, else {fallback}"

_CHOICES = {
    "sparse_attention": SPARSE_PATTERNS,
    "vert_stride_rule": VERT_STRIDE_RULES,
    "full_attention_placement": PLACEMENTS,
    "core_attention_backend": ATTENTION_BACKENDS,
    "recompute_granularity": ("full", "selective"),
    "recompute_method": ("uniform", "block"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "cross_entropy_fusion_impl": CROSS_ENTROPY_FUSION_IMPLS,
    "swiglu_fusion_impl": SWIGLU_FUSION_IMPLS,
}

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_longgen_arguments(group) -> None:
    """Flags for every LongGenFields field, with its default (for tools other than the
    trainer, whose flags default to the model preset's values)."""
    for f in dataclasses.fields(LongGenFields):
        kwargs: Dict[str, Any] = {"default": f.default, "dest": f.name, "help": HELP[f.name]}
        if f.type in (bool, "bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in str(f.type):
            kwargs.update(nargs="+", type=int)
        else:
            kwargs["type"] = type(f.default)
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        group.add_argument(_flag(f.name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pretrain_longgen.py",
        description="LongGen length-extension training on Megatron-Core.",
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
        kwargs["help"] = f"{HELP[f.name]} (default: {_default_text(f)})"
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    values: Dict[str, Any] = load_config_file(ns.config) if ns.config else {}
    for f in dataclasses.fields(TrainConfig):
        given = getattr(ns, f.name)
        if given is not None:
            values[f.name] = given
    if values.get("load"):  # the checkpoint's model settings fill in (and check) the flags
        from megatron_longgen.training.checkpoint_args import LoadedCheckpoint, merge_checkpoint_settings

        values = merge_checkpoint_settings(values, LoadedCheckpoint.read(values["load"]))
    return TrainConfig(**values)


def load_config_file(path: str) -> Dict[str, Any]:
    """A ``--config`` YAML file as TrainConfig values, each checked against its field's type
    (YAML guesses types from the text: ``seq-length: "4k"`` must not reach the trainer)."""
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as err:
        fail(f"--config {path}: {err.strerror}")
    except yaml.YAMLError as err:
        fail(f"--config {path} is not valid YAML: {' '.join(str(err).split())}")
    if not isinstance(loaded, dict):
        fail(f"--config {path}: expected a mapping of flag names to values")
    types = typing.get_type_hints(TrainConfig)
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in types:
            fail(f"--config {path}: unknown key {key!r} (keys are the flags' names, e.g. seq-length)")
        values[name] = _config_value(path, key, value, types[name])
        if name in _CHOICES and values[name] is not None and values[name] not in _CHOICES[name]:
            fail(f"--config {path}: {key} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    return values


def _config_value(path: str, key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` (int, float, bool, str, Optional / List of them)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        item = args[0]
        if item is str and isinstance(value, str):  # data-path: "W1 P1 W2 P2" on one line
            value = value.split()
        if not isinstance(value, list):
            value = [value]
        return [_config_value(path, key, v, item) for v in value]
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not _has_type(value, annotation):
        fail(f"--config {path}: {key} must be {_TYPE_NAMES[annotation]}, got {value!r}")
    return float(value) if annotation is float else value


def _has_type(value: Any, annotation: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, not to a flag
        return annotation is bool
    return isinstance(value, (int, float) if annotation is float else annotation)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
