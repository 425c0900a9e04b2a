"""HF Llama-family <-> Megatron-Core torch_dist conversions (the tools are thin CLIs over
these): Llama-2/3.x, Mistral, Qwen2(.5) and Qwen3 (see ``hf_files.llama_shape``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import torch

from megatron_longgen.checkpoint import layout, megatron_io, verify
from megatron_longgen.checkpoint.errors import (ConversionError, check_output_dir, check_separate,
                                                 staged_output)
from megatron_longgen.config import LongGenFields, longgen_fields, with_unrecorded_fields
from megatron_longgen.checkpoint.hf_files import (FAMILIES, LazyHFWeights, LlamaShape, llama_shape,
                                                  read_hf_config, sliding_window_layers)
from megatron_longgen.checkpoint.record import DTYPES, CheckpointRecord, LongGenSettings
from megatron_longgen.training.setup import padded_vocab_size

HF_MODELING_DIR = os.path.join(os.path.dirname(__file__), "hf_modeling")
HF_MODELING_FILES = ("configuration_longgen.py", "modeling_longgen.py")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json")


def _progress(tag: str, done: int, total: int, start: float) -> None:
    print(f"[{tag}] layer {done}/{total} ({time.time() - start:.1f} s)", file=sys.stderr, flush=True)


def check_target_parallel(shape: LlamaShape, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConversionError(f"target parallel sizes must be >= 1, got TP={tp}, PP={pp}")
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        raise ConversionError(
            f"target TP={tp} must divide num_attention_heads={shape.num_attention_heads} and "
            f"num_query_groups={shape.num_query_groups}")
    if shape.num_layers % pp:
        raise ConversionError(f"target PP={pp} must divide num_layers={shape.num_layers}")


# ---------------------------------------------------------------- HF -> Megatron


@dataclass
class ImportOptions:
    hf_dir: str
    megatron_dir: str
    target_tensor_parallel_size: int = 1
    target_pipeline_parallel_size: int = 1
    dtype: str = "bf16"
    longgen: LongGenSettings = field(default_factory=LongGenSettings)
    verify: bool = False
    verify_seq_length: int = 128
    verify_tolerance: Optional[float] = None
    overwrite: bool = False


def _check_hf_tensors(weights: LazyHFWeights, shape: LlamaShape) -> None:
    expected = layout.expected_hf_shapes(shape)
    names = set(weights.names())
    missing = sorted(set(expected) - names)
    if missing:
        raise ConversionError(f"{len(missing)} tensors missing from {weights.hf_dir}: {missing[:5]}")
    unexpected = sorted(n for n in names - set(expected)
                        if not n.endswith(layout.IGNORED_SUFFIXES)
                        and not (shape.tie_word_embeddings and n == layout.OUTPUT[0]))
    if unexpected:
        raise ConversionError(f"unsupported architecture: tensors a {shape.source_architecture} with "
                              f"this config.json does not have: {unexpected[:5]}")
    for name, want in expected.items():
        got = tuple(weights.shape_of(name))
        if got != want:
            raise ConversionError(f"config/weight shape mismatch: {name} is {got}, config.json implies {want}")


def _fill(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ConversionError(f"config/weight shape mismatch at {name}: {tuple(value.shape)} vs {tuple(param.shape)}")
    param.data.copy_(value)


def _fill_megatron(model, weights: LazyHFWeights, record: CheckpointRecord) -> None:
    """Copy HF tensors into the Megatron params one layer at a time, reading each lazily."""
    shape, params = record.shape, dict(model.named_parameters())
    filled = set()

    def put(name, value):
        _fill(params[name], value, name)
        filled.add(name)

    put(layout.EMBED[1], layout.pad_vocab(weights.get(layout.EMBED[0]), record.padded_vocab_size))
    start = time.time()
    for i in range(shape.num_layers):
        for suffix, value in layout.megatron_layer_from_hf(weights.get, i, shape).items():
            put(layout.megatron_layer_prefix(i) + suffix, value)
        _progress("hf->megatron", i + 1, shape.num_layers, start)
    put(layout.FINAL_NORM[1], weights.get(layout.FINAL_NORM[0]))
    if not shape.tie_word_embeddings:  # tied: the word embeddings are the output layer
        put(layout.OUTPUT[1], layout.pad_vocab(weights.get(layout.OUTPUT[0]), record.padded_vocab_size))
    left = sorted(set(params) - filled)
    if left:
        raise ConversionError(f"Megatron parameters not filled from HF: {left[:5]}")


def _hf_record(hf_dir: str, longgen: LongGenSettings, dtype: str, tp: int = 1,
               pp: int = 1) -> Tuple[CheckpointRecord, LazyHFWeights]:
    """The record of an HF Llama folder for a target layout, and its checked lazy weights."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf_config = read_hf_config(hf_dir)
    shape = llama_shape(hf_config)
    check_target_parallel(shape, tp, pp)
    weights = LazyHFWeights(hf_dir)
    _check_hf_tensors(weights, shape)
    record = CheckpointRecord(
        shape=shape, longgen=longgen, padded_vocab_size=padded_vocab_size(shape.vocab_size, tp),
        dtype=dtype, target_tensor_parallel_size=tp, target_pipeline_parallel_size=pp,
        hf_config=hf_config)
    try:  # LongGen settings are checked before any work
        megatron_io.megatron_config(record)
    except ValueError as err:  # LongGenConfig / TransformerConfig validation
        raise ConversionError(str(err)) from err
    return record, weights


