"""Converter guards: each bad input is refused with one clear error before any work, and
leaves nothing half-written and nothing of the source lost."""

import json
import os
import shutil
from pathlib import Path

import pytest

from checkpoint_helpers import make_hf_model
from megatron_longgen.checkpoint import ConversionError, ExportOptions, ImportOptions, hf_to_megatron, megatron_to_hf
from megatron_longgen.checkpoint.errors import staged_output
from megatron_longgen.checkpoint.megatron_io import load_inference_model
from megatron_longgen.checkpoint.record import LongGenSettings

ALL_FULL = LongGenSettings(full_attention_placement="all")


def convert(hf_dir, out, **kw):
    return hf_to_megatron(ImportOptions(hf_dir=str(hf_dir), megatron_dir=str(out), dtype="fp32",
                                        longgen=kw.pop("longgen", ALL_FULL), **kw))


def export(mg_dir, out, **kw):
    return megatron_to_hf(ExportOptions(megatron_dir=str(mg_dir), hf_dir=str(out), **kw))


def snapshot(root: Path):
    """Every file under ``root`` with its bytes: what must survive a refused conversion."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden_temporaries(parent: Path):
    return [p for p in os.listdir(parent) if ".tmp-" in p]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF Llama and its Megatron conversion (read-only for the tests)."""
    root = tmp_path_factory.mktemp("models")
    make_hf_model(root / "hf", "mha", layers=2, max_shard_size="100KB")
    return root / "hf", root


@pytest.fixture(scope="module")
def megatron_ckpt(models):
    hf, root = models
    convert(hf, root / "mg")  # sets up its own single-process Megatron groups
    return root / "mg"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------- output == input


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "inside", "around"])
def test_import_refuses_an_output_that_is_or_overlaps_the_source(models, tmp_path, monkeypatch, spelling):
    hf = copy(models[0], tmp_path / "model")
    before = snapshot(hf)
    (tmp_path / "link").symlink_to(hf)
    monkeypatch.chdir(tmp_path)
    out = {"same": hf, "relative": Path("sub/../model"), "symlink": tmp_path / "link",
           "inside": hf / "megatron", "around": tmp_path}[spelling]
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConversionError, match="write the output to a separate directory"):
        convert(hf, out, overwrite=True)
    assert snapshot(hf) == before and not hidden_temporaries(tmp_path)


def test_export_refuses_its_source_and_the_tokenizer_folder(megatron_ckpt, models, tmp_path):
    mg = copy(megatron_ckpt, tmp_path / "mg")
    hf = copy(models[0], tmp_path / "hf")
    before_mg, before_hf = snapshot(mg), snapshot(hf)
    with pytest.raises(ConversionError, match="--hf-dir .* is --megatron-dir"):
        export(mg, tmp_path / "mg" / ".." / "mg", overwrite=True)
    # A user exporting next to the original model must not replace the original.
    with pytest.raises(ConversionError, match="--hf-dir .* is --tokenizer-dir"):
        export(mg, hf, tokenizer_dir=str(hf), overwrite=True)
    assert snapshot(mg) == before_mg and snapshot(hf) == before_hf
    assert not hidden_temporaries(tmp_path)


# ---------------------------------------------------------------- output that is a file


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_a_file_is_refused_up_front(models, tmp_path, overwrite):
    target = tmp_path / "ckpt"
    target.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match=r"--megatron-dir: .*ckpt is a file, not a directory"):
        convert(models[0], target, overwrite=overwrite)
    with pytest.raises(ConversionError, match=r"cannot be created: .*ckpt is a file"):
        convert(models[0], target / "sub", overwrite=overwrite)
    assert target.read_text() == "not a checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no hidden temporary checkpoint


def test_staged_output_removes_its_temporary_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_output(str(tmp_path / "new" / "deeper" / "out")) as tmp:  # folders it makes, too
            Path(tmp, "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(str(tmp_path / "out"), overwrite=True):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "old").read_text() == "kept"
    with staged_output(str(tmp_path / "out"), overwrite=True) as tmp:
        Path(tmp, "new").write_text("new")
    assert os.listdir(tmp_path / "out") == ["new"]


# ---------------------------------------------------------------- damaged inputs


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors_shard_is_named(models, tmp_path):
    hf = copy(models[0], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    _truncate(shard)
    with pytest.raises(ConversionError, match=f"cannot read weight file {shard} .truncated"):
        convert(hf, tmp_path / "mg")
    assert os.listdir(tmp_path) == ["hf"]


def test_truncated_bin_weights_are_named(tmp_path):
    make_hf_model(tmp_path / "hf", "mha", layers=1, bin_format=True)
    _truncate(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="cannot read weight file .*pytorch_model.bin"):
        convert(tmp_path / "hf", tmp_path / "mg")
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_corrupt_json_is_named(models, tmp_path, name):
    hf = copy(models[0], tmp_path / "hf")
    _truncate(hf / name)
    with pytest.raises(ConversionError, match=f"cannot read {hf / name}: "):
        convert(hf, tmp_path / "mg")
    assert os.listdir(tmp_path) == ["hf"]


def test_config_without_a_shape_field_is_named(models, tmp_path):
    hf = copy(models[0], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=f"{hf / 'config.json'} lacks num_hidden_layers"):
        convert(hf, tmp_path / "mg")


def test_truncated_or_missing_distcp_file_is_named(megatron_ckpt, tmp_path):
    mg = copy(megatron_ckpt, tmp_path / "mg")
    shard = sorted((mg / "iter_0000000").glob("*.distcp"))[-1]
    _truncate(shard, 0.9)
    with pytest.raises(ConversionError, match=f"checkpoint file {shard} is truncated"):
        export(mg, tmp_path / "hf")
    with pytest.raises(ConversionError, match=f"checkpoint file {shard} is truncated"):
        load_inference_model(str(mg))  # what generate and evaluate load
    shard.unlink()
    with pytest.raises(ConversionError, match=f"checkpoint file {shard} is missing"):
        export(mg, tmp_path / "hf")
    _truncate(mg / "iter_0000000" / ".metadata")
    with pytest.raises(ConversionError, match="cannot read .*iter_0000000/.metadata"):
        export(mg, tmp_path / "hf")
    assert os.listdir(tmp_path) == ["mg"]


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(ConversionError, match=f"no checkpoint at {tmp_path / 'nowhere'}: it does not exist"):
        load_inference_model(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- --verify at a raised base


def test_verify_with_a_raised_rotary_base_compares_at_that_base(models, tmp_path):
    """fp32, base 500000 over an HF model of rope_theta 10000: the reference runs at 500000 too
    (at its own base it differs by O(1) logits and verify reported a false failure)."""
    hf = models[0]
    assert json.loads((hf / "config.json").read_text())["rope_parameters"]["rope_theta"] == 10000.0
    raised = LongGenSettings(full_attention_placement="all", rotary_base=500000.0)
    record = convert(hf, tmp_path / "mg", longgen=raised, verify=True, verify_seq_length=48)
    assert record.rotary_base == 500000.0
    # The source folder itself is left at its own base.
    assert json.loads((hf / "config.json").read_text())["rope_parameters"]["rope_theta"] == 10000.0
