"""The engine's fast path: prefill with the training attention kernels, decode with the split-K
kernel over the compact caches and the fused decode kernels, replayed as CUDA graphs.

Prefill goes layer by layer over the whole (right-padded) prompt batch. Per layer, Q/K/V of
every position are computed ``chunk_size`` positions at a time, then one call of a training
backend (``attention/backends.py``, the one ``auto`` picks: fa4 or SDPA for full layers, fa4
or Flex for AttnSink, our Triton kernel for BlockSparse) attends over the whole prompt, so a
sparse layer computes only the tiles its pattern allows and no L x L mask exists. Full layers
write their K/V straight into their cache (slot = position); sparse layers keep them in a
temporary that ``LayerCache.write`` trims to what the cache keeps, and that is freed before the
next layer. Padding sits after each prompt's last token, so causal attention never lets a real
token read it. The MLP and projections then run chunk by chunk in place. Peak extra memory is
a few [batch, heads, L, d] tensors of one layer.

Decode runs one token per sequence through ``decode_kernel.decode_attention`` and the kernels
of ``decode_ops`` (QKV split + RoPE + a full layer's cache write, the sparse layers' cache
write, gate/up + SwiGLU, residual + RMSNorm), with no host synchronisation and fixed shapes,
which makes the whole step capturable: on CUDA the first step runs eagerly (compiling and
tuning the kernels), the second is captured as a CUDA graph, and every later step replays it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megatron_longgen.attention.backends import Backend, resolve_backend
from megatron_longgen.inference import decode_ops
from megatron_longgen.inference.decode_kernel import decode_attention
from megatron_longgen.inference.kv_cache import FullSlots, KVCache, LayerCache
from megatron_longgen.inference.layer_ops import (
    finish_layer,
    norm,
    output_layer,
    output_logits,
    project_qkv,
)

def check_fast_path(engine) -> None:
    """Clear errors for what the fast path cannot run."""
    d = engine.config.kv_channels
    if d < 16 or d & (d - 1):
        raise ValueError(f"the fast inference path needs a head dim that is a power of two >= 16 "
                         f"(got {d}); use attention='exact'")
    if not engine.param.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the fast inference path runs Triton kernels on CUDA (on CPU only "
                         "under TRITON_INTERPRET=1, for tests); use attention='exact'")


def prefill_backend(name: str, pattern, device: torch.device) -> Backend:
    """The training backend of a layer's prefill: ``auto`` is the registry's own choice
    (``attention/backends.py``; fa4 for causal and AttnSink layers where flash-attn-4 is
    installed, its forward 1.2-1.4x the next one's at 128K)."""
    return resolve_backend(name, pattern, device)


# ---- prefill ----


def _spans(length: int, chunk: int):
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


@torch.no_grad()
def fast_prefill(engine, ids: torch.Tensor, lengths: torch.Tensor,
                 chunk_size: int) -> Tuple[KVCache, torch.Tensor]:
    """A fresh cache holding the right-padded prompts ``ids`` [b, L] of ``lengths`` [b], and
    the logits [b, vocab] after each prompt's last token."""
    model = engine.model
    batch, longest = ids.shape
    cache = engine.new_cache(batch)
    positions = torch.arange(longest, device=ids.device)
    valid = positions[None] < lengths[:, None]
    x = model.embedding(input_ids=ids, position_ids=positions[None].expand(batch, -1))
    freqs = engine.rope[:longest][None, None]  # [1, 1, L, d]
    spans = _spans(longest, chunk_size)
    for layer, lc in zip(engine.layers, cache.layers):
        _prefill_layer(engine, layer, lc, x, freqs, positions, valid, lengths, spans)
    last = x[lengths - 1, torch.arange(batch, device=ids.device)]  # [b, hidden]
    logits = output_logits(model, last[None])
    cache.lengths = lengths.clone()
    return cache, logits[0].float()


def _prefill_layer(engine, layer, lc: LayerCache, x, freqs, positions, valid, lengths, spans):
    """One layer over the whole prompt; updates ``x`` [L, b, hidden] in place."""
    attn = layer.self_attention
    core = attn.core_attention
    longest, batch = x.shape[:2]
    heads, groups = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    d = attn.hidden_size_per_attention_head
    full = isinstance(lc.layout, FullSlots)
    q_all = x.new_empty(batch, heads, longest, d)
    if full:  # slot = position: K/V go straight into the cache, no copy of them exists
        k_all, v_all = lc.k[:, :, :longest], lc.v[:, :, :longest]
    else:
        k_all, v_all = x.new_empty(batch, groups, longest, d), x.new_empty(batch, groups, longest, d)
    for s, e in spans:
        project_qkv(attn, norm(layer.input_layernorm, x[s:e], fused=True), freqs[:, :, s:e],
                    engine.config.rotary_interleaved, fused=True,
                    out=(q_all[:, :, s:e], k_all[:, :, s:e], v_all[:, :, s:e]))
    backend = prefill_backend(engine.prefill_backend, core.pattern, x.device)
    out = backend.fn(q_all, k_all, v_all, pattern=core.pattern, heads=core.global_heads,
                     scale=core.softmax_scale, cu_seqlens=None)  # [b, heads, L, d]
    del q_all
    if full:
        lc.pos[:, :, :longest] = torch.where(valid, positions, -1)[:, None]
    else:
        lc.write(k_all, v_all, positions.expand(batch, -1), valid, lengths)
    del k_all, v_all
    for s, e in spans:
        attn_out = out[:, :, s:e].permute(2, 0, 1, 3).reshape(e - s, batch, heads * d)
        x[s:e] = finish_layer(layer, x[s:e], attn_out, fused=True)


# ---- decode ----


@dataclass
class _DecodeLayer:
    layer: object
    cache: LayerCache
    head_offsets: torch.Tensor  # [kv_heads] int32: BlockSparse vertical offsets, else zeros
    write: dict  # decode_ops.write_params of the cache
    full: bool
    fused_rope: bool  # QKV split + RoPE (+ a full layer's cache write) in one kernel
    next_norm: object  # the norm after this layer: the next input norm or the final norm


class DecodeStep:
    """One decode step (one token per sequence) through the fast kernels. It issues no host
    synchronisation and allocates only fixed-size temporaries, so it can be graph-captured.

    Each residual add runs with the norm after it (``decode_ops.add_norm``), so the loop keeps
    the residual ``x`` and the normed rows ``h`` of the next block."""

    def __init__(self, engine, cache: KVCache, num_splits: Optional[int] = None):
        self.engine, self.cache, self.num_splits = engine, cache, num_splits
        model = engine.model
        norms = [layer.input_layernorm for layer in engine.layers[1:]]
        norms.append(model.decoder.final_layernorm)
        self.layers: List[_DecodeLayer] = []
        for layer, lc, next_norm in zip(engine.layers, cache.layers, norms):
            # The offsets are computed once here: they read the pattern on the host.
            self.layers.append(_DecodeLayer(
                layer, lc, lc.offsets.view(-1).to(torch.int32), decode_ops.write_params(lc),
                isinstance(lc.layout, FullSlots),
                decode_ops.fusable_rope(layer.self_attention, engine.rope), next_norm))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        engine, cache = self.engine, self.cache
        model = engine.model
        pos = cache.lengths  # the new tokens' positions
        x = model.embedding(input_ids=tokens.view(-1, 1), position_ids=pos.view(-1, 1))
        h = norm(engine.layers[0].input_layernorm, x, fused=True)
        for entry in self.layers:
            layer = entry.layer
            out, bias = decode_ops.linear(layer.self_attention.linear_proj,
                                          self._attend(entry, h, pos))
            x, h = decode_ops.add_norm(x, out, bias, layer.pre_mlp_layernorm)
            out, bias = decode_ops.mlp(layer.mlp, h)
            x, h = decode_ops.add_norm(x, out, bias, entry.next_norm)
        logits = output_layer(model, h)
        cache.lengths.add_(1)  # in place: a captured graph keeps reading this tensor
        return logits[0].float()

    def _attend(self, entry: _DecodeLayer, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The attention output [1, b, heads * d] of normed rows h [1, b, hidden]; writes the
        new K/V into the layer's cache."""
        engine, lc = self.engine, entry.cache
        attn = entry.layer.self_attention
        core = attn.core_attention
        interleaved = engine.config.rotary_interleaved
        if entry.fused_rope:
            qkv, _ = decode_ops.linear(attn.linear_qkv, h)  # no bias: fusable_rope
            q, k, v = decode_ops.rope_qkv(attn, qkv, engine.rope, pos, interleaved,
                                          full_cache=lc if entry.full else None)
        else:
            freqs = engine.rope[pos.clamp(max=engine.max_length - 1)][:, None, None]
            q, k, v = (t[:, :, 0].contiguous()
                       for t in project_qkv(attn, h, freqs, interleaved, fused=True))
        out = decode_attention(q, k, v, lc.k, lc.v, lc.pos, pos, core.pattern, entry.head_offsets,
                               core.softmax_scale, entry.full, self.num_splits)
        if not (entry.fused_rope and entry.full):  # after attention: it may evict what it read
            decode_ops.write_token(lc, k, v, pos, entry.head_offsets, entry.write)
        return out.reshape(1, out.shape[0], -1)


class FastDecoder:
    """Decode steps over one cache: eager, or on CUDA as a replayed CUDA graph."""

    def __init__(self, engine, cache: KVCache, num_splits: Optional[int] = None):
        self.cache, self.lengths = cache, cache.lengths
        self.step = DecodeStep(engine, cache, num_splits)
        self.max_length = engine.max_length
        self.longest = int(cache.lengths.max())  # one sync per cache; steps count on the host
        self.use_graph = engine.cuda_graphs and cache.lengths.is_cuda
        self.tokens = torch.zeros_like(cache.lengths)
        self.graph, self.logits, self.warm = None, None, False

    def serves(self, cache: KVCache) -> bool:
        """Still bound to this cache (the exact path replaces ``lengths``, which a graph reads)."""
        return cache is self.cache and cache.lengths is self.lengths

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.longest + 1 > self.max_length:
            raise ValueError(f"sequence length {self.longest + 1} exceeds max_length "
                             f"{self.max_length}")
        self.longest += 1
        self.tokens.copy_(tokens.view(-1))
        if not self.use_graph:
            return self.step(self.tokens)
        if not self.warm:  # compile and tune the kernels, initialise cuBLAS: outside a capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.step(self.tokens)
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return logits
        if self.graph is None:  # capturing records the step without running it
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.tokens)
        self.graph.replay()
        return self.logits.clone()
