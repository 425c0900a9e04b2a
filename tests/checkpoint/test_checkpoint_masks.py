"""The exported HF modeling file writes the pattern rules itself (it cannot import this
package); they must equal megatron_longgen's patterns.token_mask exactly."""

import pytest
import torch
from transformers import LlamaConfig

from megatron_longgen.attention.patterns import token_mask
from megatron_longgen.checkpoint.hf_modeling.configuration_longgen import LongGenConfig as HFLongGenConfig
from megatron_longgen.checkpoint.hf_modeling.modeling_longgen import longgen_sparse_mask
from megatron_longgen.models.presets import longgen_config

CASES = [
    # (heads, groups, sparse settings)
    (4, 4, dict(sparse_attention="attn_sink", sink_tokens=3, sliding_window_size=10)),
    (6, 3, dict(sparse_attention="attn_sink", sink_tokens=0, sliding_window_size=1)),
    (6, 3, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=2, vert_stride=3)),
    (8, 2, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1, vert_stride=4)),
    (6, 3, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1, vert_stride=8)),
    (8, 2, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1, vert_stride=8,
                vert_stride_rule="legacy")),
    (12, 6, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1, vert_stride=4)),
    (4, 4, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=2, vert_stride=8)),
    (6, 3, dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1, vert_stride=3,
                homo_head=True)),
]


def _configs(heads, groups, sparse):
    sparse = {"vert_stride_rule": "cover", **sparse}  # as an export writes it
    mg = longgen_config("tiny", num_attention_heads=heads, num_query_groups=groups,
                        hidden_size=heads * 16, **sparse)
    hf = HFLongGenConfig(num_attention_heads=heads, num_key_value_heads=groups,
                         hidden_size=heads * 16, num_hidden_layers=2, **sparse)
    return mg, hf


@pytest.mark.parametrize("heads,groups,sparse", CASES)
def test_hf_mask_equals_token_mask(heads, groups, sparse):
    mg, hf = _configs(heads, groups, sparse)
    pattern = mg.sparse_pattern()
    seq = 150  # not a multiple of the block size
    ours = longgen_sparse_mask(hf, torch.arange(seq), torch.arange(seq))
    ref = token_mask(pattern, seq, heads=range(heads), num_heads=heads)
    ours, ref = ours.expand(heads, seq, seq), ref.expand(heads, seq, seq)
    assert torch.equal(ours, ref)
    assert not ref.all(), "the case must be sparse somewhere"
    if sparse.get("sparse_attention") == "block_sparse" and not sparse.get("homo_head") and groups > 1:
        assert not torch.equal(ref[0], ref[-1]), "heterogeneous heads must differ"


@pytest.mark.parametrize("heads,groups,sparse", CASES[:4])
def test_hf_mask_for_a_decoding_step_is_the_matching_rows(heads, groups, sparse):
    """With a KV cache the queries are the last positions: their rows of the full mask."""
    mg, hf = _configs(heads, groups, sparse)
    seq = 97
    full = longgen_sparse_mask(hf, torch.arange(seq), torch.arange(seq))
    tail = longgen_sparse_mask(hf, torch.arange(seq - 5, seq), torch.arange(seq))
    assert torch.equal(tail, full[:, seq - 5:])


def test_hf_config_defaults_to_all_full_and_rejects_unknown_pattern():
    assert HFLongGenConfig(num_hidden_layers=3).full_attention_layers == [0, 1, 2]
    with pytest.raises(ValueError, match="sparse_attention"):
        HFLongGenConfig(sparse_attention="dilated")
    assert issubclass(HFLongGenConfig, LlamaConfig)


def test_hf_config_without_vert_stride_rule_means_legacy():
    """Exports written before the rule was recorded used the legacy offsets."""
    assert HFLongGenConfig(num_hidden_layers=2).vert_stride_rule == "legacy"
    with pytest.raises(ValueError, match="vert_stride_rule"):
        HFLongGenConfig(num_hidden_layers=2, vert_stride_rule="dense")


@pytest.mark.parametrize("heads,groups,sparse", [CASES[0], CASES[3], CASES[4], CASES[5]])
@pytest.mark.parametrize("q_len", [70, 1])
def test_flex_path_equals_masked_attention(heads, groups, sparse, q_len):
    """The GPU path of the export (FlexAttention, run eagerly here) equals dense masked
    attention with the pattern's mask, for a prompt and for a query at the end of a cache."""
    from megatron_longgen.attention.reference import masked_attention
    from megatron_longgen.checkpoint.hf_modeling.modeling_longgen import flex_sparse_attention

    mg, hf = _configs(heads, groups, sparse)
    k_len, d = 70, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, d, generator=g)
    k, v = torch.randn(1, groups, k_len, d, generator=g), torch.randn(1, groups, k_len, d, generator=g)
    mask = token_mask(mg.sparse_pattern(), k_len, heads=range(heads), num_heads=heads)[:, -q_len:]
    ref, _ = masked_attention(q, k, v, mask[None], d ** -0.5)
    out = flex_sparse_attention(hf, q, k, v, d ** -0.5, compile=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
