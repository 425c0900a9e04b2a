"""The trainer on CPU: learning, exact resume, crash-safe checkpoints, clear errors, launcher."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_longgen.training import checkpointing
from megatron_longgen.training.arguments import parse_args
from megatron_longgen.training.logger import metrics_log_file, read_metrics_log
from megatron_longgen.training.trainer import Trainer
from megatron_longgen.utils.cli import UsageError

REPO = Path(__file__).resolve().parents[2]


class MotifDataset:
    """Learnable data: each sample repeats one of a few random motifs."""

    def __init__(self, n=64, seq=64, vocab=512):
        g = torch.Generator().manual_seed(7)
        self.motifs = torch.randint(0, vocab, (4, 16), generator=g)
        self.n, self.seq = n, seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        text = self.motifs[i % 4].repeat(self.seq // 16 + 1)[: self.seq + 1]
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def flags(tmp_path, *extra):
    return ["--device", "cpu", "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--sliding-window-size", "16", "--sink-tokens", "2",
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", *extra]


def run(argv, data=None):
    train = parse_args(argv)
    datasets = (data, data) if data is not None else None
    return Trainer(train, datasets=datasets).fit()


def test_loss_goes_down(tmp_path):
    data = MotifDataset()
    result = run(flags(tmp_path, "--train-iters", "12", "--eval-interval", "12"), data)
    losses = [result.losses[i] for i in sorted(result.losses)]
    assert len(losses) == 12
    assert losses[-1] < 0.75 * losses[0], losses  # chance level stays at ln(512) ~ 6.24
    assert result.eval_losses[12] < 0.75 * losses[0]


def test_resume_is_exact(tmp_path):
    straight = run(flags(tmp_path, "--train-iters", "6", "--mock-data"))
    ckpt = str(tmp_path / "ckpt")
    first = run(flags(tmp_path, "--train-iters", "6", "--mock-data", "--save", ckpt,
                      "--exit-interval", "3"))
    assert first.iteration == 3 and checkpointing.read_latest_iteration(ckpt) == 3
    second = run(flags(tmp_path, "--train-iters", "6", "--mock-data", "--load", ckpt, "--save", ckpt))
    assert sorted(second.losses) == [4, 5, 6]
    resumed = {**first.losses, **second.losses}
    assert resumed == straight.losses  # bit-identical in fp32
    # The metrics log next to the checkpoints: appended on resume, every iteration once.
    assert read_metrics_log(os.path.join(ckpt, "metrics.jsonl"))["lm loss"] == pytest.approx(resumed)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    trainer = Trainer(parse_args(flags(tmp_path, "--train-iters", "2", "--mock-data", "--save", ckpt)))
    trainer.fit()
    assert checkpointing.read_latest_iteration(ckpt) == 2

    def crash(*args, **kwargs):
        raise RuntimeError("node lost")

    trainer.iteration = 3
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.save()
    monkeypatch.undo()
    assert checkpointing.read_latest_iteration(ckpt) == 2
    assert os.path.isdir(os.path.join(ckpt, "iter_0000003.tmp"))  # the partial write stays aside
    state = checkpointing.load_checkpoint(ckpt, trainer.model, trainer.optimizer, trainer.scheduler)
    assert state == {"iteration": 2, "consumed_samples": 8}
    trainer.iteration = 3  # a later save replaces the partial one
    trainer.save()
    assert checkpointing.read_latest_iteration(ckpt) == 3
    assert not os.path.exists(os.path.join(ckpt, "iter_0000003.tmp"))


def test_finetune_loads_weights_only(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run(flags(tmp_path, "--train-iters", "2", "--mock-data", "--save", ckpt))
    trainer = Trainer(parse_args(flags(tmp_path, "--train-iters", "2", "--mock-data",
                                       "--load", ckpt, "--finetune")))
    assert trainer.iteration == 0 and trainer.consumed_samples == 0
    saved = checkpointing.load_checkpoint(ckpt, trainer.model, finetune=True)
    assert saved["iteration"] == 0


@pytest.mark.parametrize("argv,message", [
    (["--global-batch-size", "3", "--mock-data"], "multiple of --micro-batch-size"),
    (["--train-iters", "2"], "--data-path"),
    (["--mock-data", "--finetune"], "give --load"),
    (["--mock-data", "--sequence-parallel"], "--sequence-parallel needs"),
    (["--mock-data", "--virtual-pipeline-model-parallel-size", "2"], "needs --pipeline-model-parallel-size"),
    (["--mock-data", "--train-iters", "4", "--lr-warmup-iters", "4"], "--lr-warmup-iters 4 must be below"),
])
def test_bad_settings_fail_before_work(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(flags(tmp_path, *argv)).validate(world_size=1)


def test_bad_flags_and_config(tmp_path):
    with pytest.raises(UsageError, match="invalid choice: 'dilated'.*see pretrain_longgen.py --help"):
        parse_args(["--sparse-attention", "dilated"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq-lenght: 128\n")
    with pytest.raises(UsageError, match="unknown key 'seq-lenght'"):
        parse_args(["--config", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("seq-length: 128\nfull_attention_layers: [1, 2]\nlr: 1.0e-4\n")
    train = parse_args(["--config", str(good), "--lr", "2e-4"])
    assert (train.seq_length, train.full_attention_layers, train.lr) == (128, [1, 2], 2e-4)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint at .*none: it does not exist"):
        parse_args(flags(tmp_path, "--mock-data", "--load", str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no checkpoint .*the trainer or tools/convert_hf_to_megatron"):
        parse_args(flags(tmp_path, "--mock-data", "--load", str(tmp_path / "empty")))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="HF model .*convert it with tools/convert_hf_to_megatron.py"):
        parse_args(flags(tmp_path, "--mock-data", "--load", str(tmp_path / "hf"), "--finetune"))


# ---------------------------------------------------------------- checkpoints carry their settings

# A model unlike the defaults in every setting the record carries.
RECORDED = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--ffn-hidden-size", "64", "--kv-channels", "16",
            "--layernorm-epsilon", "1e-6", "--vocab-size", "300", "--rotary-base", "20000",
            "--full-attention-placement", "top"]


def run_flags(*extra):
    """Flags of a run, none of them a model setting."""
    return ["--device", "cpu", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--lr-warmup-iters", "0", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer checkpoint at iteration 2 of a model set entirely by flags."""
    ckpt = str(tmp_path_factory.mktemp("trained") / "ckpt")
    run(run_flags("--train-iters", "2", "--sliding-window-size", "8", "--sink-tokens", "2",
                  "--save", ckpt, *RECORDED))
    return ckpt


