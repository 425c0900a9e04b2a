"""Process groups and RNG for a run: torch.distributed + Megatron-Core's parallel_state.

Works under torchrun/SLURM (reads RANK, WORLD_SIZE, MASTER_ADDR, ...) and in a plain single
process. On CPU it uses gloo and the CPU shim; on GPU, NCCL and Megatron's CUDA RNG tracker.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    device: str = "cuda",
) -> None:
    """Initialise torch.distributed (if needed), Megatron's groups and the RNG tracker."""
    device_type = torch.device(device).type
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM launcher
            dist.init_process_group(backend=backend)
        else:  # a plain single process; leaves the environment alone for child processes
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by tensor ({tensor_model_parallel_size}) x "
            f"pipeline ({pipeline_model_parallel_size}) x context ({context_parallel_size}) "
            f"parallel sizes = {model_parallel}; change the sizes or the number of processes")
    if device_type == "cpu":
        from megatron_longgen.utils.cpu_shim import install_cpu_shim

        install_cpu_shim()
    if parallel_state.model_parallel_is_initialized():  # re-initialising within one process
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    set_seed(seed, device_type)


def set_seed(seed: int, device_type: str) -> None:
    """Seed every RNG; the tensor-parallel tracker gets per-TP-rank seeds as Megatron does."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device_type == "cpu":
        from megatron_longgen.utils.cpu_shim import cpu_model_parallel_seed

        cpu_model_parallel_seed(seed)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
