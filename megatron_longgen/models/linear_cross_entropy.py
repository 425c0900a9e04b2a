"""Output layer and cross-entropy in one op that never holds the whole sequence's logits.

Megatron's loss path (GPTModel's ``output_layer`` then ``vocab_parallel_cross_entropy``)
keeps the logits of every token, ``[s, b, vocab / TP]``, in bf16, an fp32 copy that becomes
the softmax, and the softmax's gradient: at 128K tokens and vocabulary 32000 about 44 GB.
``linear_cross_entropy`` gives the same per-token loss and the same gradients for the hidden
states and the output weight, but works through the tokens in chunks, so that the logits of
one chunk (``chunk x vocab / TP``, sized in MiB by ``linear_cross_entropy_chunk_mb``) are the
most that exist at a time.

Forward, per chunk: the logits (matmul in the weight's dtype, then fp32, as Megatron), this
rank's log-sum-exp over its vocabulary slice and the target's logit where this rank holds the
target. After the last chunk two all-reduces over the TP group (max, then sum) combine the
ranks' slices: the loss is ``logsumexp - target logit``, and the log-sum-exp (4 bytes a
token) is kept for backward. Backward, per chunk: the logits again, ``softmax - one-hot``
times the loss gradient, then ``grad_h = grad_logits @ W`` and ``grad_W += grad_logits^T @ h``
(accumulated in fp32).

Why recompute the logits in backward instead of computing the gradients in forward (as Liger
does): Megatron's loss is per token, and its gradient (loss mask, per-token normalisation,
loss scale) is known only in backward; gradients made in forward would need the mask inside
the op, and would keep grad_h (as large as h) and grad_W for every micro-batch in flight
anyway. The recomputation costs one more logits matmul, ``2 x tokens x hidden x vocab / TP``
FLOPs: under 1% of a Llama-2-7B training step.

In bf16 each chunk's weight-gradient product is rounded to bf16 before the fp32 sum: against
fp32, that gradient errs about 1.4x as much as Megatron's single matmul does (CUDA's
``torch.mm(..., out_dtype=torch.float32)`` could keep the products in fp32). Under sequence
parallelism the all-gathered hidden states (``s x h``) are kept for backward, where
Megatron's linear keeps this rank's slice and gathers again.

On CUDA the elementwise work of a chunk is one Triton kernel each way (``_chunk_lse`` reads
the chunk's logits once for the log-sum-exp and the target's logit; ``_chunk_grad`` turns them
into the gradient in place), the same fp32 arithmetic as the torch ops they replace (which
read and write an fp32 copy of the logits four times); elsewhere the torch ops run.

Chunks run over tokens, not over the vocabulary: then grad_h of each chunk is final and only
grad_W (``vocab / TP x hidden``) accumulates across chunks; over the vocabulary it would be
grad_h (``tokens x hidden``), larger at long context.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

MiB = 2 ** 20


def chunk_tokens(chunk_mb: float, vocab_per_rank: int) -> int:
    """Tokens per chunk whose fp32 logits take at most ``chunk_mb`` MiB (at least one token)."""
    return max(1, int(chunk_mb * MiB) // (4 * vocab_per_rank))


@triton.jit
def _chunk_lse_kernel(LOGITS, TARGET, LSE, TARGET_LOGIT, vocab, BLOCK: tl.constexpr):
    """One row: log-sum-exp of the fp32-upcast logits (online max) and the target's logit."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * vocab
    cols = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # lanes still at -inf (no column yet) add nothing: exp(-inf - -inf) would be NaN
        scale = tl.where(run_max == new_max, 1.0, tl.exp(run_max - new_max))
        run_sum = run_sum * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
    tl.store(LSE + row, row_max + tl.log(total))
    tl.store(TARGET_LOGIT + row, tl.load(base + tl.load(TARGET + row)).to(tl.float32))


