"""GPU: the ring's dense-pair backends (fa4, sdpa) against the float64 reference, bf16 and fp16.

One query chunk against two key chunks, as a ring sees them: an earlier, fully visible chunk and
the causal diagonal. Each pair's output and LSE against the float64 attention of that pair; the
two merged (float32, by LSE) against attention over both; and the per-pair backward given the
FINAL merged output and LSE, summed, against autograd's float64 gradients. GQA 32q/8kv and
8q/2kv, head dim 128 and 64, chunks of 1000 and 1061 tokens (tail tiles).

Skipped without CUDA; the fa4 cases also without flash-attn-4 on an sm90+ GPU:

    pytest tests/context_parallel/test_ring_dense_gpu.py
"""

import pytest
import torch

from megatron_longgen.attention import fa4
from megatron_longgen.attention.backends import (
    _DENSE_PAIR_BACKENDS,
    CHUNK_BACKEND_ENV,
    RING_BACKEND_ENV,
    ring_pair_backend,
)
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.parallel.cp import compute, dense_pair  # noqa: F401  (registers the backends)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}  # relative norm error, as test_fa4_gpu.py
LSE_TOL = 2e-2  # absolute, natural log (as test_cp_kernels_gpu.py)
SHAPES = {  # (query heads, KV heads, head dim, chunk length)
    "32q8kv-d128-c1000": (32, 8, 128, 1000),
    "8q2kv-d64-c1061": (8, 2, 64, 1061),
    "32q8kv-d64-c1061": (32, 8, 64, 1061),
    "8q2kv-d128-c1000": (8, 2, 128, 1000),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _rel(got, ref):
    return float((got.double() - ref).norm() / ref.norm().clamp(min=1e-12))


def _backend(name):
    if name == "fa4" and not (fa4.fa4_installed() and fa4.pair_supports("cuda", torch.bfloat16, 128)):
        pytest.skip("needs flash-attn-4 on an sm90+ GPU")
    return _DENSE_PAIR_BACKENDS[name]


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("name", ["fa4", "sdpa"])
def test_dense_pairs_match_float64(name, dtype, shape):
    backend = _backend(name)
    dtype = DTYPES[dtype]
    hq, hkv, d, c = SHAPES[shape]
    scale = d ** -0.5
    g = torch.Generator(device="cuda").manual_seed(hq + d + c)
    q, k, v, dout = (torch.randn(s, generator=g, device="cuda").to(dtype)
                     for s in ((1, hq, c, d), (1, hkv, 2 * c, d), (1, hkv, 2 * c, d), (1, hq, c, d)))
    parts = [(slice(0, c), False), (slice(c, 2 * c), True)]  # [earlier chunk | diagonal]
    masks = [torch.ones(c, c, dtype=torch.bool, device="cuda"),
             torch.ones(c, c, dtype=torch.bool, device="cuda").tril()]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention(q64, k64, v64, torch.cat(masks, 1)[None, None], scale)
    (ref_out * dout.double()).sum().backward()

    out = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    lse = torch.full(q.shape[:3], float("-inf"), device="cuda")
    for (ks, causal), mask in zip(parts, masks):
        o, l = backend.forward(q, k[:, :, ks], v[:, :, ks], scale, causal)
        assert l.dtype == torch.float32 and l.shape == q.shape[:3]
        pair_out, pair_lse = masked_attention(q64.detach(), k64.detach()[:, :, ks], v64.detach()[:, :, ks],
                                              mask[None, None], scale)
        assert _rel(o, pair_out) < TOL[dtype], ("out", causal)
        assert float((l.double() - pair_lse).abs().max()) < LSE_TOL, ("lse", causal)
        out, lse = compute.merge(out, lse, o, l)
    assert _rel(out, ref_out.detach()) < TOL[dtype]
    assert float((lse.double() - ref_lse.detach()).abs().max()) < LSE_TOL

    # Backward of each pair with the merged output and LSE; float32 sums, as the ring does.
    dq = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    dk = torch.zeros(k.shape, dtype=torch.float32, device="cuda")
    dv = torch.zeros(v.shape, dtype=torch.float32, device="cuda")
    out_in = out.to(dtype)
    for ks, causal in parts:
        dq_p, dk_p, dv_p = backend.backward(q, k[:, :, ks], v[:, :, ks], out_in, lse, dout, scale, causal)
        assert dq_p.shape == q.shape and dk_p.shape == dv_p.shape == (1, hkv, c, d)
        dq += dq_p
        dk[:, :, ks] += dk_p
        dv[:, :, ks] += dv_p
    for label, got, ref in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert _rel(got, ref) < TOL[dtype], label


def test_auto_takes_a_dense_backend_on_cuda(monkeypatch):
    monkeypatch.delenv(RING_BACKEND_ENV, raising=False)
    monkeypatch.delenv(CHUNK_BACKEND_ENV, raising=False)
    cuda = torch.device("cuda")
    want = "fa4" if fa4.fa4_installed() and fa4.pair_supports(cuda, torch.bfloat16, 128) else "sdpa"
    assert ring_pair_backend(cuda, torch.bfloat16, 128, True).name == want
    assert ring_pair_backend(cuda, torch.bfloat16, 128, False).name == "triton"  # packed documents
    assert ring_pair_backend(cuda, torch.float32, 128, True).name == "triton"  # 16-bit kernels only


WINDOW_CASES = {  # (query heads, KV heads, head dim, chunk, sink tokens, window)
    "32q8kv-d128-c1000-s64-w700": (32, 8, 128, 1000, 64, 700),
    "8q2kv-d64-c1061-s4-w1500": (8, 2, 64, 1061, 4, 1500),  # a window wider than the chunk
}


@pytest.mark.parametrize("case", WINDOW_CASES, ids=list(WINDOW_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_sink_window_passes_match_float64(dtype, case):
    """The AttnSink exchange's chunk (sink_window.py) on FA4: a window pass over the contiguous
    run plus a sink pass, merged, against float64 attention under the pattern's rule at global
    positions; gradients of q, the window run and the sinks."""
    from megatron_longgen.attention.patterns import AttnSinkPattern
    from megatron_longgen.parallel.cp.sink_window import chunk_backward, chunk_forward

    backend = _backend("fa4")
    dtype = DTYPES[dtype]
    hq, hkv, d, c, sink, window = WINDOW_CASES[case]
    start, scale = sink + window + 37, d ** -0.5
    g = torch.Generator(device="cuda").manual_seed(c + window)
    sk = window - 1 + c
    q, kw, vw, ks, vs, dout = (torch.randn(s, generator=g, device="cuda").to(dtype) for s in (
        (1, hq, c, d), (1, hkv, sk, d), (1, hkv, sk, d), (1, hkv, sink, d), (1, hkv, sink, d), (1, hq, c, d)))
    q_pos = torch.arange(start, start + c, device="cuda")
    k_pos = torch.cat([torch.arange(sink, device="cuda"), torch.arange(start - window + 1, start + c, device="cuda")])
    mask = AttnSinkPattern(sink, window).allowed(q_pos[:, None], k_pos[None])
    ref_in = [t.double().requires_grad_() for t in (q, kw, vw, ks, vs)]
    ref, _ = masked_attention(ref_in[0], torch.cat([ref_in[3], ref_in[1]], 2),
                              torch.cat([ref_in[4], ref_in[2]], 2), mask[None, None], scale)
    (ref * dout.double()).sum().backward()
    out, lse = chunk_forward(q, kw, vw, ks, vs, backend, scale, window)
    assert out.dtype == dtype
    dq = torch.empty_like(q)
    grads = (dq,) + chunk_backward(q, kw, vw, ks, vs, out, lse, dout, backend, scale, window, dq)
    assert _rel(out, ref.detach()) < TOL[dtype]
    for label, got, want in zip(("dq", "dk window", "dv window", "dk sinks", "dv sinks"), grads, ref_in):
        assert got.dtype == dtype
        assert _rel(got, want.grad) < TOL[dtype], label


def test_auto_takes_fa4_for_the_attn_sink_exchange(monkeypatch):
    from megatron_longgen.attention.backends import EXCHANGE_BACKEND_ENV, exchange_pair_backend

    monkeypatch.delenv(EXCHANGE_BACKEND_ENV, raising=False)
    monkeypatch.delenv(CHUNK_BACKEND_ENV, raising=False)
    cuda = torch.device("cuda")
    backend = exchange_pair_backend(cuda, torch.bfloat16, 128)
    if fa4.fa4_installed() and fa4.pair_supports(cuda, torch.bfloat16, 128):
        assert backend.name == "fa4"
    else:
        assert backend is None
    assert exchange_pair_backend(cuda, torch.float32, 128) is None  # 16 bits only: the chunk path
