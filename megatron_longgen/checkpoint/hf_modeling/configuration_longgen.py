"""Config of an exported LongGen model: a Llama config plus the family and hybrid-attention
fields."""

import inspect

from transformers.models.llama.configuration_llama import LlamaConfig

SPARSE_PATTERNS = ("attn_sink", "block_sparse")
VERT_STRIDE_RULES = ("cover", "legacy")

# transformers before 5.0 read RoPE from rope_theta and rope_scaling; later ones from
# rope_parameters (which the export writes) and ignore the old keys.
_READS_ROPE_SCALING = "rope_scaling" in inspect.signature(LlamaConfig.__init__).parameters


def _rope_in_installed_format(kwargs: dict) -> dict:
    """kwargs with ``rope_parameters`` also given as rope_theta / rope_scaling where the
    installed LlamaConfig reads only those (else a llama3-scaled export would run plain RoPE)."""
    params = kwargs.get("rope_parameters")
    if not _READS_ROPE_SCALING or not params:
        return kwargs
    params = dict(params)
    kwargs = dict(kwargs)
    if "rope_theta" in params:
        kwargs["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default" and kwargs.get("rope_scaling") is None:
        kwargs["rope_scaling"] = params
    return kwargs


class LongGenConfig(LlamaConfig):
    """The source family's architecture: Llama's fields (``head_dim``, ``rope_parameters``
    incl. llama3 scaling, ``tie_word_embeddings``, ``rms_norm_eps``) plus ``qkv_bias`` (biases
    on the q, k and v projections only, as Qwen2; not o_proj) and ``qk_norm`` (per-head RMSNorm
    on q and k before RoPE, as Qwen3). Both default to False, Llama's, so older exports load
    as they were written.

    ``full_attention_layers`` (0-based) keep causal attention; every other layer uses
    ``sparse_attention``. Placement names are resolved at export so this file needs no rule
    for them; ``full_attention_placement`` / ``full_attention_ratio`` are kept for reference.
    ``vert_stride_rule`` defaults to ``legacy``: exports written before it was recorded used
    that rule."""

    model_type = "longgen"

    def __init__(
        self,
        sparse_attention="attn_sink",
        sink_tokens=64,
        sliding_window_size=4096,
        sparse_block_size=64,
        local_blocks=16,
        vert_stride=8,
        homo_head=False,
        vert_stride_rule="legacy",
        full_attention_layers=None,
        full_attention_placement=None,
        full_attention_ratio=None,
        qkv_bias=False,
        qk_norm=False,
        **kwargs,
    ):
        if sparse_attention not in SPARSE_PATTERNS:
            raise ValueError(f"sparse_attention must be one of {SPARSE_PATTERNS}, got {sparse_attention!r}")
        self.sparse_attention = sparse_attention
        self.sink_tokens = int(sink_tokens)
        self.sliding_window_size = int(sliding_window_size)
        self.sparse_block_size = int(sparse_block_size)
        self.local_blocks = int(local_blocks)
        self.vert_stride = int(vert_stride)
        self.homo_head = bool(homo_head)
        if vert_stride_rule not in VERT_STRIDE_RULES:
            raise ValueError(f"vert_stride_rule must be one of {VERT_STRIDE_RULES}, got {vert_stride_rule!r}")
        self.vert_stride_rule = vert_stride_rule
        self.full_attention_layers = None if full_attention_layers is None else [int(i) for i in full_attention_layers]
        self.full_attention_placement = full_attention_placement
        self.full_attention_ratio = full_attention_ratio
        self.qkv_bias = bool(qkv_bias)
        self.qk_norm = bool(qk_norm)
        super().__init__(**_rope_in_installed_format(kwargs))
        if self.full_attention_layers is None:  # no LongGen layout given: every layer full
            self.full_attention_layers = list(range(self.num_hidden_layers))
