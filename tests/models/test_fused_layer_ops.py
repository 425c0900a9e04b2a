"""The fused layer ops' autograd functions (Triton kernels, run by the interpreter here) against
the torch modules in float64, output and gradients, at odd sizes; and how training reaches them:
Megatron's RoPE hook, the MLP's SwiGLU choice, the flags' defaults."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings import rope_utils

from megatron_longgen.models import fused_ops

TOKENS, BATCH, HIDDEN, HEADS, HEAD_DIM = 37, 2, 80, 3, 16


def _grads(fn, inputs, dy):
    """fn(*inputs) and the gradients of <fn(*inputs), dy> w.r.t. the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _assert_matches_float64(fused, reference, inputs, out_shape, tol=1e-5):
    dy = torch.randn(out_shape, dtype=torch.float64)
    got, got_grads = _grads(fused, inputs, dy)
    ref, ref_grads = _grads(reference, [t.double() for t in inputs], dy)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol)


def test_rms_norm_output_and_grads_equal_torch():
    x = torch.randn(TOKENS, BATCH, HIDDEN) * 3
    w = torch.rand(HIDDEN) + 0.5
    _assert_matches_float64(lambda x, w: fused_ops.rms_norm(x, w, 1e-5),
                            lambda x, w: F.rms_norm(x, (HIDDEN,), w, 1e-5), [x, w], x.shape)


def test_rms_norm_weight_grad_sums_every_program_share():
    """More rows than backward programs: each program sums a run of rows, then the shares add."""
    x, w = torch.randn(TOKENS * 3, HIDDEN), torch.rand(HIDDEN) + 0.5
    assert fused_ops._dw_programs(x, x.shape[0]) < x.shape[0]
    _assert_matches_float64(lambda x, w: fused_ops.rms_norm(x, w, 1e-6),
                            lambda x, w: F.rms_norm(x, (HIDDEN,), w, 1e-6), [x, w], x.shape)


def _angles(s, d=HEAD_DIM, batch=1, start=1000):
    """Megatron's RotaryEmbedding layout: [s, batch, 1, d] fp32, each pair's angle twice."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(start, start + s * batch, dtype=torch.float32).view(s, batch)
    f = pos[..., None] * inv
    return torch.cat([f, f], dim=-1)[:, :, None, :]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("freq_batch", [1, BATCH])
def test_rope_output_and_grads_equal_megatron(interleaved, freq_batch):
    # A strided view, as Megatron's query is a slice of the fused QKV projection.
    qkv = torch.randn(TOKENS, BATCH, HEADS + 2, HEAD_DIM)
    t = qkv[:, :, :HEADS]
    freqs = _angles(TOKENS, batch=freq_batch)
    _assert_matches_float64(
        lambda t: fused_ops.apply_rope(t, freqs, interleaved),
        lambda t: rope_utils._apply_rotary_pos_emb_bshd(t, freqs.double(), rotary_interleaved=interleaved),
        [t], t.shape)


def test_swiglu_output_and_grads_equal_megatrons_glu():
    x = torch.randn(TOKENS, BATCH, 2 * HIDDEN) * 3

    def glu(x):  # Megatron's MLP: the first half through silu (the gate), times the second
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    _assert_matches_float64(fused_ops.swiglu, glu, [x], (TOKENS, BATCH, HIDDEN))


class _CpGroup:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp_size,cp_rank,exact", [(1, 0, False), (2, 1, False), (1, 0, True)])
def test_packed_rope_hook_takes_megatrons_positions(cp_size, cp_rank, exact):
    """The thd hook restarts positions per document (per CP rank) as Megatron's unfused path."""
    cu = torch.tensor([0, 8, 12, 24, 36], dtype=torch.int32) // cp_size * cp_size
    t = torch.randn(int(cu[-1]) // cp_size, HEADS, HEAD_DIM)
    freqs = _angles(int(cu[-1]) if exact else 40, start=0)
    ref = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_CpGroup(cp_size, cp_rank))
    got = fused_ops.fused_apply_rotary_pos_emb_thd(t, cu, freqs, cp_size=cp_size, cp_rank=cp_rank)
    torch.testing.assert_close(got, ref)


def test_rope_fusion_config_installs_our_hook_and_cpu_runs_megatrons_rope(megatron_cpu):
    from megatron_longgen.models.presets import longgen_config

    config = longgen_config("tiny", apply_rope_fusion=True)  # TransformerConfig checks the hook
    if rope_utils.fused_apply_rotary_pos_emb is not fused_ops.fused_apply_rotary_pos_emb:
        pytest.skip("TransformerEngine's fused RoPE is installed: the hook stays TE's")
    t, freqs = torch.randn(TOKENS, BATCH, HEADS, HEAD_DIM), _angles(TOKENS)
    torch.testing.assert_close(rope_utils.apply_rotary_pos_emb(t, freqs, config),
                               rope_utils._apply_rotary_pos_emb_bshd(t, freqs))


