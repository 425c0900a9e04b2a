"""The fast path's fused kernels (under the Triton interpreter) against the model's own modules:
RMSNorm, the QKV projection with RoPE and the head split, the SwiGLU MLP; and the fallback to
the module where a kernel does not apply."""

import pytest
import torch

from megatron_longgen.inference import fused_ops
from megatron_longgen.inference.layer_ops import norm, project_qkv
from test_engine import build


@pytest.fixture
def layer(megatron_cpu):
    model = build("attn_sink")  # GQA: 4 heads in 2 groups, head dim 16
    layer = model.decoder.layers[0]
    with torch.no_grad():  # non-trivial norm weights
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.pre_mlp_layernorm.weight.uniform_(0.5, 1.5)
    return layer


def test_rms_norm_equals_the_module(layer):
    x = torch.randn(7, 3, layer.input_layernorm.weight.numel()) * 3
    assert fused_ops.fusable_norm(layer.input_layernorm)
    with torch.no_grad():
        torch.testing.assert_close(fused_ops.rms_norm(layer.input_layernorm, x),
                                   layer.input_layernorm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_qkv_rope_equals_megatron_rope(layer, interleaved, where):
    attn = layer.self_attention
    d = attn.hidden_size_per_attention_head
    seq, batch = (9, 2) if where == "prefill" else (1, 3)
    angles = torch.rand(40, d) * 50  # far positions: large angles
    # prefill: one position row per token, shared by the batch; decode: one per sequence.
    freqs = angles[5:5 + seq][None, None] if where == "prefill" else angles[[3, 17, 39]][:, None, None]
    h = torch.randn(seq, batch, attn.config.hidden_size)
    assert fused_ops.fusable_qkv(attn, freqs)
    with torch.no_grad():
        ref = project_qkv(attn, h, freqs, interleaved)
        got = fused_ops.qkv_rope(attn, h, freqs, interleaved)
        # Written into views of larger buffers, as the prefill does.
        bufs = [torch.full((batch, t.shape[1], seq + 5, d), 7.0) for t in ref]
        views = tuple(b[:, :, 2:2 + seq] for b in bufs)
        project_qkv(attn, h, freqs, interleaved, fused=True, out=views)
    for r, g, b in zip(ref, got, bufs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[:, :, 2:2 + seq], r, rtol=1e-5, atol=1e-5)
        assert (b[:, :, :2] == 7).all() and (b[:, :, 2 + seq:] == 7).all()


def test_swiglu_mlp_equals_the_module(layer):
    h = torch.randn(6, 2, layer.mlp.config.hidden_size)
    assert fused_ops.fusable_mlp(layer.mlp)
    with torch.no_grad():
        out, bias = fused_ops.swiglu_mlp(layer.mlp, h)
        ref, ref_bias = layer.mlp(h)
    assert bias is None and ref_bias is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_modules_the_kernels_do_not_reproduce_run_as_themselves(layer):
    attn = layer.self_attention
    d = attn.hidden_size_per_attention_head
    partial = torch.rand(1, 1, 4, d // 2)  # partial rotary: the kernel rotates whole heads
    assert not fused_ops.fusable_qkv(attn, partial)
    assert not fused_ops.fusable_norm(torch.nn.LayerNorm(8))
    h = torch.randn(4, 1, attn.config.hidden_size)
    with torch.no_grad():
        for a, b in zip(project_qkv(attn, h, partial, False, fused=True),
                        project_qkv(attn, h, partial, False)):
            assert torch.equal(a, b)
        ln = torch.nn.LayerNorm(attn.config.hidden_size)
        assert torch.equal(norm(ln, h, fused=True), ln(h))
    layer.mlp.config.activation_func_clamp_value = 1.0  # the module clamps; the kernel does not
    try:
        assert not fused_ops.fusable_mlp(layer.mlp)
    finally:
        layer.mlp.config.activation_func_clamp_value = None
