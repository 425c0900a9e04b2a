"""HF <-> Megatron conversion in one process: logits, bitwise round trips, the hybrid export,
the trainer loading a converted checkpoint, and clear errors with no half-written output."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import (VOCAB, build_from_record, hf_state, make_hf_model, megatron_forward,
                                read_json, returned_cache, token_batch)
from megatron_longgen.checkpoint import (ConversionError, ExportOptions, ImportOptions, hf_to_megatron,
                                         megatron_to_hf)
from megatron_longgen.checkpoint import layout, megatron_io
from megatron_longgen.checkpoint.convert import load_hf_export
from megatron_longgen.checkpoint.record import LongGenSettings
from megatron_longgen.training import checkpointing
from megatron_longgen.utils.cli import UsageError

REPO = Path(__file__).resolve().parents[2]
ALL_FULL = LongGenSettings(full_attention_placement="all")
SINK = LongGenSettings(sparse_attention="attn_sink", sink_tokens=2, sliding_window_size=12)
BLOCK = LongGenSettings(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1,
                        vert_stride=3, full_attention_layers=[1])


def convert(hf_dir, out, settings=ALL_FULL, **kw):
    return hf_to_megatron(ImportOptions(hf_dir=str(hf_dir), megatron_dir=str(out), dtype=kw.pop("dtype", "fp32"),
                                        longgen=settings, **kw))


def export(mg_dir, out, **kw):
    return megatron_to_hf(ExportOptions(megatron_dir=str(mg_dir), hf_dir=str(out), **kw))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, make_hf_model(root / kind, kind)) for kind in ("mha", "gqa")}


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_import_logits_equal_hf(megatron_cpu, hf_models, tmp_path, kind):
    hf_dir, hf = hf_models[kind]
    record = convert(hf_dir, tmp_path / "mg")
    assert record.padded_vocab_size == 384  # 300 padded to a multiple of 128
    # Load exactly as the trainer does: its load_checkpoint(..., finetune=True) on the tracker.
    assert checkpointing.read_latest_iteration(str(tmp_path / "mg")) == 0
    model, _ = build_from_record(str(tmp_path / "mg"))
    checkpointing.load_checkpoint(str(tmp_path / "mg"), [model], finetune=True)
    ids = token_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    got = megatron_forward(model, ids)
    assert got.shape == (2, 48, 384)
    assert expected.abs().mean() > 0.1  # logits of a real size
    assert (got[..., :VOCAB] - expected).abs().max() <= 1e-4
    assert torch.all(got[..., VOCAB:] == 0)  # padded rows are zero


def test_round_trip_is_bitwise(megatron_cpu, hf_models, tmp_path):
    hf_dir, _ = hf_models["gqa"]
    convert(hf_dir, tmp_path / "mg", settings=SINK)
    export(tmp_path / "mg", tmp_path / "back", max_shard_size=100_000)
    original, back = hf_state(hf_dir), hf_state(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = read_json(tmp_path / "back" / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1  # really sharded


def test_round_trip_bf16_and_bin_input(megatron_cpu, tmp_path):
    make_hf_model(tmp_path / "hf", "mha", layers=2, bin_format=True)
    original = torch.load(tmp_path / "hf" / "pytorch_model.bin")
    convert(tmp_path / "hf", tmp_path / "mg", dtype="bf16")
    export(tmp_path / "mg", tmp_path / "back")
    back = hf_state(tmp_path / "back")
    assert read_json(tmp_path / "back" / "config.json")["dtype"] == "bfloat16"
    for name, tensor in original.items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name


@pytest.mark.parametrize("settings", [SINK, BLOCK], ids=["attn_sink", "block_sparse"])
def test_hybrid_export_runs_with_remote_code_and_matches_megatron(megatron_cpu, hf_models, tmp_path,
                                                                  settings):
    hf_dir, hf_llama = hf_models["gqa"]
    # A raised RoPE base, as length extension sets: the export must carry it to any transformers.
    convert(hf_dir, tmp_path / "mg", settings=dataclasses.replace(settings, rotary_base=40000.0))
    export(tmp_path / "mg", tmp_path / "out", tokenizer_dir=str(hf_dir))
    config = read_json(tmp_path / "out" / "config.json")
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 40000.0
    assert config["model_type"] == "longgen" and config["sparse_attention"] == settings.sparse_attention
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longgen.LongGenForCausalLM"
    assert (tmp_path / "out" / "generation_config.json").is_file()  # copied with the tokenizer files

    model, record = build_from_record(str(tmp_path / "mg"))
    assert 0 < len(record.full_layers) < record.shape.num_layers
    megatron_io.load(model, str(tmp_path / "mg"), None)
    hf = load_hf_export(str(tmp_path / "out"))
    assert type(hf).__name__ == "LongGenForCausalLM"
    ids = token_batch(seq=64)
    got = megatron_forward(model, ids)[..., :VOCAB]
    with torch.no_grad():
        out = hf(input_ids=ids).logits
        full = hf_llama(input_ids=ids).logits
    assert (out - got).abs().max() <= 1e-4
    assert (out - full).abs().max() > 1e-2  # the sparse layers are really sparse

    # Incremental decoding with the KV cache gives the same logits as the full forward.
    with torch.no_grad():
        prefix = hf(input_ids=ids[:, :40], use_cache=True)
        step = hf(input_ids=ids[:, 40:41], cache=returned_cache(prefix), use_cache=True).logits
    assert (step[:, 0] - out[:, 40]).abs().max() <= 1e-4


def test_plain_llama_export(megatron_cpu, hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, hf = hf_models["mha"]
    convert(hf_dir, tmp_path / "mg")
    export(tmp_path / "mg", tmp_path / "plain", plain_llama=True, verify=True)
    config = read_json(tmp_path / "plain" / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"] and "sparse_attention" not in config
    assert not (tmp_path / "plain" / "modeling_longgen.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hf(input_ids=ids).logits)
    convert(hf_dir, tmp_path / "hybrid", settings=SINK)
    with pytest.raises(ConversionError, match="--plain-llama needs every layer full"):
        export(tmp_path / "hybrid", tmp_path / "plain2", plain_llama=True)
    assert not (tmp_path / "plain2").exists()


def test_trainer_finetunes_from_a_converted_checkpoint(megatron_cpu, hf_models, tmp_path):
    """The trainer's --load --finetune reads the converted weights (built from its own flags)."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    hf_dir, _ = hf_models["gqa"]
    record = convert(hf_dir, tmp_path / "mg", settings=SINK)
    flags = record.trainer_flags(str(tmp_path / "mg")).split()
    trainer = Trainer(parse_args(flags + ["--device", "cpu", "--mock-data", "--seq-length", "32",
                                          "--micro-batch-size", "1", "--global-batch-size", "1",
                                          "--train-iters", "1"]))
    loaded = {k: v for k, v in trainer.model[0].module.state_dict().items() if "_extra_state" not in k}
    original = hf_state(hf_dir)
    assert torch.equal(loaded["embedding.word_embeddings.weight"][:VOCAB],
                       original["model.embed_tokens.weight"])
    qkv = layout.fuse_qkv(*(original[f"model.layers.2.{n}"] for n in layout.QKV), record.shape)
    assert torch.equal(loaded["decoder.layers.2.self_attention.linear_qkv.weight"], qkv)
    assert trainer.config.full_layer_indices == tuple(record.full_layers)
    assert trainer.config.rotary_base == record.rotary_base


