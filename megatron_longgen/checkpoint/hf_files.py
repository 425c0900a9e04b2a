"""Reading HF Llama-family folders lazily: config checks and a tensor-by-tensor reader.

Llama (2 and 3.x, with llama3 RoPE scaling and tied embeddings), Mistral, Qwen2 and Qwen3
share one layer layout; they differ in QKV biases (Qwen2), per-head q/k RMSNorm (Qwen3), the
head width (Qwen3: not hidden / heads), RoPE scaling (Llama-3.1+), tying (small sizes) and a
native sliding window (Mistral, Qwen2/3 when enabled). ``llama_shape`` reads all of them.

Safetensors shards are opened with ``safe_open`` (memory-mapped) and each tensor is read
only when asked for, so a 70B import never holds the HF state dict in memory.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from megatron_longgen.checkpoint.errors import ConversionError

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


@dataclass(frozen=True)
class LlamaShape:
    """What the mapping needs to know about a Llama model's shape."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Added for the Llama-3.x / Mistral / Qwen families; the defaults are Llama-2's, so a
    # record written before them keeps meaning what it meant.
    qkv_bias: bool = False  # biases on q, k and v projections only (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    rope_scaling: Optional[Dict[str, float]] = None  # llama3: factor, low/high_freq_factor,
    #                                                   original_max_position_embeddings
    source_architecture: str = "LlamaForCausalLM"  # the HF class a plain export writes back

    def model_options(self) -> Dict[str, object]:
        """The Megatron options (LongGenConfig / trainer names) of the architecture features."""
        out: Dict[str, object] = dict(
            add_qkv_bias=self.qkv_bias, qk_layernorm=self.qk_norm,
            untie_embeddings_and_output_weights=not self.tie_word_embeddings,
            use_rope_scaling=self.rope_scaling is not None)
        if self.rope_scaling is not None:
            out.update({ROPE_SCALING_OPTIONS[k]: v for k, v in self.rope_scaling.items()})
        return out


# llama3 rope_scaling key -> the LongGenConfig / trainer option that holds it.
ROPE_SCALING_OPTIONS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_scaling_low_freq_factor",
    "high_freq_factor": "rope_scaling_high_freq_factor",
    "original_max_position_embeddings": "rope_scaling_original_max_position_embeddings",
}


def rope_scaling_from_options(options) -> Optional[Dict[str, float]]:
    """The llama3 ``rope_scaling`` dict of a config with ``use_rope_scaling`` (else None)."""
    if not options.use_rope_scaling:
        return None
    return {k: getattr(options, name) for k, name in ROPE_SCALING_OPTIONS.items()}


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; a corrupt or unreadable file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}; restore the file from the original "
                              "model") from err
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json; is it an HF model folder?")
    cfg = _read_json(path)
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                           "num_attention_heads", "vocab_size") if k not in cfg]
    if missing and cfg.get("model_type") in (*FAMILIES, "longgen"):
        raise ConversionError(f"{path} lacks {', '.join(missing)}")
    return cfg


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


# HF model_type -> its CausalLM class; a LongGen export names its source in source_architecture.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_scaling(cfg: dict, problems: List[str]) -> Optional[Dict[str, float]]:
    """The llama3 RoPE-scaling parameters (None for plain RoPE); other kinds are refused."""
    # transformers 5 writes rope_parameters, older configs rope_scaling: a scaled one wins.
    kind, rope = "default", {}
    for candidate in (cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}):
        candidate_kind = candidate.get("rope_type", candidate.get("type", "default"))
        if candidate_kind not in ("default", None):
            kind, rope = candidate_kind, candidate
    if kind == "default":
        return None
    if kind != "llama3":
        problems.append(f"RoPE scaling {kind!r} (plain RoPE and llama3 scaling only)")
        return None
    missing = [k for k in ROPE_SCALING_OPTIONS if rope.get(k) is None]
    if missing:
        problems.append(f"llama3 RoPE scaling without {', '.join(missing)}")
        return None
    return {k: (int(rope[k]) if k == "original_max_position_embeddings" else float(rope[k]))
            for k in ROPE_SCALING_OPTIONS}


def _source_architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type == "longgen":  # a LongGen export: the family it was converted from
        return cfg.get("source_architecture") or "LlamaForCausalLM"
    known = set(FAMILIES.values())
    if model_type not in FAMILIES or any(a not in known for a in archs):
        raise ConversionError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
            f"supported: {', '.join(sorted(known))}")
    return FAMILIES[model_type]


