"""The LongGen training loop on Megatron-Core: schedules, DDP, optimizer, checkpoints, logs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_longgen.checkpoint.megatron_io import record_from_training
from megatron_longgen.checkpoint.record import CheckpointRecord
from megatron_longgen.parallel.context_parallel import shard_batch_for_context_parallel
from megatron_longgen.training import checkpointing
from megatron_longgen.training.arguments import TrainConfig
from megatron_longgen.training.checkpoint_args import LoadedCheckpoint
from megatron_longgen.data.datasets import iterate_batches
from megatron_longgen.training.batches import RandomTokenDataset, packed_seq_params_from_eod
from megatron_longgen.training.flops import training_flops_per_sequence
from megatron_longgen.training.logger import MetricsLogger, memory_gb, peak_tflops, print_rank0
from megatron_longgen.training.preflight import check_files
from megatron_longgen.training.setup import (
    build_model,
    build_optimizer,
    initialize_for,
    model_config_from,
    vocab_size_for,
)
from megatron_longgen.utils.accelerators import describe


@contextmanager
def stage(what: str):
    """A start-up stage on rank 0: ``<what> ...`` before, ``<what>: done (N s)`` after, so a
    long start (a 70B model, a 128K index) is never silent."""
    print_rank0(f"{what} ...")
    start = time.time()
    yield
    print_rank0(f"{what}: done ({time.time() - start:.1f} s)")


@dataclass
class TrainResult:
    iteration: int
    losses: Dict[int, float] = field(default_factory=dict)
    grad_norms: Dict[int, float] = field(default_factory=dict)
    eval_losses: Dict[int, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    step_times: List[float] = field(default_factory=list)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss: Megatron divides by the token count summed over micro-batches and DP."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach().clone(), num_tokens.float()])
    dist.all_reduce(report, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return loss, num_tokens, {"lm loss": report}


def make_forward_step(device: torch.device, eod_id: Optional[int]):
    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        packed = packed_seq_params_from_eod(batch["tokens"], eod_id) if eod_id is not None else None
        if parallel_state.get_context_parallel_world_size() > 1:  # this CP rank's share
            batch, packed = shard_batch_for_context_parallel(batch, packed)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=packed)
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


def _reduce_losses(losses_reduced: Sequence[dict]) -> Optional[float]:
    """Mean loss over the step, broadcast from the last pipeline stage to all its peers."""
    total = torch.zeros(2)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses_reduced:
            total += item["lm loss"].float().cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        total = total.to(backend_device)
        dist.broadcast(total, src=last, group=group)
        total = total.cpu()
    return float(total[0] / total[1]) if total[1] > 0 else None


class Trainer:
    def __init__(self, train: TrainConfig, datasets: Optional[Tuple] = None, eod_id: Optional[int] = None):
        self.train = train
        self.device = torch.device(train.device)
        initialize_for(train)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        # Before any model is built: flags, data and the parallel layout.
        train.validate(dist.get_world_size(), datasets_given=datasets is not None)
        check_files(train)
        self.config = model_config_from(train)
        # What --load holds; parse_args already took its model settings into ``train``.
        self.loaded = LoadedCheckpoint.read(train.load) if train.load else None
        # The embedding keeps a loaded checkpoint's padded rows, whatever TP padded them.
        self.vocab_size = self.loaded.record.padded_vocab_size if self.loaded else vocab_size_for(train)
        with stage(f"building the model ({self.config.num_layers} layers)"):
            self.model = build_model(self.config, train, self.vocab_size)
            self.optimizer, self.scheduler = build_optimizer(self.config, train, self.model)
        self.eod_id = eod_id if train.reset_attention_mask else None
        self.train_ds, self.valid_ds = datasets if datasets is not None else self._mock_datasets()
        self.iteration, self.consumed_samples = 0, 0
        if train.load:
            with stage(f"loading {self.loaded.path}" + (" (weights only)" if train.finetune else "")):
                state = checkpointing.load_checkpoint(train.load, self.model, self.optimizer,
                                                      self.scheduler, finetune=train.finetune)
            self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
            print_rank0(f"loaded {train.load} at iteration {self.iteration}"
                        + (" (weights only)" if train.finetune else ""))
        self.flops_per_sequence = training_flops_per_sequence(self.config, train.seq_length, self.vocab_size)
        full = self.config.full_layer_indices
        print_rank0(
            f"LongGen {'from ' + self.loaded.path if self.loaded else train.model}: "
            f"{self.config.num_layers} layers, full attention at {list(full)}, "
            f"others {self.config.sparse_attention} | world {dist.get_world_size()} "
            f"(TP {train.tensor_model_parallel_size}, PP {train.pipeline_model_parallel_size}, "
            f"CP {train.context_parallel_size}, DP {parallel_state.get_data_parallel_world_size()}) | "
            f"accelerators: {describe()}")

    def _mock_datasets(self):
        if not self.train.mock_data:
            raise ValueError("no datasets given: pass --data-path or --mock-data")
        n = self.train.train_iters * self.train.global_batch_size
        return (RandomTokenDataset(n, self.train.seq_length, self.vocab_size, self.train.seed),
                RandomTokenDataset(max(1, self.train.eval_iters * self.train.global_batch_size),
                                   self.train.seq_length, self.vocab_size, self.train.seed + 1))

    @property
    def num_microbatches(self) -> int:
        dp = parallel_state.get_data_parallel_world_size()
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def _iterators(self, dataset, consumed: int):
        """One iterator per model chunk (virtual pipeline stages read the same micro-batches).

        The position is just ``consumed_samples``, so a resumed run reads exactly the samples
        the uninterrupted run would."""
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        its = [iterate_batches(dataset, self.train.micro_batch_size, consumed, dp_rank, dp)
               for _ in self.model]
        return its if len(its) > 1 else its[0]

    def _run(self, data_iterator, forward_only: bool):
        return get_forward_backward_func()(
            forward_step_func=make_forward_step(self.device, self.eod_id),
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.train.seq_length,
            micro_batch_size=self.train.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, data_iterator) -> Tuple[Optional[float], float]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(data_iterator, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.train.global_batch_size)
        return _reduce_losses(losses), float(grad_norm) if grad_norm is not None else float("nan")

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_ds is None:
            return None
        for chunk in self.model:
            chunk.eval()
        it = self._iterators(self.valid_ds, 0)
        losses = [_reduce_losses(self._run(it, forward_only=True)) for _ in range(self.train.eval_iters)]
        for chunk in self.model:
            chunk.train()
        losses = [x for x in losses if x is not None]
        return sum(losses) / len(losses) if losses else None

    def record(self) -> CheckpointRecord:
        """What a checkpoint of this run is, for ``--load`` and the export to HF."""
        return record_from_training(self.config, self.train, self.vocab_size,
                                    source=self.loaded.record if self.loaded else None)

    def save(self) -> str:
        start = time.time()
        path = checkpointing.save_checkpoint(
            self.train.save, self.iteration, self.model, self.optimizer, self.scheduler,
            self.consumed_samples, self.train, record=self.record())
        print_rank0(f"saved checkpoint {path} at iteration {self.iteration} "
                    f"({time.time() - start:.1f} s)")
        return path

    def fit(self) -> TrainResult:
        train = self.train
        result = TrainResult(iteration=self.iteration)
        logger = MetricsLogger.for_run(train, start_iteration=self.iteration)
        peak = peak_tflops(self.device, train.peak_tflops)
        world = dist.get_world_size()
        data_iterator = self._iterators(self.train_ds, self.consumed_samples)
        start_iteration = self.iteration
        for chunk in self.model:
            chunk.train()
        while self.iteration < train.train_iters:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            loss, grad_norm = self.train_step(data_iterator)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.time() - t0
            self.iteration += 1
            self.consumed_samples += train.global_batch_size
            result.step_times.append(step_time)
            if loss is not None:
                result.losses[self.iteration] = loss
            result.grad_norms[self.iteration] = grad_norm
            if self.iteration % train.log_interval == 0 or self.iteration == train.train_iters:
                tflops = self.flops_per_sequence * train.global_batch_size / step_time / world / 1e12
                logger.log(self.iteration, {
                    "lm loss": loss,
                    "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    "grad norm": grad_norm,
                    "tokens/s": train.global_batch_size * train.seq_length / step_time,
                    "step time s": step_time,
                    "TFLOP/s/GPU": tflops,
                    "MFU %": 100 * tflops / peak if peak else None,
                    "mem GB": memory_gb(self.device),
                }, start_iteration)
            if train.eval_interval and self.iteration % train.eval_interval == 0:
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    result.eval_losses[self.iteration] = eval_loss
                    logger.log_validation(self.iteration, eval_loss)
            if train.save and train.save_interval and self.iteration % train.save_interval == 0:
                result.checkpoint = self.save()
            if train.exit_interval and self.iteration % train.exit_interval == 0:
                print_rank0(f"exiting at iteration {self.iteration} (--exit-interval)")
                break
        if train.save and (result.checkpoint is None or not result.checkpoint.endswith(f"{self.iteration:07d}")):
            result.checkpoint = self.save()
        logger.close()
        result.iteration = self.iteration
        return result
