"""The AttnSink exchange's sink-window path on CPU (float64, the exact dense-pair reference):
one query chunk's window pass + sink pass, merged, equals attention under the pattern's own
token rule at global positions, output and gradients (the backward takes the merged output and
LSE); the layout reads exactly the keys of the compact plan; the kernel choice follows the
environment. The whole layer on gloo ranks: tests/context_parallel/test_cp_attention.py."""

import pytest
import torch

from megatron_longgen.attention.backends import (
    CHUNK_BACKEND_ENV,
    EXCHANGE_BACKEND_ENV,
    exchange_backend_names,
    exchange_pair_backend,
)
from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.parallel.cp.exchange import DevicePlan, compact_keys
from megatron_longgen.parallel.cp.layout import local_positions
from megatron_longgen.parallel.cp.plan import exchange_plan
from megatron_longgen.parallel.cp.sink_window import SinkWindowLayout, chunk_backward, chunk_forward
from megatron_longgen.utils.cli import UsageError

D = 8
CPU = torch.device("cpu")


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setenv(EXCHANGE_BACKEND_ENV, "dense_reference")
    kernel = exchange_pair_backend(CPU, torch.float64, D)
    assert kernel is not None and kernel.name == "dense_reference"
    return kernel


@pytest.mark.parametrize("sink,window,start,c", [(3, 5, 9, 6), (2, 7, 30, 11), (0, 4, 12, 5), (4, 1, 40, 7)])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_window_and_sink_passes_equal_the_pattern(reference_kernel, sink, window, start, c, hq, hkv):
    pattern = AttnSinkPattern(sink, window)
    assert start >= sink + window - 1  # the layout's condition
    g = torch.Generator().manual_seed(start + c + hq)
    sk_w = window - 1 + c
    q, kw, vw = (torch.randn(s, generator=g, dtype=torch.float64)
                 for s in ((2, hq, c, D), (2, hkv, sk_w, D), (2, hkv, sk_w, D)))
    ks, vs = (torch.randn(2, hkv, sink, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, hq, c, D, generator=g, dtype=torch.float64)
    scale = D ** -0.5

    # Reference: the pattern's rule at global positions over [sinks | window run].
    q_pos = torch.arange(start, start + c)
    k_pos = torch.cat([torch.arange(sink), torch.arange(start - window + 1, start + c)])
    mask = pattern.allowed(q_pos[:, None], k_pos[None])
    leaves = [t.clone().requires_grad_() for t in (q, kw, vw, ks, vs)]
    ref, _ = masked_attention(leaves[0], torch.cat([leaves[3], leaves[1]], 2),
                              torch.cat([leaves[4], leaves[2]], 2), mask[None, None], scale)
    (ref * dout).sum().backward()

    sinks = (ks, vs) if sink else (None, None)
    out, lse = chunk_forward(q, kw, vw, *sinks, reference_kernel, scale, window)
    dq = torch.empty_like(q)
    grads = (dq,) + chunk_backward(q, kw, vw, *sinks, out, lse, dout, reference_kernel, scale, window, dq)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    names = ("dq", "dk window", "dv window", "dk sinks", "dv sinks")
    for name, got, want in list(zip(names, grads, leaves))[:5 if sink else 3]:
        torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12, msg=name)
    if not sink:
        assert grads[3:] == (None, None)


def _layout(pattern, seq, cp, rank, kv_heads=(0, 1)):
    plan = exchange_plan(pattern, seq, cp, rank, kv_heads, None)
    q_pos = local_positions(rank, cp, seq)
    index, key_pos = compact_keys(plan, q_pos)
    return SinkWindowLayout.build(pattern, q_pos, index, key_pos, CPU), plan, q_pos


