"""Token generation over the inference engine: greedy or sampled, stop tokens, streaming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from megatron_longgen.inference.engine import InferenceEngine, Prompts, pad_prompts
from megatron_longgen.utils.cli import fail

# Streaming callback: (sequence index, new token id) for every token as it is chosen.
OnToken = Callable[[int, int], None]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    stop_tokens: Sequence[int] = ()  # a stop token ends its sequence (and is not returned)
    seed: Optional[int] = None

    def __post_init__(self):  # usage errors: these come straight from the CLI's flags
        if self.max_new_tokens < 1:
            fail(f"max_new_tokens (--max-new-tokens) must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            fail(f"temperature (--temperature) must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            fail(f"top_k (--top-k) must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p (--top-p) must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [b, vocab] with everything outside the top-k / nucleus set to -inf."""
    logits = logits.clone()
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator=None) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(engine: InferenceEngine, prompts: Prompts, cfg: Optional[SamplingConfig] = None,
             on_token: Optional[OnToken] = None) -> List[List[int]]:
    """New tokens of each prompt (stop token excluded)."""
    cfg = cfg or SamplingConfig()
    _, lengths = pad_prompts(prompts, "cpu")
    longest = int(lengths.max()) + cfg.max_new_tokens - 1  # the last token is never fed back
    if longest > engine.max_length:
        raise ValueError(f"prompt + max_new_tokens needs {longest} positions, more than "
                         f"max_length {engine.max_length}")
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=engine.param.device).manual_seed(cfg.seed)
    stop = {int(t) for t in cfg.stop_tokens}
    cache, logits = engine.prefill(prompts)
    out: List[List[int]] = [[] for _ in range(len(lengths))]
    done = torch.zeros(len(lengths), dtype=torch.bool)
    for step in range(cfg.max_new_tokens):
        tokens = next_tokens(logits, cfg, generator)
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            if t in stop:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        # Finished sequences keep stepping (batched), their tokens are ignored.
        logits = engine.decode(cache, tokens)
    return out
