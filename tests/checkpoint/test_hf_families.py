"""The exported LongGen model runs each Llama-family source: a tiny random model of each
transformers class, saved with a LongGen config.json (the keys an export writes), equals the
source's own model with the source's attention layout, and with a hybrid layout generates with
the pattern-sized cache exactly what recomputing without a cache gives."""

import json
import shutil

import pytest
import torch
import transformers

from checkpoint_helpers import assert_generation_equals_recomputing, one_thread  # noqa: F401 (fixture)
from megatron_longgen.checkpoint.convert import HF_MODELING_DIR, load_hf_export

VOCAB, MAX_POS, WINDOW = 120, 96, 8
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
             rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
             pad_token_id=0)
LLAMA3_SCALING = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)
ALL_FULL = dict(full_attention_layers=[0, 1, 2])

# family: (transformers class, its config kwargs, the export's family keys, the LongGen layout
# that computes what the source computes, the keys without the family's feature or None)
FAMILIES = {
    "llama3": ("LlamaForCausalLM", dict(rope_theta=50000.0, rope_scaling=LLAMA3_SCALING),
               dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 50000.0}, rope_theta=50000.0),
               ALL_FULL, dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    # tying is checked on the weights themselves
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True),
                   dict(tie_word_embeddings=True), ALL_FULL, None),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=1e6),
              dict(qkv_bias=True, rope_theta=1e6,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              ALL_FULL, dict(qkv_bias=False)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16), dict(qk_norm=True, head_dim=16), ALL_FULL,
              dict(qk_norm=False)),
    # Mistral's native window arrives as AttnSink without sink tokens, no full layer.
    "mistral": ("MistralForCausalLM", dict(sliding_window=WINDOW), dict(),
                dict(sparse_attention="attn_sink", sink_tokens=0, sliding_window_size=WINDOW,
                     full_attention_layers=[]), ALL_FULL),
}
HYBRID = {
    "attn_sink": dict(sparse_attention="attn_sink", sink_tokens=2, sliding_window_size=WINDOW,
                      full_attention_layers=[1]),
    "block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=4, local_blocks=2,
                         vert_stride=3, vert_stride_rule="cover", full_attention_layers=[1]),
}


def source_model(family, vocab_size=VOCAB):
    """A random model of the family's transformers class, biases and norm weights random too."""
    cls, options = FAMILIES[family][:2]
    torch.manual_seed(0)
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls)(config_cls(**{**SHAPE, "vocab_size": vocab_size}, **options)).eval()
    with torch.no_grad():  # biases start at zero and norm weights at one: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def longgen_export(source, folder, longgen_keys):
    """The source's weights in a folder laid out as the exporter writes one: same tensor
    names, a LongGen config.json (the shape, then ``longgen_keys``: the family's keys and the
    layout) and the remote-code files."""
    source.save_pretrained(folder)
    keys = dict(SHAPE, head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
                hidden_act="silu", tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_theta=10000.0)
    keys.update(longgen_keys, model_type="longgen", architectures=["LongGenForCausalLM"],
                torch_dtype="float32",
                auto_map={"AutoConfig": "configuration_longgen.LongGenConfig",
                          "AutoModelForCausalLM": "modeling_longgen.LongGenForCausalLM"})
    (folder / "config.json").write_text(json.dumps(keys))
    for f in ("__init__.py", "configuration_longgen.py", "modeling_longgen.py"):
        shutil.copy2(f"{HF_MODELING_DIR}/{f}", folder / f)
    return load_hf_export(str(folder))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, source_model(request.param), tmp_path_factory.mktemp(request.param)


def test_export_equals_the_source_model(family):
    name, source, folder = family
    _, _, family_keys, layout, without_feature = FAMILIES[name]
    ours = longgen_export(source, folder / "native", {**family_keys, **layout})
    if family_keys.get("tie_word_embeddings"):  # tied exports have no lm_head.weight
        assert "lm_head.weight" not in saved_tensor_names(folder / "native")
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # > window
    with torch.no_grad():
        expected = source(ids, use_cache=False).logits
        assert (ours(ids, use_cache=False).logits - expected).abs().max() <= 1e-4
        if without_feature is not None:  # the feature changes these logits: the check is real
            plain = longgen_export(source, folder / "without", {**family_keys, **layout, **without_feature})
            assert (plain(ids, use_cache=False).logits - expected).abs().max() > 1e-2


def saved_tensor_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def greedy_equals_recomputing(model):
    """The prompt exceeds the window; the total spans several blocks. Returns the sequences."""
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    return assert_generation_equals_recomputing(model, ids, 30).sequences


@pytest.mark.parametrize("pattern", sorted(HYBRID))
def test_hybrid_generation_with_the_pattern_cache_equals_recomputing(family, pattern):
    name, source, folder = family
    family_keys = FAMILIES[name][2]
    greedy_equals_recomputing(longgen_export(source, folder / pattern, {**family_keys, **HYBRID[pattern]}))


def test_native_window_generation_equals_recomputing(tmp_path):
    """Mistral's own layout has no full layer: HF sizes its mask from the sparse layers."""
    _, _, family_keys, layout, _ = FAMILIES["mistral"]
    greedy_equals_recomputing(longgen_export(source_model("mistral"), tmp_path, {**family_keys, **layout}))
