"""The fused layer ops on a GPU, bf16 and fp16, at an odd length, against float64 torch (output
and gradients); and the training modules that run them on CUDA (RMSNorm, Megatron's RoPE with
``apply_rope_fusion``, packed documents, the MLP's SwiGLU) against their exact torch paths."""

import pytest
import torch
import torch.nn.functional as F

from megatron_longgen.models import fused_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENS, HIDDEN, HEADS, HEAD_DIM, FFN = 1061, 4096, 8, 128, 1376
# Largest error relative to the reference's largest magnitude: a few rounding steps of the dtype.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = list(TOLERANCE)


def _rel(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach()
    return float((got - ref).abs().max() / ref.abs().max())


def _check(fused, reference, inputs, dtype):
    """fused(*inputs in dtype) and its input gradients against reference(*the same inputs in
    float64): the kernel's own error, a few roundings to dtype."""
    ref_in = [t.detach().to(dtype).double().requires_grad_(True) for t in inputs]
    ref = reference(*ref_in)
    dy = torch.randn_like(ref).to(dtype).double()  # representable in dtype
    ref.backward(dy)
    got_in = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    got = fused(*got_in)
    assert got.dtype == dtype
    got.backward(dy.to(dtype))
    errors = [_rel(got, ref)] + [_rel(g.grad, r.grad) for g, r in zip(got_in, ref_in)]
    assert max(errors) < TOLERANCE[dtype], errors


def _angles(s, d=HEAD_DIM, start=0):
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device="cuda") / d))
    f = torch.arange(start, start + s, dtype=torch.float32, device="cuda")[:, None] * inv
    return torch.cat([f, f], dim=-1)[:, None, None, :]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x = torch.randn(TOKENS, 1, HIDDEN, device="cuda") * 3
    w = torch.rand(HIDDEN, device="cuda") + 0.5
    _check(lambda x, w: fused_ops.rms_norm(x, w, 1e-5),
           lambda x, w: F.rms_norm(x, (HIDDEN,), w, 1e-5), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope(dtype, interleaved):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t = torch.randn(TOKENS, 2, HEADS, HEAD_DIM, device="cuda")
    freqs = _angles(TOKENS, start=120000)  # far positions: large angles
    _check(lambda t: fused_ops.apply_rope(t, freqs, interleaved),
           lambda t: _apply_rotary_pos_emb_bshd(t, freqs.double(), rotary_interleaved=interleaved),
           [t], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    def glu(x):
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    _check(fused_ops.swiglu, glu, [torch.randn(TOKENS, 1, 2 * FFN, device="cuda") * 3], dtype)


@pytest.fixture(scope="module")
def megatron_gpu():
    from megatron_longgen.parallel.initialize import initialize_parallel

    initialize_parallel(device="cuda", seed=1234)


def _config(**fusions):
    from megatron_longgen.models.presets import longgen_config

    return longgen_config("tiny", bf16=True, params_dtype=torch.bfloat16, **fusions)


def test_rms_norm_module_runs_the_kernel_on_cuda():
    from megatron_longgen.models.norm import RMSNorm

    norm = RMSNorm(_config(rms_norm_fusion=True), HIDDEN).cuda().bfloat16()
    assert norm.fused
    x = torch.randn(TOKENS, 1, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = norm(x)
    assert "RMSNormFunction" in out.grad_fn.name()
    out.sum().backward()
    ref_w = norm.weight.detach().double().requires_grad_(True)
    ref_x = x.detach().double().requires_grad_(True)
    F.rms_norm(ref_x, (HIDDEN,), ref_w, norm.eps).sum().backward()
    assert _rel(x.grad, ref_x.grad) < 2e-2 and _rel(norm.weight.grad, ref_w.grad) < 2e-2


def test_megatron_rope_with_fusion_runs_ours(megatron_gpu):
    from megatron.core.models.common.embeddings import rope_utils

    config = _config(apply_rope_fusion=True)
    if rope_utils.fused_apply_rotary_pos_emb is not fused_ops.fused_apply_rotary_pos_emb:
        pytest.skip("TransformerEngine's fused RoPE is installed")
    t = torch.randn(TOKENS, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    freqs = _angles(TOKENS)
    got = rope_utils.apply_rotary_pos_emb(t, freqs, config)
    assert "RoPEFunction" in got.grad_fn.name()
    ref = rope_utils._apply_rotary_pos_emb_bshd(t.double(), freqs.double())
    assert _rel(got, ref) < 2e-2
    # Packed documents (thd): positions restart per document (angles for up to 2048 positions,
    # as RotaryEmbedding makes for the longest document).
    cu = torch.tensor([0, 300, 301, 777, TOKENS], dtype=torch.int32, device="cuda")
    freqs = _angles(2048)
    got = rope_utils.apply_rotary_pos_emb(t[:, 0], freqs, config, cu_seqlens=cu)
    docs = [rope_utils._apply_rotary_pos_emb_bshd(t[a:b].double(), freqs[: b - a].double())
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert _rel(got, torch.cat(docs)[:, 0]) < 2e-2


@pytest.mark.parametrize("impl", ["triton", "native"])
def test_mlp_fused_swiglu_equals_the_unfused_mlp(megatron_gpu, impl):
    from megatron.core.transformer.mlp import MLP

    from megatron_longgen.models.mlp import LongGenMLP
    from megatron_longgen.models.specs import longgen_layer_spec

    submodules = longgen_layer_spec().submodules.mlp.submodules
    plain = MLP(_config(), submodules).cuda()
    fused = LongGenMLP(_config(bias_activation_fusion=True, swiglu_fusion_impl=impl), submodules).cuda()
    assert fused.triton_swiglu == (impl == "triton")
    fused.load_state_dict(plain.state_dict())
    h = torch.randn(TOKENS, 1, plain.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    h_plain, h_fused = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    plain(h_plain)[0].float().square().sum().backward()
    out = fused(h_fused)[0]
    out.float().square().sum().backward()
    torch.testing.assert_close(out.detach(), plain(h)[0].detach(), rtol=2e-2, atol=2e-2)
    assert _rel(h_fused.grad, h_plain.grad.double()) < 2e-2


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_hybrid_step_with_fused_ops_equals_the_unfused_step(megatron_gpu, packed):
    """Loss and gradient norm of one forward + backward of the tiny hybrid (bf16), every layer
    op fused vs none, the same weights; packed documents take the thd RoPE hook."""
    from megatron_longgen.models.gpt import build_longgen_model
    from megatron_longgen.training.batches import packed_seq_params_from_eod

    fusions = dict(rms_norm_fusion=True, apply_rope_fusion=True, bias_activation_fusion=True,
                   bias_dropout_fusion=True, swiglu_fusion_impl="triton")
    common = dict(sink_tokens=4, sliding_window_size=32)
    seq, vocab = 1061, 512
    torch.manual_seed(0)
    plain = build_longgen_model(_config(**common), vocab, 2048).cuda()
    fused = build_longgen_model(_config(**common, **fusions), vocab, 2048).cuda()
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(1, vocab, (1, seq + 1), device="cuda")
    if packed:
        ids[0, [200, 201, 650]] = 0  # EOD tokens: four documents
    params = packed_seq_params_from_eod(ids[:, :-1], 0) if packed else None
    pos = torch.arange(seq, device="cuda")[None]
    results = []
    for model in (plain, fused):
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:], packed_seq_params=params).float().mean()
        loss.backward()
        grad_norm = torch.cat([p.grad.float().flatten() for p in model.parameters()]).norm()
        results.append((float(loss), float(grad_norm)))
    (loss_a, norm_a), (loss_b, norm_b) = results
    assert abs(loss_a - loss_b) < 1e-2 * abs(loss_a)
    assert abs(norm_a - norm_b) < 2e-2 * norm_a
