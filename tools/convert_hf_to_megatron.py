#!/usr/bin/env python3
"""HF Llama-family folder (Llama-2/3.x, Mistral, Qwen2/2.5, Qwen3) -> Megatron-Core torch_dist
checkpoint for the LongGen trainer.

Example (Llama-2 7B, for training at TP=2 with the middle third of layers full):

    python tools/convert_hf_to_megatron.py --hf-dir Llama-2-7b-hf --megatron-dir ckpt/llama2-7b \\
        --target-tensor-parallel-size 2 --dtype bf16 --rotary-base 500000 --verify

Then train with ``pretrain_longgen.py --load ckpt/llama2-7b --finetune`` plus the flags
recorded in ``ckpt/llama2-7b/longgen_config.json`` (``trainer_flags``).
"""

import argparse
import sys

from megatron_longgen.utils.accelerators import quiet_fallback_warnings

quiet_fallback_warnings()  # before Megatron-Core is imported

from megatron_longgen.checkpoint.verify import add_verify_arguments  # noqa: E402
from megatron_longgen.config import longgen_fields  # noqa: E402
from megatron_longgen.training.arguments import add_longgen_arguments  # noqa: E402
from megatron_longgen.utils.cli import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model folder (config.json + weights) of a Llama, Mistral, Qwen2 or Qwen3")
    p.add_argument("--megatron-dir", required=True, help="output checkpoint directory (created)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="TP the trainer will use: checked against heads/groups, sets vocab padding")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                   help="PP the trainer will use: checked against the number of layers")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the saved weights (the trainer's --bf16/--fp16 should match)")
    g = p.add_argument_group("LongGen settings (recorded with the checkpoint)")
    add_longgen_arguments(g)
    g.add_argument("--rotary-base", type=float, default=None,
                   help="RoPE base for the target length (default: the HF model's rope_theta)")
    add_verify_arguments(p, "compare HF and Megatron logits (all layers full) before writing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --megatron-dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_longgen.checkpoint import ImportOptions, hf_to_megatron
    from megatron_longgen.checkpoint.record import LongGenSettings

    settings = LongGenSettings(**longgen_fields(args), rotary_base=args.rotary_base)
    opts = ImportOptions(
        hf_dir=args.hf_dir, megatron_dir=args.megatron_dir,
        target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size, dtype=args.dtype,
        longgen=settings, verify=args.verify, verify_seq_length=args.verify_seq_length,
        verify_tolerance=args.verify_tolerance, overwrite=args.overwrite)
    hf_to_megatron(opts)
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing starts a spawn-mode Manager
    sys.exit(run_main(main))
