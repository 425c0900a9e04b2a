"""Parallel layouts: what makes one possible, and what it costs per GPU.

``validate_layout`` rejects an impossible TP / PP / VPP / CP / DP layout before any model is
built, with a message that names a fix. ``estimate_memory`` gives the per-GPU memory of a
layout (weights, gradients, optimizer states, activations, logits) for planning runs such as
Llama-2 70B at 128K tokens; docs/parallelism.md works through those numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_longgen.models.linear_cross_entropy import chunk_tokens
from megatron_longgen.models.presets import ModelPreset
from megatron_longgen.utils.cli import UsageError

GiB = 1024 ** 3


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_layout(
    *,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    seq_length: Optional[int] = None,
    num_microbatches: Optional[int] = None,
) -> None:
    """Raise UsageError, naming the fix, if the model cannot be laid out this way."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    vpp = virtual_pipeline_model_parallel_size or 1
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise UsageError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change the "
            f"parallel sizes")
    # Attention heads and K/V groups are split over TP ranks whole; so are FFN columns.
    good_tp = [d for d in _divisors(num_query_groups)
               if num_attention_heads % d == 0 and ffn_hidden_size % d == 0]
    for what, count in (("attention heads", num_attention_heads),
                        ("query groups (K/V heads)", num_query_groups),
                        ("FFN hidden size", ffn_hidden_size)):
        if count % tp:
            raise UsageError(
                f"{count} {what} cannot be split over --tensor-model-parallel-size {tp}; "
                f"use a tensor-parallel size that divides the heads ({num_attention_heads}), "
                f"the query groups ({num_query_groups}) and the FFN size ({ffn_hidden_size}): "
                f"one of {good_tp}")
    if num_layers % (pp * vpp):
        stages = f"{pp} pipeline stages" + (f" x {vpp} virtual stages" if vpp > 1 else "")
        fix = (f"use a --pipeline-model-parallel-size among {_divisors(num_layers)}"
               if vpp == 1 else
               f"use a --virtual-pipeline-model-parallel-size among "
               f"{[v for v in _divisors(num_layers // pp) if v > 1] if num_layers % pp == 0 else []}"
               f" (or drop it), with --pipeline-model-parallel-size among {_divisors(num_layers)}")
        raise UsageError(f"{num_layers} layers cannot be split evenly into {stages} "
                         f"({pp * vpp} chunks); {fix}, or change --num-layers")
    if vpp > 1 and num_microbatches is not None and num_microbatches < pp:
        raise UsageError(
            f"the interleaved (virtual) pipeline needs at least PP = {pp} micro-batches per step, "
            f"got {num_microbatches}; raise --global-batch-size or lower --micro-batch-size")
    if seq_length is not None:
        shards = tp if sequence_parallel else 1
        shards *= 2 * cp if cp > 1 else 1
        if seq_length % shards:
            parts = " x ".join(p for p in (f"TP {tp}" if sequence_parallel else "",
                                           f"2 x CP {cp}" if cp > 1 else "") if p)
            raise UsageError(f"--seq-length {seq_length} must be divisible by {parts} = {shards} "
                             f"(each rank holds an equal slice of the sequence)")


