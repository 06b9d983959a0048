"""Chunked cross-entropy: the full cross-entropy's value and gradients, a chunk at a time."""

import pytest
import torch
import torch.nn.functional as F

from longctx.train.loss import IGNORE_INDEX, chunked_cross_entropy


def problem(tokens=37, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens, dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a prompt that carries no loss
    labels[1, -3:] = IGNORE_INDEX
    return hidden, weight, labels


def full(hidden, weight, labels):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_value_and_gradients_equal_the_full_cross_entropy(chunk):
    hidden, weight, labels = problem()
    ref = full(hidden, weight, labels)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    loss, n = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert n.item() == 2 * 37 - 8
    torch.testing.assert_close(loss, ref.float())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_one_chunk_of_logits_is_ever_saved_for_backward():
    """With checkpointing, autograd keeps the inputs of each chunk, never its logits."""
    hidden, weight, labels = problem(tokens=64, vocab=500)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    assert saved  # the chunks' inputs are kept for the recomputation ...
    assert not [s for s in saved if s[-1] == 500]  # ... but no [tokens, vocab] logits
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None


def test_all_ignored_gives_zero_loss_and_zero_tokens_and_no_grad_mode_works():
    hidden, weight, labels = problem()
    loss, n = chunked_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE_INDEX))
    assert loss.item() == 0 and n.item() == 0
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    torch.testing.assert_close(loss, full(hidden, weight, labels).detach().float())


def test_mismatched_shapes_and_bad_chunk_are_refused():
    hidden, weight, labels = problem()
    with pytest.raises(ValueError, match="hidden states but"):
        chunked_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_cross_entropy(hidden, weight, labels, chunk_tokens=0)
