"""generate() on an exported LongGen model uses LongGenCache: sparse layers hold only what
their pattern can still read, and decoding equals recomputing the whole sequence."""

import shutil

import pytest
import torch

from checkpoint_helpers import (  # noqa: F401 (one_thread: a module fixture)
    assert_generation_equals_recomputing, greedy, one_thread, returned_cache)
from megatron_longgen.checkpoint.convert import HF_MODELING_DIR, load_hf_export
from megatron_longgen.checkpoint.hf_modeling.configuration_longgen import LongGenConfig
from megatron_longgen.checkpoint.hf_modeling.modeling_longgen import (
    LongGenForCausalLM,
    _head_offsets,
    longgen_sparse_mask,
)

SINK = dict(sparse_attention="attn_sink", sink_tokens=2, sliding_window_size=8)
BLOCK = dict(sparse_attention="block_sparse", sparse_block_size=4, local_blocks=2, vert_stride=3)
CASES = {
    "sink_mha": (4, 4, SINK),
    "sink_gqa": (6, 2, SINK),
    "block_hetero_gqa": (6, 3, BLOCK),  # three KV heads, three different vertical offsets
    "block_homo": (4, 2, {**BLOCK, "homo_head": True}),
    # two KV heads at stride 3: each reads 2 blocks in every 3 (cover rule)
    "block_cover_gqa": (4, 2, {**BLOCK, "vert_stride_rule": "cover"}),
}
MAX_POS = 96


def export_tiny(path, heads, kv_heads, sparse, seed=0):
    """A random LongGen model saved the way the exporter lays out a folder (remote code)."""
    torch.manual_seed(seed)
    config = LongGenConfig(
        vocab_size=120, hidden_size=heads * 8, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS,
        full_attention_layers=[1], initializer_range=0.1, eos_token_id=None, bos_token_id=None,
        pad_token_id=0, **sparse,
        auto_map={"AutoConfig": "configuration_longgen.LongGenConfig",
                  "AutoModelForCausalLM": "modeling_longgen.LongGenForCausalLM"})
    LongGenForCausalLM(config).save_pretrained(path)
    for f in ("__init__.py", "configuration_longgen.py", "modeling_longgen.py"):
        shutil.copy2(f"{HF_MODELING_DIR}/{f}", path / f)
    return load_hf_export(str(path))


@pytest.fixture(scope="module", params=list(CASES))
def model(request, tmp_path_factory):
    heads, kv_heads, sparse = CASES[request.param]
    return export_tiny(tmp_path_factory.mktemp(request.param), heads, kv_heads, sparse)


def test_generate_equals_recomputing_without_cache(model):
    prompt, new = 21, 40  # prompt longer than the window; total several windows/blocks
    ids = torch.randint(1, 120, (2, prompt), generator=torch.Generator().manual_seed(3))
    assert_generation_equals_recomputing(model, ids, new)


