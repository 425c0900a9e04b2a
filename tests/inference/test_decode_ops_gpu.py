"""The fast path's decode on the GPU (bf16, fused decode kernels, CUDA-graph replay) against the
exact pure-torch path: 32 decode steps of both sparse patterns at batch 1 and 4, the fast path
fed the exact path's greedy tokens, its logits within bf16 tolerance at every step.

Runs only with CUDA (skipped elsewhere, CPU CI included); about half a minute on one GPU:

    pytest tests/inference/test_decode_ops_gpu.py
"""

import pytest
import torch

from megatron_longgen.inference.engine import InferenceEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

VOCAB, STEPS, MAX_LEN = 512, 32, 512
PATTERNS = {  # prompts of 150-300 tokens wrap the window ring and cross many blocks
    "attn_sink": dict(sparse_attention="attn_sink", sink_tokens=4, sliding_window_size=64),
    "block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=2,
                         vert_stride=4, homo_head=False),
}
PROMPTS = {1: [300], 4: [300, 151, 97, 233]}
TOL = 3e-2  # relative norm error of a step's logits and of the cached K/V, bf16


@pytest.fixture(scope="module")
def megatron_cuda():
    from megatron.core import parallel_state

    from megatron_longgen.parallel.initialize import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(device="cuda", seed=1234)


def build(pattern: str):
    from megatron_longgen.models.gpt import build_longgen_model
    from megatron_longgen.models.presets import longgen_config

    torch.manual_seed(0)
    # 6 layers (2 full), hidden 512, 8 query heads in 4 groups of head dim 64, FFN 1408.
    cfg = longgen_config("tiny", hidden_size=512, num_attention_heads=8, num_query_groups=4,
                         ffn_hidden_size=1408, params_dtype=torch.bfloat16, bf16=True,
                         rotary_base=50000.0, **PATTERNS[pattern])
    return build_longgen_model(cfg, VOCAB, MAX_LEN).cuda().eval()


@pytest.mark.parametrize("batch", sorted(PROMPTS))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_fast_decode_equals_exact_decode_in_bf16(megatron_cuda, pattern, batch):
    model = build(pattern)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in PROMPTS[batch]]
    exact = InferenceEngine(model, MAX_LEN, chunk_size=64, attention="exact")
    # Decode is under test: prefill on our Triton kernel, which compiles once for every length
    # (the attention backends have GPU tests of their own).
    fast = InferenceEngine(model, MAX_LEN, chunk_size=64, attention="fast",
                           prefill_backend="triton")
    exact_cache, exact_logits = exact.prefill(prompts)
    fast_cache, fast_logits = fast.prefill(prompts)
    errors = []
    for _ in range(STEPS + 1):
        errors.append(rel_err(fast_logits, exact_logits))
        tokens = exact_logits.argmax(-1)  # both paths decode the same tokens
        exact_logits = exact.decode(exact_cache, tokens)
        fast_logits = fast.decode(fast_cache, tokens)
    decoder = fast._fast_decoder
    assert decoder.graph is not None  # the steps after the second replayed the captured graph
    assert all(e.fused_rope for e in decoder.step.layers)
    assert max(errors) < TOL, errors
    assert fast_cache.lengths.tolist() == exact_cache.lengths.tolist()
    for a, b in zip(fast_cache.layers, exact_cache.layers):  # the same tokens in the same slots
        assert torch.equal(a.pos, b.pos), a.kind
        held = b.pos >= 0
        for got, want in ((a.k[held], b.k[held]), (a.v[held], b.v[held])):
            assert rel_err(got, want) < TOL, a.kind


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
