"""The pattern-sized KV cache holds exactly the keys a future query can read, checked against a
brute-force scan of ``pattern.allowed`` over the next queries, and stays within its bound."""

import pytest
import torch

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.inference.kv_cache import KVCache, LayerCache

HEADS, GROUPS, DIM = 4, 2, 3


def readable(pattern, length, head, horizon):
    """Positions < length that some query in [length, length + horizon) may read."""
    q = torch.arange(length, length + horizon)[:, None]
    k = torch.arange(length)[None, :]
    return set(torch.nonzero(pattern.allowed(q, k, head).any(0)).flatten().tolist())


def fill(cache: LayerCache, chunks, offsets=(0, 3)):
    """Write chunks of tokens; K encodes the position so content can be checked too. Sequence
    b first gets ``offsets[b]`` tokens (a right-padded chunk), so the two lengths differ."""
    lengths = torch.zeros(2, dtype=torch.long)
    steps = [(max(offsets), torch.tensor(offsets))] + [(c, torch.tensor([c, c])) for c in chunks]
    for width, n_valid in steps:
        pos = lengths[:, None] + torch.arange(width)
        valid = torch.arange(width)[None] < n_valid[:, None]
        new_length = lengths + n_valid
        k = pos[:, None, :, None].expand(-1, GROUPS, -1, DIM).float()
        cache.write(k, -k, pos, valid, new_length)
        lengths = new_length
        yield lengths


PATTERNS = {
    "sink": (AttnSinkPattern(sink_tokens=3, window_size=8), 8),
    "sink_window1": (AttnSinkPattern(sink_tokens=2, window_size=1), 1),
    "block_hetero": (BlockSparsePattern(4, 2, 3, homo_head=False, num_heads=HEADS,
                                        num_query_groups=GROUPS), 4 * 6),
    "block_hetero_stride5": (BlockSparsePattern(4, 1, 5, homo_head=False, num_heads=HEADS,
                                                num_query_groups=GROUPS), 4 * 10),
    "block_hetero_legacy": (BlockSparsePattern(4, 2, 3, homo_head=False, num_heads=HEADS,
                                               num_query_groups=GROUPS,
                                               vert_stride_rule="legacy"), 4 * 6),
    "block_homo": (BlockSparsePattern(4, 1, 2, homo_head=True, num_heads=HEADS,
                                      num_query_groups=GROUPS), 4 * 4),
    "block_stride1": (BlockSparsePattern(4, 1, 1, num_heads=HEADS, num_query_groups=GROUPS), 8),
    "causal": (CausalPattern(), 1),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_cache_holds_exactly_what_future_queries_read(name):
    pattern, horizon = PATTERNS[name]
    max_length = 200
    cache = LayerCache.allocate(pattern, 2, GROUPS, HEADS // GROUPS, DIM, max_length,
                                torch.float32, "cpu")
    chunks = [1, 5, 2, 9, 1, 1, 13, 4, 1, 7, 30, 1, 1, 1, 16, 3]
    for lengths in fill(cache, chunks):
        for b in range(2):
            for g in range(GROUPS):
                want = readable(pattern, int(lengths[b]), g * (HEADS // GROUPS), horizon)
                assert set(cache.held_positions(b, g)) == want, (name, int(lengths[b]), g)
                held = cache.pos[b, g] >= 0
                # Each slot holds the K/V written for its position.
                torch.testing.assert_close(cache.k[b, g, held, 0], cache.pos[b, g, held].float())
                torch.testing.assert_close(cache.v[b, g, held, 0], -cache.pos[b, g, held].float())
    assert int(lengths.min()) > 90  # several windows / blocks deep


def test_heterogeneous_heads_keep_different_blocks():
    pattern, _ = PATTERNS["block_hetero"]
    cache = LayerCache.allocate(pattern, 2, GROUPS, HEADS // GROUPS, DIM, 64, torch.float32, "cpu")
    for _ in fill(cache, [40]):
        pass
    assert cache.held_positions(0, 0) != cache.held_positions(0, 1)


@pytest.mark.parametrize("max_length", [64, 4096])
def test_attn_sink_memory_does_not_grow_with_length(max_length):
    sink, window = 4, 16
    pattern = AttnSinkPattern(sink, window)
    cache = LayerCache.allocate(pattern, 2, GROUPS, 2, DIM, max_length, torch.float32, "cpu")
    assert cache.k.shape[2] == min(sink + window - 1, max_length)
    steps = [1] * 20 + [7] * 5 + [1] * 10  # lengths up to several times the window
    for lengths in fill(cache, steps):
        assert int(cache.used_slots().max()) <= sink + window - 1
    assert int(lengths.min()) >= 3 * window


@pytest.mark.parametrize("rule,per_stride,bound", [("legacy", 1, 1 / 3), ("cover", 2, 0.6)])
def test_block_sparse_memory_is_local_ring_plus_vertical_blocks(rule, per_stride, bound):
    """With 2 groups at stride 4, ``cover`` keeps ceil(4 / 2) = 2 blocks in every 4."""
    block, local, stride, max_length = 16, 2, 4, 1024
    pattern = BlockSparsePattern(block, local, stride, homo_head=False, num_heads=HEADS,
                                 num_query_groups=GROUPS, vert_stride_rule=rule)
    cache = LayerCache.allocate(pattern, 1, GROUPS, 2, DIM, max_length, torch.float32, "cpu")
    n_blocks = max_length // block
    assert cache.k.shape[2] == (local + n_blocks // stride * per_stride) * block
    assert cache.k.shape[2] < max_length * bound


def test_report_per_kind_and_total():
    patterns = [AttnSinkPattern(2, 8), CausalPattern(), AttnSinkPattern(2, 8)]
    cache = KVCache.allocate(patterns, batch=1, num_query_groups=2, num_heads=4, head_dim=8,
                             max_length=100)
    by_kind = cache.nbytes_by_kind()
    assert by_kind == {"attn_sink": 2 * 2 * (2 * 9 * 8) * 4, "causal": 2 * (2 * 100 * 8) * 4}
    assert cache.nbytes() == sum(by_kind.values())
    assert "total" in cache.report()