def test_resume_takes_the_model_from_the_checkpoint(trained, tmp_path, capsys):
    """--load alone rebuilds the recorded model (it used to build the defaults and fail with
    Megatron's "Global shape mismatch")."""
    assert os.path.isfile(os.path.join(trained, "iter_0000002", "longgen_config.json"))
    train = parse_args(run_flags("--train-iters", "3", "--load", trained, "--save", str(tmp_path / "c")))
    assert (train.num_layers, train.hidden_size, train.kv_channels, train.vocab_size) == (3, 32, 16, 300)
    assert (train.layernorm_epsilon, train.rotary_base) == (1e-6, 20000)
    assert (train.sliding_window_size, train.sink_tokens, train.full_attention_layers) == (8, 2, [2])
    assert parse_args(run_flags("--load", f"{trained}/iter_0000002")).num_layers == 3  # one iteration
    trainer = Trainer(train)
    assert trainer.iteration == 2 and trainer.config.layernorm_epsilon == 1e-6
    assert trainer.config.kv_channels == 16 and trainer.config.full_layer_indices == (2,)
    result = trainer.fit()
    assert sorted(result.losses) == [3]
    out = capsys.readouterr().out
    assert "building the model (3 layers) ..." in out and f"loading {trained}/iter_0000002" in out
    assert f"saved checkpoint {tmp_path / 'c'}/iter_0000003 at iteration 3 (" in out


