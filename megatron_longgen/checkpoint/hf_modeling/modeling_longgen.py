"""LongGen for HF transformers: a Llama whose sparse layers apply a static attention pattern.

One model runs the Llama-family sources (Llama-2/3.x, Mistral, Qwen2(.5), Qwen3): RoPE
(llama3 scaling included), ``head_dim`` and tying come from the Llama config; ``qkv_bias``
(Qwen2) and ``qk_norm`` (Qwen3) from ``LongGenConfig``. Full layers are ``LlamaAttention``
with those two additions (``LongGenAttention``); a Mistral-style native window is an
``attn_sink`` layer with no sink tokens. Sparse layers compute attention in plain torch
(SDPA with a boolean mask) on CPU and for short queries (decoding); on GPU a prompt runs
through FlexAttention with the same rule as a block mask, so no L x L mask is built. The pattern rules below are the same
as the training code's: a query at position q reads key k (k <= q) when

* ``attn_sink``: ``k < sink_tokens`` or ``q - k < sliding_window_size``;
* ``block_sparse``: with blocks qb = q // B, kb = k // B, ``qb - kb < local_blocks`` or
  ``(kb + 1 + offset) % vert_stride % period == 0``. With ``homo_head``: offset 0, period
  ``vert_stride``. Otherwise, for the query group g of the head (G = num_key_value_heads),
  by ``vert_stride_rule``: ``cover``: offset ``g % vert_stride``, period ``min(G,
  vert_stride)`` (the groups together read every block); ``legacy``: offset
  ``g * max(1, vert_stride // G) % vert_stride``, period ``vert_stride``.

Positions count from the first token in the cache (no left padding in sparse layers).
``generate()`` uses ``LongGenCache`` by default: sparse layers keep only the tokens their
pattern can still read (see ``LongGenPatternLayer``), full layers keep everything.
This file must stay self-contained: it is copied into exported model folders.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn

# The oldest transformers the cache and generation code below is tested on (pyproject.toml
# declares the same). Older ones lack the per-layer cache API: refuse them with one clear line.
MIN_TRANSFORMERS = "4.57.6"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(f"this LongGen model needs transformers>={MIN_TRANSFORMERS}, but "
                      f"{transformers.__version__} is installed: "
                      f"pip install 'transformers>={MIN_TRANSFORMERS}'")

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    repeat_kv,
)

from .configuration_longgen import LongGenConfig

# transformers 5.24 renamed the cache argument and output field past_key_values -> cache. A
# name a version does not know is swallowed by **kwargs: full layers would run without the
# cache while sparse layers write to it, wrong logits without an error. So the model takes
# either name on every version and passes the installed one on.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def _cache_under_installed_name(kwargs: dict) -> dict:
    """kwargs with a cache passed as ``cache`` or ``past_key_values`` under ``CACHE_ARG``."""
    other = "past_key_values" if CACHE_ARG == "cache" else "cache"
    if other in kwargs:
        cache = kwargs.pop(other)
        if cache is not None and kwargs.get(CACHE_ARG) is not None:
            raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
        if cache is not None:
            kwargs[CACHE_ARG] = cache
    return kwargs


def _pattern_allowed(config, q, k, offsets):
    """The pattern rule on broadcastable absolute positions q, k (k < 0 = empty slot)."""
    causal = (k >= 0) & (k <= q)
    if config.sparse_attention == "attn_sink":
        return causal & ((k < config.sink_tokens) | (q - k < config.sliding_window_size))
    qb, kb = q // config.sparse_block_size, k // config.sparse_block_size
    return causal & ((qb - kb < config.local_blocks) | _vertical(config, kb, offsets))


def longgen_sparse_mask(config, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean mask [H or 1, len(q_pos), len(k_pos)] of a sparse layer (True = attend).

    H = num_attention_heads when heads differ (block_sparse without homo_head), else 1.
    """
    q, k = q_pos.long()[None, :, None], k_pos.long()[None, None, :]
    offsets = _head_offsets(config, q.device)
    if config.sparse_attention == "attn_sink" or not bool(offsets.any()):
        offsets = offsets[:1]  # one mask shared by every head
    return _pattern_allowed(config, q, k, offsets.view(-1, 1, 1))


