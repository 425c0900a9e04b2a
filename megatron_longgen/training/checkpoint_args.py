"""The model settings of the checkpoint under ``--load``, merged with the flags given.

Megatron's ``--use-checkpoint-args``, always on: a checkpoint knows what it is (the
``longgen_config.json`` record the converter and the trainer write, or an older trainer
checkpoint's saved flags), so ``--load DIR`` alone rebuilds its model. A flag that agrees with
the checkpoint is fine; one that disagrees is an error naming both values, except the settings
that length extension changes on purpose, which ``--finetune`` may change and which are logged
as ``changed: NAME old -> new``. A resume (no ``--finetune``) continues the same run: it may
change what a run may change (iterations, LR schedule, intervals, directories, parallel layout)
but not the model or the training length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from megatron_longgen.checkpoint.hf_files import ROPE_SCALING_OPTIONS
from megatron_longgen.checkpoint.record import CheckpointRecord
from megatron_longgen.config import LongGenFields, full_attention_layer_indices, longgen_fields
from megatron_longgen.models.presets import get_preset
from megatron_longgen.training.arguments import _flag
from megatron_longgen.utils.cli import fail, is_rank_zero

# What the model is: the weights' shapes and the numerics that produced them.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "layernorm_epsilon", "vocab_size",
                "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights")
# What LongGen length extension changes on purpose (with --finetune); placement and ratio are
# compared through the full-attention layers they resolve to.
EXTENSION_FIELDS = ("seq_length", "rotary_base", "use_rope_scaling", *ROPE_SCALING_OPTIONS.values(),
                    *(f.name for f in dataclasses.fields(LongGenFields)
                      if f.name not in ("full_attention_placement", "full_attention_ratio")))
_PLACEMENT = ("full_attention_layers", "full_attention_placement", "full_attention_ratio")
# The preset fields that --model implies (its shape), compared like the flags themselves.
_PRESET_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vocab_size")


@dataclass
class LoadedCheckpoint:
    """The checkpoint under ``--load``: its directory, record and (trainer's) saved flags."""

    path: str
    record: CheckpointRecord
    train_config: Optional[Dict[str, Any]]  # None for a converted checkpoint

    @classmethod
    def read(cls, load_dir: str) -> "LoadedCheckpoint":
        from megatron_longgen.checkpoint import megatron_io
        from megatron_longgen.training.checkpointing import checkpoint_dir

        path = checkpoint_dir(load_dir)
        return cls(path, megatron_io.record_for(load_dir, None), megatron_io.saved_train_config(path))

    def settings(self) -> Dict[str, Any]:
        """The checkpoint's model settings under TrainConfig's names."""
        r, s = self.record, self.record.shape
        out = dict(
            num_layers=s.num_layers, hidden_size=s.hidden_size, ffn_hidden_size=s.ffn_hidden_size,
            num_attention_heads=s.num_attention_heads, num_query_groups=s.num_query_groups,
            kv_channels=s.head_dim, layernorm_epsilon=s.rms_norm_eps, vocab_size=s.vocab_size,
            rotary_base=r.rotary_base, **s.model_options(), **longgen_fields(r.longgen))
        out["full_attention_layers"] = r.full_layers
        if self.train_config is not None:  # a trainer checkpoint also knows its run's length
            out["seq_length"] = self.train_config["seq_length"]
            out["model"] = self.train_config["model"]
        return out


def _given_placement(given: Dict[str, Any], recorded: Dict[str, Any]):
    """The full-attention layers the given placement flags resolve to (None: none given)."""
    if not any(name in given for name in _PLACEMENT):
        return None
    if given.get("full_attention_layers") is not None:
        return sorted(int(i) for i in given["full_attention_layers"])
    placement = given.get("full_attention_placement", recorded["full_attention_placement"])
    ratio = given.get("full_attention_ratio", recorded["full_attention_ratio"])
    return list(full_attention_layer_indices(recorded["num_layers"], placement, ratio))


def merge_checkpoint_settings(given: Dict[str, Any], loaded: LoadedCheckpoint) -> Dict[str, Any]:
    """``given`` (the flags set on the command line or in --config) completed with the
    checkpoint's model settings; disagreements are a UsageError, allowed changes are logged."""
    recorded = loaded.settings()
    finetune = bool(given.get("finetune"))
    source = f"from {loaded.path}"
    if loaded.train_config is None and not finetune:
        fail(f"{loaded.path} holds weights only (a converted checkpoint: no optimizer state or "
             "data position to resume); add --finetune to start training from it")
    # What each given value is called in a message: the flag, or --model for its preset's shape.
    said = {name: f"{_flag(name)} {_show(given[name])}" for name in given}
    wanted = dict(given)
    if "model" in given and given["model"] != recorded.get("model"):
        preset = get_preset(given["model"])
        for name in _PRESET_FIELDS:
            if name not in given:
                wanted[name] = getattr(preset, name)
                said[name] = f"--model {given['model']} ({name} {wanted[name]})"
    layers = _given_placement(given, recorded)
    if layers is not None:
        wanted["full_attention_layers"] = layers
        flags = " ".join(f"{_flag(n)} {_show(given[n])}" for n in _PLACEMENT if n in given)
        said["full_attention_layers"] = f"{flags} (full-attention layers {layers})"

    merged = {**recorded, **given}
    for name in SHAPE_FIELDS + EXTENSION_FIELDS:
        if name not in wanted or name not in recorded or wanted[name] == recorded[name]:
            continue
        if name in EXTENSION_FIELDS and finetune:
            _log(f"changed: {name} {_show(recorded[name])} -> {_show(wanted[name])}")
            merged[name] = wanted[name]
            continue
        hint = ("pass --finetune to start a new run from these weights with other LongGen settings"
                if name in EXTENSION_FIELDS else
                "leave the flag out to use the checkpoint's value")
        fail(f"{said[name]} disagrees with the checkpoint's {_show(recorded[name])} ({source}); {hint}")
    if layers is not None:
        merged["full_attention_layers"] = layers
    _check_vocab_padding(loaded.record, merged.get("tensor_model_parallel_size", 1), source)
    return merged


def _check_vocab_padding(record: CheckpointRecord, tp: int, source: str) -> None:
    """The embedding keeps the checkpoint's padded rows; each TP rank takes an equal share."""
    if record.padded_vocab_size % tp:
        fail(f"--tensor-model-parallel-size {tp} does not divide the checkpoint's padded "
             f"vocabulary of {record.padded_vocab_size} rows ({source}); choose a TP that divides "
             f"it, or convert again with --target-tensor-parallel-size {tp}")


def _show(value: Any) -> str:
    """500000.0 as 500000, 1e-06 as 1e-06: floats as a person writes them in a flag."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def _log(message: str) -> None:
    if is_rank_zero():
        print(message, flush=True)