@pytest.mark.parametrize("extra,message", [
    (["--num-layers", "4"], "--num-layers 4 disagrees with the checkpoint's 3 "),
    (["--layernorm-epsilon", "1e-5"], "--layernorm-epsilon 1e-05 disagrees with the checkpoint's 1e-06"),
    (["--model", "llama2-7b"], r"--model llama2-7b \(num_layers 32\) disagrees with the checkpoint's 3"),
    (["--finetune", "--hidden-size", "64"], "--hidden-size 64 disagrees"),  # shapes never change
    # A resume continues the same run: length-extension settings need --finetune.
    (["--rotary-base", "500000"], "--rotary-base 500000 disagrees with the checkpoint's 20000 .*--finetune"),
    (["--seq-length", "64"], "--seq-length 64 disagrees with the checkpoint's 32"),
    (["--full-attention-placement", "bottom"], r"--full-attention-placement bottom \(full-attention "
                                               r"layers \[0\]\) disagrees with the checkpoint's \[2\]"),
    (["--tensor-model-parallel-size", "5"], "does not divide the checkpoint's padded vocabulary of 384"),
])
def test_flag_disagreeing_with_the_checkpoint_is_an_error(trained, extra, message, capsys):
    from megatron_longgen.train import cli_main

    before = sorted(os.listdir(trained))
    with pytest.raises(UsageError, match=message) as err:
        parse_args(run_flags("--load", trained, *extra))
    assert f"(from {trained}/iter_0000002)" in str(err.value)
    assert cli_main(run_flags("--load", trained, "--save", trained, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert sorted(os.listdir(trained)) == before  # nothing written


def test_finetune_may_change_the_length_extension_settings(trained, capsys):
    train = parse_args(run_flags("--load", trained, "--finetune", "--rotary-base", "500000",
                                 "--seq-length", "64", "--full-attention-placement", "bottom",
                                 "--sliding-window-size", "8", "--num-layers", "3"))
    assert (train.rotary_base, train.seq_length, train.full_attention_layers) == (500000, 64, [0])
    assert train.num_layers == 3 and train.sliding_window_size == 8  # agreeing flags are fine
    out = capsys.readouterr().out.splitlines()
    assert "changed: rotary_base 20000 -> 500000" in out
    assert "changed: seq_length 32 -> 64" in out
    assert "changed: full_attention_layers [2] -> [0]" in out
    assert not any("sliding_window_size" in line for line in out)


def test_every_flag_has_help():
    from megatron_longgen.training.arguments import build_parser

    for action in build_parser()._actions:
        text = (action.help or "").split("(default")[0].strip()
        assert len(text.split()) >= 2, f"{action.option_strings} has no help"
        if action.dest not in ("help", "config"):
            assert "(default: " in action.help, f"{action.option_strings} hides its default"


def test_resave_of_an_iteration_never_loses_latest(trained, tmp_path, monkeypatch):
    """Re-saving iteration 2 moves the old directory aside; a crash at any step leaves the
    tracker on a complete checkpoint (the old one until the new one is in place)."""
    import shutil

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(trained, ckpt)
    trainer = Trainer(parse_args(run_flags("--train-iters", "2", "--load", ckpt, "--save", ckpt)))
    final = checkpointing.checkpoint_name(ckpt, 2)

    def loads():
        return checkpointing.load_checkpoint(ckpt, trainer.model, trainer.optimizer,
                                             trainer.scheduler)["consumed_samples"]

    def crash(*args, **kwargs):
        raise RuntimeError("node lost")

    real_replace = os.replace
    trainer.consumed_samples = 100  # tells the new save from the old one (2 samples)
    # 1. crash between moving the old iter_0000002 aside and renaming the new one into place
    monkeypatch.setattr(checkpointing.os, "replace",
                        lambda src, dst: crash() if src.endswith(".tmp") and dst == final
                        else real_replace(src, dst))
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.save()
    monkeypatch.undo()
    assert not os.path.exists(final) and checkpointing.read_latest_iteration(ckpt) == 2
    assert loads() == 2  # the tracked iteration is read from iter_0000002.old
    # 2. the next save finds only the .old copy: keeps it until the new one is in place
    trainer.consumed_samples = 101
    monkeypatch.setattr(checkpointing, "_write_tracker", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.save()
    monkeypatch.undo()
    assert loads() == 101
    # 3. a clean save leaves one directory per iteration
    trainer.consumed_samples = 102
    trainer.save()
    assert loads() == 102
    assert sorted(p for p in os.listdir(ckpt) if p.startswith("iter_")) == ["iter_0000002"]


def test_launcher_runs_two_ranks_on_cpu():
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2", MASTER_PORT="0")
    proc = subprocess.run(["bash", "launch/pretrain_longgen.sh", "--config", "launch/configs/tiny_cpu.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter 4/4" in proc.stdout


@pytest.mark.parametrize("config", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config):
    from megatron_longgen.training.setup import model_config_from

    train = parse_args(["--config", str(config)])
    model = model_config_from(train)
    if "longgen" in config.name:
        assert len(model.full_layer_indices) == round(model.num_layers / 3)
    if "_full" in config.name:
        assert len(model.full_layer_indices) == model.num_layers


def test_entry_point_help():
    proc = subprocess.run([sys.executable, "pretrain_longgen.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--tensor-model-parallel-size", "--context-parallel-size", "--sliding-window-size"):
        assert flag in proc.stdout


def test_packed_documents_train_and_stay_apart(tmp_path):
    """--reset-attention-mask: EOD-separated documents become THD packed sequences."""
    from megatron_longgen.training.batches import packed_seq_params_from_eod

    eod = 3
    params = packed_seq_params_from_eod(torch.tensor([[5, 6, eod, 7, 8, 9, eod, 1]]), eod)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 7, 8]

    class EodMotifs(MotifDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["tokens"] = item["tokens"].clone()
            item["tokens"][20] = eod
            return item

    train = parse_args(flags(tmp_path, "--train-iters", "3", "--micro-batch-size", "1",
                             "--reset-attention-mask"))
    data = EodMotifs()
    result = Trainer(train, datasets=(data, data), eod_id=eod).fit()
    assert len(result.losses) == 3 and all(l == l for l in result.losses.values())


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, log = tmp_path / "tb", tmp_path / "logs" / "run.jsonl"
    result = run(flags(tmp_path, "--train-iters", "3", "--mock-data", "--tensorboard-dir", str(tb),
                       "--eval-interval", "3", "--eval-iters", "1", "--metrics-log-path", str(log)))
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("lm loss", "lr", "grad norm", "tokens/s", "lm loss validation"):
        assert tag in tags
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3]
    validation = [(e.step, e.value) for e in events.Scalars("lm loss validation")]
    assert validation == [(3, pytest.approx(result.eval_losses[3]))]
    # The same values in the metrics log (--metrics-log-path: no --save needed).
    series = read_metrics_log(str(log))
    assert series["lm loss validation"] == pytest.approx(result.eval_losses)
    assert series["lm loss"] == pytest.approx(result.losses)
    assert sorted(series["lr"]) == [1, 2, 3]


@pytest.mark.parametrize("argv, expected", [
    ([], None),  # nowhere to write it
    (["--save", "ckpt"], os.path.join("ckpt", "metrics.jsonl")),
    (["--save", "ckpt", "--metrics-log-path", "m.jsonl"], "m.jsonl"),
    (["--save", "ckpt", "--no-metrics-log"], None),
])
def test_metrics_log_location(argv, expected):
    assert metrics_log_file(parse_args(argv)) == expected
