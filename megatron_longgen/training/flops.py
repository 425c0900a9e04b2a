"""FLOPs of a training step, counting the attention pairs each layer's pattern really computes."""

from __future__ import annotations

from megatron_longgen.attention.patterns import allowed_pair_count
from megatron_longgen.config import LongGenConfig


def attention_pairs_per_sequence(config: LongGenConfig, seq_length: int) -> int:
    """(query, key) pairs computed per sequence, summed over layers and heads."""
    cache = {}
    total = 0
    for layer_number in range(1, config.num_layers + 1):
        pattern = config.layer_pattern(layer_number)
        if pattern not in cache:
            cache[pattern] = allowed_pair_count(
                pattern, seq_length, num_heads=config.num_attention_heads)
        total += cache[pattern]
    return total


def training_flops_per_sequence(config: LongGenConfig, seq_length: int, vocab_size: int) -> float:
    """Model FLOPs of forward + backward (3x forward) for one sequence, no recomputation."""
    h, kv = config.hidden_size, config.kv_channels * config.num_query_groups
    ffn = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    dense_params_per_layer = h * (h + 2 * kv) + h * h + h * ffn + config.ffn_hidden_size * h
    dense = 2 * seq_length * (config.num_layers * dense_params_per_layer + h * vocab_size)
    attention = 4 * config.kv_channels * attention_pairs_per_sequence(config, seq_length)
    return 3.0 * (dense + attention)
