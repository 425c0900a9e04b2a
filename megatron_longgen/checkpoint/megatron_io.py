"""The Megatron side of a conversion: one TP=1, PP=1 model in a single CPU process.

torch_dist checkpoints are layout independent (each tensor is stored with its global shape),
so a model saved from one process loads at any TP/PP, and any layout loads into one process.
Saving and loading go through the trainer's own checkpoint functions, so the layout on disk
is exactly what ``--load`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_longgen.attention.patterns import CausalPattern
from megatron_longgen.checkpoint.errors import ConversionError
from megatron_longgen.checkpoint.hf_files import LlamaShape, rope_scaling_from_options
from megatron_longgen.checkpoint.record import DTYPES, CheckpointRecord, LongGenSettings
from megatron_longgen.config import LongGenConfig, longgen_fields, with_unrecorded_fields
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import LLAMA_ARCH, get_preset
from megatron_longgen.training import checkpointing
from megatron_longgen.utils.cli import UsageError

EMBED_KEY = "embedding.word_embeddings.weight"


def init_single_process(device: str = "cpu") -> None:
    """Megatron's groups with TP = PP = 1 in this process (gloo on CPU)."""
    from megatron_longgen.parallel.initialize import initialize_parallel

    if (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        return
    initialize_parallel(device=device)


def megatron_config(record: CheckpointRecord, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                    **overrides) -> LongGenConfig:
    s, g = record.shape, record.longgen
    kwargs = dict(
        LLAMA_ARCH,
        num_layers=s.num_layers, hidden_size=s.hidden_size, ffn_hidden_size=s.ffn_hidden_size,
        num_attention_heads=s.num_attention_heads, num_query_groups=s.num_query_groups,
        kv_channels=s.head_dim, layernorm_epsilon=s.rms_norm_eps,
        rotary_base=record.rotary_base, **s.model_options(),
        **{**longgen_fields(g), "full_attention_layers": record.full_layers},
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=DTYPES[record.dtype], pipeline_dtype=DTYPES[record.dtype],
        # Weights are overwritten by the conversion: skip the (slow, for 70B) random init.
        use_cpu_initialization=True, perform_initialization=False,
    )
    kwargs.update(overrides)
    return LongGenConfig(**kwargs)


def build_model(record: CheckpointRecord, **config_overrides):
    """This process's GPTModel for ``record`` (the whole model when TP = PP = 1)."""
    config = megatron_config(record, parallel_state.get_tensor_model_parallel_world_size(),
                             parallel_state.get_pipeline_model_parallel_world_size(), **config_overrides)
    model = build_longgen_model(config, record.padded_vocab_size, record.shape.max_position_embeddings)
    return model.eval()


def save(model, root: str) -> str:
    """The trainer's layout: ``root/iter_0000000`` + tracker ``0``; load it with ``--finetune``."""
    return checkpointing.save_checkpoint(root, 0, [model], None, None, consumed_samples=0)


def check_storage_files(path: str) -> None:
    """Every ``.distcp`` file of a torch_dist checkpoint holds the bytes its ``.metadata`` says:
    a truncated or missing file is an error naming it, before any model is built (the
    loader's own error names no file)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(path).read_metadata().storage_data
    except Exception as err:  # a short or corrupt .metadata: pickle, EOF or OS errors
        raise ConversionError(f"cannot read {os.path.join(path, '.metadata')} (truncated or "
                              f"corrupt?): {err!r}") from err
    needed: Dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ConversionError(f"checkpoint file {file} is missing; copy the whole {path}")
        if os.path.getsize(file) < size:
            raise ConversionError(f"checkpoint file {file} is truncated: {os.path.getsize(file)} "
                                  f"bytes, its metadata needs {size}; copy it again")


def _saved_tensor_meta(path: str) -> Dict[str, object]:
    check_storage_files(path)
    return dist_checkpointing.load_tensors_metadata(path)


def record_for(root: str, iteration: Optional[int]) -> CheckpointRecord:
    """What the checkpoint under ``root`` is: its record (inside the iteration's directory, as
    the trainer writes it, or beside it, as the converter does), or, for a trainer checkpoint
    older than records, one rebuilt from its saved flags. Padded vocabulary and dtype are read
    from the saved tensors."""
    try:
        path = checkpointing.checkpoint_dir(root, iteration)
    except UsageError as err:  # the converters' and tools' error type
        raise ConversionError(str(err)) from err
    meta = _saved_tensor_meta(path)
    if EMBED_KEY not in meta:
        raise ConversionError(f"{path} holds no {EMBED_KEY}; is it a LongGen/GPT checkpoint?")
    embed = meta[EMBED_KEY]
    dtype = {v: k for k, v in DTYPES.items()}.get(embed.dtype)
    if dtype is None:
        raise ConversionError(f"unsupported checkpoint dtype {embed.dtype}")
    record = (CheckpointRecord.load(path) or CheckpointRecord.load(root)
              or CheckpointRecord.load(os.path.dirname(path)))
    if record is None:
        record = _record_from_trainer(path)
    record.padded_vocab_size = int(embed.global_shape[0])  # as saved, whatever TP padded it
    record.dtype = dtype
    if embed.global_shape[1] != record.shape.hidden_size:
        raise ConversionError(f"config/weight shape mismatch: {EMBED_KEY} is {tuple(embed.global_shape)} "
                              f"but hidden_size is {record.shape.hidden_size}")
    return record


def saved_train_config(path: str) -> Optional[dict]:
    """The trainer flags a trainer checkpoint directory saved (None for a converted one)."""
    return dist_checkpointing.load_common_state_dict(path).get("train_config")


def _record_from_trainer(path: str) -> CheckpointRecord:
    from megatron_longgen.training.arguments import TrainConfig
    from megatron_longgen.training.setup import model_config_from

    saved = saved_train_config(path)
    if saved is None:
        raise ConversionError(f"{path} has neither a longgen_config.json nor the trainer's train_config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in with_unrecorded_fields(saved).items() if k in known})
    train.tensor_model_parallel_size = train.pipeline_model_parallel_size = 1
    train.virtual_pipeline_model_parallel_size, train.context_parallel_size = None, 1
    train.sequence_parallel, train.device = False, "cpu"
    return record_from_training(model_config_from(train), train, padded_vocab_size=0)


def record_from_training(config: LongGenConfig, train, padded_vocab_size: int,
                         source: Optional[CheckpointRecord] = None) -> CheckpointRecord:
    """The record of a model the trainer built from ``config``. ``source`` is the record of the
    checkpoint it started from: its HF config, source family and positions carry over, so
    an export describes the model the source was, extended to the trained length."""
    vocab = train.vocab_size or get_preset(train.model).vocab_size
    positions = train.seq_length if source is None else max(source.shape.max_position_embeddings,
                                                            train.seq_length)
    shape = LlamaShape(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups, head_dim=config.kv_channels, vocab_size=vocab,
        rms_norm_eps=config.layernorm_epsilon,
        rope_theta=source.shape.rope_theta if source is not None else config.rotary_base,
        max_position_embeddings=positions,
        tie_word_embeddings=not config.untie_embeddings_and_output_weights,
        qkv_bias=config.add_qkv_bias, qk_norm=config.qk_layernorm,
        rope_scaling=rope_scaling_from_options(config),
        source_architecture=(source.shape.source_architecture if source is not None
                             else LlamaShape.source_architecture))
    settings = LongGenSettings(
        **{**longgen_fields(config), "full_attention_layers": list(config.full_layer_indices)},
        rotary_base=config.rotary_base)
    return CheckpointRecord(
        shape=shape, longgen=settings, padded_vocab_size=padded_vocab_size,
        dtype="bf16" if train.bf16 else "fp32",
        target_tensor_parallel_size=train.tensor_model_parallel_size,
        target_pipeline_parallel_size=train.pipeline_model_parallel_size,
        hf_config=dict(source.hf_config) if source is not None else {})


def load(model, root: str, iteration: Optional[int]) -> None:
    checkpointing.load_checkpoint(root, [model], finetune=True, iteration=iteration)


def layer_params(model, i: int) -> Dict[str, torch.Tensor]:
    """Layer ``i``'s tensors keyed by their per-layer suffix (TP = PP = 1 model)."""
    layer = model.decoder.layers[i]
    return {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}


@contextlib.contextmanager
def attention_pattern(model, pattern):
    """Temporarily give every attention layer ``pattern``, whatever its own."""
    from megatron_longgen.attention.core_attention import LongGenCoreAttention

    saved = []
    for module in model.modules():
        if isinstance(module, LongGenCoreAttention):
            saved.append((module, module.pattern))
            module.pattern, module._backend_cache = pattern, {}
    try:
        yield model
    finally:
        for module, saved_pattern in saved:
            module.pattern, module._backend_cache = saved_pattern, {}


def all_full_attention(model):
    """Temporarily make every layer causal: how an HF Llama must match the imported weights."""
    return attention_pattern(model, CausalPattern())


def load_inference_model(root: str, iteration=None, tensor_parallel: int = 1, device: str = "cpu"):
    """This rank's part of a checkpoint's model for generation: TP ranks of one node (launched
    with torchrun), PP = 1, eval mode, on ``device``. The distributed checkpoint reshards to
    any TP size; a checkpoint whose tensors disagree with the config it records fails clearly."""
    from megatron_longgen.parallel.initialize import initialize_parallel

    record = record_for(root, iteration)
    s = record.shape
    if s.num_attention_heads % tensor_parallel or s.num_query_groups % tensor_parallel:
        raise ConversionError(
            f"tensor parallel size {tensor_parallel} must divide the attention heads "
            f"({s.num_attention_heads}) and the query groups ({s.num_query_groups})")
    if tensor_parallel == 1:
        init_single_process(device)  # keeps groups a caller already set up at TP = PP = 1
    else:
        initialize_parallel(tensor_model_parallel_size=tensor_parallel, device=device)
    # On CUDA the parameters are made there (NCCL loads them in place); modules that ignore
    # the device flag (Megatron's local norms) are moved after.
    model = build_model(record, use_cpu_initialization=device == "cpu").to(device)
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        load(model, root, iteration)
    except (CheckpointException, CheckpointingException, RuntimeError, KeyError) as err:
        raise ConversionError(f"checkpoint {root} does not match the model its config describes "
                              f"({s}): {err}") from err
    return model.eval()