def _covering(config) -> bool:
    return not config.homo_head and config.vert_stride_rule == "cover"


def _vertical_period(config) -> int:
    return min(config.num_key_value_heads, config.vert_stride) if _covering(config) else config.vert_stride


def _vertical(config, kb, offsets):
    """Whether key block kb is a vertical block of heads with these offsets."""
    return (kb + 1 + offsets) % config.vert_stride % _vertical_period(config) == 0


def _vertical_index(config, kb, offsets):
    """How many vertical blocks of heads with these offsets come before key block kb."""
    stride, period = config.vert_stride, _vertical_period(config)
    per_stride = -(-stride // period)

    def upto(n):  # vertical residues x in [0, n): (x % stride) % period == 0
        return n // stride * per_stride + (n % stride + period - 1) // period

    return upto(kb + 1 + offsets) - upto(1 + offsets)


def _head_offsets(config, device) -> torch.Tensor:
    heads = torch.arange(config.num_attention_heads, device=device)
    groups, stride = config.num_key_value_heads, config.vert_stride
    if config.homo_head or groups == 1 or stride == 1:
        return torch.zeros_like(heads)
    step = 1 if _covering(config) else max(1, stride // groups)
    return ((heads // (config.num_attention_heads // groups)) * step) % stride


_BLOCK_MASKS = {}
_PATTERN_FIELDS = ("sparse_attention", "sink_tokens", "sliding_window_size", "sparse_block_size",
                   "local_blocks", "vert_stride", "homo_head", "vert_stride_rule",
                   "num_attention_heads", "num_key_value_heads")


def flex_sparse_attention(config, query, key, value, scale: float, compile: bool = True):
    """The sparse layer through FlexAttention: q [b, h, q_len, d] at the last q_len positions
    of k [b, h_kv, k_len, d]. Block masks are cached per (pattern, lengths, device)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_len, k_len, heads = query.shape[2], key.shape[2], query.shape[1]
    # The cache is shared by every model in the process: key it by the pattern too.
    pattern = tuple(getattr(config, name) for name in _PATTERN_FIELDS)
    cache_key = (pattern, q_len, k_len, heads, str(query.device), compile)
    if cache_key not in _BLOCK_MASKS:
        offset_q = k_len - q_len
        head_offsets = _head_offsets(config, query.device)

        def mask_mod(b, h, q_idx, kv_idx):
            q = q_idx + offset_q
            causal = kv_idx <= q
            if config.sparse_attention == "attn_sink":
                return causal & ((kv_idx < config.sink_tokens) | (q - kv_idx < config.sliding_window_size))
            qb, kb = q // config.sparse_block_size, kv_idx // config.sparse_block_size
            return causal & ((qb - kb < config.local_blocks) | _vertical(config, kb, head_offsets[h]))

        _BLOCK_MASKS[cache_key] = create_block_mask(
            mask_mod, None, heads, q_len, k_len, device=query.device, _compile=compile)
    attend = torch.compile(flex_attention) if compile else flex_attention
    return attend(query, key, value, block_mask=_BLOCK_MASKS[cache_key], scale=scale,
                  enable_gqa=query.shape[1] != key.shape[1])


def _allowed_from_hf_mask(attention_mask, q_len: int, k_len: int):
    """HF passes None, a boolean mask (True = attend) or an additive float mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[..., -q_len:, :k_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _kv_head_offsets(config, device) -> torch.Tensor:
    """Vertical-stride offset of each KV head (all query heads of a group share it)."""
    per_group = config.num_attention_heads // config.num_key_value_heads
    return _head_offsets(config, device)[::per_group]


class LongGenPatternLayer(CacheLayerMixin):
    """KV cache of one sparse layer holding only what its pattern can still read.

    ``keys``/``values`` [batch, kv_heads, slots, head_dim] and ``positions`` [batch, kv_heads,
    slots] (absolute position of each slot, -1 = empty). Slot rules, per KV head:

    * ``attn_sink``: the sink tokens, then a ring of the last ``window - 1`` tokens (the next
      query reads itself from the new chunk, not from the cache);
    * ``block_sparse``: a ring of the last ``local_blocks`` blocks (non-vertical blocks only),
      then one block per vertical-stride block of the head up to ``max_length``.

    After each write every token no future query can read is dropped, so the size is fixed
    by the pattern, not by the length. Masks are rebuilt from ``positions``, so slot order
    never matters.
    """

    is_sliding = True  # HF builds its shared mask from a full layer, not from this one

    def __init__(self, config, max_length: int):
        super().__init__()
        self.config, self.max_length = config, int(max_length)
        self.positions = self.positions_for_attention = None
        self.cumulative_length = 0  # tokens seen; positions of a new chunk continue from it

    # ---- slot layout ----

    @property
    def local_blocks(self) -> int:  # no more ring blocks than the longest sequence has
        return min(self.config.local_blocks, math.ceil(self.max_length / self.config.sparse_block_size))

    def capacity(self, offsets: torch.Tensor) -> int:
        c = self.config
        if c.sparse_attention == "attn_sink":
            return min(c.sink_tokens + max(c.sliding_window_size - 1, 0), self.max_length)
        blocks = torch.arange(math.ceil(self.max_length / c.sparse_block_size), device=offsets.device)
        vertical = int(_vertical(c, blocks[None], offsets[:, None]).sum(-1).max())
        return (self.local_blocks + vertical) * c.sparse_block_size

    def _keep(self, pos, length, offsets):
        """Whether a future query (position >= length) can still read the key at pos."""
        c = self.config
        if c.sparse_attention == "attn_sink":
            return (pos >= 0) & ((pos < c.sink_tokens) | (length - pos < c.sliding_window_size))
        block = pos // c.sparse_block_size
        local = length // c.sparse_block_size - block < c.local_blocks
        return (pos >= 0) & (local | _vertical(c, block, offsets))

    def _slot(self, pos, offsets):
        c = self.config
        if c.sparse_attention == "attn_sink":
            ring = max(c.sliding_window_size - 1, 1)
            return torch.where(pos < c.sink_tokens, pos, (pos - c.sink_tokens) % ring + c.sink_tokens)
        b, block, inner = c.sparse_block_size, pos // c.sparse_block_size, pos % c.sparse_block_size
        ring = (block % self.local_blocks) * b + inner
        vertical = (self.local_blocks + _vertical_index(c, block, offsets)) * b + inner
        return torch.where(_vertical(c, block, offsets), vertical, ring)

    # ---- HF cache-layer interface ----

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self.offsets = _kv_head_offsets(self.config, self.device).view(1, -1, 1)
        n = self.capacity(self.offsets.view(-1))
        self.keys = key_states.new_zeros(batch, heads, n, dim)
        self.values = value_states.new_zeros(batch, heads, n, value_states.shape[-1])
        self.positions = torch.full((batch, heads, n), -1, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Returns the held keys/values followed by the new chunk's (``positions_for_attention``
        gives their positions): the chunk's own queries may read tokens the write evicts."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        chunk = key_states.shape[2]
        start, length = self.cumulative_length, self.cumulative_length + chunk
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds the cache's max_length {self.max_length}")
        new_pos = torch.arange(start, length, device=self.device).expand(*self.positions.shape[:2], -1)
        keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=2)
        values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=2)
        self.positions_for_attention = torch.cat([self.positions, new_pos], dim=2)

        # Evict first: a kept new token may reuse the slot of an evicted one.
        self.positions.masked_fill_(~self._keep(self.positions, length, self.offsets), -1)
        b, h, c = self._keep(new_pos, length, self.offsets).expand(self.keys.shape[0], -1, -1).nonzero(as_tuple=True)
        slot = self._slot(new_pos, self.offsets).expand(self.keys.shape[0], -1, -1)[b, h, c]
        self.keys[b, h, slot] = key_states[b, h, c].to(self.keys.dtype)
        self.values[b, h, slot] = value_states[b, h, c].to(self.values.dtype)
        self.positions[b, h, slot] = start + c
        self.cumulative_length = length
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Only used when no layer is full; sparse layers build their own mask from positions.
        # Older transformers (5.0 among them) pass the chunk's cache_position, not its length.
        if torch.is_tensor(query_length):
            query_length = query_length.shape[-1]
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_length

    get_max_cache_shape = get_max_length  # its name in older transformers (5.0 among them)

    def nbytes(self) -> int:
        """Bytes of K and V (positions are bookkeeping and not counted)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self):
        super().reset()
        if self.is_initialized:
            self.positions.fill_(-1)

    def _select(self, fn):
        if self.is_initialized:
            self.keys, self.values, self.positions = fn(self.keys), fn(self.values), fn(self.positions)

    def reorder_cache(self, beam_idx):
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._select(lambda t: t[indices])


class LongGenCache(Cache):
    """Cache of a LongGen model: full layers grow with the sequence (HF ``DynamicLayer``),
    sparse layers are ``LongGenPatternLayer``s of fixed, pattern-sized capacity.

    ``max_length`` (default ``max_position_embeddings``) bounds the sequence; BlockSparse layers
    size their vertical-stride region from it."""

    def __init__(self, config, max_length: int | None = None):
        max_length = config.max_position_embeddings if max_length is None else int(max_length)
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        full = set(config.full_attention_layers)
        self.kinds = ["full" if i in full else config.sparse_attention for i in range(config.num_hidden_layers)]
        super().__init__(layers=[DynamicLayer() if kind == "full" else LongGenPatternLayer(config, max_length)
                                 for kind in self.kinds])

    def nbytes_by_kind(self) -> dict:
        """Bytes of K and V now held, summed per layer kind ("full", "attn_sink", "block_sparse")."""
        out = {}
        for kind, layer in zip(self.kinds, self.layers):
            if isinstance(layer, LongGenPatternLayer):
                n = layer.nbytes()
            else:
                n = 0 if not layer.is_initialized else 2 * layer.keys.numel() * layer.keys.element_size()
            out[kind] = out.get(kind, 0) + n
        return out

    def report(self) -> str:
        parts = [f"{kind}: {n / 2**20:.2f} MiB" for kind, n in sorted(self.nbytes_by_kind().items())]
        return ", ".join(parts + [f"total: {sum(self.nbytes_by_kind().values()) / 2**20:.2f} MiB"])


class LongGenAttention(LlamaAttention):
    """LlamaAttention plus the family options: ``qkv_bias`` gives q, k and v projections a
    bias (o_proj keeps none, as Qwen2); ``qk_norm`` adds ``q_norm`` / ``k_norm``, RMSNorm over
    each head's width applied to the q and k projections' output before RoPE (as Qwen3).

    The norms run as forward hooks of q_proj / k_proj, so LlamaAttention's own forward (which
    differs across transformers versions) runs unchanged and the weight names stay the
    family's (``self_attn.q_norm.weight``)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                plain = getattr(self, name)
                setattr(self, name, nn.Linear(plain.in_features, plain.out_features, bias=True))
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.q_proj.register_forward_hook(self._norm_query)
            self.k_proj.register_forward_hook(self._norm_key)

    def _per_head(self, norm, projected):
        return norm(projected.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def _norm_query(self, module, args, projected):
        return self._per_head(self.q_norm, projected)

    def _norm_key(self, module, args, projected):
        return self._per_head(self.k_norm, projected)


class LongGenSparseAttention(LongGenAttention):
    """LongGenAttention (same weights) with the layer's sparse pattern applied."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        if cache is None:  # transformers before 5.24 name the cache past_key_values
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        layer_cache = cache.layers[self.layer_idx] if isinstance(cache, LongGenCache) else None
        if isinstance(layer_cache, LongGenPatternLayer):
            return self._attend_pattern_cache(query, key, value, layer_cache, attention_mask, input_shape)

        q_len, k_len = query.shape[2], key.shape[2]
        device = query.device
        hf_allowed = _allowed_from_hf_mask(attention_mask, q_len, k_len)
        no_padding = hf_allowed is None or bool(hf_allowed[..., -1, :].all())
        if query.is_cuda and q_len > 1 and no_padding:
            out = flex_sparse_attention(self.config, query, key, value, self.scaling)
            out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
            return self.o_proj(out), None
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        allowed = longgen_sparse_mask(self.config, q_pos, torch.arange(k_len, device=device))[None]
        if hf_allowed is not None:
            allowed = allowed & hf_allowed
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=self.scaling)
        # A row with no allowed key (padding) gives NaN in SDPA; its output is defined as 0.
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None

    def _attend_pattern_cache(self, query, key, value, layer_cache, attention_mask, input_shape):
        """Attention over a LongGenPatternLayer's held keys plus the new chunk, masked by the
        pattern at the keys' absolute positions."""
        if attention_mask is not None:
            last_row = attention_mask[..., -1, :]
            allowed = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
            if not bool(allowed.all()):
                # Sparse layers place tokens by absolute position from the first token; with
                # left padding that position differs per row and the pattern would be shifted.
                raise ValueError("LongGenCache does not support padded batches: the sparse layers' "
                                 "pattern needs every row to start at position 0. Generate rows of "
                                 "different lengths separately.")
        q_len = query.shape[2]
        end = layer_cache.cumulative_length
        if query.is_cuda and q_len > 1 and end == q_len:  # a fresh prompt: positions 0..q_len-1
            out = flex_sparse_attention(self.config, query, key[:, :, -q_len:], value[:, :, -q_len:], self.scaling)
        else:
            q_pos = torch.arange(end - q_len, end, device=query.device).view(1, 1, -1, 1)
            k_pos = layer_cache.positions_for_attention.repeat_interleave(self.num_key_value_groups, 1)
            offsets = _head_offsets(self.config, query.device).view(1, -1, 1, 1)
            allowed = _pattern_allowed(self.config, q_pos, k_pos[:, :, None, :], offsets)
            key = repeat_kv(key, self.num_key_value_groups)
            value = repeat_kv(value, self.num_key_value_groups)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=self.scaling)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


class LongGenModel(LlamaModel):
    config_class = LongGenConfig

    def __init__(self, config: LongGenConfig):
        super().__init__(config)
        full = set(config.full_attention_layers)
        for i, layer in enumerate(self.layers):
            attention = LongGenAttention if i in full else LongGenSparseAttention
            layer.self_attn = attention(config, layer_idx=i)
        self.post_init()

    def forward(self, *args, **kwargs):
        return super().forward(*args, **_cache_under_installed_name(kwargs))


class LongGenForCausalLM(LlamaForCausalLM):
    config_class = LongGenConfig

    def __init__(self, config: LongGenConfig):
        # LlamaForCausalLM.__init__ would build a LlamaModel first; build ours only.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LongGenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a LongGenCache unless the caller passes a cache, asks for another
        implementation or turns caching off."""
        if (model_kwargs.get(CACHE_ARG) is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            max_length = generation_config.max_length
            if max_length > self.config.max_position_embeddings:
                raise ValueError(f"prompt plus new tokens ({max_length}) exceed max_position_embeddings "
                                 f"({self.config.max_position_embeddings}) of this LongGen model")
            model_kwargs[CACHE_ARG] = LongGenCache(self.config, max_length)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def generate(self, *args, **kwargs):
        # generate() checks its keyword arguments against forward()'s: translate the cache's name.
        return super().generate(*args, **_cache_under_installed_name(kwargs))


__all__ = ["LongGenAttention", "LongGenCache", "LongGenConfig", "LongGenForCausalLM", "LongGenModel",
           "LongGenPatternLayer", "LongGenSparseAttention",
           "flex_sparse_attention", "longgen_sparse_mask"]
