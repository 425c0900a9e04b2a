#!/usr/bin/env python3
"""Megatron-Core torch_dist checkpoint (any TP/PP layout) -> HF folder.

Example (a LongGen model trained from Llama-2 7B):

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/longgen-7b --hf-dir longgen-7b-hf \\
        --tokenizer-dir Llama-2-7b-hf --verify

Load it with ``AutoModelForCausalLM.from_pretrained("longgen-7b-hf", trust_remote_code=True)``.
``--plain-llama`` writes the source's own class instead (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM or Qwen3ForCausalLM; only for models with every layer full).
"""

import argparse
import sys

from megatron_longgen.utils.accelerators import quiet_fallback_warnings

quiet_fallback_warnings()  # before Megatron-Core is imported

from megatron_longgen.checkpoint.verify import add_verify_arguments  # noqa: E402
from megatron_longgen.utils.cli import run_main  # noqa: E402


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-2]) * factor)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--megatron-dir", required=True,
                   help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_* dir")
    p.add_argument("--hf-dir", required=True, help="output HF folder (created)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the exported weights (default: the checkpoint's)")
    p.add_argument("--plain-llama", action="store_true",
                   help="write the source's own class (Llama, Mistral, Qwen2, Qwen3) without the "
                        "LongGen fields; needs every layer full")
    p.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from this folder")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="e.g. 2GB, 500MB")
    add_verify_arguments(p, "load the export with transformers and compare logits with Megatron's")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --hf-dir")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_longgen.checkpoint import ExportOptions, megatron_to_hf

    opts = ExportOptions(
        megatron_dir=args.megatron_dir, hf_dir=args.hf_dir, iteration=args.iteration,
        dtype=args.dtype, plain_llama=args.plain_llama, tokenizer_dir=args.tokenizer_dir,
        max_shard_size=args.max_shard_size, verify=args.verify,
        verify_seq_length=args.verify_seq_length, verify_tolerance=args.verify_tolerance,
        overwrite=args.overwrite)
    megatron_to_hf(opts)
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing starts a spawn-mode Manager
    sys.exit(run_main(main))
