"""The Llama-3.1, Qwen2.5, Qwen3 and Mistral presets: shapes with the published parameter
counts, and the Llama-3.1-8B launch configs pass the layout check on their 32 GPUs."""

from pathlib import Path

import pytest

from megatron_longgen.models.presets import get_preset, longgen_config

REPO = Path(__file__).resolve().parents[2]
# Parameter counts from the model cards (billions).
PUBLISHED = {"llama3.1-8b": 8.03, "llama3.1-70b": 70.6, "qwen2.5-7b": 7.61, "qwen3-8b": 8.19,
             "mistral-7b": 7.24}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_builds_with_the_published_size(name):
    config = longgen_config(name)
    preset = get_preset(name)
    assert preset.num_params / 1e9 == pytest.approx(PUBLISHED[name], rel=0.005)
    assert config.kv_channels == preset.head_dim


def test_family_options_of_the_presets():
    llama, qwen2, qwen3 = (longgen_config(n) for n in ("llama3.1-8b", "qwen2.5-7b", "qwen3-8b"))
    assert llama.use_rope_scaling and llama.rope_scaling_factor == 8.0 and llama.rotary_base == 500000.0
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias


@pytest.mark.parametrize("config", ["llama3.1_8b_128k_longgen.yaml", "llama3.1_8b_256k_longgen_cp2.yaml"])
def test_llama3_configs_pass_the_layout_check(config):
    from megatron_longgen.parallel.layout import validate_train_layout
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.setup import model_config_from

    train = parse_args(["--config", str(REPO / "launch" / "configs" / config)])
    validate_train_layout(train, world_size=32)
    model = model_config_from(train)
    assert model.use_rope_scaling and len(model.full_layer_indices) == 11
    assert model.sparse_reads_everything(train.seq_length) is None