def _megatron_model_from_hf(record: CheckpointRecord, weights: LazyHFWeights, device: str = "cpu"):
    megatron_io.init_single_process(device)
    model = megatron_io.build_model(record)
    _fill_megatron(model, weights, record)
    weights.close()
    return model


def hf_to_megatron(opts: ImportOptions) -> CheckpointRecord:
    """Convert ``opts.hf_dir`` into a trainer checkpoint at ``opts.megatron_dir``."""
    tp, pp = opts.target_tensor_parallel_size, opts.target_pipeline_parallel_size
    check_separate(opts.hf_dir, "--hf-dir", opts.megatron_dir, "--megatron-dir")
    check_output_dir(opts.megatron_dir, "--megatron-dir", opts.overwrite)
    record, weights = _hf_record(opts.hf_dir, opts.longgen, opts.dtype, tp, pp)
    _log_native_window(record)
    model = _megatron_model_from_hf(record, weights)
    with staged_output(opts.megatron_dir, opts.overwrite, "--megatron-dir") as tmp:
        if opts.verify:
            _verify_import(model, opts, record)
        megatron_io.save(model, tmp)
        record.save(tmp, os.path.abspath(opts.megatron_dir))
    print(f"wrote {opts.megatron_dir} (TP={tp}, PP={pp} ready; {opts.dtype})", file=sys.stderr)
    return record


def _log_native_window(record: CheckpointRecord) -> None:
    """Say what a source's own sliding window is in LongGen terms, and that the LongGen settings
    of this conversion replace it (the record's hf_config keeps the source's)."""
    window, layers = sliding_window_layers(record.hf_config)
    if window is None:
        return
    native = native_longgen_settings(record.hf_config)
    print(f"{record.shape.source_architecture} has a native sliding window of {window} tokens "
          f"in layers {layers}: LongGen --sparse-attention attn_sink --sink-tokens 0 "
          f"--sliding-window-size {window} --full-attention-layers "
          f"{' '.join(map(str, native.full_attention_layers)) or '(none)'}; this checkpoint "
          f"takes the LongGen settings given instead (full-attention layers {record.full_layers}, "
          f"{record.longgen.sparse_attention})", file=sys.stderr)


def native_longgen_settings(hf_config: dict) -> LongGenSettings:
    """The attention a plain HF model computes, as LongGen settings: every layer full, or its
    native sliding window (Mistral, Qwen2/3) as AttnSink with no sink tokens."""
    window, sliding = sliding_window_layers(hf_config)
    if window is None:
        return LongGenSettings(full_attention_placement="all")
    full = [i for i in range(hf_config["num_hidden_layers"]) if i not in sliding]
    return LongGenSettings(sparse_attention="attn_sink", sink_tokens=0, sliding_window_size=window,
                           full_attention_layers=full)


def _hf_reference(hf_dir: str, record: CheckpointRecord, dtype: torch.dtype):
    """The source's own transformers model with every layer full, at the RoPE base the
    Megatron model was given (a raised --rotary-base changes every position's rotation)."""
    import transformers

    arch = record.shape.source_architecture  # also for a LongGen export (its source's class)
    hf_config = getattr(transformers, arch.replace("ForCausalLM", "Config")).from_pretrained(hf_dir)
    hf_config.rope_parameters = {**(hf_config.rope_parameters or {}), "rope_theta": record.rotary_base}
    if getattr(hf_config, "layer_types", None) is not None:
        hf_config.layer_types = ["full_attention"] * hf_config.num_hidden_layers
    if getattr(hf_config, "sliding_window", None) is not None:
        hf_config.sliding_window = None
    return getattr(transformers, arch).from_pretrained(hf_dir, config=hf_config, dtype=dtype).eval()