@triton.jit
def _chunk_grad_kernel(LOGITS, TARGET, LSE, COEF, ONE_HOT, vocab, BLOCK: tl.constexpr):
    """One row, in place: logits -> (softmax - one-hot) * loss gradient, in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * vocab
    cols = tl.arange(0, BLOCK)
    lse, coef = tl.load(LSE + row), tl.load(COEF + row)
    target, hot = tl.load(TARGET + row), tl.load(ONE_HOT + row)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < vocab, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(idx == target, hot, 0.0)) * coef
        tl.store(base + idx, g.to(LOGITS.dtype.element_ty), mask=idx < vocab)


def _fused(logits: torch.Tensor) -> bool:
    return logits.is_cuda


def _chunk_lse(logits: torch.Tensor, target: torch.Tensor):
    """(log-sum-exp, target logit) of each row, fp32, of logits in the weight's dtype."""
    n, vocab = logits.shape
    if _fused(logits):
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty_like(lse)
        _chunk_lse_kernel[(n,)](logits, target, lse, target_logit, vocab, BLOCK=1024, num_warps=4)
        return lse, target_logit
    logits = logits.float()
    target_logit = logits.gather(1, target[:, None]).squeeze(1)
    # log-sum-exp in place (torch.logsumexp would allocate another chunk of logits)
    chunk_max = logits.max(dim=-1).values
    return chunk_max + logits.sub_(chunk_max[:, None]).exp_().sum(dim=-1).log_(), target_logit


def _chunk_grad(logits: torch.Tensor, target, lse, coef, one_hot) -> torch.Tensor:
    """``(softmax - one_hot) * coef`` per row, in the logits' dtype (autograd casts Megatron's
    fp32 gradient back to it the same way)."""
    if _fused(logits):
        _chunk_grad_kernel[(logits.shape[0],)](logits, target, lse, coef, one_hot, logits.shape[1],
                                               BLOCK=1024, num_warps=4)
        return logits
    probs = logits.float().sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary
    probs.scatter_add_(1, target[:, None], -one_hot[:, None])
    return probs.mul_(coef[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of ``hidden @ weight.T`` against ``target``, the vocabulary split over TP.

    ``hidden`` [n, h] (every token of the sequence on every TP rank), ``weight`` [v, h] (this
    rank's slice of the vocabulary), ``target`` [n] (ids in the whole vocabulary)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, tp_group, chunk):
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        n, vocab = hidden.shape[0], weight.shape[0]
        local_target = target - tp_rank * vocab
        on_rank = (local_target >= 0) & (local_target < vocab)
        local_target = torch.where(on_rank, local_target, torch.zeros_like(local_target))

        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            lse[start:end], target_logit[start:end] = _chunk_lse(
                torch.matmul(hidden[start:end], weight.t()), local_target[start:end])
        target_logit.masked_fill_(~on_rank, 0.0)

        if tp_size > 1:  # combine the ranks' vocabulary slices
            lse_max = lse.clone()
            dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([torch.exp(lse - lse_max), target_logit])
            dist.all_reduce(sums, group=tp_group)
            lse = lse_max + torch.log(sums[0])
            target_logit = sums[1]

        ctx.save_for_backward(hidden, weight, local_target, on_rank, lse)
        ctx.chunk = chunk
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_target, on_rank, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_loss = grad_loss.float()
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 accumulator over chunks: rounding each chunk's bf16 sum would lose bits per chunk.
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if want_weight else None)
        one_hot = on_rank.float()
        for start in range(0, n, ctx.chunk):
            end = min(start + ctx.chunk, n)
            grad_logits = _chunk_grad(torch.matmul(hidden[start:end], weight.t()),
                                      local_target[start:end], lse[start:end],
                                      grad_loss[start:end], one_hot[start:end])
            if want_hidden:
                grad_hidden[start:end] = torch.matmul(grad_logits, weight)
            if want_weight:
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[start:end])
                else:
                    grad_weight += torch.matmul(grad_logits.t(), hidden[start:end])
            del grad_logits
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup],
    sequence_parallel: bool,
    chunk_mb: float,
) -> torch.Tensor:
    """Per-token loss ``[b, s]`` of ``compute_language_model_loss(labels, output_layer(hidden))``.

    ``hidden`` is what GPTModel gives its output layer, ``[s, b, h]`` (``[s / TP, b, h]`` under
    sequence parallelism); ``weight`` the output layer's (or the tied embedding's) vocabulary
    slice ``[vocab / TP, h]``; ``labels`` ``[b, s]``. The input goes through the same TP
    mappings as the ColumnParallelLinear output layer: all-gathered over the sequence under
    SP (gradient reduce-scattered), else copied (gradient all-reduced).
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    target = labels.transpose(0, 1).reshape(s * b)
    loss = _LinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, target, tp_group,
                                     chunk_tokens(chunk_mb, weight.shape[0]))
    return loss.view(s, b).transpose(0, 1).contiguous()
