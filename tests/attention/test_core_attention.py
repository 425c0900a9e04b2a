"""LongGenCoreAttention vs dense masked attention in float64 (forward and q/k/v gradients)."""

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_longgen.attention.core_attention import LongGenCoreAttention
from megatron_longgen.attention.patterns import token_mask
from megatron_longgen.models.presets import longgen_config


def independent_attention(q, k, v, mask, scale):
    """Plain per-head softmax attention with K/V expanded per query head (float64)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def make_config(sparse, heads, groups, backend="auto", **kw):
    return longgen_config(
        "tiny", num_layers=3, hidden_size=heads * 8, num_attention_heads=heads,
        num_query_groups=groups, sparse_attention=sparse, sink_tokens=3, sliding_window_size=9,
        sparse_block_size=16, local_blocks=1, vert_stride=3, core_attention_backend=backend,
        full_attention_layers=[1], **kw)


@pytest.mark.parametrize("sparse", ["attn_sink", "block_sparse"])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("layer_number", [1, 2])
def test_core_attention_matches_dense_masked(megatron_cpu, sparse, heads, groups, layer_number):
    # One query group cannot spread vertical blocks over groups: it reads them homogeneously.
    cfg = make_config(sparse, heads, groups, homo_head=groups == 1)
    attn = LongGenCoreAttention(cfg, layer_number=layer_number)
    assert attn.is_full == (layer_number == 2)
    s, b, d = 70, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64, requires_grad=True)
    out = attn(q, k, v, attention_mask=None)
    assert out.shape == (s, b, heads * d)

    mask = token_mask(cfg.layer_pattern(layer_number), s, range(heads), num_heads=heads)
    qt, kt, vt = (t.detach().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v))
    ref = independent_attention(qt, kt, vt, mask, d ** -0.5)
    ref = ref.permute(2, 0, 1, 3).reshape(s, b, heads * d)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for mine, theirs in ((q, qt), (k, kt), (v, vt)):
        torch.testing.assert_close(mine.grad, theirs.grad.permute(2, 0, 1, 3), rtol=1e-10, atol=1e-10)


def test_sparse_layer_really_is_sparse(megatron_cpu):
    """Far-back keys outside sink and window must not influence a query."""
    cfg = make_config("attn_sink", 2, 2)
    attn = LongGenCoreAttention(cfg, layer_number=1)
    s, d = 40, 8
    q, k, v = (torch.randn(s, 1, 2, d, dtype=torch.float64) for _ in range(3))
    v2 = v.clone()
    v2[5] += 100.0  # position 5: neither a sink (< 3) nor within 9 of the last query
    out1, out2 = attn(q, k, v, None), attn(q, k, v2, None)
    torch.testing.assert_close(out1[-1], out2[-1])
    assert not torch.allclose(out1[6], out2[6])


def test_packed_documents_thd(megatron_cpu):
    cfg = make_config("attn_sink", 4, 2)
    attn = LongGenCoreAttention(cfg, layer_number=1)
    t, d = 50, 8
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    q = torch.randn(t, 4, d, dtype=torch.float64)
    k, v = torch.randn(t, 2, d, dtype=torch.float64), torch.randn(t, 2, d, dtype=torch.float64)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, 4 * d)
    # Each document alone gives the same result: nothing crosses the boundary.
    for a, b in ((0, 20), (20, 50)):
        alone = attn(q[a:b, None], k[a:b, None], v[a:b, None], None)
        torch.testing.assert_close(out[a:b], alone[:, 0])


def test_backend_errors(megatron_cpu):
    cfg = make_config("attn_sink", 4, 4, backend="sdpa")
    with pytest.raises(ValueError, match="does not support"):
        LongGenCoreAttention(cfg, layer_number=1).backend_for(torch.device("cpu"))
    full = LongGenCoreAttention(cfg, layer_number=2)  # SDPA serves the full layer
    q = torch.randn(10, 1, 4, 8)
    assert full(q, q, q, None).shape == (10, 1, 32)
