"""The inference engine on the Llama-family options of the Megatron model: QKV biases (Qwen2),
per-head q/k RMSNorm (Qwen3), tied embeddings (Llama-3.2, small Qwen2.5), llama3-scaled RoPE
and a native window without sinks or full layers (Mistral). The exact path equals the model's
own forward; the fast path equals the exact one, its fused QKV + RoPE kernel standing aside
where it would not compute the module (biases, q/k norms)."""

import pytest
import torch

from megatron_longgen.inference import fused_ops
from megatron_longgen.inference.engine import InferenceEngine
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.norm import RMSNorm
from megatron_longgen.models.presets import longgen_config
from test_engine import CASES, MAX_LEN, VOCAB, engine_greedy, full_forward_greedy
from test_fast_path import greedy

LLAMA3 = dict(use_rope_scaling=True, rope_scaling_factor=4.0, rope_scaling_low_freq_factor=1.0,
              rope_scaling_high_freq_factor=4.0, rope_scaling_original_max_position_embeddings=16)
TIED = dict(untie_embeddings_and_output_weights=False)
FAMILIES = {
    "qwen2": dict(add_qkv_bias=True, **TIED),
    "qwen3": dict(qk_layernorm=True),
    "llama3": dict(**LLAMA3, **TIED),
    "mistral": dict(sparse_attention="attn_sink", sink_tokens=0, sliding_window_size=8,
                    full_attention_layers=[]),
}


def family_model(options):
    torch.manual_seed(0)
    cfg = longgen_config("tiny", use_cpu_initialization=True, rotary_base=50000.0,
                         **{**CASES["attn_sink"], **options})
    model = build_longgen_model(cfg, VOCAB, MAX_LEN)
    with torch.no_grad():  # biases start at zero and norms at one: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(params=list(FAMILIES))
def family(request, megatron_cpu):  # a tiny model builds in a blink: one per test
    return request.param, family_model(FAMILIES[request.param])


def test_the_options_are_in_the_model(family):
    name, model = family
    attn = model.decoder.layers[0].self_attention
    assert (attn.linear_qkv.bias is not None) == (name == "qwen2")
    assert isinstance(attn.q_layernorm, RMSNorm) == (name == "qwen3")
    assert (model.output_layer.weight is None) == (name in ("qwen2", "llama3"))  # tied: the embedding
    plain = 1.0 / 50000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(model.rotary_pos_emb.inv_freq, plain) == (name != "llama3")


def test_exact_path_equals_the_model(family):
    _, model = family
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (30, 13)]
    steps = 10
    tokens, logits, _ = engine_greedy(InferenceEngine(model, MAX_LEN, chunk_size=16), prompts, steps)
    for b, prompt in enumerate(prompts):
        ref_tokens, ref_logits = full_forward_greedy(model, prompt, steps)
        torch.testing.assert_close(logits[b], ref_logits, rtol=0, atol=1e-4)
        assert tokens[b].tolist() == ref_tokens.tolist()


def test_fast_path_equals_exact_path(family):
    name, model = family
    engine = InferenceEngine(model, MAX_LEN, chunk_size=16, attention="fast")
    # The fused kernel rotates with the model's own angle table (llama3 scaling included) but
    # adds no bias and applies no q/k norm: there the module runs.
    attn = model.decoder.layers[0].self_attention
    assert fused_ops.fusable_qkv(attn, engine.rope[None, None]) == (name not in ("qwen2", "qwen3"))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (27, 12)]
    ref, _ = greedy(InferenceEngine(model, MAX_LEN, chunk_size=16, attention="exact"), prompts, 4)
    got, _ = greedy(engine, prompts, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
