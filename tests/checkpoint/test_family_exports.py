"""Each Llama family end to end: its transformers model imported into a hybrid LongGen
Megatron checkpoint and exported again. The exported hybrid equals the Megatron hybrid and
generates with the pattern cache what recomputing gives; ``tools/generate.py`` on the
checkpoint decodes the same tokens as the export, and ``tools/evaluate.py`` scores the
checkpoint and the export alike."""

import json
import os

import pytest
import torch

from checkpoint_helpers import build_from_record, megatron_forward, one_thread  # noqa: F401
from megatron_longgen.checkpoint import ExportOptions, ImportOptions, hf_to_megatron, megatron_to_hf
from megatron_longgen.checkpoint.convert import load_hf_export
from megatron_longgen.checkpoint.record import LongGenSettings
from test_hf_families import FAMILIES, greedy_equals_recomputing, source_model
from tool_modules import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_VOCAB = 512
# Mistral keeps its native window (no full layer); the others take a hybrid layout.
LAYOUTS = {
    "attn_sink": LongGenSettings(sparse_attention="attn_sink", sink_tokens=2, sliding_window_size=8,
                                 full_attention_layers=[1]),
    "block_sparse": LongGenSettings(sparse_attention="block_sparse", sparse_block_size=16,
                                    local_blocks=1, vert_stride=2, vert_stride_rule="cover",
                                    full_attention_layers=[1]),
}
FAMILY_LAYOUT = {"llama3": "block_sparse", "llama_tied": "attn_sink", "qwen2": "attn_sink",
                 "qwen3": "block_sparse", "mistral": None}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_longgen.data.tokenizer import build_tokenizer, train_sentencepiece

    data = os.path.join(ROOT, "examples", "data")
    return build_tokenizer(train_sentencepiece(
        [os.path.join(data, "essays.txt")], str(tmp_path_factory.mktemp("tok") / "tiny"),
        vocab_size=TOKENIZER_VOCAB))


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """name -> (Megatron checkpoint dir, HF export dir) of the family at fp32."""
    from megatron_longgen.checkpoint import megatron_io
    from megatron_longgen.checkpoint.convert import native_longgen_settings

    megatron_io.init_single_process()
    name, root = request.param, tmp_path_factory.mktemp(request.param)
    source = source_model(name, vocab_size=TOKENIZER_VOCAB)
    source.save_pretrained(root / "source")
    layout = FAMILY_LAYOUT[name]
    settings = (LAYOUTS[layout] if layout else
                native_longgen_settings(json.loads((root / "source" / "config.json").read_text())))
    hf_to_megatron(ImportOptions(hf_dir=str(root / "source"), megatron_dir=str(root / "mg"),
                                 dtype="fp32", longgen=settings))
    megatron_to_hf(ExportOptions(megatron_dir=str(root / "mg"), hf_dir=str(root / "hf")))
    return name, root / "mg", root / "hf"


def test_exported_hybrid_equals_the_megatron_hybrid(megatron_cpu, exported):
    name, mg, hf = exported
    from megatron_longgen.checkpoint import megatron_io

    config = json.loads((hf / "config.json").read_text())
    assert config["qkv_bias"] == (name == "qwen2") and config["qk_norm"] == (name == "qwen3")
    assert config["full_attention_layers"] == ([] if name == "mistral" else [1])
    megatron, _ = build_from_record(str(mg))
    megatron_io.load(megatron, str(mg), None)
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    expected = megatron_forward(megatron, ids)[..., :TOKENIZER_VOCAB]
    with torch.no_grad():
        got = load_hf_export(str(hf))(ids, use_cache=False).logits
    assert (got - expected).abs().max() <= 1e-4


def test_generate_tool_decodes_what_the_export_generates(megatron_cpu, exported, capsys):
    name, mg, hf = exported
    sequences = greedy_equals_recomputing(load_hf_export(str(hf)))
    prompt = sequences[0, :21].tolist()
    capsys.readouterr()
    assert load_tool("generate").main(["--load", str(mg), "--prompt-ids", ",".join(map(str, prompt)),
                                       "--max-new-tokens", "30", "--stop-token", "-1"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == "[0] " + " ".join(map(str, sequences[0, 21:].tolist()))


def test_evaluate_tool_scores_checkpoint_and_export_alike(megatron_cpu, exported, tokenizer, tmp_path):
    name, mg, hf = exported
    reports = []
    for load in (mg, hf):
        out = tmp_path / load.name
        assert load_tool("evaluate").main([
            "--load", str(load), "--tokenizer-model", tokenizer.path, "--output-dir", str(out),
            "--tasks", "passkey", "--lengths", "64", "--depths", "0.5", "--no-progress",
            "--ppl-text", os.path.join(ROOT, "examples", "data", "essays.txt"),
            "--ppl-seq-length", "64", "--ppl-bucket", "32", "--ppl-max-windows", "2"]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    checkpoint, export = reports
    assert checkpoint["items"] and checkpoint["perplexity_by_position"]["loss"]
    assert [i["generated"] for i in checkpoint["items"]] == [i["generated"] for i in export["items"]]
    torch.testing.assert_close(torch.tensor(checkpoint["perplexity_by_position"]["loss"]),
                               torch.tensor(export["perplexity_by_position"]["loss"]), rtol=0, atol=1e-4)
