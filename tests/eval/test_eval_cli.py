"""tools/evaluate.py on a trainer checkpoint: tasks, the eviction baseline and perplexity; on HF
exports of it; and tensor parallel on two gloo ranks against one process."""

import json
import os
import re
import sys

import torch

from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "parallel"))
import harness as H  # noqa: E402
from tool_modules import load_tool


def save_tiny_checkpoint(path, seed=5, placement="middle"):
    from megatron_longgen.training import checkpointing
    from megatron_longgen.training.arguments import TrainConfig
    from megatron_longgen.training.setup import model_config_from, vocab_size_for

    train = TrainConfig(model="tiny", seq_length=320, device="cpu", sparse_attention="attn_sink",
                        sink_tokens=4, sliding_window_size=32, full_attention_placement=placement)
    torch.manual_seed(seed)
    model = build_longgen_model(model_config_from(train), vocab_size_for(train), train.seq_length)
    checkpointing.save_checkpoint(str(path), 0, [model], None, None, consumed_samples=0,
                                  train_config=train)
    return path


TASK_FLAGS = ["--tasks", "passkey,niah", "--lengths", "224,288", "--depths", "0,1", "--no-progress"]


def ppl_flags(max_windows):
    return ["--ppl-text", os.path.join(ROOT, "examples", "data", "essays.txt"), "--ppl-seq-length", "128",
            "--ppl-bucket", "32", "--ppl-max-windows", str(max_windows)]


def generated(out_dir):
    return [item["generated"] for item in json.load(open(out_dir / "report.json"))["items"]]