def _verify_import(model, opts: ImportOptions, record: CheckpointRecord) -> verify.LogitComparison:
    """The source's HF model vs the imported weights, every layer full on both sides."""
    hf = _hf_reference(opts.hf_dir, record, DTYPES[opts.dtype])
    ids = verify.sample_tokens(record.shape.vocab_size, seq_length=opts.verify_seq_length)
    expected = verify.hf_logits(hf, ids)
    del hf
    with megatron_io.all_full_attention(model):
        got = verify.megatron_logits(model, ids, record.shape.vocab_size)
    return verify.check(verify.compare(expected, got, opts.dtype, opts.verify_tolerance))


# ---------------------------------------------------------------- Megatron -> HF


@dataclass
class ExportOptions:
    megatron_dir: str
    hf_dir: str
    iteration: Optional[int] = None
    dtype: Optional[str] = None  # None: the checkpoint's
    plain_llama: bool = False
    tokenizer_dir: Optional[str] = None
    max_shard_size: int = 5 * 2**30
    verify: bool = False
    verify_seq_length: int = 128
    verify_tolerance: Optional[float] = None
    overwrite: bool = False


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_bytes`` each, plus the index."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, os.path.join(self.directory, f"shard-{len(self.shards)}.tmp"),
                  metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(os.path.join(self.directory, "shard-0.tmp"),
                       os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"shard-{i}.tmp"), os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)


def _rope_parameters(record: CheckpointRecord) -> dict:
    """transformers' own ``rope_parameters``: the trained base, and llama3 scaling if any."""
    scaling = record.shape.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": record.rotary_base}
    return {"rope_type": "llama3", **scaling, "rope_theta": record.rotary_base}


def _plain_family_options(arch: str, s: LlamaShape) -> dict:
    """What a plain export of family ``arch`` must say beyond the shared Llama fields (every
    layer full: plain exports need it, so no sliding window is written)."""
    if arch == "LlamaForCausalLM":
        return dict(attention_bias=False, mlp_bias=False, head_dim=s.head_dim)
    if arch == "MistralForCausalLM":
        return dict(head_dim=s.head_dim, sliding_window=None)
    full = dict(use_sliding_window=False, sliding_window=None,
                layer_types=["full_attention"] * s.num_layers)
    if arch == "Qwen3ForCausalLM":
        return dict(full, head_dim=s.head_dim, attention_bias=False)
    return full  # Qwen2: q/k/v biases are built in


def _hf_config_dict(record: CheckpointRecord, dtype: str, plain: bool) -> dict:
    import transformers

    s = record.shape
    kept = {k: record.hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                             "initializer_range", "pretraining_tp")
            if k in record.hf_config}
    common = dict(
        **kept, vocab_size=s.vocab_size, hidden_size=s.hidden_size,
        intermediate_size=s.ffn_hidden_size, num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_query_groups,
        rms_norm_eps=s.rms_norm_eps, max_position_embeddings=s.max_position_embeddings,
        hidden_act="silu", tie_word_embeddings=s.tie_word_embeddings,
        rope_parameters=_rope_parameters(record))
    if plain:  # the source's own class: loads in transformers without remote code
        model_type = next(t for t, a in FAMILIES.items() if a == s.source_architecture)
        config = transformers.AutoConfig.for_model(
            model_type, **common, **_plain_family_options(s.source_architecture, s))
        out = config.to_dict()
        out.update(model_type=model_type, architectures=[s.source_architecture])
    else:
        out = transformers.LlamaConfig(**common, head_dim=s.head_dim, attention_bias=False,
                                       mlp_bias=False).to_dict()
    # transformers 5 reads rope_parameters, 4.x rope_theta: both, so whichever version loads
    # the folder uses the trained base (each ignores the other's key).
    out["rope_theta"] = record.rotary_base
    out["dtype"] = str(DTYPES[dtype]).replace("torch.", "")
    if plain:
        return out
    g = record.longgen
    explicit = g.full_attention_layers is not None
    out.update(
        model_type="longgen", architectures=["LongGenForCausalLM"],
        auto_map={"AutoConfig": "configuration_longgen.LongGenConfig",
                  "AutoModelForCausalLM": "modeling_longgen.LongGenForCausalLM"},
        qkv_bias=s.qkv_bias, qk_norm=s.qk_norm, source_architecture=s.source_architecture,
        **{**longgen_fields(g),
           "full_attention_layers": record.full_layers,
           "full_attention_placement": None if explicit else g.full_attention_placement,
           "full_attention_ratio": None if explicit else g.full_attention_ratio},
    )
    return out


