"""Fused layer ops, forward and backward, at Llama-2-7B training shapes on one GPU (bf16).

For each op, every candidate that is installed is first checked against float64 torch (output
and input gradients, at ``--check-tokens`` tokens), then timed with ``triton.testing.do_bench``
(median): forward, and forward + backward. GB/s counts the bytes an op must move at least
(inputs read once, outputs written once, each way).

- ``rms_norm``: x [tokens, 4096], weight [4096]. torch.nn.RMSNorm (``torch``), its
  ``torch.compile``, Liger's ``LigerRMSNormFunction``, ours (``--rms-norm-fusion``).
  Megatron-Core's fused norms need apex or TransformerEngine.
- ``rope``: q and k [tokens, 1, 32, 128], Megatron's angles [tokens, 1, 1, 128]. Megatron's
  unfused ``_apply_rotary_pos_emb_bshd`` (``megatron``), its ``torch.compile``, Liger's
  ``LigerRopeFunction`` (HF layout through a permuted view; cos / sin computed once outside the
  timing, as a model shares them across layers), ours (``--rope-fusion`` without TE).
- ``swiglu``: Megatron's fc1 output [tokens, 1, 2 x 11008]. Megatron's MLP glu (``megatron``),
  its ``torch.compile``, Megatron's ``bias_swiglu_impl`` (``megatron-fused``,
  ``--bias-swiglu-fusion --swiglu-fusion-impl native``), Liger's
  ``LigerFusedGateUpSiLUMulFunction``, ours (``--swiglu-fusion-impl triton``).
- ``bias_dropout_add``: the residual add of a layer without bias or dropout (Llama) [tokens, 1,
  4096]: Megatron's unfused and fused (``--bias-dropout-fusion``) ``get_bias_dropout_add``.

    python benchmarks/layer_ops.py --json layer_ops.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_longgen.models import fused_ops
from megatron_longgen.utils.cli import ArgumentParser, fail, run_main

HIDDEN, HEADS, HEAD_DIM, FFN = 4096, 32, 128, 11008


@dataclass
class Op:
    name: str
    make: Callable  # (tokens, device, dtype) -> (leaves, context)
    reference: Callable  # (leaves, context) -> outputs, in float64
    candidates: Dict[str, Callable]  # name -> (leaves, context) -> outputs, or None if absent
    bytes_moved: Callable  # (tokens, element size) -> (forward, forward + backward)


def _compiled(fn):
    # Dynamic shapes: one compilation serves the check's length and the timing's.
    compiled = torch.compile(fn, dynamic=True)
    return lambda leaves, ctx: compiled(leaves, ctx)


def _liger(module: str, name: str):
    try:
        return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[name]), name)
    except ImportError:
        return None


# ---- RMSNorm ----

def _norm_make(tokens, device, dtype):
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
    w = (torch.rand(HIDDEN, device=device) + 0.5).to(dtype)
    return [x, w], 1e-5


def _norm_torch(leaves, eps):
    return F.rms_norm(leaves[0], (HIDDEN,), leaves[1], eps)


def _norm_candidates():
    liger = _liger("rms_norm", "LigerRMSNormFunction")
    return {
        "torch": _norm_torch,
        "torch.compile": _compiled(_norm_torch),
        # Positional: offset, casting_mode, in_place (off: dy stays intact for the checks).
        "liger": liger and (lambda leaves, eps: liger.apply(leaves[0], leaves[1], eps, 0.0, "llama", False)),
        "ours": lambda leaves, eps: fused_ops.rms_norm(leaves[0], leaves[1], eps),
    }


# ---- RoPE on q and k ----

def _rope_make(tokens, device, dtype):
    q = torch.randn(tokens, 1, HEADS, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(tokens, 1, HEADS, HEAD_DIM, device=device, dtype=dtype)
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device, dtype=torch.float32) / HEAD_DIM))
    f = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * inv
    freqs = torch.cat([f, f], dim=-1)[:, None, None, :]  # Megatron's RotaryEmbedding layout
    return [q, k], {"freqs": freqs, "cos": freqs.cos().view(1, tokens, HEAD_DIM),
                    "sin": freqs.sin().view(1, tokens, HEAD_DIM)}


def _rope_megatron(leaves, ctx):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    freqs = ctx["freqs"].to(leaves[0].dtype) if leaves[0].dtype == torch.float64 else ctx["freqs"]
    return tuple(_apply_rotary_pos_emb_bshd(t, freqs) for t in leaves)


def _rope_candidates():
    liger = _liger("rope", "LigerRopeFunction")

    def liger_rope(leaves, ctx):  # HF layout [b, h, s, d]: a permuted view of [s, b, h, d]
        q, k = (t.permute(1, 2, 0, 3) for t in leaves)
        q, k = liger.apply(q, k, ctx["cos"].to(q.dtype), ctx["sin"].to(q.dtype))
        return q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3)

    return {
        "megatron": _rope_megatron,
        "torch.compile": _compiled(_rope_megatron),
        "liger": liger and liger_rope,
        "ours": lambda leaves, ctx: tuple(fused_ops.apply_rope(t, ctx["freqs"]) for t in leaves),
    }


# ---- SwiGLU on fc1's output ----

def _swiglu_make(tokens, device, dtype):
    return [torch.randn(tokens, 1, 2 * FFN, device=device, dtype=dtype) * 2], None


def _glu(leaves, ctx):  # Megatron's MLP without bias_activation_fusion
    gate, up = torch.chunk(leaves[0], 2, dim=-1)
    return F.silu(gate) * up


def _swiglu_candidates():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    liger = _liger("swiglu", "LigerFusedGateUpSiLUMulFunction")
    return {
        "megatron": _glu,
        "torch.compile": _compiled(_glu),
        "megatron-fused": lambda leaves, ctx: bias_swiglu_impl(leaves[0], None),
        # Liger's gradient is [tokens, 2F]: give it the 2-D view of Megatron's [s, b, 2F]
        "liger": liger and (lambda leaves, ctx: liger.apply(leaves[0].flatten(0, -2)).view(
            *leaves[0].shape[:-1], -1)),
        "ours": lambda leaves, ctx: fused_ops.swiglu(leaves[0]),
    }


# ---- residual bias-dropout-add (no bias, no dropout) ----

def _bda_make(tokens, device, dtype):
    return [torch.randn(tokens, 1, HIDDEN, device=device, dtype=dtype) for _ in range(2)], None


def _bda(fused: bool):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    bda = get_bias_dropout_add(True, fused)
    return lambda leaves, ctx: bda((leaves[0], None), leaves[1], 0.0)


def _bda_candidates():
    return {"megatron": _bda(False), "megatron-fused": _bda(True)}


OPS = {
    "rms_norm": Op("rms_norm", _norm_make, _norm_torch, _norm_candidates,
                   lambda t, e: (2 * t * HIDDEN * e, 5 * t * HIDDEN * e)),
    "rope": Op("rope", _rope_make, _rope_megatron, _rope_candidates,
               lambda t, e: (4 * t * HEADS * HEAD_DIM * e, 8 * t * HEADS * HEAD_DIM * e)),
    "swiglu": Op("swiglu", _swiglu_make, _glu, _swiglu_candidates,
                 lambda t, e: (3 * t * FFN * e, 8 * t * FFN * e)),
    "bias_dropout_add": Op("bias_dropout_add", _bda_make, lambda leaves, ctx: leaves[0] + leaves[1],
                           _bda_candidates,  # the add's backward passes dy on: no work
                           lambda t, e: (3 * t * HIDDEN * e, 3 * t * HIDDEN * e)),
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _forward_backward(fn, leaves, ctx, dys):
    outs = _as_tuple(fn(leaves, ctx))
    torch.autograd.backward(outs, dys)
    return outs


def _fresh(leaves, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check(op: Op, fn, tokens: int, device: str, dtype: torch.dtype) -> float:
    """Largest error of fn's outputs and input gradients against float64 torch, relative to
    each reference tensor's largest magnitude."""
    torch.manual_seed(0)
    leaves, ctx = op.make(tokens, device, dtype)
    ref_leaves = _fresh(leaves, torch.float64)
    refs = _as_tuple(op.reference(ref_leaves, ctx))
    dys = tuple(torch.randn_like(r) for r in refs)
    torch.autograd.backward(refs, dys)
    got_leaves = _fresh(leaves)
    outs = _forward_backward(fn, got_leaves, ctx, tuple(d.to(dtype) for d in dys))
    errors = [_rel(o, r) for o, r in zip(outs, refs)]
    errors += [_rel(g.grad, r.grad) for g, r in zip(got_leaves, ref_leaves)]
    return max(errors)


