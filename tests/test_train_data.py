"""Packing: a packed sequence trains exactly as its samples one by one (tiny random Llama)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx.train.data import Sample, collate, document_block_mask, pack_samples, shard
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
    packed = pack_samples(SAMPLES, length=20, pad_id=0, dtype=torch.float64)
    loss, n, grads = run(model, packed.input_ids, packed.targets,
                         position_ids=packed.position_ids, attention_mask=packed.attention_mask)
    alone_loss, alone_n, alone_grads = 0.0, 0, None
    for s in SAMPLES:
        one = pack_samples([s], length=len(s.input_ids), pad_id=0, dtype=torch.float64)
        part, k, g = run(model, one.input_ids, one.targets)  # plain causal attention
        alone_loss, alone_n = alone_loss + part, alone_n + k
        alone_grads = g if alone_grads is None else {x: alone_grads[x] + g[x] for x in g}
    assert n == alone_n == 6 + 2 + 2
    torch.testing.assert_close(loss, alone_loss)
    for name in grads:  # eager attention takes its softmax in float32: ~1e-7 differences
        torch.testing.assert_close(grads[name], alone_grads[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_targets_positions_and_segments():
    p = pack_samples(SAMPLES[1:], length=11, pad_id=0)
    x = IGNORE_INDEX
    assert p.targets.tolist() == [[x, x, 23, 24, x, x, 32, 33, x, x, x]]  # never across samples
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]]
    assert p.segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]]
    allowed = p.attention_mask[0, 0] == 0
    assert allowed[6, 5] and not allowed[5, 4] and not allowed[4, 5]  # own sample, causal
    assert allowed[9].tolist() == [False] * 9 + [True, False]  # padding sees only itself


def test_context_parallel_slices_cover_the_padded_rows():
    """4 slices of 9 tokens padded to 12: each 3 tokens, laid side by side the whole row, every
    token with its own target and position; no mask (sequence parallelism masks causally)."""
    whole = pack_samples(SAMPLES[1:], length=9, pad_id=0, mask=False)
    slices = [shard(whole, 4, k, pad_id=0) for k in range(4)]
    assert all(s.input_ids.shape == (1, 3) and s.attention_mask is None for s in slices)
    x = IGNORE_INDEX
    for name, padding in (("input_ids", 0), ("targets", x), ("position_ids", 0),
                          ("segments", -1)):
        side_by_side = torch.cat([getattr(s, name) for s in slices], dim=1)
        assert side_by_side.tolist() == [getattr(whole, name)[0].tolist() + [padding] * 3]


def test_too_many_tokens_and_bad_samples_are_refused():
    with pytest.raises(ValueError, match="hold 16 tokens, more than the sequence length 10"):
        pack_samples(SAMPLES, length=10, pad_id=0)
    with pytest.raises(ValueError, match="3 tokens but 2 learn flags"):
        Sample([1, 2, 3], [True, True])


def _segments(lengths):
    return torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]


@pytest.mark.parametrize("lengths", [[300], [128, 128], [100, 28, 128, 5], [5] * 40,
                                     [128, 128, 128, 1], [129, 255, 7, 400]])
def test_document_block_mask_equals_flex_attentions_own(lengths):
    """Our block-bound construction gives the very BlockMask torch builds by evaluating the
    mask on every token pair: the same partial AND full blocks (a block wrongly marked full
    would let samples see each other, the kernel skipping the mask there)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = _segments(lengths)
    length = seg.shape[1]
    doc = torch.nn.functional.pad(seg[0], (0, -length % 128), value=-1)
    reference = create_block_mask(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), 1, None,
                                  length, length, device="cpu", _compile=False)
    ours = document_block_mask(seg)

    def blocks(mask):
        return [[sorted(idx[0, 0, i, :num[0, 0, i]].tolist()) for i in range(num.shape[-1])]
                for num, idx in ((mask.kv_num_blocks, mask.kv_indices),
                                 (mask.full_kv_num_blocks, mask.full_kv_indices))]

    assert blocks(ours) == blocks(reference)
    dense = torch.stack([ours.mask_mod(0, 0, torch.tensor(q), torch.arange(length))
                         for q in range(length)])
    allowed = pack_samples([Sample([1] * n, [True] * n) for n in lengths], length,
                           0).attention_mask
    assert torch.equal(dense, allowed[0, 0] == 0)


def test_document_block_mask_refuses_padding():
    with pytest.raises(ValueError, match="unpadded samples laid end to end"):
        document_block_mask(torch.tensor([[0, 0, 1, -1]]))


def test_flex_attention_sees_each_sample_alone():
    """A micro-batch collated for flex_attention (one row, block-sparse mask) gives the hidden
    states of sdpa's dense mask (forward only: torch has no flex backward on CPU)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(3, 60, (n,), generator=g).tolist(), [True] * n)
               for n in (150, 40, 90)]
    hidden = {}
    for attention in ("sdpa", "flex_attention"):
        model.config._attn_implementation = attention
        ids, positions, mask, _ = collate([samples[:2], samples[2:]] if attention == "sdpa"
                                          else [samples], attention, 0).model_inputs("cpu")
        with torch.no_grad():
            out = model.model(input_ids=ids, position_ids=positions,
                              attention_mask=mask).last_hidden_state
        hidden[attention] = out if attention == "flex_attention" else torch.cat(
            [out[0, :190], out[1, :90]])[None]  # sdpa: two padded rows, laid end to end
    assert type(mask).__name__ == "BlockMask"
    torch.testing.assert_close(hidden["flex_attention"], hidden["sdpa"], rtol=1e-4, atol=1e-5)


def test_flex_attention_compiles_once_whatever_the_samples():
    """Every micro-batch brings its own sample bounds (a new mask closure): the compiled
    kernel must not recompile for each, or training would crawl and, past dynamo's recompile
    limit, fall back to eager attention and its whole [T, T] scores. A new row length
    compiles once more (then dynamic), new layouts not at all."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    config._attn_implementation = "flex_attention"
    model = LlamaForCausalLM(config)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for layout in ([150, 40, 90], [100, 100, 80], [20, 260], [150, 40, 90, 30], [300, 10, 50],
                   [77, 33, 250]):
        row = collate([[Sample([3 + k % 50] * n, [True] * n) for k, n in enumerate(layout)]],
                      "flex_attention", 0)
        ids, positions, mask, _ = row.model_inputs("cpu")
        with torch.no_grad():
            model.model(input_ids=ids, position_ids=positions, attention_mask=mask)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [graphs[0]] * 3 + [graphs[0] + 1] * 3

@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention trains only on GPU")
def test_flex_attention_trains_each_sample_alone_on_gpu():
    """On a GPU: one flex_attention row of three samples spanning several 128-token blocks
    gives the loss and gradients of the samples run one by one."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    config._attn_implementation = "flex_attention"
    model = LlamaForCausalLM(config).cuda()
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(3, 60, (n,), generator=g).tolist(), [k % 2 == 0] * n)
               for k, n in enumerate((150, 40, 300))]

    def loss_and_grads(batch):
        ids, positions, mask, targets = batch.model_inputs("cuda")
        return run(model, ids, targets, position_ids=positions, attention_mask=mask)

    loss, n, grads = loss_and_grads(collate([samples], "flex_attention", 0))
    parts = [loss_and_grads(collate([[s]], "flex_attention", 0)) for s in samples]
    assert n == sum(k for _, k, _ in parts) == 149 + 299
    torch.testing.assert_close(loss, sum(p for p, _, _ in parts), rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], sum(g[name] for _, _, g in parts), rtol=1e-3,
                                   atol=1e-5, msg=name)
