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
    from megatron_longgen.utils.cli import UsageError

    with pytest.raises(UsageError, match="--vert-stride-rule: invalid choice: 'dense'"):
        parse_args(TRAIN_FLAGS + ["--vert-stride-rule", "dense"])


def test_record_without_the_field_loads_as_legacy_and_resumes_as_legacy():
    data = _record().to_json()
    assert data["longgen"]["vert_stride_rule"] == "cover"
    assert CheckpointRecord.from_json(data).longgen.vert_stride_rule == "cover"
    del data["longgen"]["vert_stride_rule"]  # a record written before the rule was recorded
    old = CheckpointRecord.from_json(data)
    assert old.longgen.vert_stride_rule == "legacy"
    # The flags the record prints rebuild the same pattern in the trainer (--load left out:
    # there is no checkpoint behind this record).
    flags = old.trainer_flags("ckpt").split()
    assert flags[-3:] == ["--load", "ckpt", "--finetune"]
    train = parse_args(flags[:-3] + ["--device", "cpu", "--mock-data"])
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


def test_resuming_an_old_run_keeps_its_legacy_blocks(monkeypatch):
    from megatron_longgen.training.checkpoint_args import LoadedCheckpoint, merge_checkpoint_settings
    from megatron_longgen.utils.cli import UsageError

    old_run = {k: v for k, v in asdict(parse_args(TRAIN_FLAGS)).items() if k != "vert_stride_rule"}
    monkeypatch.setattr(megatron_io.dist_checkpointing, "load_common_state_dict",
                        lambda path: {"train_config": old_run})
    path = "ckpt/iter_0000010"
    loaded = LoadedCheckpoint(path, megatron_io._record_from_trainer(path), old_run)
    assert merge_checkpoint_settings({"load": "ckpt"}, loaded)["vert_stride_rule"] == "legacy"
    with pytest.raises(UsageError, match="--vert-stride-rule cover disagrees with the checkpoint's legacy"):
        merge_checkpoint_settings({"load": "ckpt", "vert_stride_rule": "cover"}, loaded)
    changed = merge_checkpoint_settings({"load": "ckpt", "finetune": True, "vert_stride_rule": "cover"}, loaded)
    assert changed["vert_stride_rule"] == "cover"
