"""One training step on the fast path equals the same step on the reference path.

Fast: ``--core-attention-backend auto`` (flash-attn-4 where installed), the fused layer ops
(on by default on CUDA) and the chunked linear cross-entropy. Reference: the dense masked
attention (``reference``), every fused op off, Megatron's loss on the whole logits. Both start
from the same weights, each in a fresh Trainer; loss, gradient norm and every parameter's
gradient must agree within the dtype's tolerance. A third run with a narrower sliding window
must not: the comparison can tell a wrong attention pattern from rounding.

The GPU part (a small Llama-shaped hybrid, 4096 tokens, vocabulary 32000, bf16) is skipped
without CUDA; the CPU part runs the same comparison on the tiny shape in fp32.
"""

from typing import Dict, List

import pytest
import torch

from benchmarks.train_step import LINEAR_CROSS_ENTROPY, UNFUSED_LAYER_OPS, attention_backends
from megatron_longgen.attention import fa4
from megatron_longgen.training.arguments import parse_args
from megatron_longgen.training.trainer import Trainer

ONE_STEP = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", "1", "--log-interval", "1000", "--lr", "1e-4", "--min-lr", "1e-5"]
GPU_SHAPE = ["--model", "llama2-7b", "--num-layers", "4", "--hidden-size", "1024",
             "--num-attention-heads", "8", "--num-query-groups", "2", "--ffn-hidden-size", "2816",
             "--vocab-size", "32000", "--seq-length", "4096", "--bf16", "--device", "cuda",
             "--full-attention-layers", "1", "--sink-tokens", "64"]
# 8 chunks of 524 tokens, as a 128K sequence is cut (the default 512 MiB holds 4096 tokens whole).
GPU_CHUNKS = ["--linear-cross-entropy-chunk-mb", "64"]
CPU_SHAPE = ["--model", "tiny", "--num-layers", "4", "--seq-length", "256", "--device", "cpu",
             "--full-attention-layers", "1", "--sink-tokens", "4"]
CPU_CHUNKS = ["--linear-cross-entropy-chunk-mb", "0.1"]  # 6 chunks of 51 tokens


def fast_flags(shape: List[str], window: int, loss_chunks: List[str] = ()) -> List[str]:
    return [*shape, *ONE_STEP, "--sparse-attention", "attn_sink", "--sliding-window-size",
            str(window), "--core-attention-backend", "auto", *LINEAR_CROSS_ENTROPY, *loss_chunks]


def reference_flags(shape: List[str], window: int) -> List[str]:
    return [*shape, *ONE_STEP, "--sparse-attention", "attn_sink", "--sliding-window-size",
            str(window), "--core-attention-backend", "reference",
            *UNFUSED_LAYER_OPS]


def named_parameters(trainer):
    from megatron.core.utils import unwrap_model

    for chunk in trainer.model:
        yield from unwrap_model(chunk).named_parameters()


def one_step(flags: List[str], init: Dict[str, torch.Tensor] = None) -> dict:
    """One optimizer step in a fresh Trainer, from ``init`` if given (else the seed's weights)."""
    trainer = Trainer(parse_args(flags))
    if init is not None:
        for name, param in named_parameters(trainer):
            param.data.copy_(init[name])  # in place: DDP's buffers see it
    weights = {name: p.detach().clone() for name, p in named_parameters(trainer)}
    result = trainer.fit()
    record = {
        "init": weights,
        "loss": result.losses[1],
        "grad_norm": result.grad_norms[1],
        "grads": {name: p.main_grad.detach().float().clone() for name, p in named_parameters(trainer)},
        "attention": attention_backends(trainer),
    }
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def worst_grad_diff(got: dict, ref: dict) -> tuple:
    """(largest ||g - r|| / ||r|| over the parameters, its parameter)."""
    assert sorted(got["grads"]) == sorted(ref["grads"]), "parameter names differ"
    diffs = {name: float((got["grads"][name] - r).norm() / r.norm().clamp_min(1e-30))
             for name, r in ref["grads"].items()}
    name = max(diffs, key=diffs.get)
    return diffs[name], name


def three_runs(shape: List[str], window: int, loss_chunks: List[str] = ()) -> tuple:
    """(fast, reference, reference with half the window), all from the reference's weights."""
    ref = one_step(reference_flags(shape, window))
    fast = one_step(fast_flags(shape, window, loss_chunks), ref["init"])
    narrow = one_step(reference_flags(shape, window // 2), ref["init"])
    return fast, ref, narrow


def check_equal_and_discriminating(fast, ref, narrow, loss_rtol, norm_rtol, grad_rtol):
    assert fast["loss"] == pytest.approx(ref["loss"], rel=loss_rtol)
    assert fast["grad_norm"] == pytest.approx(ref["grad_norm"], rel=norm_rtol)
    worst, name = worst_grad_diff(fast, ref)
    assert worst < grad_rtol, f"{name}: gradient differs by {worst:.2e} (relative L2)"
    # A different pattern misses by far more than the tolerance, in some gradient.
    wrong, wrong_name = worst_grad_diff(narrow, ref)
    assert wrong > 5 * grad_rtol, f"a narrower window moved no gradient past {wrong:.2e} ({wrong_name})"


# ---- GPU: bf16, flash-attn-4 and the fused ops where present --------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_runs():
    return three_runs(GPU_SHAPE, 1024, GPU_CHUNKS)


def test_reference_turns_every_fused_op_off():
    """Every flag the reference run uses to unfuse the layer ops is a trainer flag, and each
    turns its op off (a renamed flag would otherwise fail only on a GPU)."""
    from megatron_longgen.training.arguments import build_parser

    args, unknown = build_parser().parse_known_args(["--mock-data", *UNFUSED_LAYER_OPS])
    assert not unknown, "the trainer lacks these flags"
    # None would be the device default (on for CUDA): each must be an explicit False
    assert (args.rms_norm_fusion, args.rope_fusion, args.bias_swiglu_fusion, args.bias_dropout_fusion) == (False,) * 4


@gpu
def test_fast_step_equals_reference_step_bf16(gpu_runs):
    fast, ref, narrow = gpu_runs
    assert set(ref["attention"].values()) == {"reference"}
    if fa4.fa4_installed() and torch.cuda.get_device_capability() >= (9, 0):
        assert fast["attention"] == {"attn_sink": "fa4", "causal": "fa4"}
    # bf16: activations rounded to 8 bits of mantissa in different places on the two paths.
    check_equal_and_discriminating(fast, ref, narrow, loss_rtol=2e-3, norm_rtol=2e-2, grad_rtol=5e-2)


# ---- CPU: the same comparison in fp32 (sdpa for the full layer, the chunked loss) -----------

@pytest.fixture(scope="module")
def cpu_runs():
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        pytest.skip("this process's group is NCCL (a GPU run came first): the fp32 CPU "
                    "comparison runs in a CPU-only pytest process, the bf16 one above here")
    return three_runs(CPU_SHAPE, 32, CPU_CHUNKS)


def test_fast_step_equals_reference_step_fp32_cpu(cpu_runs):
    fast, ref, narrow = cpu_runs
    assert fast["attention"] == {"attn_sink": "reference", "causal": "sdpa"}
    assert ref["attention"] == {"attn_sink": "reference", "causal": "reference"}
    assert all(torch.equal(fast["init"][k], v) for k, v in ref["init"].items())
    check_equal_and_discriminating(fast, ref, narrow, loss_rtol=1e-5, norm_rtol=1e-4, grad_rtol=1e-4)