def llama_shape(cfg: dict) -> LlamaShape:
    """Validate that ``cfg`` describes an architecture the mapping covers and return its shape."""
    arch = _source_architecture(cfg)
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (SwiGLU with silu only)")
    if cfg.get("mlp_bias"):
        problems.append("MLP biases")
    # Qwen2's q/k/v biases are built in; Llama's attention_bias also biases o_proj.
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("qkv_bias"))
    if cfg.get("attention_bias"):
        problems.append("attention biases on every projection (attention_bias: o_proj too)")
    qk_norm = arch == "Qwen3ForCausalLM" or bool(cfg.get("qk_norm"))
    rope_scaling = _rope_scaling(cfg, problems)
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"] and not cfg.get("head_dim"):
        problems.append(f"hidden_size={cfg['hidden_size']} is not a multiple of heads={heads}")
    if heads % groups:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    if problems:
        raise ConversionError("unsupported architecture: " + "; ".join(problems))
    return LlamaShape(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=groups, head_dim=head_dim, vocab_size=cfg["vocab_size"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, qk_norm=qk_norm, rope_scaling=rope_scaling, source_architecture=arch,
    )


def sliding_window_layers(cfg: dict) -> Tuple[Optional[int], List[int]]:
    """A plain HF model's native sliding window and the layers that use it ((None, []) when
    every layer is full): Mistral's ``sliding_window`` in every layer; Qwen2/3's
    ``layer_types`` (from ``use_sliding_window`` and ``max_window_layers``). The window
    counts the query itself (transformers reads keys ``q - window < k <= q``), as LongGen's
    ``sliding_window_size`` does."""
    window = cfg.get("sliding_window")
    if cfg.get("model_type") not in FAMILIES or not window:
        return None, []
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        if cfg["model_type"] == "mistral":
            types = ["sliding_attention"] * n
        elif cfg.get("use_sliding_window"):
            first = cfg.get("max_window_layers", n)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        else:
            types = ["full_attention"] * n
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return (int(window), sliding) if sliding else (None, [])


class LazyHFWeights:
    """Tensor-by-tensor access to an HF folder's weights (safetensors or .bin, sharded or not)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._where: Dict[str, str] = {}  # tensor name -> file
        self._handles: Dict[str, object] = {}
        self.safetensors = True
        for index_name, single, safe in ((SAFE_INDEX, SAFE_SINGLE, True), (BIN_INDEX, BIN_SINGLE, False)):
            index, one = os.path.join(hf_dir, index_name), os.path.join(hf_dir, single)
            if os.path.isfile(index):
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ConversionError(f"{index} has no weight_map")
                self._where = dict(weight_map)
                self.safetensors = safe
                break
            if os.path.isfile(one):
                self._where = {name: single for name in self._names_in(one, safe)}
                self.safetensors = safe
                break
        else:
            raise ConversionError(
                f"{hf_dir} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                f"or {BIN_INDEX}")
        missing = sorted({f for f in self._where.values()
                          if not os.path.isfile(os.path.join(hf_dir, f))})
        if missing:
            raise ConversionError(f"missing weight shards in {hf_dir}: {', '.join(missing)}")

    def _names_in(self, path: str, safe: bool) -> List[str]:
        return list(self._open(os.path.basename(path), safe).keys())

    def _open(self, filename: str, safe: Optional[bool] = None):
        if filename not in self._handles:
            path = os.path.join(self.hf_dir, filename)
            safe = self.safetensors if safe is None else safe
            try:
                if safe:  # checks that the file holds every byte its header promises
                    self._handles[filename] = safe_open(path, framework="pt", device="cpu")
                else:  # mmap: tensors are paged in when read, not at load
                    self._handles[filename] = torch.load(path, map_location="cpu", mmap=True,
                                                         weights_only=True)
            except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
                raise ConversionError(f"cannot read weight file {path} (truncated or corrupt?): "
                                      f"{err}") from err
        return self._handles[filename]

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape_of(self, name: str):
        """Shape without reading the data."""
        if name not in self._where:
            raise ConversionError(f"tensor {name} is missing from {self.hf_dir}")
        handle = self._open(self._where[name])
        return handle.get_slice(name).get_shape() if self.safetensors else handle[name].shape

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"tensor {name} is missing from {self.hf_dir}")
        handle = self._open(self._where[name])
        return handle.get_tensor(name) if self.safetensors else handle[name]

    def close(self):
        self._handles.clear()
