"""The cached engine equals the model: greedy tokens and logits of prefill + token-by-token
decode match running the whole Megatron model on the whole sequence at every step."""

import pytest
import torch

from megatron_longgen.inference.engine import InferenceEngine
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import get_preset, longgen_config

VOCAB = get_preset("tiny").vocab_size
MAX_LEN = 128

CASES = {
    # window 8 and blocks of 16: prompts of 20-50 tokens exceed the window and several blocks.
    "attn_sink": dict(sparse_attention="attn_sink", sink_tokens=2, sliding_window_size=8),
    "block_hetero": dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1,
                         vert_stride=2, homo_head=False),
    "block_homo": dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=2,
                       vert_stride=3, homo_head=True),
}


def build(case, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = longgen_config("tiny", use_cpu_initialization=True, rotary_base=50000.0,
                         **{**CASES[case], **overrides})
    assert cfg.num_query_groups < cfg.num_attention_heads  # GQA
    return build_longgen_model(cfg, VOCAB, MAX_LEN).eval()


def full_forward_greedy(model, prompt, steps):
    """Reference: the whole model over the whole sequence for every new token."""
    ids, logits = prompt.clone(), []
    with torch.no_grad():
        for _ in range(steps):
            out = model(ids[None], torch.arange(len(ids))[None], None)[0, -1]
            logits.append(out)
            ids = torch.cat([ids, out.argmax()[None]])
    return ids[len(prompt):], torch.stack(logits)


def engine_greedy(engine, prompts, steps, chunk_size=None):
    cache, logits = engine.prefill(prompts, chunk_size=chunk_size)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = engine.decode(cache, nxt)
    return torch.stack(tokens, 1), torch.stack(all_logits, 1), cache


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_batch_of_different_lengths_equals_full_forward(megatron_cpu, case):
    model = build(case)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (50, 21)]
    steps = 24
    engine = InferenceEngine(model, MAX_LEN, chunk_size=16)
    tokens, logits, cache = engine_greedy(engine, prompts, steps)
    for b, prompt in enumerate(prompts):
        ref_tokens, ref_logits = full_forward_greedy(model, prompt, steps)
        torch.testing.assert_close(logits[b], ref_logits, rtol=0, atol=1e-4)
        assert tokens[b].tolist() == ref_tokens.tolist()
    assert cache.lengths.tolist() == [50 + steps, 21 + steps]
    # Sparse layers really hold less than the full ones.
    by_kind = cache.nbytes_by_kind()
    per_layer_sparse = by_kind[CASES[case]["sparse_attention"]] / 4
    assert per_layer_sparse < by_kind["causal"] / 2


@pytest.mark.parametrize("case", ["attn_sink", "block_hetero"])
def test_chunked_prefill_equals_one_shot(megatron_cpu, case):
    model = build(case, seed=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (61, 37)]
    engine = InferenceEngine(model, MAX_LEN)
    one_cache, one = engine.prefill(prompts, chunk_size=64)
    for chunk in (5, 16):
        cache, logits = engine.prefill(prompts, chunk_size=chunk)
        torch.testing.assert_close(logits, one, rtol=0, atol=1e-5)
        for a, b in zip(cache.layers, one_cache.layers):
            assert torch.equal(a.pos, b.pos)
            held = a.pos >= 0  # evicted slots keep stale data that nothing reads
            torch.testing.assert_close(a.k[held], b.k[held], rtol=0, atol=1e-5)
            torch.testing.assert_close(a.v[held], b.v[held], rtol=0, atol=1e-5)


def test_sparse_cache_stays_bounded_while_decoding(megatron_cpu):
    model = build("attn_sink")
    engine = InferenceEngine(model, MAX_LEN)
    cache, logits = engine.prefill([[1, 2, 3]])
    sink, window = 2, 8
    for _ in range(100):  # far past the window
        logits = engine.decode(cache, logits.argmax(-1))
        for layer in cache.layers:
            if layer.kind == "attn_sink":
                assert layer.k.shape[2] == sink + window - 1
                assert int(layer.used_slots().max()) <= sink + window - 1


def test_too_long_prompt_is_a_clear_error(megatron_cpu):
    engine = InferenceEngine(build("attn_sink"), 32)
    with pytest.raises(ValueError, match="exceeds max_length"):
        engine.prefill([list(range(33))])
    cache, logits = engine.prefill([list(range(32))])
    with pytest.raises(ValueError, match="exceeds max_length"):
        engine.decode(cache, logits.argmax(-1))
