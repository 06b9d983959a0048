"""A tiny random chat model built in the test's tmp dir: real tokenizer machinery (byte-level
BPE, ChatML template, <|im_end|> as eos), a 2-layer Llama, loads in a fraction of a second."""

from __future__ import annotations

import json
from pathlib import Path

from longctx.llm.base import derive_seed

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML,
    )


def build_tiny_chat_model(path: Path, seed: int = 0, extra_eos: list[int] | None = None,
                          max_positions: int = 512, vocab_size: int | None = None,
                          tied: bool = False) -> Path:
    """Save a random tiny Llama + tokenizer at `path`. `extra_eos`: more stop ids for the
    generation_config (as Llama-3 style checkpoints list several); `vocab_size`: rows beyond
    the tokenizer's (a larger output projection); `tied`: the output projection is the input
    embedding (as in SmolLM2 and Llama-3.2)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32,
                         intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, eos_token_id=eos,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=None,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a spikier output distribution: fewer near-ties between tokens
        model.lm_head.weight.mul_(8.0)
    model.generation_config = GenerationConfig(eos_token_id=[eos] + (extra_eos or []),
                                               bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


PROMPTS = [  # varied lengths, so batches need real left padding
    "hi",
    "What is the capital of France?",
    "Summarize: the quick brown fox jumps over the lazy dog, again and again, all day long.",
    "ok",
    "Tell me a story about a lighthouse keeper and a storm at sea.",
    "1 2 3",
    "Why is the sky blue? Explain in detail with physics.",
    "abc",
]


def manifest_files(path: Path) -> dict:
    return json.loads((path / "longctx_manifest.json").read_text())["files"]


class Killed(Exception):
    """Raised where a killed process would have stopped."""


def complete(backend, chats, sampling, seeds=None) -> list:
    """A backend's completions in input order; call i's seed derived from (sampling.seed, i)
    unless `seeds` are given. Every index must come back exactly once."""
    if seeds is None:
        seeds = [derive_seed(sampling.seed, i) % 2**31 for i in range(len(chats))]
    done = {}
    for i, completion in backend.generate(chats, sampling, seeds):
        assert i not in done, f"index {i} yielded twice"
        done[i] = completion
    assert sorted(done) == list(range(len(chats)))
    return [done[i] for i in range(len(chats))]


def kill_on_call(monkeypatch, backend, n: int) -> list[int]:
    """Make the backend's n-th generate call (1-based) die, as a killed process would;
    returns the batch sizes of the calls made (the dying one included)."""
    real, calls = backend.generate, []

    def generate(chats, sampling, seeds):
        calls.append(len(chats))
        if len(calls) == n:
            raise Killed
        return real(chats, sampling, seeds)

    monkeypatch.setattr(backend, "generate", generate)
    return calls