def validate_train_layout(train, world_size: int) -> None:
    """``validate_layout`` for a TrainConfig: its preset's shape with the flag overrides."""
    from megatron_longgen.models.presets import get_preset

    preset = get_preset(train.model)

    def pick(name):
        value = getattr(train, name)
        return getattr(preset, name) if value is None else value

    model_parallel = (train.tensor_model_parallel_size * train.pipeline_model_parallel_size
                      * train.context_parallel_size)
    dp = max(1, world_size // model_parallel)
    validate_layout(
        num_layers=pick("num_layers"),
        num_attention_heads=pick("num_attention_heads"),
        num_query_groups=pick("num_query_groups"),
        ffn_hidden_size=pick("ffn_hidden_size"),
        world_size=world_size,
        tensor_model_parallel_size=train.tensor_model_parallel_size,
        pipeline_model_parallel_size=train.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=train.virtual_pipeline_model_parallel_size,
        context_parallel_size=train.context_parallel_size,
        sequence_parallel=train.sequence_parallel,
        seq_length=train.seq_length,
        num_microbatches=train.global_batch_size // (train.micro_batch_size * dp),
    )


# ---- memory ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = True
    distributed_optimizer: bool = True
    recompute: str = "full"  # "none", "selective" (core attention) or "full" (every layer)
    # With "full": None recomputes every layer (--recompute-method uniform); N only the first N
    # layers of each pipeline chunk (--recompute-method block --recompute-num-layers N).
    recompute_num_layers: Optional[int] = None
    micro_batch_size: int = 1
    num_microbatches: int = 32
    # None: Megatron's loss on the whole sequence's logits; else the chunked linear
    # cross-entropy (``--cross-entropy-fusion-impl linear``) with chunks of this many MiB.
    linear_cross_entropy_chunk_mb: Optional[float] = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def estimate_memory(shape: ModelPreset, layout: Layout, seq_length: int,
                    overhead_gib: float = 4.0) -> Dict[str, float]:
    """Per-GPU memory in GiB under bf16 mixed precision, on the safe side: the parameters of
    the larger end stage, the first stage's activations and the last stage's logits.

    Bytes per parameter: bf16 weights 2, fp32 gradient buffer 4 (the trainer reduces grads in
    fp32), Adam 12 (fp32 master copy, two moments), the latter sharded over DP x CP by the
    distributed optimizer. Activations follow Korthikanti et al. (2022) for this layer
    (RMSNorm, GQA attention, SwiGLU), with a fused attention kernel that keeps no s x s
    scores: so "selective" recompute (of core attention) saves about nothing over "none",
    and "full" keeps one layer input per recomputed layer (all, or ``recompute_num_layers``
    per chunk), every activation of the others, plus one layer's being recomputed.
    The first stage holds min(PP, micro-batches) micro-batches in flight, times
    (1 + (PP-1)/(PP*VPP)) with an interleaved schedule. The last stage's logits take 6 bytes
    per token and vocabulary entry on a TP rank (bf16, and the fp32 copy the loss works on):
    for the whole sequence with Megatron's loss, for one chunk of tokens with the linear
    cross-entropy, which adds its fp32 output-weight gradient (4 bytes per weight).
    ``overhead_gib`` stands for the CUDA context, communication buffers and allocator
    fragmentation.
    """
    if layout.recompute not in ("none", "selective", "full"):
        raise UsageError("recompute must be none, selective or full")
    if layout.recompute_num_layers is not None and (
            layout.recompute != "full" or layout.recompute_num_layers < 1):
        raise UsageError("recompute_num_layers (--recompute-num-layers with --recompute-method "
                         "block) needs recompute 'full' and at least 1 layer")
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    vpp = layout.vpp or 1
    h, f = shape.hidden_size, shape.ffn_hidden_size
    layers = shape.num_layers // pp
    embed = shape.vocab_size * h
    # Busiest stage for parameters: the first (input embedding) or last (output layer + norm).
    stage_params = (layers * shape.params_per_layer + max(embed, embed + h)) / tp
    sharding = layout.dp * cp if layout.distributed_optimizer else 1

    tokens = seq_length // cp * layout.micro_batch_size  # per micro-batch on this rank
    sp = tp if layout.sequence_parallel else 1
    # Values kept per token per layer: the two norms' and two linears' inputs (4h, sharded by
    # SP), Q/K/V and the attention output (sharded by TP), fc1's gate+up output and fc2's input.
    per_layer = 2 * tokens * (4 * h / sp + (2 * h + 2 * shape.kv_width) / tp + 3 * f / tp)
    in_flight = min(pp, layout.num_microbatches) * (1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1)
    if layout.recompute == "full":
        recomputed = layers if layout.recompute_num_layers is None else (
            min(layout.recompute_num_layers, layers // vpp) * vpp)
        kept = in_flight * (recomputed * 2 * tokens * h / sp + (layers - recomputed) * per_layer)
        activations = kept + (per_layer if recomputed else 0)
    else:
        activations = layers * in_flight * per_layer
    # Last stage: bf16 logits plus the fp32 copy the cross-entropy works on, vocab split by TP.
    vocab = shape.vocab_size / tp
    if layout.linear_cross_entropy_chunk_mb is None:
        logits = tokens * vocab * (2 + 4)
    else:
        chunk = min(tokens, chunk_tokens(layout.linear_cross_entropy_chunk_mb, int(vocab)))
        logits = chunk * vocab * (2 + 4) + vocab * h * 4

    out = {
        "weights": 2 * stage_params / GiB,
        "grads": 4 * stage_params / GiB,
        "optimizer": 12 * stage_params / sharding / GiB,
        "activations": activations / GiB,
        "logits": logits / GiB,
        "overhead": overhead_gib,
    }
    out["total"] = sum(out.values())
    return out


def format_estimate(est: Dict[str, float]) -> str:
    return " + ".join(f"{k} {v:.1f}" for k, v in est.items() if k != "total") + f" = {est['total']:.1f} GiB"
