"""Same tokens through an HF model and a Megatron model; compare the logits."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_longgen.checkpoint.errors import ConversionError

# Max abs logit difference allowed by default, per dtype of the compared models.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.5, "fp16": 0.1}
MIN_COSINE = {"fp32": 0.99999, "bf16": 0.995, "fp16": 0.999}


@dataclass
class LogitComparison:
    max_abs_diff: float
    min_cosine: float
    next_token_agreement: float
    tokens: int
    tolerance: float
    min_cosine_required: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.min_cosine >= self.min_cosine_required

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"verify {verdict}: {self.tokens} tokens, max |logit diff| {self.max_abs_diff:.3e} "
                f"(tolerance {self.tolerance:g}), min cosine {self.min_cosine:.6f} "
                f"(required {self.min_cosine_required}), next-token agreement "
                f"{100 * self.next_token_agreement:.1f}%")


def sample_tokens(vocab_size: int, batch: int = 2, seq_length: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_length), generator=g)


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model(ids, pos, None)[..., :vocab_size].float()


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def compare(hf: torch.Tensor, megatron: torch.Tensor, dtype: str, tolerance=None) -> LogitComparison:
    if hf.shape != megatron.shape:
        raise ConversionError(f"logit shapes differ: HF {tuple(hf.shape)} vs Megatron {tuple(megatron.shape)}")
    a, b = hf.reshape(-1, hf.shape[-1]), megatron.reshape(-1, hf.shape[-1])
    return LogitComparison(
        max_abs_diff=float((a - b).abs().max()),
        min_cosine=float(F.cosine_similarity(a, b, dim=-1).min()),
        next_token_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        tokens=a.shape[0],
        tolerance=DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance),
        min_cosine_required=MIN_COSINE[dtype],
    )


def check(result: LogitComparison) -> LogitComparison:
    """Print the comparison; raise past tolerance."""
    print(result.summary(), file=sys.stderr, flush=True)
    if not result.passed:
        raise ConversionError(result.summary())
    return result


def add_verify_arguments(parser, what: str) -> None:
    """``--verify`` and its settings, shared by both conversion tools."""
    group = parser.add_argument_group("verification")
    group.add_argument("--verify", action="store_true", help=what)
    group.add_argument("--verify-seq-length", type=int, default=128,
                       help="tokens per sequence of the comparison (2 sequences); longer than the "
                            "sliding window or block span to exercise the sparse layers")
    group.add_argument("--verify-tolerance", type=float, default=None,
                       help="max |logit diff| allowed (default: 1e-3 fp32, 0.1 fp16, 0.5 bf16)")
