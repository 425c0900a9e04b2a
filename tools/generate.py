#!/usr/bin/env python3
"""Generate text from a LongGen Megatron checkpoint with the pattern-sized KV cache.

Example (one process, TP = PP = 1; any saved layout loads):

    python tools/generate.py --load ckpt/longgen-tiny --tokenizer-model tok.model \\
        --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8 --top-p 0.9

Tensor parallel over the GPUs of one node (rank 0 prints):

    torchrun --nproc-per-node 2 tools/generate.py --device cuda --tensor-model-parallel-size 2 ...

The model's shape and LongGen flags come from the checkpoint itself (the trainer's
``train_config`` or a converted checkpoint's record), so they cannot disagree with the weights.
Without a tokenizer, pass token ids: ``--prompt-ids 1,450,3978``.
"""

import argparse
import sys
from typing import List, Optional

from megatron_longgen.utils.accelerators import quiet_fallback_warnings

quiet_fallback_warnings()  # before Megatron-Core is imported

from megatron_longgen.utils.cli import fail, run_main  # noqa: E402


def _ids(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root or an iter_* directory")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="text prompt (repeat for a batch)")
    prompt.add_argument("--prompt-ids", action="append", type=_ids,
                        help="comma-separated token ids (repeat for a batch)")
    p.add_argument("--tokenizer-model", default=None, help="needed for --prompt and text output")
    p.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer or HuggingFaceTokenizer (default: from the path)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens to generate per prompt (prompt + new tokens must fit --max-length)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cache length (default: the model's max_position_embeddings)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the likeliest tokens up to this probability mass")
    p.add_argument("--stop-token", type=int, action="append", default=None,
                   help="default: the tokenizer's end-of-sequence token, if any")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: random; shared by all tensor-parallel ranks)")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk length")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one GPU per rank (LOCAL_RANK under torchrun)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="split heads/MLP/vocabulary over this many ranks (torchrun, one node)")
    p.add_argument("--attention", choices=["auto", "exact", "fast"], default="auto",
                   help="engine attention path (auto: fast on CUDA)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (batch 1)")
    p.add_argument("--report-cache", action="store_true", help="print KV cache memory per layer kind")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_longgen.inference.engine import InferenceEngine
    from megatron_longgen.inference.generate import SamplingConfig, generate

    tokenizer = None
    if args.tokenizer_model:
        from megatron_longgen.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(args.tokenizer_model, args.tokenizer_type)
    if args.prompt and tokenizer is None:
        fail("--prompt needs --tokenizer-model (or pass --prompt-ids)")
    if args.prompt:
        prompts = [[tokenizer.bos_id] + tokenizer.encode(t) for t in args.prompt]
    else:
        prompts = args.prompt_ids
    if not all(prompts):
        fail("every --prompt / --prompt-ids needs at least one token")
    stop = args.stop_token
    if stop is None:
        stop = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id >= 0 else []
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, stop_tokens=stop, seed=args.seed)

    import torch
    import torch.distributed as dist

    from megatron_longgen.checkpoint.megatron_io import load_inference_model

    tp = args.tensor_model_parallel_size
    model = load_inference_model(args.load, args.iteration, tp, args.device)
    vocab = model.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        fail(f"token ids {bad[:5]} are outside the model's vocabulary of {vocab} (--prompt-ids)")
    max_length = args.max_length or model.max_sequence_length
    longest = max(len(p) for p in prompts)
    needed = longest + args.max_new_tokens - 1  # the last new token is never fed back
    if needed > max_length:
        fail(f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} needs "
             f"{needed} positions, more than the maximum length {max_length} (--max-length, or "
             f"the model's max_position_embeddings): shorten the prompt or lower --max-new-tokens")
    engine = InferenceEngine(model, max_length, chunk_size=args.chunk_size,
                             attention=args.attention)
    rank = dist.get_rank()
    if tp > 1 and args.seed is None:  # every rank must draw the same tokens: one shared seed
        seed = torch.randint(0, 2**31 - 1, (1,), device=args.device)
        dist.broadcast(seed, src=0)
        cfg.seed = int(seed)

    def show(ids):
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    on_token = None
    if args.stream and len(prompts) == 1 and rank == 0:
        on_token = lambda i, t: print(show([t]), end=" " if tokenizer is None else "", flush=True)
    outputs = generate(engine, prompts, cfg, on_token=on_token)
    if rank != 0:
        return 0
    if on_token is not None:
        print()
    else:
        for i, ids in enumerate(outputs):
            print(f"[{i}] {show(ids)}")
    if args.report_cache:
        print("KV cache:", engine.new_cache(len(prompts)).report())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