@pytest.mark.parametrize("cp", [2, 4])
def test_layout_reads_the_planned_keys(cp):
    """Each windowed chunk's halo gathers positions [start - W + 1, start), the sinks [0, S), per
    KV head, from this rank's K/V or the received rows (each row here holds its own head and
    position); rank 0's first chunk is the head chunk."""
    pattern, seq, hkv = AttnSinkPattern(3, 6), 96, 2
    for rank in range(cp):
        layout, plan, q_pos = _layout(pattern, seq, cp, rank)
        c = seq // (2 * cp)
        starts = [int(q_pos[0]), int(q_pos[c])]
        assert layout.head_chunk == (0 if rank == 0 else None)
        assert layout.windowed == tuple(i for i in (0, 1) if starts[i] > 0)
        # Row content = 1000 * head + position, in K; V the negative.
        k = (1000 * torch.arange(hkv)[:, None] + q_pos[None]).double()[None, :, :, None]
        width = max(len(plan.extra_pos), 1)
        recv_k = (1000 * (plan.recv_slot // width) + plan.extra_pos[plan.recv_slot % width]).double()
        recv = torch.stack([recv_k, -recv_k], 1)[:, None, :, None]  # [M, b=1, 2, d=1]

        def check(gather, positions):
            got_k, got_v = gather.rows(k, -k, recv)
            want = (1000 * torch.arange(hkv)[:, None] + positions[None]).double()
            assert torch.equal(got_k[0, :, :, 0], want) and torch.equal(got_v[0, :, :, 0], -want)

        for i, halo in zip(layout.windowed, layout.halos):
            check(halo, torch.arange(starts[i] - pattern.window_size + 1, starts[i]))
        check(layout.sinks, torch.arange(pattern.sink_tokens))


@pytest.mark.parametrize("pattern,cp,rank", [(AttnSinkPattern(3, 6), 2, 0), (AttnSinkPattern(3, 6), 2, 1),
                                               (AttnSinkPattern(2, 15), 4, 3), (AttnSinkPattern(2, 15), 4, 0)])
def test_row_gradients_are_the_gathers_adjoint(pattern, cp, rank):
    """``add_grads`` routes the rows' gradients exactly where autograd sends them through the
    gather: local rows into dK/dV, received rows into the received gradient, repeated rows
    summed. (2, 15) at CP 4: rank 3's second halo spans a received and a local chunk."""
    seq, hkv, b, d = 96, 2, 2, 3
    layout, plan, _ = _layout(pattern, seq, cp, rank)
    c2 = seq // cp
    g = torch.Generator().manual_seed(cp + rank)
    k, v = (torch.randn(b, hkv, c2, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    recv = torch.randn(len(plan.recv_slot), b, 2, d, generator=g, dtype=torch.float64).requires_grad_()
    kinds = set()
    for gather in layout.halos + (layout.sinks,):
        kinds.add((len(gather.local_row) > 0, len(gather.recv_row) > 0))
        rows_k, rows_v = gather.rows(k, v, recv)
        grad_k, grad_v = torch.randn_like(rows_k), torch.randn_like(rows_v)
        k.grad = v.grad = recv.grad = None
        torch.autograd.backward((rows_k, rows_v), (grad_k, grad_v))
        grad_local = torch.zeros(2, b, hkv, c2, d, dtype=torch.float64)
        grad_recv = torch.zeros_like(recv)
        gather.add_grads(grad_k, grad_v, grad_local.view(2, b, hkv * c2, d), grad_recv)
        for got, want in ((grad_local[0], k.grad), (grad_local[1], v.grad), (grad_recv, recv.grad)):
            torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got))
    if (pattern.window_size, rank) == (15, 3):
        assert (True, True) in kinds  # the mixed gather is exercised


def test_layout_applies_only_where_sinks_and_window_are_apart():
    assert _layout(AttnSinkPattern(2, 21), 64, 2, 1)[0] is None  # chunk 1 starts at 16 < 22
    assert _layout(AttnSinkPattern(2, 21), 64, 2, 0)[0] is not None  # chunks at 0 and 48
    block = BlockSparsePattern(4, 2, 3, True, 4, 2)
    plan = exchange_plan(block, 64, 2, 1, (0, 1), None)
    assert DevicePlan(plan, local_positions(1, 2, 64), CPU, block).sink_window is None


def test_kernel_choice_follows_the_environment(monkeypatch):
    monkeypatch.delenv(EXCHANGE_BACKEND_ENV, raising=False)
    monkeypatch.delenv(CHUNK_BACKEND_ENV, raising=False)
    assert exchange_pair_backend(CPU, torch.float32, D) is None  # CPU: the chunk path
    assert set(exchange_backend_names()) >= {"dense_reference", "chunk"}
    monkeypatch.setenv(EXCHANGE_BACKEND_ENV, "dense_reference")
    assert exchange_pair_backend(CPU, torch.float32, D).name == "dense_reference"
    monkeypatch.setenv(EXCHANGE_BACKEND_ENV, "chunk")
    assert exchange_pair_backend(CPU, torch.float32, D) is None
    for bad in ("nonsense", "fa4", "sdpa"):  # none runs the window on CPU
        monkeypatch.setenv(EXCHANGE_BACKEND_ENV, bad)
        with pytest.raises(UsageError, match=EXCHANGE_BACKEND_ENV):
            exchange_pair_backend(CPU, torch.float32, D)
    if torch.cuda.is_available():
        monkeypatch.delenv(EXCHANGE_BACKEND_ENV)
        monkeypatch.setenv(CHUNK_BACKEND_ENV, "triton")  # forcing a chunk backend keeps the chunk path
        assert exchange_pair_backend(torch.device("cuda"), torch.bfloat16, 128) is None
