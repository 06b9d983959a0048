"""The transformers backend on a tiny random chat model: batching must not change outputs."""

import json

import pytest
from llm_data import PROMPTS, build_tiny_chat_model, build_tokenizer, complete, user

from longctx.errors import LongctxError
from longctx.llm.base import Sampling
from longctx.llm.cache import CallCache
from longctx.llm.client import LLM
from longctx.llm.hf import HFBackend, resolve_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat")


@pytest.fixture(scope="module")
def backend(model_dir):
    return HFBackend(model_dir)


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=10),
                                      Sampling(max_new_tokens=10, temperature=1.0, seed=4)],
                         ids=["greedy", "sampled"])
def test_a_call_comes_out_the_same_whatever_shares_its_batch(backend, sampling):
    """The contract the per-call cache and sharded steps stand on: batched, alone, or among
    other batch-mates in another order, a call with its seed gives the same completion."""
    chats = [user(p) for p in PROMPTS]
    lengths = backend.prompt_tokens([backend.render(c) for c in chats])
    assert max(lengths) > 2 * min(lengths)  # the batch really is padded
    seeds = [100 + i for i in range(len(chats))]
    batched = complete(backend, chats, sampling, seeds)
    alone = [complete(backend, [c], sampling, [s])[0] for c, s in zip(chats, seeds)]
    shuffled = complete(backend, chats[::-1][:5], sampling, seeds[::-1][:5])
    assert batched == alone
    assert shuffled == batched[::-1][:5]
    assert len({c.text for c in batched}) > 1  # outputs depend on the prompt


def test_a_sampled_call_follows_its_own_seed(backend):
    chats = [user(PROMPTS[4])] * 2
    sampling = Sampling(max_new_tokens=12, temperature=1.0)
    same, other = complete(backend, chats, sampling, [7, 7]), complete(backend, chats[:1],
                                                                       sampling, [8])
    assert same[0] == same[1] != other[0]


def test_top_p_that_keeps_one_token_samples_the_greedy_text(backend):
    """Temperature and top-p are applied as transformers applies them before the noise: a
    nucleus of one token leaves nothing to sample."""
    chats = [user(p) for p in PROMPTS[:4]]
    narrow = Sampling(max_new_tokens=10, temperature=1.0, top_p=1e-9)
    assert complete(backend, chats, narrow) == complete(backend, chats, Sampling(max_new_tokens=10))


def test_unpadded_prefill_gives_what_a_padded_batch_gives(backend, monkeypatch):
    """On CPU a mixed-length batch is prefilled prompt by prompt; the plain padded batch
    (what a GPU runs) must produce the same tokens, greedy and sampled."""
    chats = [user(p) for p in PROMPTS]
    calls = []
    real = backend._prefill_unpadded
    monkeypatch.setattr(backend, "_prefill_unpadded", lambda ids: calls.append(1) or real(ids))
    assert backend.unpadded_prefill  # the default on CPU
    for sampling in (Sampling(max_new_tokens=10),
                     Sampling(max_new_tokens=10, temperature=1.0, seed=3)):
        backend.unpadded_prefill = True
        unpadded = complete(backend, chats, sampling)
        backend.unpadded_prefill = False
        padded = complete(backend, chats, sampling)
        assert unpadded == padded
    backend.unpadded_prefill = True
    assert len(calls) == 2  # once per unpadded generate, never on the padded path


def test_unpadded_prefill_cache_equals_the_padded_batch_cache(backend):
    """Each row of the joined cache holds, right-aligned, exactly the keys and values a
    left-padded batch forward computes for that prompt (RoPE positions included)."""
    import torch

    ids = backend._encode([backend.render(user(p)) for p in PROMPTS])
    cache = backend._prefill_unpadded(ids)
    batch = backend.tokenizer.pad({"input_ids": [x[:-1] for x in ids]}, padding=True,
                                  return_tensors="pt")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = backend.model(**batch, position_ids=positions, use_cache=True).cache
    for mine, theirs in zip(cache.layers, ref.layers, strict=True):
        assert mine.keys.shape == theirs.keys.shape
        for row, x in enumerate(ids):
            n = len(x) - 1
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                torch.testing.assert_close(a[row, :, a.shape[2] - n:], b[row, :, b.shape[2] - n:])
                assert not a[row, :, :a.shape[2] - n].any()  # padding: zeros, masked out


def test_render_is_the_chat_template_with_generation_prompt(backend):
    text = backend.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    # the template wrote the special tokens; tokenizing must not add a second BOS
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert backend.prompt_tokens([text]) == [len(ids)]
    assert ids[0] == backend.tokenizer.bos_token_id and ids[1] != ids[0]


def test_max_new_tokens_and_length_finish(backend):
    for n in (1, 7):
        (out,) = complete(backend, [user("hello there")], Sampling(max_new_tokens=n))
        assert out.completion_tokens == n
        assert out.finish_reason == "length"
        assert out.prompt_tokens == backend.prompt_tokens([backend.render(user("hello there"))])[0]


