"""Parity harness: train the tiny hybrid model under a parallel layout on gloo ranks and gather
what it learned into full tensors named as in the single-process model.

A run records, per optimizer step, the loss, the gradient norm, the updated weights and (when
the gradients are whole on a rank, i.e. without the distributed optimizer) the gradients.
Every rank of a layout starts from the same full initial weights, sliced to its shard, so
layouts with pipeline stages (which draw their init in another order) start equal too.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

SEQ = 64
# Adam's step 1 is lr * sign(grad) with the usual tiny eps; with eps=5e-2 (above most gradient
# entries) and no weight decay, updates follow the gradients' values, so comparing updates
# checks the gradients even where a run does not hold them whole (distributed optimizer).
BASE = ["--device", "cpu", "--mock-data", "--seq-length", str(SEQ), "--num-layers", "4",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--lr", "0.1", "--min-lr", "0.1", "--lr-decay-style", "constant", "--adam-eps", "5e-2",
        "--weight-decay", "0", "--clip-grad", "1.0", "--log-interval", "1000"]
# Both sparse patterns; block-sparse with heterogeneous heads, so each TP rank's heads differ.
PATTERNS = {
    "attn_sink": ["--sink-tokens", "2", "--sliding-window-size", "20"],
    "block_sparse": ["--sparse-attention", "block_sparse", "--sparse-block-size", "16",
                     "--local-blocks", "1", "--vert-stride", "2", "--no-homo-head"],
}
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- naming and tensor-parallel layout -------------------------------------------------------

def named_shards(model_chunks, attr: str = "data") -> Dict[str, tuple]:
    """This rank's tensors by global name -> (tensor, partition dim or None, gated fc1?).

    Layer indices in module names are local to a pipeline (virtual) stage; the layer's own
    1-based ``layer_number`` is global, so it names the layer."""
    out = {}
    for name, param, gated in _named_params(model_chunks):
        tensor = param.data if attr == "data" else getattr(param, attr)
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        out[name] = (tensor.detach().clone(), dim, gated and name.endswith("linear_fc1.weight"))
    return out


def _named_params(model_chunks):
    from megatron.core.utils import unwrap_model

    for chunk in model_chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            if name.startswith("decoder.layers."):
                _, _, idx, rest = name.split(".", 3)
                name = f"decoder.layers.{model.decoder.layers[int(idx)].layer_number - 1}.{rest}"
            yield name, param, model.config.gated_linear_unit


def join_tp(parts: Sequence[torch.Tensor], dim: Optional[int], gated: bool) -> torch.Tensor:
    """Full tensor from TP shards ordered by TP rank.

    Fused QKV rows are grouped per query group and TP ranks hold whole groups, so a plain
    concatenation restores them; a gated fc1 holds [gate_r; up_r] per rank, the full one
    [gate; up]."""
    if dim is None:
        return parts[0]
    if gated:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(parts), dim=dim)


def split_tp(full: torch.Tensor, dim: Optional[int], gated: bool, tp_size: int, tp_rank: int):
    """Inverse of ``join_tp``: this TP rank's shard of ``full``."""
    if dim is None:
        return full
    if gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def gather_full(model_chunks, attr: str = "data") -> Optional[Dict[str, torch.Tensor]]:
    """Full tensors by name on global rank 0 (None elsewhere), from the first DP replica.

    Tensors that TP ranks replicate (norm weights) must agree across them; a mismatch is
    reported as an error, not hidden."""
    from megatron.core import parallel_state as ps

    mine = None
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        mine = (ps.get_tensor_model_parallel_rank(), named_shards(model_chunks, attr))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    by_name: Dict[str, dict] = {}
    for item in gathered:
        if item is None:
            continue
        tp_rank, shards = item
        for name, (tensor, dim, gated) in shards.items():
            by_name.setdefault(name, {"dim": dim, "gated": gated, "parts": {}})["parts"][tp_rank] = tensor
    full = {}
    for name, entry in by_name.items():
        parts = [entry["parts"][r] for r in sorted(entry["parts"])]
        if entry["dim"] is None and any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise AssertionError(f"{name}: TP replicas differ")
        full[name] = join_tp(parts, entry["dim"], entry["gated"])
    return full


