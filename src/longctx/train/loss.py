"""Cross-entropy over the vocabulary without ever holding a long sequence's logits whole.

At 64K tokens the logits of a 49K-vocabulary model are 3.2G floats (12.9 GB in fp32): most of
a plain training step's memory (REFERENCE.md). Here the hidden states are projected onto the
vocabulary one chunk of tokens at a time, and each chunk's logits are reduced at once to its
loss AND to its gradients (softmax - one-hot, pushed back through the projection): the forward
pass keeps only d(loss)/d(hidden) [T, d] and d(loss)/d(weight) [V, d], and the backward pass
merely scales them. So at most one chunk of logits exists at any moment, and unlike
checkpointing the chunks, no logits are computed twice (the fused linear cross-entropy of
Liger and torchtune, in plain torch). The result equals the full cross-entropy in value and
gradient.

The function returns a SUM and a token count, not a mean: the training loop divides by the
number of target tokens over all accumulation steps and processes, so every token weighs the
same however the tokens fall into micro-batches. `LossModel` wraps a causal LM so that its
forward returns that (sum, count) pair: the module the training loop trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # labels of tokens that carry no loss (transformers' convention)


def _chunks(labels: torch.Tensor, chunk_tokens: int):
    """(start, end) of every chunk holding at least one target: the others cost nothing."""
    for start in range(0, labels.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, labels.shape[0])
        if (labels[start:end] != IGNORE_INDEX).any():
            yield start, end


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`, its gradients computed chunk by chunk in
    the forward pass (the loss is linear in its upstream gradient, so backward only scales)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.to(hidden.dtype)  # bf16 hidden states (autocast) meet an fp32 weight
        for start, end in _chunks(labels, chunk_tokens):
            h, y = hidden[start:end], labels[start:end]
            logits = (h @ w.T).float()  # fp32 softmax even when training in bf16
            total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            grad = torch.softmax(logits, dim=-1)  # d(sum CE)/d(logits) = softmax - one-hot
            learnt = y != IGNORE_INDEX
            grad[learnt, y[learnt]] -= 1
            grad[~learnt] = 0
            grad = grad.to(h.dtype)
            grad_hidden[start:end] = grad @ w
            grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype),
                (grad_weight * grad_total).to(ctx.weight_dtype), None, None)


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
    count = (labels != IGNORE_INDEX).sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start, end in _chunks(labels, chunk_tokens):  # evaluation: the loss alone
        logits = (hidden[start:end] @ weight.to(hidden.dtype).T).float()
        total = total + F.cross_entropy(logits, labels[start:end], ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total, count


def liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (summed loss, target count) through Liger's fused linear cross-entropy, a
    Triton kernel (GPU only; liger-kernel is in the `gpu` extra). Liger chunks by itself."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return loss(weight, hidden, labels).float(), (labels != IGNORE_INDEX).sum()


class LossModel(nn.Module):
    """A causal LM whose forward returns (summed loss, target tokens) through the chunked
    cross-entropy (or Liger's). Wrapping the LM (rather than calling its parts from the loop)
    keeps the output projection inside the module DDP/FSDP prepare, so sharded weights are
    gathered."""

    def __init__(self, lm: nn.Module, chunk_tokens: int, loss: str = "chunked"):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.loss = loss
        self._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP auto-wrap
        self.config = lm.config  # read by DeepSpeed's Ulysses setup (heads, attention kernel)

    def forward(self, input_ids, position_ids, attention_mask, targets):
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        if self.loss == "liger":
            return liger_cross_entropy(hidden, weight, targets)
        return chunked_cross_entropy(hidden, weight, targets, self.chunk_tokens)
