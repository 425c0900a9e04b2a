"""Every backend's log-sum-exp (``return_lse=True``) against a float64 LSE computed here from
the dense masked scores, and how ``auto`` and an explicit ``fa4`` behave with flash-attn-4
installed or missing (simulated: FA4 never runs on CPU).

On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py), Flex eagerly
(forward only: Flex has no CPU backward).
"""

import logging
import sys
import types

import pytest
import torch

from megatron_longgen.attention import backends, fa4
from megatron_longgen.attention.patterns import (
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    token_mask,
)
from megatron_longgen.utils.cli import UsageError

SINK = AttnSinkPattern(sink_tokens=4, window_size=20)
HETERO = BlockSparsePattern(block_size=16, local_blocks=2, vert_stride=3, homo_head=False,
                            num_heads=8, num_query_groups=4)
DOCS = [0, 23, 24, 70]
CUDA = torch.device("cuda")  # a device object only: resolving never touches a GPU


def dense_lse(q, k, pattern, heads, num_heads, cu, scale):
    """float64 logsumexp of the masked scores, K expanded per query head."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    mask = token_mask(pattern, q.shape[2], heads, torch.tensor(cu) if cu else None,
                      num_heads=num_heads)
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)


def inputs(hq, hkv, seq_len, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, seq_len, dim, generator=g) for h in (hq, hkv, hkv)]


# backend, pattern, hq, hkv, heads (global), num_heads, cu_seqlens
CASES = {
    "reference-causal-gqa": ("reference", CausalPattern(), 4, 2, range(4), 4, None),
    "reference-sink-docs": ("reference", SINK, 4, 2, range(4), 4, DOCS),
    "reference-block_sparse-tp_slice": ("reference", HETERO, 4, 2, range(4, 8), 8, None),
    "sdpa-causal-gqa": ("sdpa", CausalPattern(), 4, 1, range(4), 4, None),
    "sdpa-causal-docs-gqa": ("sdpa", CausalPattern(), 4, 2, range(4), 4, DOCS),
    "flex-causal-docs": ("flex", CausalPattern(), 2, 1, range(2), 2, DOCS),
    "flex-sink-gqa": ("flex", SINK, 4, 2, range(4), 4, None),
    "flex-block_sparse-docs": ("flex", HETERO, 4, 2, range(2, 6), 8, DOCS),
    "triton-causal-docs-gqa": ("triton", CausalPattern(), 4, 2, range(4), 4, DOCS),
    "triton-sink-gqa": ("triton", SINK, 4, 1, range(4), 4, None),
    "triton-block_sparse-tp_slice-docs": ("triton", HETERO, 4, 2, range(4, 8), 8, DOCS),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_lse_matches_dense_scores(case):
    name, pattern, hq, hkv, heads, num_heads, cu = CASES[case]
    heads = torch.tensor(list(heads))
    q, k, v = inputs(hq, hkv, 70, 16)
    scale = 16 ** -0.5
    kwargs = dict(pattern=pattern, heads=heads, scale=scale,
                  cu_seqlens=torch.tensor(cu) if cu else None)
    fn = backends._BACKENDS[name].fn
    out, lse = fn(q, k, v, **kwargs, return_lse=True)
    assert lse.shape == (1, hq, 70) and lse.dtype == torch.float32
    want = dense_lse(q, k, pattern, heads, num_heads, cu, scale)
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(out, fn(q, k, v, **kwargs), rtol=0, atol=1e-6)  # same output


def test_reference_lse_gradient():
    """The reference's LSE is differentiable: q/k gradients of a loss on it match float64."""
    q, k, v = inputs(4, 2, 40, 8, seed=1)
    q, k = q.double().requires_grad_(), k.double().requires_grad_()
    _, lse = backends.reference_attention(q, k, v.double(), pattern=SINK, heads=torch.arange(4),
                                          scale=0.3, return_lse=True)
    weight = torch.randn(lse.shape, dtype=torch.float64)
    got = torch.autograd.grad((lse * weight).sum(), (q, k))
    q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
    want_lse = dense_lse(q2, k2, SINK, torch.arange(4), 4, None, 0.3)
    want = torch.autograd.grad((want_lse * weight).sum(), (q2, k2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sdpa_lse_refuses_a_gradient():
    """SDPA's LSE has none: its output still trains, a loss on the LSE fails loudly."""
    q, k, v = (x.requires_grad_() for x in inputs(2, 1, 30, 8))
    out, lse = backends.sdpa_attention(q, k, v, pattern=CausalPattern(), heads=torch.arange(2),
                                       scale=0.3, return_lse=True)
    out.sum().backward(retain_graph=True)
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="LSE has no gradient"):
        (out.sum() + lse.sum()).backward()


# ---- flash-attn-4 detection, simulated ----


@pytest.fixture
def fa4_missing(monkeypatch):
    monkeypatch.delitem(backends._BACKENDS, "fa4", raising=False)
    backends._log_missing_once.cache_clear()
    yield
    backends._log_missing_once.cache_clear()


REAL_FA4_LOADS = fa4.fa4_loads.__wrapped__  # the import check itself, uncached


@pytest.fixture
def fa4_installed(monkeypatch):
    """flash-attn-4 found, on an sm90 device: registered exactly as at import."""
    monkeypatch.setattr(fa4, "fa4_installed", lambda: True)
    monkeypatch.setattr(fa4, "fa4_loads", lambda: True)
    monkeypatch.setattr(fa4, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    backends._register_gpu_backends()
    assert "fa4" in backends.available_backends()


def test_auto_falls_back_with_one_log_line(fa4_missing, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_longgen.attention"):
        for _ in range(3):  # every layer resolves: the line comes once per pattern
            assert backends.resolve_backend("auto", CausalPattern(), CUDA).name == "sdpa"
            assert backends.resolve_backend("auto", SINK, CUDA).name == "flex"
            assert backends.resolve_backend("auto", HETERO, CUDA).name == "triton"
            assert backends.resolve_backend("auto", CausalPattern(), "cpu").name == "sdpa"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "flash-attn-4 not installed: causal attention uses sdpa; pip install flash-attn-4",
        "flash-attn-4 not installed: attn_sink attention uses flex; pip install flash-attn-4",
    ]


def test_explicit_fa4_without_the_package_names_it(fa4_missing):
    hint = r"needs the flash-attn-4 package.*pip install flash-attn-4"
    with pytest.raises(UsageError, match=hint):
        backends.resolve_backend("fa4", CausalPattern(), CUDA)


def test_auto_prefers_fa4_where_it_measured_faster(fa4_installed, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_longgen.attention"):
        assert backends.resolve_backend("auto", CausalPattern(), CUDA).name == "fa4"
        assert backends.resolve_backend("auto", SINK, CUDA).name == "fa4"
        assert backends.resolve_backend("auto", HETERO, CUDA).name == "triton"
        # Nothing changes on CPU.
        assert backends.resolve_backend("auto", CausalPattern(), "cpu").name == "sdpa"
        assert backends.resolve_backend("auto", SINK, "cpu").name == "reference"
    assert not caplog.records
    with pytest.raises(UsageError, match="does not support"):
        backends.resolve_backend("fa4", HETERO, CUDA)
    with pytest.raises(UsageError, match="does not support"):
        backends.resolve_backend("fa4", CausalPattern(), "cpu")


def test_fa4_that_does_not_load_counts_as_missing(fa4_installed, monkeypatch, caplog):
    """Found but broken (e.g. the CuTe DSL's libraries incomplete): auto takes the next
    backend with one line saying why, instead of failing in the first forward."""
    monkeypatch.setattr(fa4, "fa4_loads", REAL_FA4_LOADS)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="megatron_longgen.attention"):
        assert backends.resolve_backend("auto", CausalPattern(), CUDA).name == "sdpa"
        assert backends.resolve_backend("auto", SINK, CUDA).name == "flex"
    assert any("flash-attn-4 is installed but does not load" in r.getMessage() for r in caplog.records)


def test_fa4_needs_sm90(fa4_installed, monkeypatch, caplog):
    monkeypatch.setattr(fa4, "_capability", lambda device: (8, 0))
    with caplog.at_level(logging.WARNING, logger="megatron_longgen.attention"):
        assert backends.resolve_backend("auto", CausalPattern(), CUDA).name == "sdpa"
    assert not caplog.records  # installed, just not for this GPU


def _fake_flash_attn_cute(calls):
    """flash_attn.cute's two entry points with FA4 4.0.0b36's keywords and layouts
    ([b, s, h, d]; varlen [total, h, d] with int32 cu_seqlens; lse [b, h, s] / [h, total]),
    computed per document in float64. Lets the CPU check fa4.py's layout handling."""

    def attend(q, k, v, scale):  # [s, h, d]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
        s = s.masked_fill(~torch.ones(s.shape[1:], dtype=torch.bool).tril(), float("-inf"))
        lse = torch.logsumexp(s, -1)
        return torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), v.double()), lse

    def flash_attn_func(q, k, v, *, softmax_scale, causal, return_lse):
        assert causal and q.dim() == 4
        calls.append("func")
        outs, lses = zip(*(attend(q[i], k[i], v[i], softmax_scale) for i in range(q.shape[0])))
        return torch.stack(outs).to(q.dtype), torch.stack(lses).float()

    def flash_attn_varlen_func(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale, causal, return_lse):
        assert causal and q.dim() == 3 and cu_seqlens_q.dtype == torch.int32
        assert max_seqlen_q == max_seqlen_k == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        calls.append("varlen")
        bounds = cu_seqlens_q.tolist()
        outs, lses = zip(*(attend(q[a:b], k[a:b], v[a:b], softmax_scale)
                           for a, b in zip(bounds[:-1], bounds[1:])))
        return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=-1).float()

    module = types.ModuleType("flash_attn.cute")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