def test_fusion_flags_default_on_for_cuda_off_on_cpu_and_map_to_megatron_fields():
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.setup import model_config_from

    fields = ("rms_norm_fusion", "apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion")
    cpu = model_config_from(parse_args(["--mock-data", "--device", "cpu"]))
    assert not any(getattr(cpu, f) for f in fields)
    cuda = model_config_from(parse_args(["--mock-data", "--device", "cuda"]))
    assert all(getattr(cuda, f) for f in fields) and cuda.swiglu_fusion_impl == "triton"
    off = model_config_from(parse_args(["--mock-data", "--device", "cuda", "--no-rope-fusion",
                                        "--bias-swiglu-fusion", "--swiglu-fusion-impl", "native"]))
    assert not off.apply_rope_fusion and off.bias_activation_fusion
    assert off.swiglu_fusion_impl == "native"


def test_swiglu_impl_without_the_fusion_is_refused():
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.utils.cli import UsageError

    train = parse_args(["--mock-data", "--device", "cpu", "--no-bias-swiglu-fusion",
                        "--swiglu-fusion-impl", "triton"])
    with pytest.raises(UsageError, match="--swiglu-fusion-impl triton takes effect only"):
        train.validate(world_size=1)


def test_mlp_with_triton_swiglu_equals_megatrons_mlp_on_cpu(megatron_cpu):
    """On CPU tensors the MLP keeps the exact torch path, whatever the fusion settings."""
    from megatron.core.transformer.mlp import MLP

    from megatron_longgen.models.mlp import LongGenMLP
    from megatron_longgen.models.presets import longgen_config
    from megatron_longgen.models.specs import longgen_layer_spec

    assert longgen_layer_spec().submodules.mlp.module is MLP  # Megatron's own unless asked
    assert longgen_layer_spec(triton_swiglu=True).submodules.mlp.module is LongGenMLP
    submodules = longgen_layer_spec().submodules.mlp.submodules
    plain = MLP(longgen_config("tiny", use_cpu_initialization=True), submodules)
    fused = LongGenMLP(longgen_config("tiny", use_cpu_initialization=True, bias_activation_fusion=True),
                       submodules)
    assert fused.triton_swiglu
    fused.load_state_dict(plain.state_dict())
    h = torch.randn(5, 2, plain.config.hidden_size)
    torch.testing.assert_close(fused(h)[0], plain(h)[0])


def test_layer_with_our_mlp_logs_no_unknown_mlp_notice_and_keeps_the_tp_group(megatron_cpu, caplog):
    """Megatron logs "Unknown MLP type" per layer for an MLP class but its own and passes it no
    tensor-parallel group: ours then takes the default group, the one Megatron would pass."""
    import logging

    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_longgen.models.mlp import LongGenMLP
    from megatron_longgen.models.presets import longgen_config
    from megatron_longgen.models.specs import longgen_layer_spec

    config = longgen_config("tiny", use_cpu_initialization=True, bias_activation_fusion=True)
    spec = longgen_layer_spec(triton_swiglu=True)
    with caplog.at_level(logging.WARNING):
        layer = TransformerLayer(config, spec.submodules, layer_number=1)
    assert isinstance(layer.mlp, LongGenMLP)
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]
    assert layer.mlp.tp_group is parallel_state.get_tensor_model_parallel_group()
    other = logging.getLogger("megatron.core.transformer.transformer_layer")
    with caplog.at_level(logging.WARNING):
        other.warning("another notice")
    assert [r for r in caplog.records if r.getMessage() == "another notice"]


def test_layer_ops_benchmark_checks_catch_a_wrong_candidate():
    """The benchmark's float64 check (run before any timing) passes our kernels and Megatron's
    unfused ops and fails a candidate that computes something else."""
    from benchmarks import layer_ops as bench

    for name in ("rms_norm", "rope", "swiglu"):
        op = bench.OPS[name]
        candidates = op.candidates()
        for cand in ("ours", "torch" if name == "rms_norm" else "megatron"):
            assert bench.check(op, candidates[cand], 3, "cpu", torch.float32) < 1e-5, (name, cand)
    def wrong(leaves, ctx):  # gate and up swapped
        return fused_ops.swiglu(torch.cat(torch.chunk(leaves[0], 2, dim=-1)[::-1], dim=-1))

    assert bench.check(bench.OPS["swiglu"], wrong, 3, "cpu", torch.float32) > 1e-2