def test_train_and_export_keep_what_the_source_recorded(megatron_cpu, tmp_path):
    """HF -> Megatron -> train with --load --finetune and only length-extension flags -> HF:
    the trainer builds the recorded model (not the defaults) and the export keeps the source's
    norm epsilon, positions and token ids."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    make_hf_model(tmp_path / "hf", "mha", layers=3, rms_norm_eps=1e-6)
    convert(tmp_path / "hf", tmp_path / "mg", settings=SINK)
    trainer = Trainer(parse_args([
        "--load", str(tmp_path / "mg"), "--finetune", "--rotary-base", "40000", "--seq-length", "32",
        "--device", "cpu", "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "1", "--save", str(tmp_path / "trained")]))
    with pytest.raises(UsageError, match="holds weights only .*add --finetune"):
        parse_args(["--load", str(tmp_path / "mg"), "--mock-data"])  # a resume needs a trainer's
    c = trainer.config
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.layernorm_epsilon) == (3, 64, 112, 1e-6)
    assert (c.sliding_window_size, c.sink_tokens, c.rotary_base) == (12, 2, 40000)
    assert trainer.vocab_size == 384
    trainer.fit()
    export(tmp_path / "trained", tmp_path / "out", verify=True, verify_seq_length=40,
           verify_tolerance=1e-4)
    source, out = read_json(tmp_path / "hf" / "config.json"), read_json(tmp_path / "out" / "config.json")
    assert (out["rms_norm_eps"], out["max_position_embeddings"]) == (1e-6, 256)
    assert (out["sliding_window_size"], out["sink_tokens"]) == (12, 2)
    assert out["full_attention_layers"] == [1] and out["rope_parameters"]["rope_theta"] == 40000
    assert (out["bos_token_id"], out["eos_token_id"]) == (source["bos_token_id"], source["eos_token_id"])


def test_export_of_a_trainer_checkpoint_without_a_record(megatron_cpu, tmp_path):
    """An older trainer checkpoint (no longgen_config.json) exports from its saved flags."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    Trainer(parse_args(["--device", "cpu", "--mock-data", "--seq-length", "32", "--train-iters", "1",
                        "--micro-batch-size", "1", "--global-batch-size", "1", "--sink-tokens", "2",
                        "--sliding-window-size", "8", "--save", str(tmp_path / "ckpt")])).fit()
    os.remove(tmp_path / "ckpt" / "iter_0000001" / "longgen_config.json")
    record = export(tmp_path / "ckpt", tmp_path / "hf", verify=True, verify_seq_length=40,
                    verify_tolerance=1e-4)
    assert record.shape.num_layers == 6 and record.longgen.sliding_window_size == 8
    assert read_json(tmp_path / "hf" / "config.json")["vocab_size"] == 512