@pytest.mark.parametrize("cu", [None, DOCS], ids=["dense", "docs"])
def test_fa4_causal_layouts(monkeypatch, cu):
    """fa4.py's transposes and varlen packing, from Megatron's permuted [s, b, h, d] views."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fake_flash_attn_cute(calls))
    q, k, v = (x.to(torch.bfloat16).permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
               for x in inputs(4, 2, 70, 16))
    kwargs = dict(pattern=CausalPattern(), heads=torch.arange(4), scale=0.25,
                  cu_seqlens=torch.tensor(cu) if cu else None)
    out, lse = fa4.fa4_attention(q, k, v, **kwargs, return_lse=True)
    assert calls == (["varlen"] if cu else ["func"])
    assert out.shape == q.shape and lse.shape == (1, 4, 70)
    ref_out, ref_lse = backends.reference_attention(q.double(), k.double(), v.double(), **kwargs,
                                                    return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


def test_fa4_float32_takes_the_next_backend(fa4_installed):
    """FA4 runs 16 bits only; float32 goes to the backend auto picks after fa4."""
    q, k, v = inputs(4, 2, 40, 8)
    kwargs = dict(pattern=SINK, heads=torch.arange(4), scale=0.3)
    got = backends._BACKENDS["fa4"].fn(q, k, v, **kwargs)  # on CPU: the reference
    torch.testing.assert_close(got, backends.reference_attention(q, k, v, **kwargs), rtol=0, atol=0)
