"""Tiny random HF Llama models and Megatron forwards shared by the checkpoint tests."""

import json
import os

import pytest
import torch

# Shapes: MHA; GQA whose 6 query groups are not a power of two (and split 3 + 3 at TP=2).
SHAPES = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=112),
    "gqa": dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=6, intermediate_size=160),
}
VOCAB = 300  # not a multiple of 128: exercises padding and trimming


def make_hf_model(path, kind="gqa", layers=4, max_shard_size="150KB", seed=0, tie=False, bin_format=False,
                  rms_norm_eps=1e-5):
    """Save a random LlamaForCausalLM; weights drawn wider than the default init so that
    logits are O(1) and a wrong mapping cannot hide under tiny numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, rms_norm_eps=rms_norm_eps,
                      max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=10000.0,
                      initializer_range=0.1, **SHAPES[kind])
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1 catch a swapped norm placement
                p.uniform_(0.5, 1.5)
    if bin_format:
        os.makedirs(path, exist_ok=True)
        cfg.save_pretrained(path)
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()},
                   os.path.join(path, "pytorch_model.bin"))
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


def token_batch(seq=48, batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_state(path):
    """Every tensor of an HF folder, read from its safetensors files."""
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def build_from_record(root, **overrides):
    """The model the trainer would build for a converted checkpoint, in this process's layout."""
    from megatron_longgen.checkpoint import megatron_io
    from megatron_longgen.checkpoint.record import CheckpointRecord

    record = CheckpointRecord.load(root)
    return megatron_io.build_model(record, **overrides), record


def megatron_forward(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def returned_cache(output):
    """The cache a forward or generate() returns: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a tiny model is hundreds of tiny ops: extra intra-op threads only add
    synchronisation, which stalls badly on a busy machine. Applies to the modules that import it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy(model, ids, new_tokens):
    """Greedy generate() of an HF model, with the per-step logits."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def assert_generation_equals_recomputing(model, ids, new_tokens):
    """Greedy generate() with the model's default (LongGen) cache equals the whole sequence run
    without a cache: every step's logits (<= 1e-4) and tokens. Returns generate()'s output."""
    out = greedy(model, ids, new_tokens)
    prompt = ids.shape[1]
    assert out.sequences.shape[1] == prompt + new_tokens
    assert type(returned_cache(out)).__name__ == "LongGenCache"
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    for step, logits in enumerate(out.logits):
        assert (logits - full[:, prompt - 1 + step]).abs().max() <= 1e-4, step
    assert torch.equal(out.sequences[:, prompt:], full[:, prompt - 1:-1].argmax(-1))
    return out
