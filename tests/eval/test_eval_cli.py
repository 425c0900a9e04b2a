"""tools/evaluate.py on a trainer checkpoint: tasks, the eviction baseline and perplexity."""

import importlib.util
import json
import os

import torch

from megatron_longgen.models.gpt import build_longgen_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_writes_report(megatron_cpu, tokenizer, tmp_path, capsys):
    from megatron_longgen.training import checkpointing
    from megatron_longgen.training.arguments import TrainConfig
    from megatron_longgen.training.setup import model_config_from, vocab_size_for

    train = TrainConfig(model="tiny", seq_length=320, device="cpu", sparse_attention="attn_sink",
                        sink_tokens=4, sliding_window_size=32)
    torch.manual_seed(5)
    model = build_longgen_model(model_config_from(train), vocab_size_for(train), train.seq_length)
    ckpt = tmp_path / "ckpt"
    checkpointing.save_checkpoint(str(ckpt), 0, [model], None, None, consumed_samples=0,
                                  train_config=train)
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "tools", "evaluate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    assert cli.main(["--load", str(ckpt), "--tokenizer-model", tokenizer.path, "--output-dir", str(out),
                     "--tasks", "passkey,niah", "--lengths", "224,288", "--depths", "0,1",
                     "--all-full", "--evict-sink", "4", "--evict-window", "64", "--no-progress",
                     "--ppl-text", os.path.join(ROOT, "examples", "data", "essays.txt"),
                     "--ppl-seq-length", "128", "--ppl-bucket", "32", "--ppl-max-windows", "4"]) == 0
    report = json.load(open(out / "report.json"))
    assert report["summary"]["passkey"]["items"] == 4
    assert len(report["perplexity_by_position"]["loss"]) == 4
    assert {"summary.md", "heatmap_passkey.png", "heatmap_niah.png", "ppl_by_position.png"} <= set(os.listdir(out))
    assert "eviction" in capsys.readouterr().out
