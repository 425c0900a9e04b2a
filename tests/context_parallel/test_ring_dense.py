"""The ring's dense-pair dispatch on CPU (the ``dense_reference`` backend, forced): pairs equal the
chunk path (``compute``'s reference) on a ring diagonal and a fully visible pair; the per-pair
backward given the FINAL merged output and LSE sums to the autograd gradient of attention over
all the keys; the backend choice follows the environment; and a whole ring layer on spawned gloo
ranks (CP 2 and 4) run through the dense dispatch equals the unsharded layer."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from megatron_longgen.attention.backends import (
    CHUNK_BACKEND_ENV,
    RING_BACKEND_ENV,
    DensePairBackend,
    ring_pair_backend,
)
from megatron_longgen.attention.patterns import CausalPattern
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.parallel.cp import compute, dense_pair  # noqa: F401  (registers the backends)
from megatron_longgen.parallel.cp.layout import local_positions
from megatron_longgen.parallel.cp.plan import ring_pairs
from megatron_longgen.utils.cli import UsageError

SEQ, CP, RANK = 96, 4, 1  # chunks of 12; rank 1 holds chunks 1 and 6
C = SEQ // (2 * CP)
D = 16
DENSE = "dense_reference"


def _close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
    assert err < tol, err


def _tensors(hq, hkv, sq, sk, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g, dtype=torch.float64)
                 for s in ((2, hq, sq, D), (2, hkv, sk, D), (2, hkv, sk, D), (2, hq, sq, D)))


def _dense():
    return ring_pair_backend(torch.device("cpu"), torch.float64, D, True)


@pytest.fixture
def dense(monkeypatch):
    monkeypatch.setenv(RING_BACKEND_ENV, DENSE)
    backend = _dense()
    assert isinstance(backend, DensePairBackend) and backend.name == DENSE
    return backend


def _ring_pair(step, causal):
    """Chunk ids (query, key) of the rank's pair at ``step`` whose needs_mask is ``causal``."""
    src = (RANK - step) % CP
    pairs = [(qi, ki) for qi, ki, m in ring_pairs(RANK, CP, SEQ, step) if m == causal]
    qi, ki = pairs[0]
    q_chunk = (RANK, 2 * CP - 1 - RANK)[qi]
    k_chunk = (src, 2 * CP - 1 - src)[ki]
    return torch.arange(q_chunk * C, (q_chunk + 1) * C), torch.arange(k_chunk * C, (k_chunk + 1) * C)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal,step", [(True, 0), (False, 0), (False, 2)],
                         ids=["diagonal", "full_step0", "full_step2"])
def test_dense_pair_equals_chunk_path(dense, heads, causal, step):
    """Output, LSE and final-LSE gradients equal the chunk reference at the pair's positions."""
    q_pos, k_pos = _ring_pair(step, causal)
    assert torch.equal(q_pos, k_pos) == causal  # the diagonal is the only causal pair
    q, k, v, dout = _tensors(*heads, C, C, seed=step + 10 * causal)
    args = (q_pos, k_pos, CausalPattern(), torch.arange(heads[0]), D ** -0.5, None)
    out, lse = dense.forward(q, k, v, D ** -0.5, causal)
    ref_out, ref_lse = compute._reference_forward(q, k, v, *args)
    _close(out, ref_out)
    _close(lse, ref_lse)
    # Final output / LSE as if other keys held softmax mass too (scaled down output, larger LSE).
    g = torch.Generator().manual_seed(3)
    final_lse = torch.logaddexp(ref_lse, torch.randn(ref_lse.shape, generator=g, dtype=torch.float64))
    final_out = ref_out * torch.exp(ref_lse - final_lse)[..., None] + 0.1 * torch.randn(
        ref_out.shape, generator=g, dtype=torch.float64)
    delta = (dout * final_out).sum(-1)
    grads = dense.backward(q, k, v, final_out, final_lse, dout, D ** -0.5, causal)
    ref_grads = compute._reference_backward(q, k, v, *args, final_lse, dout, delta)
    for got, ref in zip(grads, ref_grads):
        _close(got, ref)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_pairs_with_final_lse_sum_to_the_whole_gradient(dense, heads):
    """Queries of one chunk against two key chunks (the diagonal and an earlier, fully visible
    one): merged pair outputs equal attention over both, and the per-pair backward with the
    merged output and LSE sums to autograd's gradient of that attention."""
    hq, hkv = heads
    q, k, v, w = _tensors(hq, hkv, C, 2 * C, seed=5)
    # Keys: [earlier chunk | the queries' own chunk]; causal over the global positions.
    mask = torch.ones(C, 2 * C, dtype=torch.bool)
    mask[:, C:] = torch.ones(C, C, dtype=torch.bool).tril()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = masked_attention(*leaves, mask[None, None], D ** -0.5)
    (ref_out * w).sum().backward()
    scale = D ** -0.5
    parts = [(slice(0, C), False), (slice(C, 2 * C), True)]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=q.dtype)
    for ks, causal in parts:
        o, l = dense.forward(q, k[:, :, ks], v[:, :, ks], scale, causal)
        out, lse = compute.merge(out, lse, o, l)
    _close(out, ref_out.detach())
    _close(lse, ref_lse.detach())
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for ks, causal in parts:
        dq_p, dk_p, dv_p = dense.backward(q, k[:, :, ks], v[:, :, ks], out, lse, w, scale, causal)
        dq += dq_p
        dk[:, :, ks] += dk_p
        dv[:, :, ks] += dv_p
    for got, leaf in zip((dq, dk, dv), leaves):
        _close(got, leaf.grad)