# ---------------------------------------------------------------- errors


def _leftovers(parent: Path, name: str):
    return [p for p in os.listdir(parent) if p.startswith(name) or p.startswith("." + name)]


def test_error_missing_shard(hf_models, tmp_path):
    src, _ = hf_models["gqa"]
    shutil.copytree(src, tmp_path / "hf")
    os.remove(sorted((tmp_path / "hf").glob("model-*.safetensors"))[1])
    with pytest.raises(ConversionError, match="missing weight shards"):
        convert(tmp_path / "hf", tmp_path / "mg")
    assert not _leftovers(tmp_path, "mg")


@pytest.mark.parametrize("edit,message", [
    ({"intermediate_size": 128}, "config/weight shape mismatch"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 RoPE scaling without"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"attention_bias": True}, "attention biases on every projection"),
    ({"hidden_act": "gelu"}, "unsupported architecture"),
])
def test_error_bad_config(hf_models, tmp_path, edit, message):
    src, _ = hf_models["gqa"]
    shutil.copytree(src, tmp_path / "hf")
    cfg = read_json(tmp_path / "hf" / "config.json")
    cfg.update(edit)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "hf", tmp_path / "mg")
    assert not _leftovers(tmp_path, "mg")


@pytest.mark.parametrize("tp,pp,message", [
    (4, 1, r"TP=4 must divide num_attention_heads=12 and num_query_groups=6"),
    (5, 1, r"TP=5 must divide"),
    (1, 3, r"PP=3 must divide num_layers=4"),
])
def test_error_target_parallel_sizes(hf_models, tmp_path, tp, pp, message):
    src, _ = hf_models["gqa"]
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "mg", target_tensor_parallel_size=tp, target_pipeline_parallel_size=pp)
    assert not _leftovers(tmp_path, "mg")


def test_failed_verify_leaves_no_output(megatron_cpu, hf_models, tmp_path, monkeypatch):
    """A wrong mapping (k and v swapped) must fail --verify, and nothing is written."""
    src, _ = hf_models["gqa"]
    real = layout.fuse_qkv
    monkeypatch.setattr(layout, "fuse_qkv", lambda q, k, v, shape: real(q, v, k, shape))
    with pytest.raises(ConversionError, match="verify FAILED"):
        convert(src, tmp_path / "mg", verify=True, verify_seq_length=16)
    assert not _leftovers(tmp_path, "mg")


def test_existing_output_is_refused(hf_models, tmp_path):
    src, _ = hf_models["mha"]
    (tmp_path / "mg").mkdir()
    (tmp_path / "mg" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert(src, tmp_path / "mg")
    assert os.listdir(tmp_path / "mg") == ["keep.txt"]


def test_cli_round_trip_with_verify(hf_models, tmp_path):
    src, _ = hf_models["mha"]
    # A fresh process group: not the port this test process already listens on.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore"
    run = lambda *argv: subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                                       text=True, timeout=300)
    ok = run("tools/convert_hf_to_megatron.py", "--hf-dir", str(src), "--megatron-dir", str(tmp_path / "mg"),
             "--dtype", "fp32", "--target-tensor-parallel-size", "2", "--sink-tokens", "2",
             "--sliding-window-size", "8", "--verify", "--verify-seq-length", "32")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "verify OK" in ok.stderr and "[hf->megatron] layer 4/4" in ok.stderr
    recorded = read_json(tmp_path / "mg" / "longgen_config.json")
    assert recorded["target_tensor_parallel_size"] == 2 and recorded["padded_vocab_size"] == 512
    assert recorded["longgen"]["full_attention_layers"] == [1] and recorded["longgen"]["sink_tokens"] == 2
    back = run("tools/convert_megatron_to_hf.py", "--megatron-dir", str(tmp_path / "mg"), "--hf-dir",
               str(tmp_path / "hf"), "--verify", "--verify-seq-length", "32", "--verify-tolerance", "1e-4")
    assert back.returncode == 0, back.stderr[-2000:]
    assert "verify OK" in back.stderr
    bad = run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "nowhere"),
              "--megatron-dir", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("error: ")
    assert "no config.json" in bad.stderr and "Traceback" not in bad.stderr