def time_op(fn, leaves, ctx, dys):
    from triton.testing import do_bench

    leaves = _fresh(leaves)
    fwd = do_bench(lambda: fn(leaves, ctx), return_mode="median")
    both = do_bench(lambda: _forward_backward(fn, leaves, ctx, dys), grad_to_none=leaves,
                    return_mode="median")
    return fwd, both


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="tokens (sequence x batch) of the timing")
    parser.add_argument("--check-tokens", type=int, default=1061, help="tokens of the float64 check")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), help="ops to run")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="largest relative error vs float64 a candidate may have to be timed")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def run(args) -> List[dict]:
    """Check and time every installed candidate of ``args.ops``; print the table; the rows."""
    if not torch.cuda.is_available():
        fail("benchmarks/layer_ops.py times CUDA kernels: run it on a GPU machine")
    device, dtype = "cuda", torch.bfloat16
    elem = torch.finfo(dtype).bits // 8
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, {dtype}")
    rows = []
    for name in args.ops:
        op = OPS[name]
        leaves, ctx = op.make(args.tokens, device, dtype)
        dys = tuple(torch.randn_like(o) for o in _as_tuple(op.reference(leaves, ctx)))
        fwd_bytes, both_bytes = op.bytes_moved(args.tokens, elem)
        for cand, fn in op.candidates().items():
            row = {"op": name, "candidate": cand, "tokens": args.tokens}
            if fn is None:
                row["missing"] = True
                print(f"{name} {cand}: not installed", flush=True)
                rows.append(row)
                continue
            try:
                row["max_rel_error"] = check(op, fn, args.check_tokens, device, dtype)
            except Exception as err:  # a candidate that does not run here is a row, not the end
                row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
                print(f"{name} {cand}: {row['error']}", flush=True)
                rows.append(row)
                continue
            if row["max_rel_error"] > args.tolerance:
                row["failed_check"] = True
            else:
                fwd, both = time_op(fn, leaves, ctx, dys)
                row.update(fwd_ms=fwd, fwd_bwd_ms=both, fwd_gbps=fwd_bytes / fwd / 1e6,
                           fwd_bwd_gbps=both_bytes / both / 1e6)
            rows.append(row)
            print(f"{name} {cand}: {row}", flush=True)
        del leaves, ctx, dys
        torch.cuda.empty_cache()
    print()
    print("| op | candidate | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | max rel. err vs fp64 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("missing"):
            print(f"| {r['op']} | {r['candidate']} | not installed | | | | |")
        elif r.get("error"):
            print(f"| {r['op']} | {r['candidate']} | did not run: {r['error'][:60]} | | | | |")
        elif r.get("failed_check"):
            print(f"| {r['op']} | {r['candidate']} | check failed | | | | {r['max_rel_error']:.1e} |")
        else:
            print(f"| {r['op']} | {r['candidate']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                  f"{r['fwd_gbps']:.0f} | {r['fwd_bwd_gbps']:.0f} | {r['max_rel_error']:.1e} |")
    return rows


if __name__ == "__main__":
    raise SystemExit(run_main(main))