def load_full(model_chunks, full: Dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of each full tensor into the (DDP-buffer-backed) parameters."""
    from megatron.core import parallel_state as ps

    tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, param, gated in _named_params(model_chunks):
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        shard = split_tp(full[name], dim, gated and name.endswith("linear_fc1.weight"), tp_size, tp_rank)
        param.data.copy_(shard)  # in place: DDP buffers and optimizer views see it


# ---- one run ---------------------------------------------------------------------------------

def run_case(flags: List[str], init: Optional[Dict[str, torch.Tensor]], steps: int = STEPS):
    """Train ``steps`` steps under ``flags``; returns the record on global rank 0."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    train = parse_args(flags)
    trainer = Trainer(train)
    if init is not None:
        load_full(trainer.model, init)
    record = {"init": gather_full(trainer.model), "loss": [], "grad_norm": [], "weights": [], "grads": []}
    it = trainer._iterators(trainer.train_ds, 0)
    for chunk in trainer.model:
        chunk.train()
    for _ in range(steps):
        loss, grad_norm = trainer.train_step(it)
        record["loss"].append(loss)
        record["grad_norm"].append(grad_norm)
        record["weights"].append(gather_full(trainer.model))
        # With the distributed optimizer each DP rank holds reduced gradients only for its shard.
        if not train.use_distributed_optimizer:
            record["grads"].append(gather_full(trainer.model, "main_grad"))
    return record if dist.get_rank() == 0 else None


def worker(rank: int, world: int, port: int, jobs: list, out_dir: str) -> None:
    """A spawned gloo rank: runs ``jobs`` in order (each re-initialises Megatron's groups).

    A job is (name, kind, flags, initial weights file): kind ``parity`` saves a record,
    ``resume`` the per-step losses of ``Trainer.fit``, ``error`` the message of the error an
    impossible layout raises."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # ranks share two cores
    for name, kind, flags, init_path in jobs:
        init = torch.load(init_path) if init_path else None
        if kind == "parity":
            result = run_case(flags, init)
        elif kind == "error":
            result = run_expecting_error(flags)
        else:
            result = run_resume(flags)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, f"{name}.pt"))


def run_expecting_error(flags: List[str]) -> str:
    """The message of the ValueError the trainer raises for an impossible layout; building
    any model first would be a failure of its own."""
    from megatron_longgen.training import trainer as trainer_module
    from megatron_longgen.training.arguments import parse_args

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the layout was checked")

    build_model, trainer_module.build_model = trainer_module.build_model, no_model
    try:
        trainer_module.Trainer(parse_args(flags))
    except ValueError as err:
        return str(err)
    finally:
        trainer_module.build_model = build_model
    raise AssertionError(f"no error for {flags}")


def run_resume(flags: List[str]):
    """Train to ``--train-iters`` (from ``--load`` if given) and return the per-step losses."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    trainer = Trainer(parse_args(flags))
    result = trainer.fit()
    return {"losses": result.losses, "checkpoint": result.checkpoint}


def launch(world: int, jobs: list, out_dir: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), jobs, str(out_dir)), nprocs=world, join=True)


# ---- comparison ------------------------------------------------------------------------------

def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over a tensor (elementwise ratios blow up near zero)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def update_diff(new_a, old_a, new_b, old_b) -> float:
    """Relative difference of two updates beyond what fp32 weights can resolve.

    A weight near 1.0 (an RMSNorm gain) stores an update of 1e-3 only to ~1e-4 relative:
    the stored weights are rounded to their fp32 spacing, so up to two spacings of the weight
    (one per stored end) are not counted as a difference."""
    da, db = new_a - old_a, new_b - old_b
    floor = 2 * torch.finfo(torch.float32).eps * torch.maximum(new_b.abs(), old_b.abs())
    excess = ((da - db).abs() - floor).clamp(min=0)
    scale = float(db.abs().max())
    return float(excess.max()) / scale if scale > 0 else float(excess.max())


def compare(got: dict, ref: dict) -> Dict[str, float]:
    """Worst relative difference of each recorded quantity of ``got`` against ``ref``."""
    worst = {}
    worst["loss"] = max(abs(g - r) / abs(r) for g, r in zip(got["loss"], ref["loss"]))
    worst["grad_norm"] = max(abs(g - r) / abs(r) for g, r in zip(got["grad_norm"], ref["grad_norm"]))
    assert sorted(got["init"]) == sorted(ref["init"]), "parameter names differ"
    worst["init"] = max(rel_diff(got["init"][k], ref["init"][k]) for k in ref["init"])
    # Updates (not weights) per step: a wrong gradient hides in a weight much larger than it.
    prev_g, prev_r = got["init"], ref["init"]
    worst["weight"] = worst["update"] = 0.0
    for w_g, w_r in zip(got["weights"], ref["weights"]):
        assert sorted(w_g) == sorted(w_r)
        worst["weight"] = max(worst["weight"], max(rel_diff(w_g[k], w_r[k]) for k in w_r))
        worst["update"] = max(worst["update"], max(
            update_diff(w_g[k], prev_g[k], w_r[k], prev_r[k]) for k in w_r))
        prev_g, prev_r = w_g, w_r
    if got["grads"]:
        worst["grad"] = max(rel_diff(g[k], r[k]) for g, r in zip(got["grads"], ref["grads"]) for k in r)
    return worst
