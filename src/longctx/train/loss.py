"""Cross-entropy over the vocabulary without ever holding a long sequence's logits whole.

At 64K tokens the logits of a 49K-vocabulary model are 3.2G floats (12.9 GB in fp32): most of
a plain training step's memory (REFERENCE.md). Here the hidden states are projected onto the
vocabulary one chunk of tokens at a time, each chunk's logits are reduced to a loss at once and
recomputed in the backward pass (activation checkpointing), so at most one chunk of logits
exists at any moment. The result equals the full cross-entropy in value and gradient.

The function returns a SUM and a token count, not a mean: the training loop divides by the
number of target tokens over all accumulation steps and processes, so every token weighs the
same however the tokens fall into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels of tokens that carry no loss (transformers' convention)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # fp32 softmax even when training in bf16
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of target tokens) of next-token prediction.

    hidden: [..., T, d] final hidden states; weight: [V, d] the output embedding; labels:
    [..., T] the token each position must predict (already shifted), IGNORE_INDEX where no
    loss is taken.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {labels.shape[0]} labels")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        y = labels[start:start + chunk_tokens]
        if (y == IGNORE_INDEX).all():
            continue  # nothing to learn here: skip the projection entirely
        h = hidden[start:start + chunk_tokens]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y)
    return total, (labels != IGNORE_INDEX).sum()
