"""The fused decode kernels (``inference/decode_ops.py``, under the Triton interpreter, float32)
against what they replace: the residual add and the model's RMSNorm, the exact path's QKV
projection with Megatron's RoPE, ``LayerCache.write`` of one token, the model's MLP and linear
layers."""

import pytest
import torch

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.inference import decode_ops
from megatron_longgen.inference.kv_cache import LayerCache
from megatron_longgen.inference.layer_ops import project_qkv
from test_fused_ops import layer  # noqa: F401  (a fixture: the tiny model's first layer, GQA)


@pytest.mark.parametrize("with_bias", [False, True])
def test_add_norm_equals_residual_then_module(layer, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = layer.pre_mlp_layernorm.weight.numel()
    x, out = torch.randn(1, 3, hidden, generator=g) * 2, torch.randn(1, 3, hidden, generator=g)
    bias = torch.randn(hidden, generator=g) if with_bias else None
    ref_x = x + (out + bias if with_bias else out)
    with torch.no_grad():
        ref_h = layer.pre_mlp_layernorm(ref_x)
        got_x, got_h = decode_ops.add_norm(x.clone(), out, bias, layer.pre_mlp_layernorm)
    torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("write_cache", [False, True])
def test_rope_qkv_equals_projection_with_megatron_rope(layer, interleaved, write_cache):
    """Positions 3, 17 and 39 of a 40-row angle table (large angles), and one past its end
    (clamped, as the fast path clamps); a full layer's cache gets K/V at slot = position."""
    attn = layer.self_attention
    d, groups = attn.hidden_size_per_attention_head, attn.num_query_groups_per_partition
    g = torch.Generator().manual_seed(1)
    rope = torch.rand(40, d, generator=g) * 50
    lengths = torch.tensor([3, 17, 39, 45])
    h = torch.randn(1, 4, attn.config.hidden_size, generator=g)
    assert decode_ops.fusable_rope(attn, rope)
    cache = LayerCache.allocate(CausalPattern(), 4, groups, 2, d, 48, torch.float32, "cpu")
    with torch.no_grad():
        freqs = rope[lengths.clamp(max=39)][:, None, None]
        ref = [t[:, :, 0] for t in project_qkv(attn, h, freqs, interleaved)]
        qkv, _ = attn.linear_qkv(h)
        got = decode_ops.rope_qkv(attn, qkv, rope, lengths, interleaved,
                                  full_cache=cache if write_cache else None)
    for r, t in zip(ref, got):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-5)
    held = cache.pos >= 0
    if not write_cache:
        assert not held.any() and not cache.k.any()
        return
    b = torch.arange(4)
    assert held.sum() == 4 * groups and (cache.pos[b, :, lengths] == lengths[:, None]).all()
    torch.testing.assert_close(cache.k[b, :, lengths], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[b, :, lengths], ref[2], rtol=0, atol=0)
    assert cache.k[~held].abs().sum() == 0  # nothing else written


HEADS, GROUPS, DIM = 4, 2, 4
WRITE_PATTERNS = {
    "sink": AttnSinkPattern(sink_tokens=3, window_size=8),
    "sink_window1": AttnSinkPattern(sink_tokens=2, window_size=1),
    "block_hetero": BlockSparsePattern(4, 2, 3, homo_head=False, num_heads=HEADS,
                                       num_query_groups=GROUPS),
    "block_local1": BlockSparsePattern(4, 1, 2, homo_head=True, num_heads=HEADS,
                                       num_query_groups=GROUPS),
    "block_cover_stride5": BlockSparsePattern(4, 1, 5, homo_head=False, num_heads=HEADS,
                                              num_query_groups=GROUPS),
    "block_legacy": BlockSparsePattern(4, 2, 4, homo_head=False, num_heads=HEADS,
                                       num_query_groups=GROUPS, vert_stride_rule="legacy"),
    "causal": CausalPattern(),
}


