"""Console, TensorBoard and (optional) Weights & Biases logging of training metrics."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional

import psutil
import torch
import torch.distributed as dist

# Dense bf16 peak of common training GPUs, for MFU (override with --peak-tflops).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device: torch.device, given: Optional[float]) -> Optional[float]:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def print_rank0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


class MetricsLogger:
    def __init__(self, train_iters: int, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None):
        self.train_iters = train_iters
        self.is_writer = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        self.started = time.time()
        self.tb = self.wandb = None
        if self.is_writer and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("--tensorboard-dir needs the tensorboard package: "
                                   "pip install tensorboard") from err
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if self.is_writer and wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("--wandb-project needs the wandb package: pip install wandb") from err
            self.wandb = wandb.init(project=wandb_project, config=run_config or {})

    def log(self, iteration: int, metrics: Dict[str, float], start_iteration: int) -> None:
        if not self.is_writer:
            return
        done = iteration - start_iteration
        elapsed = time.time() - self.started
        eta = elapsed / max(done, 1) * (self.train_iters - iteration)
        width = len(str(self.train_iters))
        parts = [f"iter {iteration:>{width}}/{self.train_iters}"]
        fmt = {"lm loss": "{:.4f}", "lr": "{:.3e}", "grad norm": "{:.3f}", "tokens/s": "{:,.0f}",
               "step time s": "{:.3f}", "TFLOP/s/GPU": "{:.3g}", "MFU %": "{:.1f}", "mem GB": "{:.2f}"}
        for key, spec in fmt.items():
            if metrics.get(key) is not None:
                parts.append(f"{key} {spec.format(metrics[key])}")
        parts.append(f"eta {int(eta) // 60}:{int(eta) % 60:02d}")
        print(" | ".join(parts), file=sys.stdout, flush=True)
        for key, value in metrics.items():
            if value is None:
                continue
            if self.tb is not None:
                self.tb.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
