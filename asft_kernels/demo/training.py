"""Training loops of the demo: full-parameter (base, alignment) and LoRA fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import chat

IGNORE = -100


def encode(tokenizer, prompts: Sequence[str], responses: Sequence[str] | None = None,
           texts: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example, each ending with ``[EOS]``.

    With ``texts`` every token is a target (language modelling on the whole turn); with
    ``prompts``/``responses`` only the response tokens (and ``[EOS]``) are.
    """
    eos = tokenizer.eos_token_id
    out = []
    if texts is not None:
        for text in texts:
            ids = tokenizer(text)["input_ids"] + [eos]
            out.append((ids, list(ids)))
        return out
    for prompt, response in zip(prompts, responses):
        n_prompt = len(tokenizer(chat(prompt))["input_ids"])
        ids = tokenizer(chat(prompt, response))["input_ids"] + [eos]
        out.append((ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    return out


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, steps: int, seed: int, pad_id: int):
    """``steps`` right-padded batches ``(input_ids, attention_mask, labels)``, each (batch, length),
    in epochs of a fixed permutation drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        rows = [examples[i] for i in idx]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, (ids, lab) in enumerate(rows):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            labels[j, : len(lab)] = torch.tensor(lab)
            mask[j, : len(ids)] = 1
        yield input_ids, mask, labels


def train(model: nn.Module, optimizer: torch.optim.Optimizer, examples, *, steps: int, batch_size: int,
          seed: int, pad_id: int, desc: str, progress: bool = True,
          after_step: Callable[[int], bool] | None = None) -> dict:
    """Run up to ``steps`` optimizer steps of causal-LM cross-entropy on ``examples``.

    ``after_step(step)`` (1-based) is called after every step with the model in eval mode;
    returning True stops training there (an early-stopping criterion or a checkpoint).

    Returns ``{"steps": steps run, "final_loss": mean loss (nats/token) of the last 10% of them}``.
    """
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (input_ids, mask, labels) in enumerate(batches(examples, batch_size, steps, seed, pad_id), start=1):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if after_step is not None:
            model.eval()
            stop = after_step(step)
            model.train()
            if stop:
                break
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "final_loss": round(sum(tail) / len(tail), 6)}
