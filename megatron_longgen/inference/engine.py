"""Pure-torch inference over a LongGen GPTModel with a pattern-sized KV cache.

The engine owns no weights: every projection, norm, the MLP, the embedding, RoPE table and the
output layer are the model's own modules. Only the attention step is written here, because it
reads the compact cache instead of the whole sequence. Single process, TP = PP = 1.

Batches with prompts of different lengths use **per-sequence lengths**: each sequence has its
own positions (starting at 0, as in training) and its own cache slots. Chunks are
right-padded; padded tokens are computed but never written to the cache and their outputs are
ignored. Decode steps feed one token per sequence.

Two attention paths (``attention=``): ``exact`` runs prefill in chunks of ``chunk_size`` tokens,
each chunk's queries attending to what the cache holds plus the chunk's own keys, masked with
``pattern.allowed`` at the true positions (decode is the same step with a chunk of one token);
pure torch, the CPU path and the reference. ``fast`` (``fast_path.py``) prefills layer by layer
with the training attention kernels and decodes with a split-K Triton kernel over the compact
caches and the fused decode kernels of ``decode_ops.py``, replayed as CUDA graphs. ``auto``
picks ``fast`` on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.inference.kv_cache import KVCache, LayerCache
from megatron_longgen.inference.layer_ops import output_logits, project_qkv, run_layer

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[torch.Tensor]]


@dataclass
class InferenceEngine:
    model: torch.nn.Module  # a GPTModel from build_longgen_model (pre and post process)
    max_length: int  # longest sequence (prompt + generated) a cache can hold
    chunk_size: int = 512
    attention: str = "auto"  # "exact", "fast" or "auto" (fast on CUDA)
    prefill_backend: str = "auto"  # fast path: attention backend of prefill (backends.py names)
    cuda_graphs: bool = True  # fast path on CUDA: replay decode steps as CUDA graphs

    def __post_init__(self):
        self.config = self.model.config
        # Tensor parallelism needs nothing of the engine beyond per-rank heads (the caches
        # hold this rank's KV heads) and gathered logits; pipelines are not supported.
        if self.config.pipeline_model_parallel_size != 1:
            raise ValueError("the inference engine runs PP = 1 models only (TP > 1 is supported)")
        if not (self.model.pre_process and self.model.post_process):
            raise ValueError("the inference engine needs the whole model (one pipeline stage)")
        if self.max_length > self.model.max_sequence_length:
            raise ValueError(f"max_length {self.max_length} exceeds the model's "
                             f"max_sequence_length {self.model.max_sequence_length}")
        self.layers = list(self.model.decoder.layers)
        self.param = next(self.model.parameters())
        # RoPE table of Megatron's RotaryEmbedding: [max_length, head_dim].
        with torch.no_grad():
            self.rope = self.model.rotary_pos_emb(self.max_length)[:, 0, 0, :].to(self.param.device)
        if self.attention not in ("auto", "exact", "fast"):
            raise ValueError(f"attention must be 'auto', 'exact' or 'fast', got {self.attention!r}")
        self.fast = self.attention == "fast" or (self.attention == "auto" and self.param.is_cuda)
        self._fast_decoder = None
        if self.fast:
            from megatron_longgen.inference.fast_path import check_fast_path

            check_fast_path(self)

    # ---- cache ----

    def cache_patterns(self) -> list:
        """The pattern each layer's cache is sized and masked by: the model's own."""
        return [layer.self_attention.core_attention.pattern for layer in self.layers]

    def new_cache(self, batch: int) -> KVCache:
        attn = [layer.self_attention for layer in self.layers]
        a = attn[0]
        return KVCache.allocate(
            self.cache_patterns(), batch, a.num_query_groups_per_partition,
            a.num_attention_heads_per_partition, a.hidden_size_per_attention_head,
            self.max_length, self.param.dtype, self.param.device,
            first_heads=[int(x.core_attention.global_heads[0]) for x in attn])

    # ---- one forward step over a chunk ----

    @torch.no_grad()
    def forward_chunk(self, cache: KVCache, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run ``tokens`` [b, c] (right-padded, ``valid`` [b, c]) after what ``cache`` holds and
        write them into it. Returns logits [b, c, vocab] (rows of padding are meaningless)."""
        valid = valid.to(torch.bool)
        n_new = valid.sum(-1)
        new_length = cache.lengths + n_new
        if int(new_length.max()) > self.max_length:
            raise ValueError(f"sequence length {int(new_length.max())} exceeds max_length "
                             f"{self.max_length}")
        pos = cache.lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.model.embedding(input_ids=tokens, position_ids=pos)  # [c, b, h]
        freqs = self.rope[pos.clamp(max=self.max_length - 1)][:, None]  # [b, 1, c, d]
        for layer, lc in zip(self.layers, cache.layers):
            x = self._layer(layer, lc, x, pos, valid, freqs, cache.lengths, new_length)
        logits = output_logits(self.model, x)
        cache.lengths = new_length
        return logits.transpose(0, 1).float()

    def _layer(self, layer, lc: LayerCache, x, pos, valid, freqs, old_length, new_length):
        return run_layer(layer, x, lambda attn, h: self._attention(
            attn, lc, h, pos, valid, freqs, old_length, new_length))

    def _attention(self, attn, lc: LayerCache, x, pos, valid, freqs, old_length, new_length):
        groups = attn.num_query_groups_per_partition  # this rank's heads under TP
        per_group = attn.num_attention_heads_per_partition // groups
        q, k, v = project_qkv(attn, x, freqs, self.config.rotary_interleaved)
        b, s = q.shape[0], q.shape[2]

        # Keys: what the cache still holds (all a query of this chunk may read from before
        # it) plus the chunk itself; masked by the pattern at the true positions.
        k_old, v_old, pos_old = lc.view(upto=int(old_length.max()))
        new_pos = torch.where(valid, pos, -1)[:, None].expand(-1, groups, -1)
        keys, values = torch.cat([k_old, k], 2), torch.cat([v_old, v], 2)
        key_pos = torch.cat([pos_old, new_pos], 2).repeat_interleave(per_group, dim=1)
        heads = attn.core_attention.global_heads.to(pos.device)[None, :, None, None]
        key_pos = key_pos[:, :, None, :]  # [b, hq, 1, keys]
        mask = lc.pattern.allowed(pos[:, None, :, None], key_pos, heads) & (key_pos >= 0)
        out, _ = masked_attention(q, keys, values, mask, attn.core_attention.softmax_scale)

        lc.write(k, v, pos, valid, new_length)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    # ---- prefill and decode ----

    def prefill(self, prompts: Prompts, chunk_size: int = None) -> Tuple[KVCache, torch.Tensor]:
        """A fresh cache holding ``prompts`` (lists of ids of any lengths >= 1) and the logits
        [b, vocab] after each prompt's last token."""
        ids, lengths = pad_prompts(prompts, self.param.device)
        if int(lengths.max()) > self.max_length:
            raise ValueError(f"prompt of {int(lengths.max())} tokens exceeds max_length "
                             f"{self.max_length}")
        chunk = chunk_size or self.chunk_size
        if self.fast:
            from megatron_longgen.inference.fast_path import fast_prefill

            return fast_prefill(self, ids, lengths, chunk)
        cache = self.new_cache(ids.shape[0])
        last = None
        for start in range(0, ids.shape[1], chunk):
            tokens = ids[:, start:start + chunk]
            idx = torch.arange(start, start + tokens.shape[1], device=ids.device)
            valid = idx[None] < lengths[:, None]
            logits = self.forward_chunk(cache, tokens, valid)
            if last is None:
                last = logits.new_zeros(ids.shape[0], logits.shape[-1])
            ends_here = (lengths - 1 >= start) & (lengths - 1 < start + tokens.shape[1])
            rows = ends_here.nonzero().flatten()
            last[rows] = logits[rows, lengths[rows] - 1 - start]
        return cache, last

    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence [b] -> next-token logits [b, vocab]."""
        if self.fast:
            from megatron_longgen.inference.fast_path import FastDecoder

            if self._fast_decoder is None or not self._fast_decoder.serves(cache):
                self._fast_decoder = None  # let a previous cache's buffers (and graph) go first
                self._fast_decoder = FastDecoder(self, cache)
            return self._fast_decoder(tokens)
        tokens = tokens.view(-1, 1)
        return self.forward_chunk(cache, tokens, torch.ones_like(tokens, dtype=torch.bool))[:, 0]


def pad_prompts(prompts: Prompts, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts into [b, longest] ids and their lengths [b]."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        rows: List[torch.Tensor] = list(prompts)
    else:
        rows = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r.to(device)
    return ids, lengths
