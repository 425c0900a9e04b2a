"""Shared test set-up: CPU-only runs use Triton's interpreter and Megatron on gloo."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def megatron_cpu():
    """Single-process Megatron-Core (TP=PP=CP=1) on CPU with gloo."""
    from megatron.core import parallel_state

    from megatron_longgen.parallel.initialize import initialize_parallel

    if not parallel_state.model_parallel_is_initialized() or (
        parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        initialize_parallel(device="cpu", seed=1234)
