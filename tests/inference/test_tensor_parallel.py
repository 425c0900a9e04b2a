"""Tensor-parallel generation on two gloo ranks: the same weights split over TP=2 give the
greedy tokens and logits of TP=1 (exact path, and the fast path under the Triton interpreter),
for AttnSink and heterogeneous BlockSparse heads, a batch of two prompt lengths."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "parallel"))
import harness as H  # noqa: E402

CASES = {
    "attn_sink": dict(sink_tokens=2, sliding_window_size=8),
    "block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1,
                         vert_stride=2, homo_head=False),
}
PROMPTS = [list(range(3, 40)), list(range(7, 28))]  # beyond the window and one block
STEPS = 3


def greedy(tp: int, case: str, attention: str, full=None):
    """(weights, tokens, logits) of greedy decoding at this TP size; ``full`` weights are
    split to this rank (TP=1 draws them)."""
    from megatron_longgen.inference.engine import InferenceEngine
    from megatron_longgen.models.gpt import build_longgen_model
    from megatron_longgen.models.presets import get_preset, longgen_config
    from megatron_longgen.parallel.initialize import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=tp, device="cpu", seed=1234)
    torch.manual_seed(0)
    cfg = longgen_config("tiny", use_cpu_initialization=True, tensor_model_parallel_size=tp,
                         **CASES[case])
    model = build_longgen_model(cfg, get_preset("tiny").vocab_size, 128).eval()
    if full is None:
        full = {name: t for name, (t, _, _) in H.named_shards([model]).items()}
    else:
        H.load_full([model], full)
    engine = InferenceEngine(model, max_length=64, chunk_size=16, attention=attention)
    cache, logits = engine.prefill(PROMPTS)
    tokens, all_logits = [], [logits]
    for _ in range(STEPS):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = engine.decode(cache, nxt)
        all_logits.append(logits)
    return full, torch.stack(tokens), torch.stack(all_logits)


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        for attention in ("exact", "fast"):
            full, tok1, log1 = greedy(1, case, attention)
            _, tok2, log2 = greedy(2, case, attention, full)
            results[case, attention] = (tok1, log1, tok2, log2)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "tp.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
    mp.spawn(worker, args=(2, H.free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out / "tp.pt")


@pytest.mark.parametrize("attention", ["exact", "fast"])
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_generation_matches_tp1(results, case, attention):
    tok1, log1, tok2, log2 = results[case, attention]
    assert log2.shape == log1.shape  # whole vocabulary: the vocab-parallel logits are gathered
    assert torch.equal(tok1, tok2)
    assert (log1 - log2).abs().max() <= 1e-4
