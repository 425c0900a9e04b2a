"""LongGenConfig: placement of full layers, pattern construction, and clear errors."""

import pytest

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.config import full_attention_layer_indices
from megatron_longgen.models.presets import PRESETS, longgen_config


def test_default_middle_third_for_llama2_7b_and_70b():
    cfg7 = longgen_config("llama2-7b")
    assert cfg7.full_layer_indices == tuple(range(10, 21))  # 11 of 32, centred
    cfg70 = longgen_config("llama2-70b")
    assert cfg70.full_layer_indices == tuple(range(26, 53))  # 27 of 80, centred
    for cfg in (cfg7, cfg70):
        full = cfg.full_layer_indices
        below, above = full[0], cfg.num_layers - 1 - full[-1]
        assert abs(below - above) <= 1


@pytest.mark.parametrize("placement,expected", [
    ("middle", (4, 5, 6, 7)),
    ("bottom", (0, 1, 2, 3)),
    ("top", (8, 9, 10, 11)),
    ("interleave", (1, 4, 7, 10)),
    ("all", tuple(range(12))),
    ("none", ()),
])
def test_named_placements(placement, expected):
    assert full_attention_layer_indices(12, placement, 1 / 3) == expected
    cfg = longgen_config("tiny", num_layers=12, full_attention_placement=placement)
    assert cfg.full_layer_indices == expected
    # Megatron's layer_number is 1-based.
    assert [n for n in range(1, 13) if cfg.is_full_layer(n)] == [i + 1 for i in expected]


def test_ratio_and_explicit_list():
    assert full_attention_layer_indices(32, "middle", 0.25) == tuple(range(12, 20))
    cfg = longgen_config("tiny", full_attention_layers=[5, 0])
    assert cfg.full_layer_indices == (0, 5)
    assert isinstance(cfg.layer_pattern(1), CausalPattern)
    assert isinstance(cfg.layer_pattern(2), AttnSinkPattern)


def test_patterns_from_config():
    cfg = longgen_config("llama2-70b", sparse_attention="block_sparse", vert_stride=8, homo_head=False)
    pattern = cfg.layer_pattern(1)
    assert pattern == BlockSparsePattern(64, 16, 8, False, 64, 8)
    legacy = longgen_config("tiny", sparse_attention="block_sparse", vert_stride_rule="legacy")
    assert legacy.layer_pattern(1) == BlockSparsePattern(64, 16, 8, False, 4, 2, "legacy")
    cfg = longgen_config("llama2-7b", sink_tokens=16, sliding_window_size=2048)
    assert cfg.layer_pattern(1) == AttnSinkPattern(16, 2048)


@pytest.mark.parametrize("field,value,message", [
    ("sparse_attention", "dilated", "sparse_attention must be one of"),
    ("sink_tokens", -1, "sink_tokens"),
    ("sliding_window_size", 0, "sliding_window_size"),
    ("sparse_block_size", 48, "power of two"),
    ("sparse_block_size", 8, "power of two"),
    ("local_blocks", 0, "local_blocks"),
    ("vert_stride", 0, "vert_stride"),
    ("vert_stride_rule", "dense", "vert_stride_rule must be one of"),
    ("full_attention_placement", "sides", "full_attention_placement"),
    ("full_attention_ratio", 1.5, "full_attention_ratio"),
    ("full_attention_layers", [0, 6], "out of range"),
    ("full_attention_layers", [1, 1], "duplicates"),
    ("rotary_base", 0, "rotary_base"),
    ("core_attention_backend", "cudnn", "core_attention_backend"),
    ("attention_dropout", 0.1, "attention_dropout"),
])
def test_bad_values_raise_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        longgen_config("tiny", **{field: value})


def test_one_query_group_cannot_cover_blocks_sparsely():
    sparse = dict(sparse_attention="block_sparse", num_query_groups=1)
    with pytest.raises(ValueError, match="one query group.*set homo_head"):
        longgen_config("tiny", **sparse)
    assert longgen_config("tiny", homo_head=True, **sparse).sparse_pattern().vert_period == 8
    assert longgen_config("tiny", vert_stride_rule="legacy", **sparse).sparse_pattern().vert_period == 8


def test_presets_shapes():
    assert PRESETS["llama2-7b"].num_layers == 32 and PRESETS["llama2-70b"].num_query_groups == 8
    with pytest.raises(ValueError, match="unknown model preset"):
        longgen_config("llama3-405b")


def test_trainer_flags_cover_every_longgen_field():
    """The trainer's flags mirror LongGenFields; this keeps the two from drifting apart."""
    from dataclasses import fields

    from megatron_longgen.config import LongGenFields
    from megatron_longgen.training.arguments import MODEL_FIELDS, TrainConfig

    names = {f.name for f in fields(LongGenFields)}
    assert names <= set(MODEL_FIELDS)
    assert names <= {f.name for f in fields(TrainConfig)}
