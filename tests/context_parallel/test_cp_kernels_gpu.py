"""GPU: the CP chunk kernels in bf16 against the float64 reference on the same inputs (the
cases of cp_pairs.py, head dim 128), output and gradients; and one CP layer's peak memory.

Skipped without CUDA. The memory check runs one rank of CP 4 at L = 64K (two chunks of 8K
tokens per rank; Llama-2 7B shapes with 8 KV heads) under torch's fake process group
(benchmarks/cp_sim.py's method): forward + backward must stay under 4 GiB above the inputs,
while one chunk x chunk fp32 score tensor for the 32 heads alone is 8 GiB.
"""

import pytest
import torch
import torch.distributed as dist

from cp_pairs import PAIRS, pair_args, pair_tensors
from megatron_longgen.attention.backends import chunk_backend
from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.parallel.cp import compute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HEAD_DIM = 128
TOL = 2e-2  # relative norm error, as tests/attention/test_fa4_gpu.py for bf16


def _rel(got, ref):
    return float((got.double() - ref).norm() / ref.norm().clamp(min=1e-12))


@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_bf16_kernels_match_float64_reference(pair):
    assert chunk_backend(torch.device("cuda"), torch.bfloat16, HEAD_DIM).name == "triton"
    q, k, v, dout, other_lse = pair_tensors(pair, seed=len(pair.name), head_dim=HEAD_DIM,
                                            device="cuda", dtype=torch.bfloat16)
    args = pair_args(pair, HEAD_DIM, "cuda")
    out, lse = compute.attend(q, k, v, *args)
    ref_out, ref_lse = compute._reference_forward(*(t.double() for t in (q, k, v)), *args)
    assert _rel(out, ref_out) < TOL
    finite = ~torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert float((lse[finite].double() - ref_lse[finite]).abs().max()) < 2e-2
    final_lse = ref_lse if pair.whole else torch.logaddexp(ref_lse, other_lse.double())
    delta = (dout.double() * ref_out).sum(-1)
    grads = compute.attend_backward(q, k, v, *args, final_lse.float(), dout, delta.float())
    ref_grads = compute._reference_backward(*(t.double() for t in (q, k, v)), *args, final_lse,
                                            dout.double(), delta)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == torch.float32
        assert _rel(got, ref) < TOL, name


@pytest.fixture(scope="module")
def sim():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from benchmarks import cp_sim

    return cp_sim


MEMORY_BOUND_GIB = 4.0


@pytest.mark.parametrize("pattern", [CausalPattern(), AttnSinkPattern(64, 4096),
                                     BlockSparsePattern(64, 16, 8, False, 32, 8)],
                         ids=["ring", "attn_sink", "block_sparse"])
def test_cp_layer_peak_memory(sim, pattern):
    from megatron_longgen.parallel.context_parallel import ContextParallelAttention

    seq_len, cp, heads, kv_heads = 65536, 4, 32, 8
    c = seq_len // (2 * cp)
    assert 32 * c * c * 4 / 2 ** 30 == 8.0  # the score tensor the bound rules out
    with sim.FakeGroup(cp, 0) as group:
        attn = ContextParallelAttention(pattern, torch.arange(heads), tuple(range(kv_heads)),
                                        HEAD_DIM ** -0.5, group, layer_number=1)
        shapes = ((1, heads, 2 * c, HEAD_DIM), (1, kv_heads, 2 * c, HEAD_DIM), (1, kv_heads, 2 * c, HEAD_DIM))
        _, _, extra, _ = sim.time_fwd_bwd(attn, shapes, torch.bfloat16, torch.device("cuda"), iters=1)
    assert extra / 2 ** 30 < MEMORY_BOUND_GIB, extra / 2 ** 30