def test_generation_config_eos_ids_stop_generation(model_dir, backend, tmp_path):
    """A checkpoint may list several end-of-turn ids (Llama 3 does): each one stops."""
    chats = [user("What is the capital of France?"), user("hi")]
    prompt = backend.tokenizer(backend.render(chats[0]), add_special_tokens=False,
                               return_tensors="pt")
    out = backend.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    first_ids = out[0, prompt["input_ids"].shape[1]:].tolist()  # what greedy decoding picks
    stop_id = first_ids[4]  # the 5th generated token becomes an end-of-turn token
    stopper = build_tiny_chat_model(tmp_path / "stopper", extra_eos=[stop_id])
    stopping = HFBackend(stopper)
    assert stop_id in stopping.eos_ids and backend.tokenizer.eos_token_id in stopping.eos_ids
    outs = complete(stopping, chats, Sampling(max_new_tokens=12))
    k = first_ids.index(stop_id)  # the first occurrence is where generation stops
    assert outs[0].finish_reason == "stop"
    assert outs[0].completion_tokens == k + 1  # the stop token counts, its text does not
    assert outs[0].text == backend.tokenizer.decode(first_ids[:k])
    # the other row keeps going after its neighbour stopped, and is unaffected by it
    assert outs[1] == complete(stopping, [chats[1]], Sampling(max_new_tokens=12))[0]


def test_weights_load_only_for_a_call_not_in_the_cache(model_dir, tmp_path):
    """A rerun whose calls are all cached (a resumed step, the second of two runs sharing a
    cache) renders, counts and keys its prompts with the tokenizer alone."""
    chats = [user(p) for p in PROMPTS[:3]]
    sampling = Sampling(max_new_tokens=6)
    with LLM(HFBackend(model_dir), CallCache(tmp_path / "calls.sqlite"), 2) as first:
        made = first.chat(chats, sampling, "t/1")
    rerun = HFBackend(model_dir)
    with LLM(rerun, CallCache(tmp_path / "calls.sqlite"), 2) as llm:
        assert llm.chat(chats, sampling, "t/1") == made
        assert llm.last.hits == 3 and "model" not in vars(rerun)  # never loaded
        llm.chat([user("something new")], sampling, "t/1")
        assert llm.last.misses == 1 and "model" in vars(rerun)


def test_without_generation_config_json_the_model_config_gives_the_special_tokens(tmp_path):
    """What `from_pretrained` derives for a checkpoint that has no generation_config.json."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_chat_model(tmp_path / "bare")
    (path / "generation_config.json").unlink()
    bare = HFBackend(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).generation_config
    assert bare.eos_ids == [loaded.eos_token_id] == [bare.tokenizer.eos_token_id]
    assert bare.generation_config.bos_token_id == loaded.bos_token_id is not None
    (out,) = complete(bare, [user("hello")], Sampling(max_new_tokens=4))
    assert out.completion_tokens > 0 and bare.model.generation_config is bare.generation_config


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(backend):
    chats = [user(p) for p in PROMPTS[:4]]

    def sample(seed):
        return complete(backend, chats, Sampling(max_new_tokens=12, temperature=1.0, seed=seed))

    a = sample(1)
    complete(backend, chats, Sampling(max_new_tokens=5, temperature=1.0, seed=99))  # other work
    assert sample(1) == a  # nothing that ran before matters
    assert sample(2) != a
    assert a != complete(backend, chats, Sampling(max_new_tokens=12))  # it really samples


def test_prompt_longer_than_the_window_is_refused(tmp_path):
    small = HFBackend(build_tiny_chat_model(tmp_path / "small", max_positions=64))
    assert small.context_tokens == 64
    chats = [user("short"), user("x" * 60)]
    with pytest.raises(LongctxError, match=r"prompt 1 has \d+ tokens.*64-token window"):
        complete(small, chats, Sampling(max_new_tokens=8))
    configured = HFBackend(tmp_path / "small", context_tokens=32)
    with pytest.raises(LongctxError, match="32-token window"):
        complete(configured, [user("a" * 20)], Sampling(max_new_tokens=8))


def test_identity_hashes_model_files_or_reads_the_manifest(model_dir, tmp_path):
    _, identity = resolve_model(str(model_dir))
    assert {"model.safetensors", "tokenizer.json", "config.json",
            "generation_config.json"} <= set(identity["files"])
    manifest_dir = tmp_path / "with_manifest"
    manifest_dir.mkdir()
    (manifest_dir / "config.json").write_text("{}")
    (manifest_dir / "longctx_manifest.json").write_text(json.dumps({"files": {"a": "b"}}))
    assert resolve_model(str(manifest_dir))[1] == {"files": {"a": "b"}}
    with pytest.raises(LongctxError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_a_tokenizer_without_chat_template_is_named(tmp_path):
    path = build_tiny_chat_model(tmp_path / "plain")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(path)
    with pytest.raises(LongctxError, match="no chat template"):
        HFBackend(path).render(user("hi"))