@pytest.mark.parametrize("name", sorted(WRITE_PATTERNS))
def test_write_token_equals_layer_cache_write(name):
    """The one-token write kernel leaves the cache exactly as ``LayerCache.write`` does,
    including tokens dropped at once (window 1, one local block) and full rings."""
    pattern = WRITE_PATTERNS[name]
    twins = [LayerCache.allocate(pattern, 2, GROUPS, HEADS // GROUPS, DIM, 100, torch.float32,
                                 "cpu") for _ in range(2)]
    lengths = torch.tensor([0, 5])
    prompt = torch.arange(5).expand(2, -1)
    k = prompt[:, None, :, None].expand(-1, GROUPS, -1, DIM).float()
    for cache in twins:
        cache.write(k, -k, prompt, prompt < lengths[:, None], lengths)
    offsets = twins[0].offsets.view(-1).to(torch.int32)
    params = decode_ops.write_params(twins[1])
    for _ in range(60):
        k = lengths[:, None, None].expand(-1, GROUPS, DIM).float() + 0.5
        k = k + torch.arange(DIM) / 8  # distinct lanes
        twins[0].write(k[:, :, None], -k[:, :, None], lengths[:, None],
                       torch.ones(2, 1, dtype=torch.bool), lengths + 1)
        decode_ops.write_token(twins[1], k.contiguous(), (-k).contiguous(), lengths, offsets,
                               params)
        lengths = lengths + 1
        assert torch.equal(twins[1].pos, twins[0].pos)
        held = twins[0].pos >= 0
        assert torch.equal(twins[1].k[held], twins[0].k[held])
        assert torch.equal(twins[1].v[held], twins[0].v[held])


@pytest.mark.parametrize("rows", [1, 3])
def test_swiglu_mlp_equals_the_module(layer, rows):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, rows, layer.mlp.config.hidden_size, generator=g)
    assert decode_ops.fusable_mlp(layer.mlp, rows)
    with torch.no_grad():
        out, bias = decode_ops.mlp(layer.mlp, h)
        ref, ref_bias = layer.mlp(h)
    assert bias is None and ref_bias is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear_qkv", "linear_proj"])
def test_linear_equals_the_module(layer, name):
    """The matrix-vector kernel on a column- and a row-parallel layer (output widths 128 and
    64: several and partial tiles of 16 over a 64-wide input in tiles of 32), 5 rows."""
    module = getattr(layer.self_attention, name)
    x = torch.randn(1, 5, module.weight.shape[1], generator=torch.Generator().manual_seed(3))
    assert decode_ops.fusable_linear(module, 5)
    with torch.no_grad():
        out, bias = decode_ops.linear(module, x)
        ref, ref_bias = module(x)
    assert bias is None and ref_bias is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gemv_of_odd_widths_equals_matmul():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 1, 70, generator=g), torch.randn(2 * 37, 70, generator=g)
    torch.testing.assert_close(decode_ops.gemv(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    gate, up = (x @ w.T).chunk(2, -1)
    torch.testing.assert_close(decode_ops.gemv(x, w, swiglu=True),
                               torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_products_the_kernel_does_not_reproduce_run_as_the_module(layer):
    assert not decode_ops.fusable_mlp(layer.mlp, decode_ops.MAX_BATCH + 1)
    assert not decode_ops.fusable_linear(layer.mlp.linear_fc2, decode_ops.MAX_BATCH + 1)
    plain = torch.nn.Linear(64, 64, bias=False)  # not a Megatron linear: may do anything else
    assert not decode_ops.fusable_linear(plain, 1)
    layer.mlp.config.activation_func_clamp_value = 1.0  # the module clamps; the kernel does not
    try:
        assert not decode_ops.fusable_mlp(layer.mlp, 1)
        h = torch.randn(1, 2, layer.mlp.config.hidden_size) * 4
        with torch.no_grad():
            assert torch.equal(decode_ops.mlp(layer.mlp, h)[0], layer.mlp(h)[0])
    finally:
        layer.mlp.config.activation_func_clamp_value = None


def test_add_norm_of_a_norm_the_kernel_does_not_reproduce_runs_the_module():
    ln = torch.nn.LayerNorm(8)
    x, out = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        got_x, got_h = decode_ops.add_norm(x, out, None, ln)
        assert torch.equal(got_x, x + out) and torch.equal(got_h, ln(x + out))
