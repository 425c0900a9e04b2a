"""Layout validation messages and the per-GPU memory arithmetic of docs/parallelism.md."""

import pytest

from megatron_longgen.parallel.layout import (
    Layout,
    estimate_memory,
    validate_layout,
    validate_train_layout,
)
from megatron_longgen.models.presets import get_preset
from megatron_longgen.training.arguments import parse_args

LLAMA_70B = dict(num_layers=80, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672)


def check(**kwargs):
    validate_layout(**{**LLAMA_70B, **kwargs})


def test_the_documented_70b_layout_is_valid():
    check(world_size=128, tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
          virtual_pipeline_model_parallel_size=5, context_parallel_size=4, sequence_parallel=True,
          seq_length=131072, num_microbatches=32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=12, tensor_model_parallel_size=8),
     r"world size 12 is not divisible by TP x PP x CP = 8 x 1 x 1 = 8; launch a multiple of 8"),
    (dict(world_size=16, tensor_model_parallel_size=16),
     r"8 query groups \(K/V heads\) cannot be split over --tensor-model-parallel-size 16; .* one of \[1, 2, 4, 8\]"),
    (dict(world_size=48, tensor_model_parallel_size=3),
     r"64 attention heads cannot be split over --tensor-model-parallel-size 3"),
    (dict(world_size=24, tensor_model_parallel_size=8, pipeline_model_parallel_size=3),
     r"80 layers cannot be split evenly into 3 pipeline stages .* among \[1, 2, 4, 5, 8, 10, 16, 20, 40, 80\]"),
    (dict(world_size=32, tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
          virtual_pipeline_model_parallel_size=3),
     r"80 layers cannot be split evenly into 4 pipeline stages x 3 virtual stages \(12 chunks\); "
     r"use a --virtual-pipeline-model-parallel-size among \[2, 4, 5, 10, 20\]"),
    (dict(world_size=32, tensor_model_parallel_size=8, pipeline_model_parallel_size=4,
          virtual_pipeline_model_parallel_size=5, num_microbatches=2),
     r"needs at least PP = 4 micro-batches per step, got 2; raise --global-batch-size"),
    (dict(world_size=8, tensor_model_parallel_size=8, sequence_parallel=True, seq_length=1001),
     r"--seq-length 1001 must be divisible by TP 8 = 8"),
    (dict(world_size=16, tensor_model_parallel_size=8, context_parallel_size=2, sequence_parallel=True,
          seq_length=1000),
     r"must be divisible by TP 8 x 2 x CP 2 = 32"),
])
def test_impossible_layouts_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check(**kwargs)


def test_train_config_layout_uses_preset_and_overrides():
    train = parse_args(["--model", "tiny", "--tensor-model-parallel-size", "4", "--mock-data"])
    with pytest.raises(ValueError, match="2 query groups"):  # tiny: 4 heads, 2 groups
        validate_train_layout(train, world_size=4)
    train = parse_args(["--model", "tiny", "--tensor-model-parallel-size", "4", "--num-query-groups", "4",
                        "--mock-data"])
    validate_train_layout(train, world_size=4)


def test_parameter_counts_match_llama2():
    assert round(get_preset("llama2-7b").num_params / 1e9, 2) == 6.74
    assert round(get_preset("llama2-70b").num_params / 1e9, 2) == 68.98


SEQ = 131072
SEVENTY_B = Layout(tp=8, pp=4, vpp=5, cp=4, dp=1, recompute="full")  # the documented plan
SEVEN_B = Layout(tp=4, pp=1, cp=2, dp=1, recompute="full")


def test_documented_layouts_fit_80gb_and_need_their_choices():
    shape70, shape7 = get_preset("llama2-70b"), get_preset("llama2-7b")
    plan70 = estimate_memory(shape70, SEVENTY_B, SEQ)
    assert plan70["total"] < 74.5  # 80 GB = 74.5 GiB
    assert round(plan70["total"], 1) == 29.7  # the figure docs/parallelism.md quotes
    # Without full recompute the activations alone exceed the GPU.
    assert estimate_memory(shape70, Layout(**{**SEVENTY_B.__dict__, "recompute": "none"}), SEQ)["total"] > 74.5
    # Without CP the activations and logits grow 4x and the optimizer is no longer sharded
    # (DP = 1): ~70.5 GiB, within 4 GiB of the limit, which the docs call too tight.
    no_cp = estimate_memory(shape70, Layout(**{**SEVENTY_B.__dict__, "cp": 1}), SEQ)["total"]
    assert 70 < no_cp < 74.5
    plan7 = estimate_memory(shape7, SEVEN_B, SEQ)
    assert plan7["total"] < 74.5 and round(plan7["total"], 1) == 31.4


def test_memory_scales_as_the_layout_says():
    shape = get_preset("llama2-70b")
    base = estimate_memory(shape, SEVENTY_B, SEQ)
    double_tp = estimate_memory(shape, Layout(**{**SEVENTY_B.__dict__, "tp": 16}), SEQ)
    assert double_tp["weights"] == pytest.approx(base["weights"] / 2)
    no_distopt = estimate_memory(shape, Layout(**{**SEVENTY_B.__dict__, "distributed_optimizer": False}), SEQ)
    assert no_distopt["optimizer"] == pytest.approx(base["optimizer"] * 4)  # sharded over DP x CP = 4
    half_seq = estimate_memory(shape, SEVENTY_B, SEQ // 2)
    assert half_seq["activations"] == pytest.approx(base["activations"] / 2)
    assert base["weights"] == pytest.approx(2 * (20 * shape.params_per_layer + 32000 * 8192 + 8192) / 8 / 2 ** 30)
    with pytest.raises(ValueError, match="recompute"):
        estimate_memory(shape, Layout(recompute="some"), SEQ)


def test_partial_recompute_lies_between_full_and_none():
    """--recompute-method block --recompute-num-layers N: N layers per chunk keep only their
    input, the others every activation (the 7B plan of docs/training.md, TP 8 x DP 4)."""
    shape = get_preset("llama2-7b")
    plan = dict(tp=8, dp=4, recompute="full")
    full = estimate_memory(shape, Layout(**plan), SEQ)["activations"]
    none = estimate_memory(shape, Layout(**{**plan, "recompute": "none"}), SEQ)["activations"]
    half = estimate_memory(shape, Layout(**plan, recompute_num_layers=16), SEQ)["activations"]
    assert estimate_memory(shape, Layout(**plan, recompute_num_layers=32), SEQ)["activations"] == full
    kept = 2 * SEQ * (4 * 4096 / 8 + (4 * 4096) / 8 + 3 * 11008 / 8)  # one layer's, TP 8 + SP
    layer_input = 2 * SEQ * 4096 / 8
    assert half == pytest.approx((16 * layer_input + 16 * kept + kept) / 2 ** 30)
    assert full < half < none
    with pytest.raises(ValueError, match="recompute_num_layers"):
        estimate_memory(shape, Layout(recompute="selective", recompute_num_layers=2), SEQ)
