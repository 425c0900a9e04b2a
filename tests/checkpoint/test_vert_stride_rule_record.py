"""Which BlockSparse vertical rule a model was trained with travels with it: new runs use
``cover``; a checkpoint record, a trainer's saved train_config or an HF export written before
the rule was recorded means ``legacy``; the recorded rule reaches the trainer flags, the
model config and the HF export's config."""

from dataclasses import asdict

import pytest

from megatron_longgen.checkpoint import megatron_io
from megatron_longgen.checkpoint.convert import _hf_config_dict, hf_longgen_settings
from megatron_longgen.checkpoint.hf_files import LlamaShape
from megatron_longgen.checkpoint.hf_modeling.configuration_longgen import LongGenConfig as HFConfig
from megatron_longgen.checkpoint.record import CheckpointRecord, LongGenSettings
from megatron_longgen.training.arguments import TrainConfig, parse_args
from megatron_longgen.training.setup import model_config_from

SHAPE = LlamaShape(num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                   num_query_groups=2, head_dim=16, vocab_size=512, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
TRAIN_FLAGS = ["--device", "cpu", "--mock-data", "--sparse-attention", "block_sparse"]


def _record(**longgen):
    settings = LongGenSettings(sparse_attention="block_sparse", full_attention_layers=[1], **longgen)
    return CheckpointRecord(shape=SHAPE, longgen=settings, padded_vocab_size=512)


def _pattern(train: TrainConfig):
    return model_config_from(train).sparse_pattern()


def test_new_runs_use_the_covering_rule():
    assert LongGenSettings().vert_stride_rule == "cover"
    assert _pattern(parse_args(TRAIN_FLAGS)).vert_stride_rule == "cover"
    legacy = parse_args(TRAIN_FLAGS + ["--vert-stride-rule", "legacy"])
    assert _pattern(legacy).vert_stride_rule == "legacy"
    with pytest.raises(SystemExit):  # argparse's choices: exit status 2
        parse_args(TRAIN_FLAGS + ["--vert-stride-rule", "dense"])


def test_record_without_the_field_loads_as_legacy_and_resumes_as_legacy():
    data = _record().to_json()
    assert data["longgen"]["vert_stride_rule"] == "cover"
    assert CheckpointRecord.from_json(data).longgen.vert_stride_rule == "cover"
    del data["longgen"]["vert_stride_rule"]  # a record written before the rule was recorded
    old = CheckpointRecord.from_json(data)
    assert old.longgen.vert_stride_rule == "legacy"
    # The flags the record prints rebuild the same pattern in the trainer.
    train = parse_args(old.trainer_flags("ckpt").split() + ["--device", "cpu", "--mock-data"])
    pattern = _pattern(train)
    assert pattern.vert_stride_rule == "legacy" and pattern.num_query_groups == 2
    assert pattern.vert_period == pattern.vert_stride == 8


def test_trainer_checkpoint_without_the_field_exports_as_legacy(monkeypatch):
    saved = asdict(parse_args(TRAIN_FLAGS + ["--model", "tiny"]))
    assert "vert_stride_rule" in saved  # new trainer checkpoints save it (None: the default)
    for train_config, rule in ((saved, "cover"),
                               ({k: v for k, v in saved.items() if k != "vert_stride_rule"}, "legacy")):
        monkeypatch.setattr(megatron_io.dist_checkpointing, "load_common_state_dict",
                            lambda path, tc=train_config: {"train_config": tc})
        record = megatron_io._record_from_trainer("iter_0000001")
        assert record.longgen.vert_stride_rule == rule


def test_hf_export_records_the_rule_and_older_exports_mean_legacy():
    for rule in ("cover", "legacy"):
        exported = _hf_config_dict(_record(vert_stride_rule=rule), "fp32", plain=False)
        assert exported["vert_stride_rule"] == rule
        assert HFConfig(**exported).vert_stride_rule == rule
        assert hf_longgen_settings(exported).vert_stride_rule == rule
    older = _hf_config_dict(_record(), "fp32", plain=False)
    del older["vert_stride_rule"]
    assert HFConfig(**older).vert_stride_rule == "legacy"
    assert hf_longgen_settings(older).vert_stride_rule == "legacy"


def test_resuming_keeps_the_vertical_blocks_the_run_trained_with():
    from megatron_longgen.models.presets import longgen_config
    from megatron_longgen.training.checkpointing import check_same_vertical_blocks
    from megatron_longgen.utils.cli import UsageError

    old_run = {k: v for k, v in asdict(parse_args(TRAIN_FLAGS)).items() if k != "vert_stride_rule"}
    tiny = longgen_config("tiny", sparse_attention="block_sparse")  # 2 groups, stride 8
    with pytest.raises(UsageError, match="--vert-stride-rule legacy to resume"):
        check_same_vertical_blocks(old_run, tiny, "ckpt/iter_0000010")
    check_same_vertical_blocks(old_run, longgen_config("tiny", sparse_attention="block_sparse",
                                                       vert_stride_rule="legacy"), "ckpt")
    check_same_vertical_blocks({**old_run, "vert_stride_rule": None}, tiny, "ckpt")  # a new run
    # 32 groups at stride 8: both rules give the same blocks, old runs resume as they are.
    check_same_vertical_blocks(old_run, longgen_config("llama2-7b", sparse_attention="block_sparse"),
                               "ckpt")
    check_same_vertical_blocks(old_run, longgen_config("tiny"), "ckpt")  # attn_sink
