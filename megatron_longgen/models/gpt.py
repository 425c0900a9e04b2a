"""Builder of the hybrid LongGen model: a Megatron-Core GPTModel with Llama's architecture."""

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_longgen.config import LongGenConfig
from megatron_longgen.models.specs import longgen_block_spec


def build_longgen_model(
    config: LongGenConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """The part of the model this pipeline stage (and virtual stage) holds.

    Llama: RoPE with ``config.rotary_base``, untied input/output embeddings, no biases.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
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
