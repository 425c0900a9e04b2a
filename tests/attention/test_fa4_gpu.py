"""flash-attn-4 backends on the GPU against the float64 reference: output, LSE and q/k/v
gradients at an odd length (L = 1061: tail tiles), bf16 and fp16, GQA and packed documents.
Also SDPA's LSE on CUDA (its flash kernel) and ``auto``'s choice with FA4 present.

Runs only on an sm90+ GPU with flash-attn-4 installed (``pip install flash-attn-4``); skipped
elsewhere, CPU CI included:

    pytest tests/attention/test_fa4_gpu.py
"""

import pytest
import torch

from megatron_longgen.attention import backends, fa4
from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fa4.fa4_installed()
         and fa4.supports(CausalPattern(), torch.device("cuda"))),
    reason="needs an sm90+ GPU with flash-attn-4 installed")

L, HQ, HKV, DIM = 1061, 8, 2, 128
DOCS = [0, 300, 301, 777, L]
SINK = AttnSinkPattern(64, 256)
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}  # relative norm error, as benchmarks/attention.py
CASES = {
    "causal-gqa": (CausalPattern(), None),
    "causal-docs-gqa": (CausalPattern(), DOCS),
    "attn_sink-gqa": (SINK, None),
    "attn_sink-docs-gqa": (SINK, DOCS),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def run(name, pattern, docs, dtype, lse_grad):
    """Output, LSE and gradients of backend ``name`` and of the float64 reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, L, DIM, device="cuda", dtype=dtype, requires_grad=True)
               for h in (HQ, HKV, HKV))
    kwargs = dict(pattern=pattern, heads=torch.arange(HQ), scale=DIM ** -0.5,
                  cu_seqlens=torch.tensor(DOCS, device="cuda", dtype=torch.int32) if docs else None)
    out, lse = backends._BACKENDS[name].fn(q, k, v, **kwargs, return_lse=True)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    loss = (out.float() * d_out.float()).sum() + ((lse * d_lse).sum() if lse_grad else 0)
    loss.backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = backends.reference_attention(q64, k64, v64, **kwargs, return_lse=True)
    ref_loss = (ref_out * d_out.double()).sum()
    (ref_loss + ((ref_lse * d_lse.double()).sum() if lse_grad else 0)).backward()
    return {"out": (out, ref_out), "lse": (lse, ref_lse), "dq": (q.grad, q64.grad),
            "dk": (k.grad, k64.grad), "dv": (v.grad, v64.grad)}


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fa4_matches_reference(case, dtype):
    pattern, docs = CASES[case]
    dtype = DTYPES[dtype]
    # Causal FA4's LSE is differentiable; the FLASH backend of Flex (attn_sink) has no dLSE.
    results = run("fa4", pattern, docs, dtype, lse_grad=isinstance(pattern, CausalPattern))
    for what, (got, want) in results.items():
        assert torch.isfinite(got).all(), what
        assert rel_err(got, want) < TOL[dtype], f"{what}: relative error {rel_err(got, want):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
def test_sdpa_lse_on_cuda(dtype):
    """SDPA's CUDA flash kernel, the one SDPA path that returns the LSE (no LSE gradient)."""
    results = run("sdpa", CausalPattern(), None, DTYPES[dtype], lse_grad=False)
    for what, (got, want) in results.items():
        assert rel_err(got, want) < TOL[DTYPES[dtype]], what


def test_auto_picks_fa4_for_causal_and_attn_sink():
    cuda = torch.device("cuda")
    assert backends.resolve_backend("auto", CausalPattern(), cuda).name == "fa4"
    assert backends.resolve_backend("auto", SINK, cuda).name == "fa4"
    block_sparse = BlockSparsePattern(64, 4, 4, False, HQ, HKV)
    assert backends.resolve_backend("auto", block_sparse, cuda).name == "triton"