def _write_hf_weights(model, record: CheckpointRecord, directory: str, dtype: torch.dtype,
                      max_shard_size: int) -> None:
    writer = ShardWriter(directory, max_shard_size)
    vocab = record.shape.vocab_size

    def add(name, t):  # own storage: safetensors refuses views into one shared buffer
        writer.add(name, t.detach().to(dtype=dtype, copy=True).contiguous())

    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    add(layout.EMBED[0], state[layout.EMBED[1]][:vocab])
    start = time.time()
    for i in range(record.shape.num_layers):
        for name, t in layout.hf_layer_from_megatron(megatron_io.layer_params(model, i), i, record.shape).items():
            add(name, t)
        _progress("megatron->hf", i + 1, record.shape.num_layers, start)
    add(layout.FINAL_NORM[0], state[layout.FINAL_NORM[1]])
    if not record.shape.tie_word_embeddings:  # tied: lm_head is the embedding table
        add(layout.OUTPUT[0], state[layout.OUTPUT[1]][:vocab])
    writer.close()


def _copy_tokenizer(tokenizer_dir: str, directory: str) -> List[str]:
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
    if not found:
        raise ConversionError(f"no tokenizer files in {tokenizer_dir} (looked for {', '.join(TOKENIZER_FILES)})")
    for f in found:
        shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(directory, f))
    return found


def megatron_to_hf(opts: ExportOptions) -> CheckpointRecord:
    """Export a trainer or converted checkpoint (any TP/PP layout) to an HF folder."""
    check_separate(opts.megatron_dir, "--megatron-dir", opts.hf_dir, "--hf-dir")
    if opts.tokenizer_dir:  # --overwrite must not delete the folder the tokenizer comes from
        check_separate(opts.tokenizer_dir, "--tokenizer-dir", opts.hf_dir, "--hf-dir")
    check_output_dir(opts.hf_dir, "--hf-dir", opts.overwrite)
    megatron_io.init_single_process()
    record = megatron_io.record_for(opts.megatron_dir, opts.iteration)
    dtype = opts.dtype or record.dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if opts.plain_llama and len(record.full_layers) != record.shape.num_layers:
        raise ConversionError(
            f"--plain-llama needs every layer full, but layers "
            f"{sorted(set(range(record.shape.num_layers)) - set(record.full_layers))} are sparse; "
            "export without --plain-llama to keep the hybrid attention")
    model = megatron_io.build_model(record)
    megatron_io.load(model, opts.megatron_dir, opts.iteration)
    with staged_output(opts.hf_dir, opts.overwrite, "--hf-dir") as tmp:
        _write_hf_weights(model, record, tmp, DTYPES[dtype], opts.max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(_hf_config_dict(record, dtype, opts.plain_llama), fh, indent=2)
        if not opts.plain_llama:
            for f in HF_MODELING_FILES:
                shutil.copy2(os.path.join(HF_MODELING_DIR, f), os.path.join(tmp, f))
        if opts.tokenizer_dir:
            _copy_tokenizer(opts.tokenizer_dir, tmp)
        if opts.verify:
            _verify_export(model, tmp, record, dtype, opts)
    kind = record.shape.source_architecture if opts.plain_llama else "LongGen"
    print(f"wrote {opts.hf_dir} ({kind}, {dtype})", file=sys.stderr)
    return record


def hf_longgen_settings(hf_config: dict) -> LongGenSettings:
    """The hybrid layout an HF folder describes: a LongGen export's own fields; a plain model
    runs every layer full, or its native sliding window."""
    if hf_config.get("model_type") != "longgen":
        return native_longgen_settings(hf_config)
    # An export records its full layers explicitly and leaves placement/ratio null.
    hf_config = with_unrecorded_fields(hf_config)
    return LongGenSettings(**{f.name: hf_config[f.name] for f in fields(LongGenFields)
                              if hf_config.get(f.name) is not None})


def load_hf_as_megatron(hf_dir: str, dtype: str = "fp32", device: str = "cpu"):
    """An HF export (or a plain Llama-family folder) as a whole Megatron model in eval mode, in memory:
    what the evaluation tool runs on HF folders (TP = PP = 1; convert first for TP)."""
    record, weights = _hf_record(hf_dir, hf_longgen_settings(read_hf_config(hf_dir)), dtype)
    return _megatron_model_from_hf(record, weights, device).to(device).eval()


def load_hf_export(path: str, dtype: Optional[torch.dtype] = None):
    """Load an exported folder the way users do (remote code for LongGen, no network)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype,
                                                local_files_only=True).eval()


def _verify_export(model, path: str, record: CheckpointRecord, dtype: str, opts: ExportOptions):
    ids = verify.sample_tokens(record.shape.vocab_size, seq_length=opts.verify_seq_length)
    # Compare in the export dtype: cast the Megatron copy only if it differs.
    if DTYPES[dtype] != DTYPES[record.dtype]:
        model = model.to(DTYPES[dtype])
    got = verify.megatron_logits(model, ids, record.shape.vocab_size)
    hf = load_hf_export(path, DTYPES[dtype])
    expected = verify.hf_logits(hf, ids)
    del hf
    return verify.check(verify.compare(expected, got, dtype, opts.verify_tolerance))
