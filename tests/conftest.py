"""Shared test set-up: CPU-only runs use Triton's interpreter and Megatron on gloo."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def megatron_cpu():
    """Single-process Megatron-Core (TP=PP=CP=1) on CPU with gloo."""
    from megatron_longgen.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(device="cpu", seed=1234)
    yield
    destroy_parallel()
