"""The split-K decode kernel (Triton interpreter on CPU) against exact masked attention over
the cache's stored positions plus the new token, for every layout, GQA, heterogeneous
BlockSparse heads and a batch of different lengths."""

import pytest
import torch

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.inference.decode_kernel import decode_attention
from megatron_longgen.inference.kv_cache import FullSlots, LayerCache

HEADS, GROUPS, DIM, MAX_LEN = 4, 2, 16, 160

PATTERNS = {
    "causal": CausalPattern(),
    "sink": AttnSinkPattern(sink_tokens=3, window_size=20),
    "block_hetero": BlockSparsePattern(8, 2, 3, homo_head=False, num_heads=HEADS,
                                       num_query_groups=GROUPS),
    "block_homo": BlockSparsePattern(8, 1, 2, homo_head=True, num_heads=HEADS,
                                     num_query_groups=GROUPS),
    # 2 groups at stride 5: each reads 3 blocks in every 5 (residues 0, 2, 4 shifted by g).
    "block_cover_stride5": BlockSparsePattern(8, 1, 5, homo_head=False, num_heads=HEADS,
                                              num_query_groups=GROUPS),
    "block_legacy": BlockSparsePattern(8, 1, 4, homo_head=False, num_heads=HEADS,
                                       num_query_groups=GROUPS, vert_stride_rule="legacy"),
}


def filled_cache(pattern, lengths, gen):
    """A cache after a prefill of ``lengths`` tokens (random K/V), as the engine leaves it."""
    batch, longest = len(lengths), max(lengths)
    cache = LayerCache.allocate(pattern, batch, GROUPS, HEADS // GROUPS, DIM, MAX_LEN,
                                torch.float32, "cpu")
    k = torch.randn(batch, GROUPS, longest, DIM, generator=gen)
    v = torch.randn(batch, GROUPS, longest, DIM, generator=gen)
    pos = torch.arange(longest).expand(batch, -1)
    lengths_t = torch.tensor(lengths)
    cache.write(k, v, pos, pos < lengths_t[:, None], lengths_t)
    return cache, lengths_t


def exact(q, k_new, v_new, cache, lengths, pattern):
    """Dense masked attention over every slot (rule at the stored positions) plus the new key."""
    keys = torch.cat([cache.k, k_new[:, :, None]], 2)
    values = torch.cat([cache.v, v_new[:, :, None]], 2)
    key_pos = torch.cat([cache.pos, lengths[:, None, None].expand(-1, GROUPS, 1)], 2)
    key_pos = key_pos.repeat_interleave(HEADS // GROUPS, 1)[:, :, None, :]
    heads = torch.arange(HEADS)[None, :, None, None]
    q_pos = lengths[:, None, None, None]
    mask = pattern.allowed(q_pos, key_pos, heads) & (key_pos >= 0)
    return masked_attention(q[:, :, None], keys, values, mask, DIM ** -0.5)[0][:, :, 0]


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_equals_exact_attention(name, splits):
    pattern = PATTERNS[name]
    gen = torch.Generator().manual_seed(0)
    # Longer than the window and several blocks; one sequence much shorter than the other.
    cache, lengths = filled_cache(pattern, [117, 38], gen)
    q = torch.randn(2, HEADS, DIM, generator=gen)
    k_new, v_new = torch.randn(2, 2, GROUPS, DIM, generator=gen)
    offsets = cache.offsets.view(-1).to(torch.int32)
    out = decode_attention(q, k_new, v_new, cache.k, cache.v, cache.pos, lengths, pattern,
                           offsets, DIM ** -0.5, isinstance(cache.layout, FullSlots),
                           num_splits=splits)
    torch.testing.assert_close(out, exact(q, k_new, v_new, cache, lengths, pattern),
                               rtol=0, atol=1e-5)


def test_decode_kernel_rejects_unsupported_head_dim():
    q = torch.zeros(1, 2, 24)
    kv = torch.zeros(1, 1, 8, 24)
    with pytest.raises(ValueError, match="head dim 24"):
        decode_attention(q, q[:, :1], q[:, :1], kv, kv, torch.zeros(1, 1, 8, dtype=torch.long),
                         torch.zeros(1, dtype=torch.long), CausalPattern(),
                         torch.zeros(1, dtype=torch.int32), 1.0, True)


@pytest.mark.parametrize("name", ["sink", "block_hetero", "block_homo"])
def test_decode_kernel_masks_slots_the_query_cannot_read(name):
    """Sparse layers apply the rule at the stored positions: a query 12 tokens past what the
    cache was trimmed for must skip the slots that fell out of its window or local blocks."""
    pattern = PATTERNS[name]
    gen = torch.Generator().manual_seed(1)
    cache, lengths = filled_cache(pattern, [117, 38], gen)
    later = lengths + 12
    readable = pattern.allowed(later[:, None, None], cache.pos,
                               torch.arange(GROUPS)[None, :, None] * (HEADS // GROUPS))
    assert ((cache.pos >= 0) & ~readable).any()  # the cache does hold such slots
    q = torch.randn(2, HEADS, DIM, generator=gen)
    k_new, v_new = torch.randn(2, 2, GROUPS, DIM, generator=gen)
    out = decode_attention(q, k_new, v_new, cache.k, cache.v, cache.pos, later, pattern,
                           cache.offsets.view(-1).to(torch.int32), DIM ** -0.5, False,
                           num_splits=2)
    torch.testing.assert_close(out, exact(q, k_new, v_new, cache, later, pattern),
                               rtol=0, atol=1e-5)
