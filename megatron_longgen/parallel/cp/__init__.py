"""Context-parallel pieces: layout and sharding, static plans, per-chunk compute, ring
attention, pattern-aware K/V exchange, communication accounting. The public entry point is
``megatron_longgen.parallel.context_parallel``."""
