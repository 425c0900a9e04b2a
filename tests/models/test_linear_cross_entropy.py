"""Fused output layer + cross-entropy (``cross_entropy_fusion_impl="linear"``): the loss and
gradients of Megatron's own path (output layer + vocab_parallel_cross_entropy) at TP=1,
without ever holding the whole sequence's logits. TP=2, with and without sequence
parallelism, runs through the trainer in tests/parallel/test_parallel_parity.py."""

import pytest
import torch
from megatron.core import tensor_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.linear_cross_entropy import MiB, _LinearCrossEntropy, chunk_tokens
from megatron_longgen.models.presets import get_preset, longgen_config
from megatron_longgen.parallel.layout import Layout, estimate_memory
from megatron_longgen.training.arguments import parse_args
from megatron_longgen.training.setup import model_config_from
from megatron_longgen.training.trainer import loss_func

TINY = get_preset("tiny")
LINEAR = dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="linear")


def megatron_loss(hidden, weight, target):
    """Megatron's unfused path at TP=1: the whole logits, then vocab_parallel_cross_entropy."""
    return tensor_parallel.vocab_parallel_cross_entropy(torch.matmul(hidden, weight.t()), target)


def loss_and_grads(loss_fn, hidden, weight, target, grad_loss):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, target)
    grads = torch.autograd.grad((loss.float() * grad_loss).sum(), (hidden, weight))
    return loss.detach(), *grads


def problem(n=100, h=32, v=96, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    # A per-token gradient, as the trainer's masked sum and the loss scale give.
    grad_loss = torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.3)
    return hidden, weight, target, grad_loss


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])  # one token, uneven, exact, beyond n
def test_op_equals_megatron_loss_and_gradients(megatron_cpu, chunk):
    hidden, weight, target, grad_loss = problem()
    ref = loss_and_grads(megatron_loss, hidden, weight, target, grad_loss)
    got = loss_and_grads(lambda h, w, t: _LinearCrossEntropy.apply(h, w, t, None, chunk),
                         hidden, weight, target, grad_loss)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert float(ref[2].abs().max()) > 0.01  # the reference gradient is not trivially zero


def test_op_bf16_as_accurate_as_megatron(megatron_cpu):
    """bf16 weights: bf16 logits made fp32 and bf16 gradient matmuls, as in Megatron's path.
    Against the fp32 computation on the same inputs, the fused loss and gradients err no more
    than Megatron's own bf16 path does (the weight gradient sums its chunks in fp32)."""
    hidden, weight, target, grad_loss = problem(dtype=torch.bfloat16)
    exact = loss_and_grads(megatron_loss, hidden.float(), weight.float(), target, grad_loss)
    ref = loss_and_grads(megatron_loss, hidden, weight, target, grad_loss)
    got = loss_and_grads(lambda h, w, t: _LinearCrossEntropy.apply(h, w, t, None, 9),
                         hidden, weight, target, grad_loss)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16

    def error(x, e):
        return float((x.float() - e).abs().max() / e.abs().max())

    for name, g, r, e in zip(("loss", "grad hidden", "grad weight"), got, ref, exact):
        print(f"{name}: fused {error(g, e):.1e}, Megatron {error(r, e):.1e}")
        assert error(g, e) <= 1.5 * error(r, e) + 1e-6, name
        assert error(g, e) < 1e-2, name  # about one bf16 rounding (2^-8)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation makes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_chunk_kernels_equal_the_torch_ops(megatron_cpu, monkeypatch, dtype):
    """The CUDA path's two Triton kernels (run by Triton's interpreter here) give the loss and
    gradients of the torch ops they replace, with a vocabulary of several kernel blocks and a
    ragged tail, chunks of uneven size, and a target in the last column."""
    from megatron_longgen.models import linear_cross_entropy as lce

    hidden, weight, target, grad_loss = problem(n=23, v=2051, dtype=dtype)
    target[0] = 2050
    op = lambda h, w, t: _LinearCrossEntropy.apply(h, w, t, None, 10)  # noqa: E731
    ref = loss_and_grads(op, hidden, weight, target, grad_loss)
    exact = loss_and_grads(op, hidden.double(), weight.double(), target, grad_loss.double())
    monkeypatch.setattr(lce, "_fused", lambda logits: True)
    got = loss_and_grads(op, hidden, weight, target, grad_loss)
    for name, a, b, e in zip(("loss", "grad hidden", "grad weight"), got, ref, exact):
        assert a.dtype == b.dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:  # bf16 results: one rounding of the largest value, as the torch ops' own error
            error = float((a.double() - e).abs().max() / e.abs().max())
            assert error < 2 ** -7, (name, error)


