"""Reading HF Llama folders lazily: config checks and a tensor-by-tensor reader.

Safetensors shards are opened with ``safe_open`` (memory-mapped) and each tensor is read
only when asked for, so a 70B import never holds the HF state dict in memory.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

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
    if missing and cfg.get("model_type") in ("llama", "longgen"):
        raise ConversionError(f"{path} lacks {', '.join(missing)}")
    return cfg


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llama_shape(cfg: dict) -> LlamaShape:
    """Validate that ``cfg`` describes an architecture the mapping covers and return its shape."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "longgen") or any(
            a not in ("LlamaForCausalLM", "LongGenForCausalLM") for a in archs):
        raise ConversionError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
            "only Llama (LlamaForCausalLM) checkpoints can be converted")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (SwiGLU with silu only)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention/MLP biases")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} (plain RoPE only)")
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        problems.append(f"head_dim={head_dim} x heads={heads} != hidden_size={cfg['hidden_size']}")
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
    )


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
