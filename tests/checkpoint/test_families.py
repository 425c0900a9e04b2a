"""Llama-3.x (llama3 RoPE scaling, tied), Mistral (native sliding window), Qwen2 (QKV biases,
tied) and Qwen3 (q/k norms, head_dim != hidden / heads) into Megatron and back: logits equal
transformers' own model in fp32 at TP1 (in process), PP2 and TP2 (one spawn each serving every
family), and the export is bitwise."""

import json
import os

import pytest
import torch

from checkpoint_helpers import VOCAB, build_from_record, hf_state, megatron_forward, token_batch
from megatron_longgen.checkpoint import ExportOptions, ImportOptions, hf_to_megatron, megatron_to_hf
from megatron_longgen.checkpoint.convert import native_longgen_settings
from megatron_longgen.checkpoint.record import CheckpointRecord, LongGenSettings
from test_checkpoint_parallel import _spawn

SEQ = 48  # longer than Mistral's window and Llama-3's original length below
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def _configs():
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=4, max_position_embeddings=256,
                  initializer_range=0.1, rms_norm_eps=1e-5)
    return {
        # 3 KV groups: TP1 and PP2 only
        "llama3": tf.LlamaConfig(**common, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                 intermediate_size=160, rope_parameters=LLAMA3_ROPE),
        "llama3_tied": tf.LlamaConfig(**common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=112, rope_parameters=LLAMA3_ROPE,
                                      tie_word_embeddings=True),
        "mistral": tf.MistralConfig(**common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=112, sliding_window=16, head_dim=16),
        "qwen2": tf.Qwen2Config(**common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=112, tie_word_embeddings=True),
        "qwen3": tf.Qwen3Config(**common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=112, head_dim=32),
    }


TP2_FAMILIES = ("llama3_tied", "mistral", "qwen2", "qwen3")


def _random_model(cfg, seed):
    """Weights wider than the default init (logits O(1)); norms and biases away from 1 and 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (HF dir, HF model, Megatron dir) for every family, converted at fp32."""
    from megatron_longgen.checkpoint import megatron_io

    megatron_io.init_single_process()
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, (name, cfg) in enumerate(_configs().items()):
        hf_dir, mg_dir = root / f"{name}-hf", root / f"{name}-mg"
        model = _random_model(cfg, seed)
        model.save_pretrained(hf_dir)
        # The source's own attention: Mistral's window becomes AttnSink with no sinks.
        settings = native_longgen_settings(json.loads((hf_dir / "config.json").read_text()))
        hf_to_megatron(ImportOptions(hf_dir=str(hf_dir), megatron_dir=str(mg_dir), dtype="fp32",
                                     longgen=settings, verify=True))
        out[name] = (hf_dir, model, mg_dir)
    return out


def _hf_logits(model):
    with torch.no_grad():
        return model(input_ids=token_batch(seq=SEQ)).logits


def _diff(got, model):
    return float((got[..., :VOCAB] - _hf_logits(model)).abs().max())


def test_records_map_each_family_to_megatron_options(families):
    records = {name: CheckpointRecord.load(str(mg)) for name, (_, _, mg) in families.items()}
    assert records["llama3"].shape.rope_scaling == {
        "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}
    assert records["llama3_tied"].shape.tie_word_embeddings and records["qwen2"].shape.tie_word_embeddings
    assert records["qwen2"].shape.qkv_bias and not records["qwen3"].shape.qkv_bias
    assert records["qwen3"].shape.qk_norm and records["qwen3"].shape.head_dim == 32
    mistral = records["mistral"]
    assert (mistral.longgen.sparse_attention, mistral.longgen.sink_tokens,
            mistral.longgen.sliding_window_size, mistral.full_layers) == ("attn_sink", 0, 16, [])
    assert records["qwen3"].shape.source_architecture == "Qwen3ForCausalLM"
    assert "--qk-layernorm" in records["qwen3"].trainer_flags("X")
    assert "--add-qkv-bias --no-untie-embeddings-and-output-weights" in records["qwen2"].trainer_flags("X")
    assert "--use-rope-scaling --rope-scaling-factor 4 --rope-scaling-low-freq-factor 1" in \
        records["llama3"].trainer_flags("X")


@pytest.mark.parametrize("name", list(_configs()))
def test_tp1_logits_equal_transformers(megatron_cpu, families, name):
    hf_dir, model, mg_dir = families[name]
    from megatron_longgen.checkpoint import megatron_io

    megatron, _ = build_from_record(str(mg_dir))
    megatron_io.load(megatron, str(mg_dir), None)
    ids = token_batch(seq=SEQ)
    diff = _diff(megatron_forward(megatron, ids), model)
    print(f"TP1 {name}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4


def test_mistral_window_is_not_full_attention(families):
    """The window matters at this length: full attention would give other logits."""
    _, model, _ = families["mistral"]
    model.config._attn_implementation = "eager"
    windowed = _hf_logits(model)
    model.config.sliding_window = None
    try:
        full = _hf_logits(model)
    finally:
        model.config.sliding_window = 16
    assert float((windowed - full).abs().max()) > 1e-2


@pytest.mark.parametrize("plain", [True, False])
def test_export_round_trip_is_bitwise(megatron_cpu, families, tmp_path, plain):
    for name, (hf_dir, model, mg_dir) in families.items():
        if plain and name == "mistral":  # its windowed layers are sparse: LongGen export only
            continue
        out = tmp_path / name
        megatron_to_hf(ExportOptions(megatron_dir=str(mg_dir), hf_dir=str(out), plain_llama=plain))
        original, back = hf_state(hf_dir), hf_state(out)
        assert sorted(original) == sorted(back), name
        assert all(torch.equal(original[k], back[k]) for k in original), name
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
        if plain:  # the source's own class, loaded by transformers without remote code
            from transformers import AutoModelForCausalLM

            assert config["architectures"] == [type(model).__name__]
            again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            assert torch.equal(_hf_logits(again), _hf_logits(model)), name
        else:
            assert config["source_architecture"] == type(model).__name__
            assert config["qkv_bias"] == (name == "qwen2") and config["qk_norm"] == (name == "qwen3")
            # A LongGen export converts again, verified against its source family's class.
            again = hf_to_megatron(ImportOptions(hf_dir=str(out), megatron_dir=str(tmp_path / f"{name}-mg"),
                                                 dtype="fp32", verify=True, verify_seq_length=SEQ))
            assert again.shape == CheckpointRecord.load(str(mg_dir)).shape


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1)])
def test_parallel_logits_equal_transformers(megatron_cpu, families, tmp_path, tp, pp):
    names = list(families) if tp == 1 else list(TP2_FAMILIES)
    _spawn(tp, pp, [(n, str(families[n][2]), None) for n in names], tmp_path, seq=SEQ)
    for name in names:
        diff = _diff(torch.load(tmp_path / f"{name}.pt"), families[name][1])
        print(f"TP{tp} PP{pp} {name}: max |logit diff| {diff:.2e}")
        assert diff <= 1e-4, name