def test_op_never_holds_the_sequence_logits(megatron_cpu):
    n, h, v, chunk = 512, 32, 1024, 16
    hidden, weight, target, grad_loss = problem(n, h, v)
    largest = {}
    for name, fn in (("megatron", megatron_loss),
                     ("linear", lambda a, b, c: _LinearCrossEntropy.apply(a, b, c, None, chunk))):
        with LargestTensor() as probe:
            loss_and_grads(fn, hidden, weight, target, grad_loss)
        largest[name] = probe.numel
    assert largest["megatron"] >= n * v  # the probe sees the whole logits where they exist
    # Fused: a chunk's logits, the weight (gradient) or the hidden states (gradient), no more.
    assert largest["linear"] <= max(chunk * v, v * h, n * h) == n * v // 16


def test_chunk_is_sized_in_bytes():
    assert chunk_tokens(512, 32000) == 512 * MiB // (4 * 32000) == 4194
    assert chunk_tokens(512, 128256 // 8) == 8371  # Llama-3's vocabulary over TP=8
    assert chunk_tokens(0.001, 32000) == 1  # never zero tokens


def test_memory_estimate_counts_one_chunk():
    """Llama-2-7B at 128K on one GPU: Megatron's loss holds 6 B per token and vocabulary entry
    (23.4 GiB); the linear one holds one 512 MiB chunk's (4194 tokens) plus its fp32 weight
    gradient, whatever the sequence length."""
    shape = get_preset("llama2-7b")
    fused = Layout(tp=1, sequence_parallel=False, linear_cross_entropy_chunk_mb=512)
    whole = estimate_memory(shape, Layout(tp=1, sequence_parallel=False), 131072)["logits"]
    assert whole == pytest.approx(131072 * 32000 * 6 / 2 ** 30)
    chunk = estimate_memory(shape, fused, 131072)["logits"]
    assert chunk == pytest.approx((4194 * 32000 * 6 + 32000 * 4096 * 4) / 2 ** 30)  # 1.24 GiB
    assert estimate_memory(shape, fused, 32768)["logits"] == chunk
    short = estimate_memory(shape, fused, 2048)["logits"]  # shorter than a chunk: the tokens'
    assert short == pytest.approx((2048 * 32000 * 6 + 32000 * 4096 * 4) / 2 ** 30)


def tiny_pair(**extra):
    """The tiny hybrid model with Megatron's loss and with the linear one, equal weights."""
    common = dict(use_cpu_initialization=True, sink_tokens=2, sliding_window_size=8, **extra)
    stock = build_longgen_model(longgen_config("tiny", **common), TINY.vocab_size, 64)
    fused = build_longgen_model(longgen_config("tiny", **common, **LINEAR,
                                               linear_cross_entropy_chunk_mb=20 * 4 * TINY.vocab_size / MiB),
                                TINY.vocab_size, 64)
    fused.load_state_dict(stock.state_dict())
    return stock, fused


def test_model_loss_and_gradients_equal_megatron(megatron_cpu):
    """Through GPTModel and the trainer's loss_func (loss mask with zeros): same per-token
    loss, same gradient for every parameter (output weight, final norm, layers, embedding)."""
    stock, fused = tiny_pair()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY.vocab_size, (2, 48), generator=g)  # 96 tokens: 5 chunks of 20
    labels = torch.randint(0, TINY.vocab_size, (2, 48), generator=g)
    pos = torch.arange(48)[None].expand(2, -1)
    mask = (torch.rand(2, 48, generator=g) > 0.25).float()
    results, largest = [], []
    for model in (stock, fused):
        with LargestTensor() as probe:
            per_token = model(ids, pos, None, labels=labels)
            loss, num_tokens, _ = loss_func(mask, per_token)
            loss.backward()
        results.append((per_token.detach(), {n: p.grad for n, p in model.named_parameters()}))
        largest.append(probe.numel)
    (ref_loss, ref_grads), (got_loss, got_grads) = results
    assert got_loss.shape == (2, 48)
    # The fused model took the chunked path: no tensor as large as the 96 x 512 logits.
    assert largest[0] >= 96 * TINY.vocab_size > largest[1]
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert sorted(got_grads) == sorted(ref_grads)
    for name, grad in ref_grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_without_labels_still_gives_logits(megatron_cpu):
    stock, fused = tiny_pair()
    ids = torch.randint(0, TINY.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(32)[None]
    with torch.no_grad():
        logits = fused(ids, pos, None)
        torch.testing.assert_close(logits, stock(ids, pos, None))
    assert logits.shape == (1, 32, TINY.vocab_size)


def test_trainer_flags_reach_the_config():
    train = parse_args(["--device", "cpu", "--mock-data", "--cross-entropy-loss-fusion",
                        "--cross-entropy-fusion-impl", "linear", "--linear-cross-entropy-chunk-mb", "64"])
    cfg = model_config_from(train)
    assert cfg.uses_linear_cross_entropy and cfg.linear_cross_entropy_chunk_mb == 64
    assert not longgen_config("tiny").uses_linear_cross_entropy  # Megatron's default: off


@pytest.mark.parametrize("overrides,message", [
    (dict(cross_entropy_fusion_impl="fast"), "cross_entropy_fusion_impl must be one of"),
    (dict(linear_cross_entropy_chunk_mb=0), "linear_cross_entropy_chunk_mb must be > 0"),
    (dict(**LINEAR, mtp_num_layers=1), "does not cover multi-token prediction"),
])
def test_config_refuses_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        longgen_config("tiny", **overrides)


def test_trainer_refuses_an_impl_without_the_fusion():
    train = parse_args(["--mock-data", "--cross-entropy-fusion-impl", "linear"])
    with pytest.raises(ValueError, match="takes effect only with --cross-entropy-loss-fusion"):
        train.validate(world_size=1)


@pytest.mark.parametrize("linear", [False, True])
def test_train_step_benchmark_selects_the_loss(linear):
    from benchmarks import train_step as bench

    case = bench.Case(131072, "hybrid attn_sink", 32000, linear_cross_entropy=linear)
    flags = bench.trainer_flags(case, num_layers=6, iters=3)
    cfg = model_config_from(parse_args(flags))
    assert cfg.uses_linear_cross_entropy == linear and cfg.bf16


def test_cross_entropy_benchmark_smoke(megatron_cpu, capsys):
    from benchmarks import cross_entropy as bench

    rows = bench.main(["--device", "cpu", "--tokens", "96", "--hidden", "32", "--vocab", "256",
                       "--chunk-mb", "0.01", "--iters", "1", "--warmup", "0",
                       "--impls", "megatron", "linear"])  # native: torch.compile, slow on CPU
    megatron, linear = rows
    assert megatron["impl"] == "megatron" and megatron["ms"] > 0 and "loss_diff" not in megatron
    assert max(linear["loss_diff"], linear["grad_h_diff"], linear["grad_w_diff"]) < 1e-5
    assert "| 256 | linear |" in capsys.readouterr().out
