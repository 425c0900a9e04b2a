"""Builder of the hybrid LongGen model: a Megatron-Core GPTModel with Llama's architecture."""

from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_longgen.config import LongGenConfig
from megatron_longgen.models.linear_cross_entropy import linear_cross_entropy
from megatron_longgen.models.specs import longgen_block_spec


class LongGenGPTModel(GPTModel):
    """Megatron-Core's GPTModel whose training loss, with ``cross_entropy_loss_fusion`` and
    ``cross_entropy_fusion_impl="linear"``, comes from ``linear_cross_entropy``: the same
    per-token loss ``[b, s]`` without the whole sequence's logits. Everything else (logits
    when no labels are given, inference, the other loss implementations) is GPTModel's."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (labels is None or not self.post_process or not self.config.uses_linear_cross_entropy
                or kwargs.get("inference_context") is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return linear_cross_entropy(
            hidden_states, weight, labels,
            tp_group=self.output_layer.tp_group,
            sequence_parallel=self.output_layer.sequence_parallel,
            chunk_mb=self.config.linear_cross_entropy_chunk_mb,
        )


def build_longgen_model(
    config: LongGenConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
) -> LongGenGPTModel:
    """The part of the model this pipeline stage (and virtual stage) holds.

    Llama: RoPE with ``config.rotary_base`` (and llama3 scaling when configured), input and
    output embeddings untied unless ``config.untie_embeddings_and_output_weights`` is False.
    Tied under pipeline parallelism, the last stage keeps a copy of the word embeddings that
    Megatron initialises from the first stage and keeps in sync (its embedding group).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = LongGenGPTModel(
        config=config,
        transformer_layer_spec=longgen_block_spec(config, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=config.rotary_base,
        rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    if config.use_rope_scaling:  # Megatron's own scaling, with the parameters it hard-codes
        _apply_llama3_rope_scaling(model.rotary_pos_emb, config)
    return model


def _apply_llama3_rope_scaling(rotary, config: LongGenConfig) -> None:
    """Llama-3.x scaled inverse frequencies with all four of the config's parameters (GPTModel
    would pass only the factor). Recomputed from the plain frequencies, as RotaryEmbedding does."""
    dim = config.kv_channels  # rotary_percent 1: RoPE over the whole head
    device = rotary.inv_freq.device
    plain = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rotary.inv_freq = rotary._apply_scaling(
        plain, factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_scaling_low_freq_factor,
        high_freq_factor=config.rope_scaling_high_freq_factor,
        original_max_position_embeddings=config.rope_scaling_original_max_position_embeddings)
