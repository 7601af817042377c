"""How much the base model still has to learn from each example: its mean loss on the example's completion.

ASSL's data selection "accounts for the model's own training needs" (SilverSight spec, step 4): an example
the base model already predicts well teaches an adapter little, one it predicts badly teaches more. This
module measures that need once, before training, with one forward pass per example of the frozen base
model; :func:`~hf_compress.experts.select_data` (``weights="loss"``) then weights each example's share of
the coverage objective by it, so regions the model already handles get fewer representatives.

The tokens scored are the ones training puts its loss on (:func:`~.data.packed_instruction_dataset`): the
completion and the EOS after it (the whole text of a text row).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> completion_losses(model, tokenizer, [{"prompt": "Q: 1+1?\\nA:", "completion": " 2"}], progress=False).shape
    torch.Size([1])
"""

from __future__ import annotations

import torch

from ..modeling.layers import evaluation_mode
from ..utils import check_int, progress_bar
from .data import example_tokens, instruction_rows

__all__ = ["completion_losses"]


def completion_losses(model, tokenizer, dataset, *, max_length: int = 256, batch_size: int = 16,
                      progress: bool = True) -> torch.Tensor:
    """``[n]`` mean negative log-likelihood (nats per token) of each example's completion under ``model``.

    Args:
        model: The base causal LM the adapters will train on.
        tokenizer: Its tokenizer (needs an ``eos_token_id``, as training does).
        dataset: Instruction rows (see :func:`~.data.instruction_rows`).
        max_length: Tokens kept per example; a longer one keeps its last ``max_length`` tokens, so the
            completion is scored with as much of its prompt as fits.
        batch_size: Examples per forward.
    """
    check_int("max_length", max_length, minimum=2)
    check_int("batch_size", batch_size, minimum=1)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token_id; set one (training appends it to every example).")
    rows = instruction_rows(dataset)
    sequences: list[tuple[list[int], int]] = []  # (ids, index of the first scored token)
    for prompt, completion in zip(rows.prompts, rows.completions):
        whole, cut = example_tokens(tokenizer, prompt, completion)  # the seam training uses
        whole = whole + [eos]
        drop = max(0, len(whole) - max_length)
        sequences.append((whole[drop:], max(1, cut - drop)))  # a first token has no prediction to score
    device = next(model.parameters()).device
    losses = torch.empty(len(sequences))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))  # similar lengths: little padding
    with evaluation_mode(model):
        for start in progress_bar(range(0, len(order), batch_size), desc="completion loss", disable=not progress,
                          leave=False):
            chunk = order[start : start + batch_size]
            width = max(len(sequences[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), eos, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, index in enumerate(chunk):
                tokens, first = sequences[index]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            # Logits only from the earliest scored prediction on (prompts are most of each row), one row's float
            # copy at a time: the batch's full-vocabulary logits in float were the largest thing held.
            keep = width - min(sequences[i][1] for i in chunk) + 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                               logits_to_keep=keep).logits
            for row, index in enumerate(chunk):
                tokens, first = sequences[index]
                start_at = first - 1 - (width - keep)  # the logits' position that predicts token `first`
                predicted = logits[row, start_at : start_at + len(tokens) - first].float()
                target = ids[row, first : len(tokens)].to(device)
                losses[index] = torch.nn.functional.cross_entropy(predicted, target).cpu()
            del logits
    return losses
