"""The fast inference path (whole-prompt prefill with the training backends, split-K decode
kernel and the fused decode kernels under the Triton interpreter) against the exact pure-torch
path: same logits at every step, same greedy tokens, same cache contents."""

import pytest
import torch

from megatron_longgen.attention import backends
from megatron_longgen.attention.triton_kernels import sparse_attention
from megatron_longgen.inference import decode_ops
from megatron_longgen.inference.engine import InferenceEngine
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import longgen_config
from test_engine import CASES, MAX_LEN, VOCAB, build  # the exact path's models and patterns


def greedy(engine, prompts, steps, chunk_size=None):
    cache, logits = engine.prefill(prompts, chunk_size=chunk_size)
    all_logits = []
    for _ in range(steps):
        all_logits.append(logits)
        logits = engine.decode(cache, logits.argmax(-1))
    all_logits.append(logits)
    return torch.stack(all_logits, 1), cache


def assert_same_cache(fast, exact):
    assert fast.lengths.tolist() == exact.lengths.tolist()
    for a, b in zip(fast.layers, exact.layers):
        assert torch.equal(a.pos, b.pos), a.kind
        held = b.pos >= 0  # free slots may hold stale data that nothing reads
        torch.testing.assert_close(a.k[held], b.k[held], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.v[held], b.v[held], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case,backend", [
    ("attn_sink", "auto"), ("block_hetero", "auto"), ("block_homo", "auto"),
    ("attn_sink", "triton"), ("block_hetero", "triton"),
])
def test_fast_path_equals_exact_path(megatron_cpu, monkeypatch, case, backend):
    """Batch of two prompt lengths beyond the window / several blocks, then 6 decode steps
    that wrap the window ring and cross a block boundary in both sequences.
    ``auto`` prefill on CPU: SDPA for full layers, the dense reference for sparse ones;
    ``triton``: the training Triton kernel for every layer (registered for CUDA only, so it is
    made available on CPU here, where the interpreter runs it)."""
    if backend == "triton":
        def triton_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None):
            return sparse_attention(q, k, v, pattern, heads, scale, cu_seqlens=cu_seqlens)

        monkeypatch.setitem(backends._BACKENDS, "triton",
                            backends.Backend("triton", triton_attention, lambda p, d: True))
    model = build(case)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (60, 29)]
    exact = InferenceEngine(model, MAX_LEN, chunk_size=16, attention="exact")
    fast = InferenceEngine(model, MAX_LEN, chunk_size=16, attention="fast", prefill_backend=backend)
    assert fast.fast and not exact.fast
    ref_logits, ref_cache = greedy(exact, prompts, 6)
    logits, cache = greedy(fast, prompts, 6)
    layers = fast._fast_decoder.step.layers  # the fused decode kernels ran in every layer
    assert all(e.fused_rope for e in layers) and any(e.full for e in layers)
    assert all(decode_ops.fusable_mlp(e.layer.mlp, len(prompts)) for e in layers)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert_same_cache(cache, ref_cache)


def test_fast_prefill_chunking_does_not_change_the_result(megatron_cpu):
    model = build("block_hetero", seed=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (61, 37)]
    fast = InferenceEngine(model, MAX_LEN, attention="fast")
    one_cache, one = fast.prefill(prompts, chunk_size=64)
    cache, logits = fast.prefill(prompts, chunk_size=7)
    torch.testing.assert_close(logits, one, rtol=0, atol=1e-5)
    assert_same_cache(cache, one_cache)


def test_fast_decode_keeps_sparse_caches_bounded(megatron_cpu):
    model = build("attn_sink")
    fast = InferenceEngine(model, MAX_LEN, attention="fast")
    cache, logits = fast.prefill([[1, 2, 3]])
    sink, window = 2, 8
    for _ in range(20):  # several windows past the prompt
        logits = fast.decode(cache, logits.argmax(-1))
    for layer in cache.layers:
        if layer.kind == "attn_sink":
            assert layer.k.shape[2] == sink + window - 1
            assert layer.held_positions(0, 0) == [0, 1] + list(range(23 - window + 1, 23))


def test_fast_path_errors_are_clear(megatron_cpu):
    with pytest.raises(ValueError, match="attention must be"):
        InferenceEngine(build("attn_sink"), 32, attention="quick")
    torch.manual_seed(0)
    odd = longgen_config("tiny", use_cpu_initialization=True, hidden_size=48, sink_tokens=2,
                         sliding_window_size=8)  # head dim 12
    with pytest.raises(ValueError, match="power of two"):
        InferenceEngine(build_longgen_model(odd, VOCAB, 64).eval(), 32, attention="fast")
    fast = InferenceEngine(build("attn_sink"), 32, attention="fast")
    with pytest.raises(ValueError, match="prompt of 33 tokens exceeds max_length 32"):
        fast.prefill([list(range(33))])
    cache, logits = fast.prefill([list(range(31)), [1]])
    logits = fast.decode(cache, logits.argmax(-1))  # the longest reaches 32
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_length 32"):
        fast.decode(cache, logits.argmax(-1))
