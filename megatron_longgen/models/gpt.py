"""Builder of the hybrid LongGen model: a Megatron-Core GPTModel with Llama's architecture."""

from typing import Optional

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

    Llama: RoPE with ``config.rotary_base``, untied input/output embeddings, no biases.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return LongGenGPTModel(
        config=config,
        transformer_layer_spec=longgen_block_spec(config, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
    )