def test_llama3_scaling_matters_at_this_length(families):
    """Plain RoPE at the same base gives other logits: the TP1/PP2 match checks the scaling."""
    from transformers import LlamaForCausalLM

    _, model, _ = families["llama3"]
    plain_cfg = type(model.config).from_dict(model.config.to_dict())
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
    plain = LlamaForCausalLM(plain_cfg).eval()
    plain.load_state_dict(model.state_dict())
    assert float((_hf_logits(plain) - _hf_logits(model)).abs().max()) > 1e-2


@pytest.mark.parametrize("name", list(_configs()))
def test_longgen_training_resumes_and_exports(megatron_cpu, families, tmp_path, capsys, name):
    """A short LongGen run from the converted model (its settings from the record), resumed,
    then exported: the family's tensors (biases, q/k norms, tying) survive the trainer."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    hf_dir, model, mg_dir = families[name]
    ckpt = str(tmp_path / "ckpt")
    run = ["--device", "cpu", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
           "--global-batch-size", "1", "--lr-warmup-iters", "0", "--train-iters", "2", "--save", ckpt]
    # Length extension may change the llama3 factor (with --finetune), like the RoPE base.
    longer = ["--rope-scaling-factor", "8"] if name == "llama3" else []
    first = Trainer(parse_args([*run, "--load", str(mg_dir), "--finetune", "--sparse-attention",
                                "attn_sink", "--sink-tokens", "2", "--sliding-window-size", "8",
                                "--full-attention-layers", "1", "--exit-interval", "1", *longer])).fit()
    second = Trainer(parse_args([*run, "--load", ckpt])).fit()
    assert (first.iteration, sorted(second.losses)) == (1, [2])
    record = CheckpointRecord.load(os.path.join(ckpt, "iter_0000002"))
    source = CheckpointRecord.load(str(mg_dir)).shape.model_options()
    if longer:
        assert "changed: rope_scaling_factor 4 -> 8" in capsys.readouterr().out
        source["rope_scaling_factor"] = 8.0
    assert record.shape.model_options() == source
    out = tmp_path / "hf"
    megatron_to_hf(ExportOptions(megatron_dir=ckpt, hf_dir=str(out)))
    original, back = hf_state(hf_dir), hf_state(out)
    assert sorted(original) == sorted(back)
    assert all(original[k].shape == back[k].shape for k in original)
    assert not all(torch.equal(original[k], back[k]) for k in original)  # it trained
    config = json.loads((out / "config.json").read_text())
    assert (config["full_attention_layers"], config["sink_tokens"]) == ([1], 2)


def test_plain_folder_evaluates_with_its_native_window(megatron_cpu, families):
    """The evaluation tool's in-memory model of a plain Mistral folder computes its window."""
    from megatron_longgen.checkpoint import load_hf_as_megatron

    hf_dir, model, _ = families["mistral"]
    megatron = load_hf_as_megatron(str(hf_dir), dtype="fp32")
    assert _diff(megatron_forward(megatron, token_batch(seq=SEQ)), model) <= 1e-4


@pytest.mark.parametrize("written_layer_types", [True, False])
def test_qwen2_window_layers_follow_transformers(written_layer_types):
    """Qwen2's max_window_layers split, from transformers' own layer_types (or, for configs
    written before layer_types, from use_sliding_window / max_window_layers)."""
    from transformers import Qwen2Config

    from megatron_longgen.checkpoint.hf_files import sliding_window_layers

    cfg = Qwen2Config(num_hidden_layers=6, use_sliding_window=True, sliding_window=32,
                      max_window_layers=4).to_dict()
    expected = [i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention"]
    assert expected == [4, 5]
    if not written_layer_types:
        del cfg["layer_types"]
    assert sliding_window_layers(cfg) == (32, expected)
    off = Qwen2Config(num_hidden_layers=6, use_sliding_window=False, sliding_window=32).to_dict()
    del off["layer_types"]
    assert sliding_window_layers(off) == (None, [])
