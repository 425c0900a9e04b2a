"""The runner on a tiny random model: results, report files and figures, perplexity by
position and the sink + window eviction baseline."""

import json

import torch
from PIL import Image

from megatron_longgen.checkpoint.megatron_io import all_full_attention
from megatron_longgen.eval import runner
from megatron_longgen.eval.tasks import build_items, load_haystack
from megatron_longgen.inference.engine import InferenceEngine
from megatron_longgen.inference.generate import SamplingConfig, generate
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import get_preset, longgen_config

VOCAB = get_preset("tiny").vocab_size


def tiny_model(max_len=360):
    torch.manual_seed(0)
    cfg = longgen_config("tiny", use_cpu_initialization=True, sink_tokens=4, sliding_window_size=32)
    return build_longgen_model(cfg, VOCAB, max_len).eval()


def test_runner_writes_report_and_heatmap(megatron_cpu, tokenizer, tmp_path):
    model = tiny_model()
    lengths, depths = [224, 300], [0.0, 0.5, 1.0]
    items = build_items(tokenizer, ["passkey", "niah", "common_words"], lengths, depths, seed=0,
                        haystack=load_haystack())
    engine = InferenceEngine(model, 360, chunk_size=64)
    results = runner.run_items(engine, tokenizer, items, batch_size=4)
    assert len(results) == len(items) == 2 * 3 * 2 + 2
    for it, r in zip(items, results):
        assert (r.task, r.length, r.depth, r.answers) == (it.task, it.length, it.depth, it.answers)
        assert 0.0 <= r.exact <= r.partial <= 1.0
    # Batched, length-sorted generation gives each item what it gets alone.
    alone = generate(engine, [[tokenizer.bos_id] + tokenizer.encode(items[0].prompt)],
                     SamplingConfig(max_new_tokens=items[0].max_new_tokens, stop_tokens=[tokenizer.eos_id]))
    assert results[0].generated == tokenizer.decode(alone[0])

    windows = runner.windows_from_documents([list(range(3, 500))], seq_length=64, max_windows=4)
    ppl = runner.perplexity_by_position(model, windows, bucket_size=16, batch_size=2)
    assert ppl.bucket_starts == [0, 16, 32, 48] and len(ppl.loss) == 4
    assert all(x > 0 for x in ppl.loss)

    paths = runner.write_report(str(tmp_path), results, ppl, config={"preset": "tiny"}, model="tiny")
    report = json.load(open(paths["json"]))
    assert report["model"] == "tiny"
    assert set(report["summary"]) == {"passkey", "niah", "common_words"}
    assert report["summary"]["niah"]["items"] == 6 and len(report["items"]) == len(items)
    assert len(report["summary"]["passkey"]["grid"]) == 6
    md = open(paths["markdown"]).read()
    assert "| passkey |" in md and "depth \\ length" in md and "Perplexity by position" in md
    # The figures themselves are checked in test_plots.py; here: written, and whole PNGs.
    for name in ("heatmap_passkey", "heatmap_niah", "ppl"):
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.size[0] >= 720
            image.verify()
    assert "heatmap_common_words" not in paths  # no depth axis


def test_sink_window_eviction_after_prefill(megatron_cpu):
    model = tiny_model()
    prompts = [list(range(5, 105)), list(range(7, 67))]
    cfg = SamplingConfig(max_new_tokens=6)
    with all_full_attention(model):
        full = InferenceEngine(model, 128)
        # A window covering everything evicts nothing: the same greedy tokens.
        wide = runner.EvictingEngine(model, 128, sink=4, window=128, streaming=False)
        assert generate(wide, prompts, cfg) == generate(full, prompts, cfg)
        # A small window: after the prefill a full layer keeps only sink + window positions.
        narrow = runner.EvictingEngine(model, 128, sink=4, window=16, streaming=False)
        cache, logits = narrow.prefill(prompts)
        for lc in cache.layers:
            held = lc.held_positions(0, 0)
            assert held == list(range(4)) + list(range(100 - 15, 100))
        # The prefill itself was full: the first answer token is the full model's.
        torch.testing.assert_close(logits, full.prefill(prompts)[1])
        assert generate(narrow, prompts, cfg) != generate(full, prompts, cfg)


def test_streaming_eviction_matches_the_model_run_with_sink_window_masks(megatron_cpu):
    """StreamingLLM: every prompt token reads only sink + window, from sink + window sized
    caches; the reference is the model's own forward with that pattern in every layer."""
    from megatron_longgen.attention.patterns import AttnSinkPattern
    from megatron_longgen.checkpoint.megatron_io import attention_pattern

    model = tiny_model()
    tokens = torch.arange(5, 105).remainder(VOCAB).view(1, -1)
    with all_full_attention(model):
        engine = runner.EvictingEngine(model, 128, sink=4, window=16, chunk_size=32)
        cache, logits = engine.prefill(tokens)
        assert {lc.kind for lc in cache.layers} == {"attn_sink"}
        # sink + window - 1 slots: the next query is itself the window's newest token.
        assert all(lc.k.shape[2] == 4 + 15 for lc in cache.layers)
        full_logits = InferenceEngine(model, 128).prefill(tokens)[1]
    with attention_pattern(model, AttnSinkPattern(sink_tokens=4, window_size=16)), torch.no_grad():
        position_ids = torch.arange(tokens.shape[1]).view(1, -1)
        reference = model(tokens, position_ids, None)[0, -1].float()
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, full_logits, atol=1e-3)  # the window did cut something
