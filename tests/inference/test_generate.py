"""Sampling, stop tokens and streaming of ``generate``, and the generate CLI on a trainer
checkpoint."""

import dataclasses

import pytest
import torch

from megatron_longgen.checkpoint.errors import ConversionError
from megatron_longgen.inference.engine import InferenceEngine
from megatron_longgen.inference.generate import SamplingConfig, filter_logits, generate
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import get_preset, longgen_config
from megatron_longgen.utils.cli import UsageError, run_main
from tool_modules import load_tool

VOCAB = get_preset("tiny").vocab_size


def tiny_engine(max_length=96):
    torch.manual_seed(0)
    cfg = longgen_config("tiny", use_cpu_initialization=True, sink_tokens=2, sliding_window_size=8)
    return InferenceEngine(build_longgen_model(cfg, VOCAB, 128).eval(), max_length)


def reference_greedy(model, prompt, steps):
    ids = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids[None], torch.arange(len(ids))[None], None)[0, -1].argmax()
            ids = torch.cat([ids, nxt[None]])
    return ids[len(prompt):].tolist()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    top2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(top2).tolist() == [[True, False, True, False], [True] * 4]  # ties stay
    # Nucleus 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it.
    nucleus = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(nucleus[0]).tolist() == [True, False, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum(-1).tolist() == [1, 1]
    torch.testing.assert_close(nucleus[0, [0, 2]], logits[0, [0, 2]])


def test_greedy_stop_tokens_and_streaming(megatron_cpu):
    engine = tiny_engine()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [3, 4, 5]]
    greedy = generate(engine, prompts, SamplingConfig(max_new_tokens=10))
    assert greedy == [reference_greedy(engine.model, p, 10) for p in prompts]

    stop = greedy[0][3]
    assert stop not in greedy[0][:3]
    streamed = []
    out = generate(engine, prompts, SamplingConfig(max_new_tokens=10, stop_tokens=[stop]),
                   on_token=lambda i, t: streamed.append((i, t)))
    assert out[0] == greedy[0][:3]
    want1 = greedy[1][:greedy[1].index(stop)] if stop in greedy[1] else greedy[1]
    assert out[1] == want1
    assert [t for i, t in streamed if i == 0] == out[0]
    assert [t for i, t in streamed if i == 1] == out[1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(megatron_cpu):
    engine = tiny_engine()
    prompt = [[1, 2, 3, 4]]
    greedy = generate(engine, prompt, SamplingConfig(max_new_tokens=8))
    top1 = generate(engine, prompt, SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=1, seed=0))
    assert top1 == greedy
    a = generate(engine, prompt, SamplingConfig(max_new_tokens=8, temperature=2.0, seed=7))
    b = generate(engine, prompt, SamplingConfig(max_new_tokens=8, temperature=2.0, seed=7))
    c = generate(engine, prompt, SamplingConfig(max_new_tokens=8, temperature=2.0, seed=8))
    assert a == b and a != c


def test_generation_longer_than_max_length_is_refused(megatron_cpu):
    engine = tiny_engine(max_length=16)
    with pytest.raises(ValueError, match="max_length"):
        generate(engine, [list(range(10))], SamplingConfig(max_new_tokens=8))


def test_cli_generates_from_a_trainer_checkpoint(megatron_cpu, tmp_path, capsys):
    from megatron_longgen.training import checkpointing
    from megatron_longgen.training.arguments import TrainConfig
    from megatron_longgen.training.setup import model_config_from, vocab_size_for

    train = TrainConfig(model="tiny", seq_length=64, device="cpu", sparse_attention="block_sparse",
                        sparse_block_size=16, local_blocks=1, vert_stride=2)
    torch.manual_seed(5)
    model = build_longgen_model(model_config_from(train), vocab_size_for(train), train.seq_length)
    checkpointing.save_checkpoint(str(tmp_path), 0, [model], None, None, consumed_samples=0,
                                  train_config=train)

    cli = load_tool("generate")
    prompt = list(range(1, 40))
    assert cli.main(["--load", str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)),
                     "--max-new-tokens", "5", "--report-cache"]) == 0
    out = capsys.readouterr().out
    want = reference_greedy(model.eval(), prompt, 5)
    assert f"[0] {' '.join(map(str, want))}" in out
    assert "block_sparse:" in out and "causal:" in out
    # Clear errors: a prompt past the maximum length, a prompt + new tokens past the model's
    # positions (39 + 26 - 1 = 64 fits in 64, one more does not), a TP size the heads cannot be
    # split by.
    with pytest.raises(UsageError, match="needs 43 positions, more than the maximum length 16"):
        cli.main(["--load", str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)),
                  "--max-length", "16", "--max-new-tokens", "5"])
    assert cli.main(["--load", str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)),
                     "--max-new-tokens", "26"]) == 0
    assert run_main(cli.main, ["--load", str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)),
                               "--max-new-tokens", "27"]) == 2
    assert capsys.readouterr().err == (
        "error: a prompt of 39 tokens + --max-new-tokens 27 needs 65 positions, more than the "
        "maximum length 64 (--max-length, or the model's max_position_embeddings): shorten the "
        "prompt or lower --max-new-tokens\n")
    with pytest.raises(UsageError, match="--max-new-tokens.* must be >= 1, got 0"):
        cli.main(["--load", str(tmp_path), "--prompt-ids", "1,2", "--max-new-tokens", "0"])
    with pytest.raises(ConversionError, match=f"no checkpoint at {tmp_path / 'nowhere'}: it does not exist"):
        cli.main(["--load", str(tmp_path / "nowhere"), "--prompt-ids", "1,2"])
    with pytest.raises(ConversionError, match="tensor parallel size 3 must divide"):
        cli.main(["--load", str(tmp_path), "--prompt-ids", "1,2",
                  "--tensor-model-parallel-size", "3"])
    # A config that disagrees with the saved tensors (here a wider MLP) names the checkpoint.
    from megatron_longgen.checkpoint import megatron_io

    record_for = megatron_io.record_for

    def wrong_record(*args):
        record = record_for(*args)
        record.shape = dataclasses.replace(record.shape, ffn_hidden_size=2 * record.shape.ffn_hidden_size)
        return record

    megatron_io.record_for = wrong_record
    try:
        with pytest.raises(ConversionError, match="does not match the model its config describes"):
            cli.main(["--load", str(tmp_path), "--prompt-ids", "1,2"])
    finally:
        megatron_io.record_for = record_for
