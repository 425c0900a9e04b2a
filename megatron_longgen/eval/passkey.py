"""Passkey retrieval accuracy of a Megatron model, teacher-forced.

Greedy decoding reproduces the passkey exactly when every answer token is the argmax given
the true prefix, so one forward pass per batch gives the exact-match rate; the per-token rate
shows partial retrieval (chance is 10% per digit).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch


@torch.no_grad()
def passkey_accuracy(model, dataset, indices: Sequence[int], device, batch_size: int = 16) -> Dict[str, float]:
    """``dataset`` yields training items whose ``loss_mask`` marks the answer tokens
    (``PasskeyTrainingSet``); ``model`` is a single-stage Megatron GPTModel."""
    was_training = model.training
    model.eval()
    exact, correct, total = 0, 0, 0
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        tokens = torch.stack([it["tokens"] for it in items]).to(device)
        labels = torch.stack([it["labels"] for it in items]).to(device)
        answer = torch.stack([it["answer_mask"] for it in items]).to(device) > 0
        positions = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        predicted = model(tokens, positions, None).argmax(-1)
        hits = (predicted == labels) & answer
        exact += int((hits.sum(-1) == answer.sum(-1)).sum())
        correct += int(hits.sum())
        total += int(answer.sum())
    model.train(was_training)
    return {"exact": exact / len(indices), "token_accuracy": correct / max(total, 1)}


@torch.no_grad()
def passkey_accuracy_generated(engine, dataset, indices: Sequence[int], batch_size: int = 16) -> Dict[str, float]:
    """The same items answered by greedy generation through an inference engine.

    Unlike the teacher-forced pass, this runs the engine's cache policy (``EvictingEngine``:
    sink + window eviction), so trained sparse models and an all-full model with
    inference-time eviction are scored on identical prompts.
    """
    from megatron_longgen.inference.generate import SamplingConfig, generate

    was_training = engine.model.training
    engine.model.eval()
    exact, correct, total, per_item = 0, 0, 0, []
    for start in range(0, len(indices), batch_size):
        samples = [dataset.sample(i) for i in indices[start:start + batch_size]]
        prompts = [[dataset.tokenizer.bos] + s.prompt_token_ids for s in samples]
        answers = [s.answer_token_ids for s in samples]
        cfg = SamplingConfig(max_new_tokens=max(len(a) for a in answers))
        for out, answer in zip(generate(engine, prompts, cfg), answers):
            hits = sum(int(o == a) for o, a in zip(out, answer))
            exact += int(hits == len(answer))
            per_item.append(float(hits == len(answer)))
            correct += hits
            total += len(answer)
    engine.model.train(was_training)
    return {"exact": exact / len(indices), "token_accuracy": correct / max(total, 1),
            "per_item_exact": per_item}