def test_cli_writes_report(megatron_cpu, tokenizer, tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert load_tool("evaluate").main(["--load", str(ckpt), "--tokenizer-model", tokenizer.path, "--output-dir", str(out),
                            *TASK_FLAGS, "--all-full", "--evict-sink", "4", "--evict-window", "64",
                            *ppl_flags(4)]) == 0
    report = json.load(open(out / "report.json"))
    assert report["model"] == "ckpt, all-full, sink 4 + window 64 eviction, streamed prompt"
    assert report["summary"]["passkey"]["items"] == 4
    assert len(report["perplexity_by_position"]["loss"]) == 4
    assert {"summary.md", "heatmap_passkey.png", "heatmap_niah.png", "ppl_by_position.png"} <= set(os.listdir(out))
    assert "eviction" in capsys.readouterr().out


def test_cli_on_hf_exports_answers_as_the_megatron_checkpoint(megatron_cpu, tokenizer, tmp_path):
    """A LongGen export keeps the hybrid layout; a plain Llama export runs every layer full."""
    from megatron_longgen.checkpoint import ExportOptions, megatron_to_hf

    cli = load_tool("evaluate")
    runs = {}
    for placement, plain in (("middle", False), ("all", True)):
        ckpt = save_tiny_checkpoint(tmp_path / f"ckpt-{placement}", placement=placement)
        runs[placement] = tmp_path / f"out-{placement}"
        cli.main(["--load", str(ckpt), "--tokenizer-model", tokenizer.path, "--output-dir",
                  str(runs[placement]), *TASK_FLAGS])
        hf = tmp_path / f"hf-{placement}"
        megatron_to_hf(ExportOptions(megatron_dir=str(ckpt), hf_dir=str(hf), dtype="fp32", plain_llama=plain))
        out = tmp_path / f"out-hf-{placement}"
        assert cli.main(["--load", str(hf), "--tokenizer-model", tokenizer.path, "--output-dir", str(out),
                         *TASK_FLAGS]) == 0
        assert generated(out) == generated(runs[placement])
    # Same weights, different layouts: the comparison above would catch a lost layout.
    assert generated(runs["middle"]) != generated(runs["all"])


def _tp_worker(rank, world, port, ckpt, tok, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    load_tool("evaluate").main(["--load", ckpt, "--tokenizer-model", tok, "--output-dir", out, *TASK_FLAGS,
                     "--tensor-model-parallel-size", str(world), *ppl_flags(2)])


def test_cli_tensor_parallel_matches_one_process(megatron_cpu, tokenizer, tmp_path):
    import torch.multiprocessing as mp

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    one = tmp_path / "tp1"
    load_tool("evaluate").main(["--load", str(ckpt), "--tokenizer-model", tokenizer.path, "--output-dir", str(one),
                     *TASK_FLAGS, *ppl_flags(2)])
    two = tmp_path / "tp2"
    mp.spawn(_tp_worker, args=(2, H.free_port(), str(ckpt), tokenizer.path, str(two)), nprocs=2, join=True)
    assert json.load(open(two / "report.json"))["config"]["tensor_model_parallel_size"] == 2
    assert generated(two) == generated(one)
    ppl1 = json.load(open(one / "report.json"))["perplexity_by_position"]["loss"]
    ppl2 = json.load(open(two / "report.json"))["perplexity_by_position"]["loss"]
    assert max(abs(a - b) for a, b in zip(ppl1, ppl2)) < 1e-4


def test_cli_perplexity_from_an_indexed_dataset(megatron_cpu, tokenizer, tmp_path):
    """Documents come back from the .bin/.idx exactly as the preprocessor framed them, and the
    same text given as a file (framed alike) gives the same per-position loss."""
    from megatron_longgen.data.preprocess import PreprocessConfig, preprocess
    from megatron_longgen.eval import runner

    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    essays = open(os.path.join(ROOT, "examples", "data", "essays.txt"), encoding="utf-8").read()
    texts[0].write_text(essays[:2000])
    texts[1].write_text(essays[2000:4000])
    report = preprocess(PreprocessConfig(inputs=[("heldout", str(t)) for t in texts],
                                         output_prefix=str(tmp_path / "data"),
                                         tokenizer_model=tokenizer.path, progress=False))
    prefix = report.prefixes[0]
    docs = [d.tolist() for d in runner.documents_from_indexed(prefix)]
    assert docs == [tokenizer.encode_document(t.read_text()) for t in texts]

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cli, losses = load_tool("evaluate"), {}
    for name, flags in (("indexed", ["--ppl-data-path", prefix]),
                        ("text", ["--ppl-text", str(texts[0]), "--ppl-text", str(texts[1])])):
        out = tmp_path / name
        assert cli.main(["--load", str(ckpt), "--tokenizer-model", tokenizer.path, "--output-dir", str(out),
                         "--tasks", "", "--ppl-seq-length", "128", "--ppl-bucket", "32",
                         "--ppl-max-windows", "6", *flags]) == 0
        losses[name] = json.load(open(out / "report.json"))["perplexity_by_position"]["loss"]
    assert len(losses["indexed"]) == 4
    assert losses["indexed"] == losses["text"]


def test_cli_usage_errors_are_one_line_before_any_model_is_loaded(tokenizer, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")  # also a document far shorter than --ppl-seq-length
    base = ["--load", str(tmp_path / "nowhere"), "--tokenizer-model", tokenizer.path,
            "--output-dir", str(tmp_path / "out"), "--lengths", "224", "--depths", "0", "--no-progress"]
    cases = [
        (["--tasks", "passkey,needle"], "unknown task 'needle' in --tasks; choose from passkey, niah,"),
        (["--depths", "0,1.5"], r"--depths must lie in \[0, 1\] .*got \[1.5\]"),
        (["--tasks", "niah", "--lengths", "16"],
         r"length 16 is too small for task niah: its facts and question need at least \d+ tokens"),
        (["--output-dir", str(a_file)], f"--output-dir: {a_file} is a file, not a directory"),
        (["--haystack", str(tmp_path / "essays.txt")], "--haystack: .*essays.txt is not a file"),
        (["--evict-sink", "4"], "--evict-sink and --evict-window go together"),
        (["--tasks", ""], "nothing to evaluate: give --tasks, --ppl-text or --ppl-data-path"),
        (["--tasks", "", "--ppl-text", str(a_file), "--ppl-seq-length", "64"],
         "no perplexity window: every --ppl-text / --ppl-data-path document is shorter than "
         "--ppl-seq-length 64"),
        (["--ppl-data-path", str(tmp_path / "heldout")], "--ppl-data-path: .*heldout.bin is not a file"),
        ([], f"no checkpoint at {tmp_path / 'nowhere'}: it does not exist"),
    ]
    cli = load_tool("evaluate")
    for flags, message in cases:
        assert run_main(cli.main, base + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match("error: " + message, err), (flags, err)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
