"""Checkpoints with Megatron-Core dist_checkpointing (torch_dist): save, resume, finetune.

Layout: ``<dir>/iter_0000100/`` per checkpoint and ``<dir>/latest_checkpointed_iteration.txt``.
A checkpoint is written under ``iter_XXXXXXX.tmp`` and renamed only once every rank has
finished, and the tracker is replaced atomically afterwards. Re-saving an iteration moves the
old directory aside (``iter_XXXXXXX.old``) and removes it only once the new one is in place
and tracked; a reader that finds the tracked directory missing (a crash between those two
renames) takes the ``.old`` one. So whatever step a crash interrupts, the tracker names a
complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from megatron_longgen.utils.cli import fail

TRACKER = "latest_checkpointed_iteration.txt"


def checkpoint_name(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        fail(f"{path} is corrupt: expected an iteration number, found {text!r}")
    return int(text)


def checkpoint_dir(root: str, iteration: Optional[int] = None) -> str:
    """The complete checkpoint directory ``root`` names: ``root`` itself if it is one, else
    its ``iteration`` (default: the tracked one)."""
    if not os.path.isdir(root):
        fail(f"no checkpoint at {root}: " + ("it is a file; give a checkpoint directory"
                                             if os.path.exists(root) else "it does not exist"))
    if os.path.isfile(os.path.join(root, "metadata.json")):
        return root
    iteration = iteration if iteration is not None else read_latest_iteration(root)
    if iteration is None:
        hint = ("it holds an HF model (config.json): convert it with tools/convert_hf_to_megatron.py"
                if os.path.isfile(os.path.join(root, "config.json"))
                else "give a directory the trainer or tools/convert_hf_to_megatron.py wrote")
        fail(f"no checkpoint in {root}: neither {TRACKER} nor a checkpoint's metadata.json; {hint}")
    path = checkpoint_name(root, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        return path + ".old"  # a re-save of this iteration stopped between its two renames
    if not os.path.isdir(path):
        fail(f"checkpoint {path} does not exist")
    return path


def _layout() -> Dict[str, int]:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
    )


def _rank_coordinates():
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_data_parallel_world_size(with_context_parallel=True))
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank(with_context_parallel=True))
    return shape, offset


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_state_dict(model: List[torch.nn.Module]) -> dict:
    # Keys of the bare GPTModel: checkpoints do not depend on the DDP / bf16 wrappers.
    if len(model) == 1:
        return {"model": unwrap_model(model[0]).sharded_state_dict()}
    return {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _sharded_state_dict(model, optimizer, scheduler, *, iteration, consumed_samples,
                        train_config, is_loading) -> dict:
    state = _model_sharded_state_dict(model)
    shape, offset = _rank_coordinates()
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        layout=_layout(),
        rng_state=ShardedObject("rng_state", None if is_loading else _rng_state(), shape, offset,
                                replica_id=0),
    )
    if train_config is not None:
        state["train_config"] = asdict(train_config)
    if optimizer is not None:
        flat_model = {}
        for key, value in state.items():
            if key.startswith("model"):
                flat_model.update(value)
        state["optimizer"] = optimizer.sharded_state_dict(flat_model, is_loading=is_loading)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler,
                    consumed_samples: int, train_config=None, record=None) -> str:
    """Write ``iter_<iteration>`` under ``root`` atomically (with ``record``, the checkpoint's
    ``longgen_config.json``, inside it); returns its path."""
    final = checkpoint_name(root, iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state_dict(model, optimizer, scheduler, iteration=iteration,
                                consumed_samples=consumed_samples, train_config=train_config,
                                is_loading=False)
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if rank == 0:
        if record is not None:
            record.save(tmp, os.path.abspath(root))
        _publish(root, iteration, tmp, final)
    dist.barrier()
    return final


def _publish(root: str, iteration: int, tmp: str, final: str) -> None:
    """Rename the complete ``tmp`` to ``final`` and track it, never leaving the tracker on a
    missing directory (see the module docstring)."""
    old = final + ".old"
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)  # stale: ``final`` is complete
        os.replace(final, old)
    # Else an ``old`` left by a crash is the only copy of this iteration: kept until replaced.
    os.replace(tmp, final)
    _write_tracker(root, iteration)
    shutil.rmtree(old, ignore_errors=True)


def _write_tracker(root: str, iteration: int) -> None:
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as fh:
        fh.write(str(iteration))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, *, finetune: bool = False,
                    iteration: Optional[int] = None) -> Dict[str, int]:
    """Load the latest (or given) checkpoint under ``root`` (or ``root`` itself if it is one).

    ``finetune`` loads model weights only and starts from iteration 0. Returns
    ``{"iteration", "consumed_samples"}``.
    """
    path = checkpoint_dir(root, iteration)
    if finetune:
        template = _model_sharded_state_dict(model)
    else:
        template = _sharded_state_dict(model, optimizer, scheduler, iteration=0,
                                       consumed_samples=0, train_config=None, is_loading=True)
        saved_layout = dist_checkpointing.load_common_state_dict(path).get("layout")
        if saved_layout != _layout():  # RNG streams belong to one layout
            template.pop("rng_state")
    state = dist_checkpointing.load(template, path)
    for i, chunk in enumerate(model):
        unwrap_model(chunk).load_state_dict(state["model" if len(model) == 1 else f"model{i}"])
    if finetune:
        return {"iteration": 0, "consumed_samples": 0}
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return {"iteration": int(state["iteration"]), "consumed_samples": int(state["consumed_samples"])}
