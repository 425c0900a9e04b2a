"""Converted checkpoints load at TP=2 and PP=2 (spawned gloo ranks) and give HF's logits;
a checkpoint saved in a TP=2 layout exports back to the original HF tensors."""

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from checkpoint_helpers import VOCAB, build_from_record, hf_state, make_hf_model, megatron_forward, token_batch
from megatron_longgen.checkpoint import ExportOptions, ImportOptions, hf_to_megatron, megatron_to_hf
from megatron_longgen.checkpoint.record import RECORD_FILE, LongGenSettings

ALL_FULL = LongGenSettings(full_attention_placement="all")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(model, ids):
    """Whole-model logits [b, s, V] on every rank of a TP x PP layout of 2 ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return gather_from_tensor_model_parallel_region(model(ids, pos, None))
        if ps.is_pipeline_first_stage():
            hidden = model(ids, pos, None)  # [s, b, h]
            dist.send(hidden.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        return model(ids, pos, None)


def _worker(rank, port, tp, pp, jobs, out_dir, seq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from megatron_longgen.parallel.initialize import initialize_parallel
    from megatron_longgen.training import checkpointing

    initialize_parallel(tp, pp, device="cpu")
    ids = token_batch(seq=seq)
    for name, mg_dir, resave_dir in jobs:
        model, _ = build_from_record(mg_dir)
        checkpointing.load_checkpoint(mg_dir, [model], finetune=True)  # the trainer's loader
        logits = _logits(model, ids)
        if logits is not None and rank == 1:
            torch.save(logits, os.path.join(out_dir, f"{name}.pt"))
        if resave_dir:
            checkpointing.save_checkpoint(resave_dir, 0, [model], None, None, consumed_samples=0)


def _spawn(tp, pp, jobs, out_dir, seq=48):
    """Each job's logits at layout TP x PP (2 ranks) for a batch of ``seq`` tokens."""
    mp.spawn(_worker, args=(_free_port(), tp, pp, jobs, str(out_dir), seq), nprocs=2, join=True)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, make_hf_model(root / kind, kind)) for kind in ("mha", "gqa")}


def _hf_logits(model):
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


def test_tp2_logits_equal_hf_and_tp2_layout_exports_bitwise(megatron_cpu, hf_models, tmp_path):
    jobs = []
    for kind in ("mha", "gqa"):
        hf_to_megatron(ImportOptions(hf_dir=str(hf_models[kind][0]), megatron_dir=str(tmp_path / kind),
                                     dtype="fp32", target_tensor_parallel_size=2, longgen=ALL_FULL))
        jobs.append((kind, str(tmp_path / kind), str(tmp_path / f"{kind}-tp2") if kind == "gqa" else None))
    _spawn(2, 1, jobs, tmp_path)
    for kind in ("mha", "gqa"):
        got = torch.load(tmp_path / f"{kind}.pt")
        assert got.shape == (2, 48, 512)  # vocab padded to a multiple of 128 x TP
        diff = float((got[..., :VOCAB] - _hf_logits(hf_models[kind][1])).abs().max())
        print(f"TP=2 {kind}: max |logit diff| vs HF {diff:.2e}")
        assert diff <= 1e-4

    # The TP=2 save has its own sharding; a one-process export reads it back exactly.
    shutil.copy(tmp_path / "gqa" / RECORD_FILE, tmp_path / "gqa-tp2" / RECORD_FILE)
    megatron_to_hf(ExportOptions(megatron_dir=str(tmp_path / "gqa-tp2"), hf_dir=str(tmp_path / "back")))
    original, back = hf_state(hf_models["gqa"][0]), hf_state(tmp_path / "back")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_pp2_logits_equal_hf(megatron_cpu, hf_models, tmp_path):
    hf_to_megatron(ImportOptions(hf_dir=str(hf_models["gqa"][0]), megatron_dir=str(tmp_path / "gqa"),
                                 dtype="fp32", target_pipeline_parallel_size=2, longgen=ALL_FULL))
    _spawn(1, 2, [("gqa", str(tmp_path / "gqa"), None)], tmp_path)
    got = torch.load(tmp_path / "gqa.pt")
    assert got.shape == (2, 48, 384)
    diff = float((got[..., :VOCAB] - _hf_logits(hf_models["gqa"][1])).abs().max())
    print(f"PP=2 gqa: max |logit diff| vs HF {diff:.2e}")
    assert diff <= 1e-4
