"""Guards of the trainer: each mistake is one clear UsageError before any work, nothing written;
the commands print it as one line and exit 2; the launcher runs under torchrun --no-python."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longgen.attention.patterns import CausalPattern
from megatron_longgen.train import cli_main, main, prepare
from megatron_longgen.training import preflight
from megatron_longgen.training.arguments import parse_args
from megatron_longgen.training.setup import model_config_from
from megatron_longgen.utils.cli import USAGE_ERROR, UsageError, run_main

REPO = Path(__file__).resolve().parents[2]
BASE = ["--device", "cpu", "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2",
        "--train-iters", "2", "--sink-tokens", "2", "--sliding-window-size", "16"]
MOCK = BASE + ["--mock-data"]


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


# ---- the window guard against the patterns themselves -------------------------------------

def reads_everything(config, seq_length):
    """Independent reference: every head of the sparse pattern allows every causal pair."""
    pattern = config.sparse_pattern()
    q, k = torch.meshgrid(torch.arange(seq_length), torch.arange(seq_length), indexing="ij")
    causal = CausalPattern().allowed(q, k)
    return all(torch.equal(pattern.allowed(q, k, head), causal)
               for head in range(config.num_attention_heads))


@pytest.mark.parametrize("seq_length", [48, 64])
def test_window_guard_fires_exactly_when_sparse_layers_are_full(seq_length):
    cases = [["--sink-tokens", str(s), "--sliding-window-size", str(w)]
             for s, w in itertools.product([0, 4], [16, seq_length - 5, seq_length - 4, seq_length])]
    cases += [["--sparse-attention", "block_sparse", "--sparse-block-size", "16", "--local-blocks", str(lb),
               "--vert-stride", str(vs), *homo]
              for lb, vs, homo in itertools.product([1, 2, 3, 4], [1, 2, 3], [["--homo-head"], ["--no-homo-head"]])]
    verdicts = set()
    for case in cases:
        config = model_config_from(parse_args(["--device", "cpu", *case]))
        expected = reads_everything(config, seq_length)
        assert (config.sparse_reads_everything(seq_length) is not None) == expected, case
        verdicts.add(expected)
    assert verdicts == {True, False}  # the grid holds both kinds


@pytest.mark.parametrize("argv,message", [
    (["--sliding-window-size", "62"], r"--sink-tokens 2 \+ --sliding-window-size 62 = 64 >= --seq-length 64"),
    (["--sparse-attention", "block_sparse", "--sparse-block-size", "16", "--local-blocks", "4"],
     r"--local-blocks 4 x --sparse-block-size 16 = 64 >= --seq-length 64.*below 4"),
    (["--sparse-attention", "block_sparse", "--sparse-block-size", "16", "--local-blocks", "1",
      "--vert-stride", "1"], "--vert-stride 1 makes every key block"),
    (["--seq-length", "0"], "--seq-length must be > 0, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0"),
    (["--global-batch-size", "-2"], "--global-batch-size must be > 0"),
    (["--sliding-window-size", "0"], "--sliding-window-size must be > 0"),
    (["--sparse-block-size", "0"], "--sparse-block-size must be > 0"),
    (["--vert-stride", "0"], "--vert-stride must be > 0"),
    (["--local-blocks", "-1"], "--local-blocks must be > 0"),
    (["--sparse-block-size", "24"], "power of two"),  # LongGenConfig's own check, now a UsageError
    (["--lr", "-0.001"], "--lr must be >= 0, got -0.001"),
    (["--min-lr", "1e-2", "--lr", "1e-3"], "--min-lr 0.01 must not exceed --lr 0.001"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "177"],
     "177 FFN hidden size cannot be split over --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "2", "--num-attention-heads", "6", "--num-query-groups", "3"],
     "3 query groups"),
    (["--context-parallel-size", "2", "--seq-length", "66"], "must be divisible by 2 x CP 2 = 4"),
])
def test_bad_values_fail_in_validate(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(MOCK + argv).validate(world_size=2)


def test_full_attention_everywhere_needs_no_sparse_window():
    parse_args(MOCK + ["--sliding-window-size", "4096", "--full-attention-placement", "all"]).validate(world_size=1)


# ---- the YAML file -------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ('seq-length: "abc"\n', r"seq-length must be an integer, got 'abc'"),
    ("seq-length: 1.5\n", "seq-length must be an integer"),
    ("mock-data: 1\n", "mock-data must be true or false, got 1"),
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("full-attention-layers: [1, x]\n", "full-attention-layers must be an integer, got 'x'"),
    ("sparse-attention: dilated\n", "sparse-attention must be one of attn_sink, block_sparse"),
    ("seq-length: [128\n", "is not valid YAML"),
    ("- seq-length\n", "expected a mapping"),
])
def test_yaml_values_are_checked_against_the_fields(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as err:
        parse_args(["--config", str(path)])
    assert str(path) in str(err.value)


def test_yaml_reads_numbers_as_the_flags_do(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-4\nmin-lr: 3\nseq-length: 128\nrotary-base: 5.0e+5\n"
                    "data-path: 0.5 a 0.5 b\nvocab-size: null\n")
    train = parse_args(["--config", str(path)])
    assert (train.lr, train.min_lr, train.seq_length, train.rotary_base) == (3e-4, 3.0, 128, 5e5)
    assert train.data_path == ["0.5", "a", "0.5", "b"] and train.vocab_size is None
    assert isinstance(train.min_lr, float)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match=r"--config .*nope.yaml: No such file or directory"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


# ---- files ---------------------------------------------------------------------------------

def write_indexed_dataset(prefix, documents, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_bad_paths_fail_before_anything_is_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "latest_checkpointed_iteration.txt").write_text("100")
    half = write_indexed_dataset(str(tmp_path / "half"), [[1, 2, 3]])
    os.remove(half + ".idx")
    before = files_under(tmp_path)
    cases = [
        (["--mock-data", "--save", str(a_file)], "--save: .*a_file is a file"),
        (["--mock-data", "--save", str(a_file / "ckpt")], "--save: .*ckpt cannot be created: .*a_file is a file"),
        (["--mock-data", "--tensorboard-dir", str(a_file)], "--tensorboard-dir: .*a_file is a file"),
        (["--mock-data", "--data-cache-path", str(a_file)], "--data-cache-path: .*a_file is a file"),
        (["--mock-data", "--load", str(hf)], "HF model .*convert it with tools/convert_hf_to_megatron.py"),
        (["--mock-data", "--load", str(empty)], "no checkpoint in .*empty: neither latest_checkpointed_iteration.txt"),
        (["--mock-data", "--load", str(stale)], r"checkpoint .*stale/iter_0000100 does not exist"),
        (["--mock-data", "--load", str(a_file)], "a_file: it is a file"),
        (["--mock-data", "--load", str(tmp_path / "nowhere")], "nowhere: it does not exist"),
        (["--data-path", str(tmp_path / "blend.json"), "--tokenizer-model", "x"], "no such blend file"),
    ]
    for argv, message in cases:
        with pytest.raises(UsageError, match=message):
            prepare(parse_args(BASE + argv))
    assert files_under(tmp_path) == before


# ---- vocabulary ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_512(tmp_path_factory):
    from megatron_longgen.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tok")
    return train_sentencepiece([str(REPO / "examples" / "data" / "essays.txt")], str(root / "tok"),
                               vocab_size=512)


def test_missing_prefix_file_is_named(tmp_path, tokenizer_512):
    prefix = write_indexed_dataset(str(tmp_path / "docs"), [[1, 2, 3]])
    os.remove(prefix + ".idx")
    with pytest.raises(UsageError, match=r"--data-path prefix .*docs: .*docs.idx does not exist"):
        prepare(parse_args(BASE + ["--data-path", prefix, "--tokenizer-model", tokenizer_512]))


def test_tokenizer_larger_than_the_model(tokenizer_512, tmp_path):
    prefix = write_indexed_dataset(str(tmp_path / "docs"), [[1, 2, 3]])
    with pytest.raises(UsageError, match="has 512 tokens, more than the model's vocabulary of 384"):
        prepare(parse_args(BASE + ["--data-path", prefix, "--tokenizer-model", tokenizer_512,
                                   "--vocab-size", "300"]))  # padded to 384


def test_dataset_ids_beyond_the_model_fail_before_training(tokenizer_512, tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, 200).tolist() for _ in range(20)]
    docs[13][77] = 700  # made with a larger tokenizer
    prefix = write_indexed_dataset(str(tmp_path / "docs"), docs)
    save = tmp_path / "ckpt"
    with pytest.raises(UsageError, match=r"docs holds token id 700, beyond the model's vocabulary of 512"):
        main(BASE + ["--data-path", prefix, "--tokenizer-model", tokenizer_512, "--save", str(save)])
    assert not save.exists()


def test_token_id_scan_reads_every_chunk_once_over_the_ranks(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 300, 100).tolist() for _ in range(7)]
    docs[5][50] = 400
    prefix = write_indexed_dataset(str(tmp_path / "docs"), docs)
    monkeypatch.setattr(preflight, "SCAN_CHUNK", 64)  # 700 tokens in 11 chunks
    tokens = np.concatenate([np.array(d) for d in docs])
    for world in (1, 3):
        parts = [preflight.largest_token_id(prefix, 512, rank, world) for rank in range(world)]
        assert max(parts) == 400
        # rank r's maximum is that of chunks r, r + world, ... of the concatenated documents
        assert parts == [max(tokens[s:s + 64].max() for s in range(r * 64, len(tokens), world * 64))
                         for r in range(world)]
    assert preflight.largest_token_id(prefix, 70000) == -1  # uint16 cannot reach 70000


# ---- the commands: one line, exit 2; the launcher under torchrun ---------------------------

def run_command(args, env=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable, **(env or {}))
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('seq-length: "abc"\n')
    proc = run_command([sys.executable, "pretrain_longgen.py", "--config", str(bad)])
    assert proc.returncode == USAGE_ERROR, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: --config {bad}: seq-length must be an integer, got 'abc'"]
    assert "Traceback" not in proc.stderr


def test_train_command_reports_usage_errors(tmp_path, capsys):
    """``python -m megatron_longgen.train`` runs ``cli_main(argv)``."""
    assert cli_main(MOCK + ["--save", str(REPO / "README.md")]) == USAGE_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f"error: --save: {REPO / 'README.md'} is a file, not a directory; choose another path"]


def test_other_ranks_stay_silent_and_wait_for_rank_0(monkeypatch, capsys):
    from megatron_longgen.utils import cli

    waited = []
    monkeypatch.setattr(cli.time, "sleep", waited.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # ranks from RANK
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("RANK", "1")
    assert run_main(lambda argv: cli.fail("bad"), []) == USAGE_ERROR
    assert capsys.readouterr().err == "" and waited == [cli.SILENT_RANK_DELAY_S]
    monkeypatch.setenv("RANK", "0")
    assert run_main(lambda argv: cli.fail("bad"), []) == USAGE_ERROR
    assert capsys.readouterr().err == "error: bad\n" and len(waited) == 1


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--no-python", "launch/pretrain_longgen.sh", "--config", "launch/configs/tiny_cpu.yaml"]


def test_launcher_under_torchrun_runs_two_ranks():
    proc = run_command(TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter 4/4" in proc.stdout
    assert "world 2" in proc.stdout
    assert "launching on" not in proc.stdout  # no second torchrun inside


def test_launcher_under_torchrun_reports_a_usage_error_once(tmp_path, tokenizer_512):
    """An error found after the process groups start (the data's token ids, reduced over the
    ranks): every rank stops, one line is printed."""
    docs = [[1, 2, 3] * 50 for _ in range(30)]
    docs[17][9] = 900
    prefix = write_indexed_dataset(str(tmp_path / "docs"), docs)
    proc = run_command(TORCHRUN + ["--no-mock-data", "--data-path", prefix, "--tokenizer-model",
                                   tokenizer_512, "--save", str(tmp_path / "ckpt")])
    assert proc.returncode != 0
    assert error_lines(proc) == [
        f"error: --data-path {prefix} holds token id 900, beyond the model's vocabulary of 512 "
        f"(padded): it was made with a larger tokenizer; give the tokenizer it was made with and "
        f"--vocab-size > 900, or preprocess it again"], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary of the failed ranks
    assert not (tmp_path / "ckpt").exists()
