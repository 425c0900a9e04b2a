"""Block-sparse flash attention in Triton, driven by ``patterns.block_layout``."""

from megatron_longgen.attention.triton_kernels.sparse_attention import (
    DEFAULT_TILES,
    Tiles,
    default_tiles,
    sparse_attention,
)

__all__ = ["DEFAULT_TILES", "Tiles", "default_tiles", "sparse_attention"]
