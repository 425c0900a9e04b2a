"""The tiny hybrid model (GQA; AttnSink and heterogeneous-head BlockSparse layers around a full
one) trained under TP, PP, VPP, DP (plain, distributed optimizer, gradient accumulation),
TP x PP and TP + SP, and with the chunked linear cross-entropy under TP, TP + SP and
TP x PP, gives the single-process losses (of Megatron's own loss path), gradient norms,
gradients and weight updates for two steps; a TP=2 x PP=2 checkpoint resumes under
TP=1 x PP=1 and TP=1 x PP=2.

Ranks are spawned twice (4 ranks, then 2); each rank runs its layouts in sequence,
re-initialising Megatron's process groups in between.
"""

import re

import pytest
import torch

import harness as H

TOL = 1e-5
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
VPP2 = ["--virtual-pipeline-model-parallel-size", "2"]
MICRO1 = ["--micro-batch-size", "1"]  # 4 micro-batches of 1 instead of 2 of 2
DISTOPT = ["--use-distributed-optimizer"]
# Output layer + loss in chunks of 10 tokens (vocab 512 / TP 2 x 4 B = 1 KiB a token).
LINEAR_CE = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear",
             "--linear-cross-entropy-chunk-mb", "0.01"]

# name -> (world size, flags). The reference is always TP=PP=DP=1, micro 2 x 2 = global 4.
LAYOUTS = {
    "tp2": (2, TP2),
    "pp2": (2, PP2),
    "vpp2": (2, PP2 + VPP2 + MICRO1),
    "dp2": (2, []),
    "dp2_distopt": (2, DISTOPT),
    "dp2_accumulate": (2, MICRO1),  # 2 micro-batches per DP rank per step
    "tp2_sp": (2, TP2 + ["--sequence-parallel"]),
    "tp2_linear_ce": (2, TP2 + LINEAR_CE),
    "tp2_sp_linear_ce": (2, TP2 + ["--sequence-parallel"] + LINEAR_CE),
    "tp2_pp2": (4, TP2 + PP2),
    "tp2_pp2_linear_ce": (4, TP2 + PP2 + LINEAR_CE),
    # The 70B plan's shape scaled down: query groups = TP, pipeline with virtual stages,
    # sequence parallel and full recompute.
    "tp2_pp2_vpp2_sp_recompute": (4, TP2 + PP2 + VPP2 + MICRO1 + [
        "--sequence-parallel", "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "1"]),
}

# Impossible layouts on 2 ranks: the trainer must refuse them before building a model.
LAYOUT_ERRORS = {
    "groups_vs_tp": (TP2 + ["--num-query-groups", "1"],
                     r"1 query groups \(K/V heads\) cannot be split over --tensor-model-parallel-size 2"),
    "layers_vs_pp": (PP2 + ["--num-layers", "3"], "3 layers cannot be split evenly into 2 pipeline"),
}

SAVE = TP2 + PP2 + ["--train-iters", "4", "--save-interval", "2"]
RESUME = {"tp1_pp1": (1, []), "tp1_pp2": (2, PP2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    refs = {}
    for pattern, flags in H.PATTERNS.items():
        refs[pattern] = H.run_case(H.BASE + flags, None)
        torch.save(refs[pattern]["init"], out / f"init_{pattern}.pt")

    def jobs(world):
        return [(f"{name}-{pattern}", "parity", H.BASE + pflags + flags, str(out / f"init_{pattern}.pt"))
                for name, (w, flags) in LAYOUTS.items() if w == world
                for pattern, pflags in H.PATTERNS.items()]

    ckpt = str(out / "ckpt")
    H.launch(4, jobs(4) + [("save", "resume", H.BASE + H.PATTERNS["block_sparse"] + SAVE + ["--save", ckpt], None)],
             out)
    resume_flags = H.BASE + H.PATTERNS["block_sparse"] + ["--train-iters", "4", "--load", ckpt + "/iter_0000002"]
    errors = [(f"error-{name}", "error", H.BASE + flags, None) for name, (flags, _) in LAYOUT_ERRORS.items()]
    H.launch(2, jobs(2) + errors + [("resume-tp1_pp2", "resume", resume_flags + RESUME["tp1_pp2"][1], None)],
             out)
    resumed = {"tp1_pp2": torch.load(out / "resume-tp1_pp2.pt"),
               "tp1_pp1": H.run_resume(resume_flags)}  # here, in one process
    return {"refs": refs, "out": out, "saved": torch.load(out / "save.pt"), "resumed": resumed}


@pytest.mark.parametrize("pattern", list(H.PATTERNS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs, layout, pattern):
    got = torch.load(runs["out"] / f"{layout}-{pattern}.pt")
    worst = H.compare(got, runs["refs"][pattern])
    print(f"{layout:28s} {pattern:13s} " + " ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    # Gradients are compared whole wherever a rank holds them whole (not with the distributed
    # optimizer, whose DP ranks reduce only their shard); updates are compared everywhere.
    assert ("grad" in worst) == ("--use-distributed-optimizer" not in LAYOUTS[layout][1])
    assert worst["init"] == 0.0  # every layout started from the reference's weights
    bad = {k: v for k, v in worst.items() if v > TOL}
    assert not bad, f"{layout} / {pattern}: relative differences above {TOL}: {bad}"


def test_reference_moves_every_parameter(runs):
    """Guards the harness: zero gradients or updates would compare equal whatever the layout."""
    for ref in runs["refs"].values():
        for step in range(H.STEPS):
            prev = ref["init"] if step == 0 else ref["weights"][step - 1]
            for name, grad in ref["grads"][step].items():
                assert float(grad.abs().max()) > 0, name
                assert float((ref["weights"][step][name] - prev[name]).abs().max()) > 0, name


@pytest.mark.parametrize("layout", list(RESUME))
def test_tp2_pp2_checkpoint_resumes_in_other_layouts(runs, layout):
    saved, resumed = runs["saved"], runs["resumed"][layout]
    assert saved["checkpoint"].endswith("iter_0000004") and sorted(saved["losses"]) == [1, 2, 3, 4]
    assert sorted(resumed["losses"]) == [3, 4]
    for it in (3, 4):  # step 3 needs the weights; step 4 the optimizer state and LR schedule too
        rel = abs(resumed["losses"][it] - saved["losses"][it]) / abs(saved["losses"][it])
        print(f"resume {layout} iteration {it}: relative loss difference {rel:.1e}")
        assert rel <= TOL


@pytest.mark.parametrize("case", list(LAYOUT_ERRORS))
def test_trainer_refuses_impossible_layout_before_building(runs, case):
    message = torch.load(runs["out"] / f"error-{case}.pt")
    print(f"{case}: {message}")
    assert re.search(LAYOUT_ERRORS[case][1], message)
