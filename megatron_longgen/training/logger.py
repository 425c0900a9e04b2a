"""Console, JSON-lines metrics log, TensorBoard and (optional) Weights & Biases logging of
training metrics.

The metrics log (``SAVE/metrics.jsonl`` by default, ``--metrics-log-path``, ``--no-metrics-log``)
holds one JSON object per line, flushed as written and appended to on resume:

- ``{"event": "start", "iteration": N, "time": T}`` when a run starts (or resumes) at N;
- ``{"iteration": N, "time": T, "lm loss": ..., "lr": ..., "grad norm": ..., ...}`` per
  logged iteration, with the keys TensorBoard uses;
- ``{"iteration": N, "time": T, "lm loss validation": ...}`` per validation.

``read_metrics_log`` reads it back; ``tools/plot.py training`` draws it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from typing import Dict, Optional

import psutil
import torch
import torch.distributed as dist

from megatron_longgen.utils.cli import fail

METRICS_LOG_NAME = "metrics.jsonl"

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


def metrics_log_file(train) -> Optional[str]:
    """Where a run's metrics log goes: ``--metrics-log-path``, else ``SAVE/metrics.jsonl``
    (next to the checkpoints); None with ``--no-metrics-log`` or with neither flag."""
    if not train.metrics_log:
        return None
    if train.metrics_log_path:
        return train.metrics_log_path
    return os.path.join(train.save, METRICS_LOG_NAME) if train.save else None


def read_metrics_log(path: str) -> Dict[str, Dict[int, float]]:
    """``{metric: {iteration: value}}`` from a metrics log. A start record at iteration N (a
    resumed or restarted run) supersedes what earlier runs logged after N; a last line cut
    short by a crash is skipped."""
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as err:
        fail(f"cannot read the metrics log {path}: {err.strerror}")
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                break
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            fail(f"{path} line {number} is not a metrics record (a JSON object with an "
                 f"'iteration'); give the metrics.jsonl a training run wrote")
        iteration = record["iteration"]
        if record.get("event") == "start":
            for values in series.values():
                for i in [i for i in values if i > iteration]:
                    del values[i]
            continue
        for key, value in record.items():
            if key not in ("iteration", "time") and isinstance(value, (int, float)):
                series[key][iteration] = float(value)
    return dict(series)


class MetricsLogger:
    def __init__(self, train_iters: int, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None,
                 metrics_log: Optional[str] = None, start_iteration: int = 0):
        self.train_iters = train_iters
        # The last rank holds the loss under pipeline parallelism (Megatron's logging rank).
        self.is_writer = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        self.started = time.time()
        self.tb = self.wandb = self.metrics_file = None
        if self.is_writer and metrics_log:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_log)), exist_ok=True)
            self.metrics_file = open(metrics_log, "a", encoding="utf-8")
            self._write({"event": "start", "iteration": start_iteration})
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

    @classmethod
    def for_run(cls, train, start_iteration: int) -> "MetricsLogger":
        """The logger a training run's flags ask for (``TrainConfig``), from ``start_iteration``."""
        return cls(train.train_iters, train.tensorboard_dir, train.wandb_project,
                   dataclasses.asdict(train), metrics_log_file(train), start_iteration)

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
        self._record(iteration, {k: v for k, v in metrics.items() if v is not None})

    def log_validation(self, iteration: int, loss: float) -> None:
        if not self.is_writer:
            return
        print(f"validation at iter {iteration}: lm loss {loss:.4f}", file=sys.stdout, flush=True)
        self._record(iteration, {"lm loss validation": loss})

    def _record(self, iteration: int, metrics: Dict[str, float]) -> None:
        """The same values to TensorBoard, W&B and the metrics log."""
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log(metrics, step=iteration)
        self._write({"iteration": iteration, **metrics})

    def _write(self, record: dict) -> None:
        if self.metrics_file is not None:
            record["time"] = round(time.time(), 3)
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.metrics_file is not None:
            self.metrics_file.close()
