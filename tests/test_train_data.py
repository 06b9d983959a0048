"""Packing: a packed sequence trains exactly as its samples one by one (tiny random Llama)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.train.data import Sample, pack
from longctx.train.loss import IGNORE_INDEX, chunked_cross_entropy

SAMPLES = [  # a long sample learns every token; short ones only their target (last tokens)
    Sample([5, 6, 7, 8, 9, 10, 11], [True] * 7),
    Sample([20, 21, 22, 23, 24], [False, False, False, True, True]),
    Sample([30, 31, 32, 33], [False, False, True, True]),
]


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    config._attn_implementation = request.param
    return LlamaForCausalLM(config).double()


def run(model, input_ids, targets, **extra):
    model.zero_grad()
    hidden = model.model(input_ids=input_ids, **extra).last_hidden_state
    total, n = chunked_cross_entropy(hidden, model.lm_head.weight, targets, chunk_tokens=4)
    total.backward()
    return total.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_packed_sequence_equals_its_samples_one_by_one(model):
    packed = pack(SAMPLES, length=20, pad_id=0, dtype=torch.float64)
    loss, n, grads = run(model, packed.input_ids, packed.targets,
                         position_ids=packed.position_ids, attention_mask=packed.attention_mask)
    alone_loss, alone_n, alone_grads = 0.0, 0, None
    for s in SAMPLES:
        one = pack([s], length=len(s.input_ids), pad_id=0, dtype=torch.float64)
        part, k, g = run(model, one.input_ids, one.targets)  # plain causal attention
        alone_loss, alone_n = alone_loss + part, alone_n + k
        alone_grads = g if alone_grads is None else {x: alone_grads[x] + g[x] for x in g}
    assert n == alone_n == 6 + 2 + 2
    torch.testing.assert_close(loss, alone_loss)
    for name in grads:  # eager attention takes its softmax in float32: ~1e-7 differences
        torch.testing.assert_close(grads[name], alone_grads[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_targets_positions_and_segments():
    p = pack(SAMPLES[1:], length=11, pad_id=0)
    x = IGNORE_INDEX
    assert p.targets.tolist() == [[x, x, 23, 24, x, x, 32, 33, x, x, x]]  # never across samples
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]]
    assert p.segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]]
    allowed = p.attention_mask[0, 0] == 0
    assert allowed[6, 5] and not allowed[5, 4] and not allowed[4, 5]  # own sample, causal
    assert allowed[9].tolist() == [False] * 9 + [True, False]  # padding sees only itself


def test_too_many_tokens_and_bad_samples_are_refused():
    with pytest.raises(ValueError, match="hold 16 tokens, more than the sequence length 10"):
        pack(SAMPLES, length=10, pad_id=0)
    with pytest.raises(ValueError, match="3 tokens but 2 learn flags"):
        Sample([1, 2, 3], [True, True])