def test_causal_pair_needs_equal_lengths(dense):
    q, k, v, _ = _tensors(4, 2, C, 2 * C, seed=0)
    with pytest.raises(ValueError, match="same positions"):
        dense.forward(q, k, v, D ** -0.5, True)


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(RING_BACKEND_ENV, raising=False)
    monkeypatch.delenv(CHUNK_BACKEND_ENV, raising=False)
    assert ring_pair_backend(cpu, torch.float32, D, True).name == "reference"  # CPU: chunk reference
    monkeypatch.setenv(RING_BACKEND_ENV, DENSE)
    assert ring_pair_backend(cpu, torch.float32, D, True).name == DENSE
    # Packed documents: a dense kernel cannot mask them, the chunk path does.
    assert not isinstance(ring_pair_backend(cpu, torch.float32, D, False), DensePairBackend)
    monkeypatch.setenv(RING_BACKEND_ENV, "reference")
    assert ring_pair_backend(cpu, torch.float32, D, True).name == "reference"
    for bad in ("nonsense", "sdpa", "fa4"):  # none runs on CPU
        monkeypatch.setenv(RING_BACKEND_ENV, bad)
        with pytest.raises(UsageError, match=RING_BACKEND_ENV):
            ring_pair_backend(cpu, torch.float32, D, True)
    if torch.cuda.is_available():
        monkeypatch.delenv(RING_BACKEND_ENV)
        cuda = torch.device("cuda")
        assert isinstance(ring_pair_backend(cuda, torch.bfloat16, 128, True), DensePairBackend)
        monkeypatch.setenv(CHUNK_BACKEND_ENV, "triton")  # forcing a chunk backend keeps ring pairs on it
        assert ring_pair_backend(cuda, torch.bfloat16, 128, True).name == "triton"


# ---------------------------------------------------------------- a whole ring layer on gloo

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ring_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from cp_cases import SEQ as LSEQ, CASES, case_tensors, reference
    from megatron_longgen.parallel.context_parallel import ContextParallelAttention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{RING_BACKEND_ENV: DENSE})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for layer, case in enumerate(CASES, start=1):
        if not isinstance(case.pattern, CausalPattern) or case.docs:
            continue
        q, k, v, w = case_tensors(case, seed=layer)
        ref = reference(case, q, k, v, w)
        pos = local_positions(rank, world, LSEQ)
        lq, lk, lv = (t[:, :, pos].clone().requires_grad_() for t in (q, k, v))
        attn = ContextParallelAttention(case.pattern, torch.tensor(case.heads), case.kv_heads,
                                        case.head_dim ** -0.5, dist.group.WORLD, layer)
        assert isinstance(ring_pair_backend(lq.device, lq.dtype, case.head_dim, True), DensePairBackend)
        out = attn(lq, lk, lv)
        (out * w[:, :, pos]).sum().backward()
        got = (out.detach(), lq.grad, lk.grad, lv.grad)
        results[case.name] = [float((a - b[:, :, pos]).abs().max() / b[:, :, pos].abs().max())
                              for a, b in zip(got, ref)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4], ids=["cp2", "cp4"])
def test_ring_layer_on_the_dense_dispatch_matches_unsharded(world, tmp_path):
    mp.spawn(_ring_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res, "no full-layer case ran"
        for name, errs in res.items():
            assert max(errs) < 1e-5, (world, rank, name, errs)