# transformers >= 5.24 warns that past_key_values is deprecated: the point here is that it still works.
@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_decoding_takes_the_cache_under_either_name(model, name):
    """transformers 5.24 renamed past_key_values to cache; an unknown name would be swallowed
    by **kwargs and the step would run without the prefix. Either name works on every version."""
    ids = torch.randint(1, 120, (2, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefix = model(ids[:, :25], use_cache=True)
        cache = returned_cache(prefix)
        for t in range(25, 30):
            step = model(ids[:, t:t + 1], use_cache=True, **{name: cache}).logits
            assert (step[:, 0] - full[:, t]).abs().max() <= 1e-4, t
    assert cache.get_seq_length() == 30


def test_the_cache_is_passed_once():
    from megatron_longgen.checkpoint.hf_modeling.modeling_longgen import _cache_under_installed_name

    with pytest.raises(ValueError, match="pass the cache once"):
        _cache_under_installed_name({"cache": object(), "past_key_values": object()})


MODELING = "megatron_longgen.checkpoint.hf_modeling.modeling_longgen"


def test_older_transformers_are_refused_at_load(monkeypatch):
    import importlib
    import sys

    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.56.2")
    monkeypatch.delitem(sys.modules, MODELING)  # restored afterwards
    with pytest.raises(ImportError, match=r"needs transformers>=4\.57\.6, but 4\.56\.2 is installed"):
        importlib.import_module(MODELING)


def test_declared_minimum_is_the_one_the_model_checks():
    import re
    from pathlib import Path

    from megatron_longgen.checkpoint.hf_modeling.modeling_longgen import MIN_TRANSFORMERS

    root = Path(__file__).resolve().parents[2]
    pyproject, requirements = (root / "pyproject.toml").read_text(), (root / "requirements.txt").read_text()
    assert f'"transformers>={MIN_TRANSFORMERS}",' in pyproject
    assert re.search(rf"^transformers>={re.escape(MIN_TRANSFORMERS)}$", requirements, re.M)


def held_positions(layer, b, h):
    pos = layer.positions[b, h]
    return set(pos[pos >= 0].tolist())


def test_sparse_layers_hold_exactly_what_the_pattern_can_still_read(model):
    cfg = model.config
    ids = torch.randint(1, 120, (1, 10), generator=torch.Generator().manual_seed(4))
    sizes = []
    for total in (30, 60, MAX_POS):
        cache = returned_cache(greedy(model, ids, total - 10))
        length = total - 1  # the last token is generated, never fed back
        sparse = [layer for i, layer in enumerate(cache.layers) if i not in cfg.full_attention_layers]
        readable = longgen_sparse_mask(cfg, torch.arange(length, MAX_POS), torch.arange(length))
        readable = readable.expand(cfg.num_attention_heads, -1, -1).any(1)  # [heads, keys]
        per_group = cfg.num_attention_heads // cfg.num_key_value_heads
        for layer in sparse:
            assert layer.get_seq_length() == length
            for h in range(cfg.num_key_value_heads):
                want = set(readable[h * per_group].nonzero().flatten().tolist())
                assert held_positions(layer, 0, h) == want
        sizes.append(cache.nbytes_by_kind())
    kind = cfg.sparse_attention
    assert sizes[0]["full"] < sizes[1]["full"] < sizes[2]["full"]  # full layers grow
    if kind == "attn_sink":  # sink + window - 1 slots whatever the length
        slots = [cfg.sink_tokens + cfg.sliding_window_size - 1] * 3
    else:  # local ring + the most vertical blocks any head has up to generate's max_length
        offsets = _head_offsets(cfg, "cpu").tolist()
        covering = cfg.vert_stride_rule == "cover" and not cfg.homo_head
        period = min(cfg.num_key_value_heads, cfg.vert_stride) if covering else cfg.vert_stride
        blocks = [range(-(-total // cfg.sparse_block_size)) for total in (30, 60, MAX_POS)]
        slots = [(cfg.local_blocks + max(sum((k + o + 1) % cfg.vert_stride % period == 0 for k in r)
                                         for o in offsets))
                 * cfg.sparse_block_size for r in blocks]
    # K and V, fp32, two sparse layers
    assert [s[kind] for s in sizes] == [2 * 2 * cfg.num_key_value_heads * n * cfg.head_dim * 4 for n in slots]
    assert "total" in cache.report()


def test_padded_batch_is_refused(model):
    ids = torch.randint(1, 120, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the second row is 8 tokens long
    with pytest.raises(ValueError, match="padded batches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_too_long_generation_is_refused(model):
    ids = torch.randint(1, 120, (1, 40), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, max_new_tokens=MAX_POS, do_sample=False, pad_token_id=0)


def test_beam_search_equals_the_dynamic_cache(model):
    """Beam search reorders the pattern cache's rows (positions included) like HF's own cache."""
    from transformers import DynamicCache

    ids = torch.randint(1, 120, (2, 21), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, **kw)
        theirs = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    assert torch.equal(ours, theirs)
