"""Chunked cross-entropy: the full cross-entropy's value and gradients, a chunk at a time (and
Liger's kernel, on a GPU, the same)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from longctx.train.loss import IGNORE_INDEX, chunked_cross_entropy, liger_cross_entropy


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


def test_no_logits_are_ever_saved_for_backward():
    """Autograd keeps the gradients w.r.t. hidden states and weight, never a chunk's logits."""
    hidden, weight, labels = problem(tokens=64, vocab=500)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    assert sorted(saved) == [(128, 16), (500, 16)]  # [tokens, d] and [vocab, d] only
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


def test_gradients_follow_the_upstream_scale_and_mixed_dtypes():
    """The loop backpropagates total * world / tokens; under bf16 autocast the hidden states
    are bf16 while the weight stays fp32: each gradient comes back in its tensor's dtype."""
    hidden, weight, labels = problem()
    ref_grads = torch.autograd.grad(full(hidden, weight, labels) * 0.25, [hidden, weight])
    loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=7)
    for got, want in zip(torch.autograd.grad(loss * 0.25, [hidden, weight]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    loss, _ = chunked_cross_entropy(h16, w32, labels, chunk_tokens=7)
    loss.backward()
    assert h16.grad.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    torch.testing.assert_close(w32.grad, ref_grads[1].float() * 4, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel")
                    is None, reason="Liger's kernel runs on a CUDA GPU (the `gpu` extra)")
@pytest.mark.parametrize("autocast", [False, True])
def test_liger_gives_the_chunked_loss_and_gradients_on_gpu(autocast):
    """train.loss: liger is a drop-in for ours: the same sum, count and gradients, in fp32 and
    with bf16 hidden states against an fp32 weight (training under autocast)."""
    results = []
    for fn in (lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_tokens=64),
               liger_cross_entropy):
        hidden, weight, labels = problem(tokens=300, dim=64, vocab=1000)
        hidden = hidden.float().cuda().detach().requires_grad_()
        weight = weight.float().cuda().detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, n = fn(hidden, weight, labels.cuda())
        grads = torch.autograd.grad(loss, [hidden, weight])
        results.append((loss, n, grads))
    (ours, n_ours, g_ours), (liger, n_liger, g_liger) = results
    assert n_ours.item() == n_liger.item() == 2 * 300 - 8
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(liger, ours, **tolerance)
    for got, want in zip(g_liger, g_ours):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
