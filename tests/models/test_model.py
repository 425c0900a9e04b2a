"""The hybrid GPTModel: equals Megatron's stock local-spec model when every layer is full,
and trains on CPU."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import get_preset, longgen_config

TINY = get_preset("tiny")


def tokens(batch=2, seq=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (batch, seq), generator=g)
    return ids, torch.arange(seq)[None].expand(batch, -1)


def test_all_full_equals_stock_megatron_gpt(megatron_cpu):
    cfg = longgen_config("tiny", full_attention_placement="all", use_cpu_initialization=True,
                         rotary_base=50000.0)
    ours = build_longgen_model(cfg, TINY.vocab_size, 128)
    stock_cfg = TransformerConfig(**TINY.config_kwargs(), use_cpu_initialization=True)
    stock = GPTModel(
        stock_cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), TINY.vocab_size, 128,
        position_embedding_type="rope", rotary_base=50000, share_embeddings_and_output_weights=False)
    missing, unexpected = stock.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    assert not [k for k in unexpected if not k.endswith("_extra_state")], unexpected

    ids, pos = tokens()
    causal = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)
    with torch.no_grad():
        mine = ours(ids, pos, None)
        theirs = stock(ids, pos, causal)
    assert mine.shape == (2, 48, TINY.vocab_size)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_hybrid_differs_from_full_beyond_the_window(megatron_cpu):
    """With a window shorter than the sequence, sparse layers must change the logits there."""
    common = dict(use_cpu_initialization=True, sink_tokens=2, sliding_window_size=8)
    full = build_longgen_model(longgen_config("tiny", full_attention_placement="all", **common), TINY.vocab_size, 128)
    hybrid = build_longgen_model(longgen_config("tiny", **common), TINY.vocab_size, 128)
    hybrid.load_state_dict(full.state_dict())
    ids, pos = tokens(seq=32)
    with torch.no_grad():
        a, b = full(ids, pos, None), hybrid(ids, pos, None)
    torch.testing.assert_close(a[:, :8], b[:, :8])  # inside the window: identical
    assert not torch.allclose(a[:, 16:], b[:, 16:], atol=1e-4)


@pytest.mark.parametrize("sparse", ["attn_sink", "block_sparse"])
def test_tiny_hybrid_trains(megatron_cpu, sparse):
    torch.manual_seed(0)
    cfg = longgen_config("tiny", sparse_attention=sparse, sink_tokens=2, sliding_window_size=16,
                         sparse_block_size=16, local_blocks=1, vert_stride=2,
                         use_cpu_initialization=True)
    model = build_longgen_model(cfg, TINY.vocab_size, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable stream: a repeated random motif.
    motif = torch.randint(0, TINY.vocab_size, (16,), generator=torch.Generator().manual_seed(1))
    ids = motif.repeat(4)[None].expand(2, -1)
    pos = torch.arange(ids.shape[1])[None].expand(2, -1)
    losses = []
    for _ in range(8):
        loss = model(ids[:, :-1], pos[:, :-1], None, labels=ids[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_packed_documents_equal_separate_documents(megatron_cpu):
    """THD packing: each document's logits equal those of the document run alone
    (no attention across documents, RoPE positions and sparse patterns restart)."""
    from megatron_longgen.training.batches import packed_seq_params_from_eod

    cfg = longgen_config("tiny", use_cpu_initialization=True, sink_tokens=2, sliding_window_size=8)
    model = build_longgen_model(cfg, TINY.vocab_size, 128).eval()
    eod = 0
    doc_a = torch.randint(1, TINY.vocab_size, (1, 19))
    doc_b = torch.randint(1, TINY.vocab_size, (1, 25))
    doc_a[0, -1] = eod
    packed = torch.cat([doc_a, doc_b], dim=1)
    params = packed_seq_params_from_eod(packed, eod)
    with torch.no_grad():
        together = model(packed, torch.arange(44)[None], None, packed_seq_params=params)
        alone_a = model(doc_a, torch.arange(19)[None], None)
        alone_b = model(doc_b, torch.arange(25)[None], None)
    torch.testing.assert_close(together[:, :19], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[:, 19:], alone_b, rtol=1e-5, atol=1e-5)
