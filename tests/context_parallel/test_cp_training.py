"""End to end: the tiny hybrid model trained with context parallelism (CP=2, TP=2 x CP=2,
PP=2 x CP=2; AttnSink with a window longer than a chunk, BlockSparse, packed documents) gives
the single-process losses and gradient norms, step after step."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

SEQ = 64
BASE = ["--device", "cpu", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "0", "--train-iters", "2",
        "--sink-tokens", "2", "--sliding-window-size", "20"]  # window 20 > a CP=2 chunk of 16
BLOCK = ["--sparse-attention", "block_sparse", "--sparse-block-size", "16", "--local-blocks", "1",
         "--vert-stride", "2", "--no-homo-head"]
PACKED = ["--micro-batch-size", "1", "--global-batch-size", "2", "--reset-attention-mask"]
STEPS = 2


class EodDataset:
    """Random tokens with end-of-document tokens (id 0) at fixed places that cut CP chunks."""

    def __init__(self, n=8):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        text = torch.randint(1, 512, (SEQ + 1,), generator=g)
        text[[9 + i, 30, 47]] = 0
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(SEQ),
                "position_ids": torch.arange(SEQ)}


# name -> (flags, uses packed documents)
RUNS = {
    "attn_sink": (["--mock-data"], False),
    "block_sparse": (["--mock-data", *BLOCK], False),
    "attn_sink_packed": (PACKED, True),
}


def _train(name, parallel, save=None):
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    flags, packed = RUNS[name]
    train = parse_args(BASE + flags + parallel + (["--save", save] if save else []))
    data = (EodDataset(), EodDataset()) if packed else None
    trainer = Trainer(train, datasets=data, eod_id=0 if packed else None)
    if save:  # the initial weights, for layouts that initialise differently (pipeline stages)
        trainer.save()
    it = trainer._iterators(trainer.train_ds, 0)
    for chunk in trainer.model:
        chunk.train()
    return [list(trainer.train_step(it)) for _ in range(STEPS)]  # (loss, grad norm) per step


def _worker(rank, world, port, jobs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    results = {f"{name}|{' '.join(par)}": _train(name, par) for name, par in jobs}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CP2 = ["--context-parallel-size", "2"]
JOBS = {
    2: [(name, CP2) for name in RUNS],
    4: [("attn_sink", ["--tensor-model-parallel-size", "2", *CP2]),
        # A pipeline stage draws only its own layers' initial weights: start from the
        # single-process run's weights (a resharded checkpoint) instead.
        ("block_sparse", ["--pipeline-model-parallel-size", "2", *CP2, "--load", "{ckpt}", "--finetune"])],
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("init") / "ckpt")
    return ckpt, {name: _train(name, [], save=ckpt if name == "block_sparse" else None) for name in RUNS}


@pytest.mark.parametrize("world", [2, 4], ids=["cp2", "tp2_pp2_with_cp2"])
def test_training_with_cp_matches_single_process(world, single_process, tmp_path):
    ckpt, single_process = single_process
    jobs = [(name, [a.format(ckpt=ckpt) for a in par]) for name, par in JOBS[world]]
    mp.spawn(_worker, args=(world, _free_port(), jobs, str(tmp_path)), nprocs=world, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for name, parallel in jobs:
        want = torch.tensor(single_process[name])
        for res in ranks:
            got = torch.tensor(res[f"{name}|{' '.join(parallel)}"])
            assert torch.allclose(got, want, rtol=1e-5, atol=0), (name, parallel, got, want)
        assert (want[:, 1] > 1e-3).all()  # real gradients; step 2 sees the updated weights
