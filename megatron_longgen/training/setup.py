"""Model, optimizer and LR schedule from Megatron-Core pieces.

Model chunks (one per virtual pipeline stage) -> Float16Module for bf16 -> Megatron DDP;
Megatron's optimizer (optionally distributed) and OptimizerParamScheduler.
"""

from __future__ import annotations

from functools import partial
from typing import List, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_longgen.config import LongGenConfig
from megatron_longgen.models.gpt import build_longgen_model
from megatron_longgen.models.presets import get_preset, longgen_config
from megatron_longgen.training.arguments import FUSION_FLAGS, MODEL_FIELDS, TrainConfig


def initialize_for(train: TrainConfig) -> None:
    """Process groups and RNG for ``train``'s parallel layout."""
    from megatron_longgen.parallel.initialize import initialize_parallel

    initialize_parallel(
        tensor_model_parallel_size=train.tensor_model_parallel_size,
        pipeline_model_parallel_size=train.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=train.virtual_pipeline_model_parallel_size,
        context_parallel_size=train.context_parallel_size,
        seed=train.seed,
        device=train.device,
    )


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so that each TP rank's slice is a multiple of 128."""
    step = multiple * tensor_model_parallel_size
    return -(-vocab_size // step) * step


def model_config_from(train: TrainConfig) -> LongGenConfig:
    overrides = {k: getattr(train, k) for k in MODEL_FIELDS if getattr(train, k) is not None}
    on_cuda = torch.device(train.device).type == "cuda"  # fused layer ops: on for CUDA by default
    fusions = {field: on_cuda if getattr(train, flag) is None else getattr(train, flag)
               for flag, field in FUSION_FLAGS.items()}
    dtype = torch.bfloat16 if train.bf16 else torch.float32
    return longgen_config(
        train.model,
        tensor_model_parallel_size=train.tensor_model_parallel_size,
        pipeline_model_parallel_size=train.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=train.virtual_pipeline_model_parallel_size,
        context_parallel_size=train.context_parallel_size,
        sequence_parallel=train.sequence_parallel,
        bf16=train.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=train.recompute_granularity,
        recompute_method=train.recompute_method if train.recompute_granularity == "full" else None,
        recompute_num_layers=train.recompute_num_layers if train.recompute_granularity == "full" else None,
        calculate_per_token_loss=True,
        use_cpu_initialization=torch.device(train.device).type == "cpu",
        # Batched P2P on gloo (CPU) silently garbles interleaved-pipeline (VPP) activations.
        batch_p2p_comm=torch.device(train.device).type != "cpu",
        **fusions,
        **overrides,
    )


def vocab_size_for(train: TrainConfig) -> int:
    vocab = train.vocab_size or get_preset(train.model).vocab_size
    return padded_vocab_size(vocab, train.tensor_model_parallel_size)


def build_model(config: LongGenConfig, train: TrainConfig, vocab_size: int) -> List[DistributedDataParallel]:
    """This rank's model chunks, wrapped for bf16 and data parallelism."""
    vpp = train.virtual_pipeline_model_parallel_size
    device = torch.device(train.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_longgen_model(config, vocab_size, train.seq_length,
                                    vp_stage=vp_stage if vpp else None)
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        model.to(device)
        if config.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=train.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(config: LongGenConfig, train: TrainConfig, model) -> Tuple[object, OptimizerParamScheduler]:
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=train.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=train.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    decay_iters = train.lr_decay_iters or train.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.lr_warmup_iters else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters * train.global_batch_size,
        lr_decay_steps=decay_iters * train.global_batch_size,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=decay_iters * train.global_batch_size,
        wd_incr_style="constant",
    )
    # What Megatron's schedules call back into.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in model]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return optimizer, scheduler
