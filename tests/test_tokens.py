"""Token-exact chunking: what summarize relies on to keep every prompt inside the window."""

import pytest
from llm_data import build_tiny_chat_model
from synth_data import words

from longctx.errors import LongctxError
from longctx.tokens import split_chunks, token_counter

PARAGRAPHS = [
    "The first paragraph has two sentences. It talks about volcanoes and lava.",
    "A second paragraph follows! It is about honeybees, nectar and the hive.",
    "The third one is short.",
]
TEXT = "\n\n".join(PARAGRAPHS)


@pytest.fixture(scope="module")
def tiny_counter(tmp_path_factory):
    return token_counter(build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat"))


def check(text, chunks, max_tokens, count):
    assert "".join(chunks) == text
    assert all(n <= max_tokens for n in count(chunks))
    assert all(c for c in chunks)


@pytest.mark.parametrize("max_tokens", [1, 3, 7, 12, 25, 1000])
def test_chunks_join_back_and_fit(max_tokens):
    chunks = split_chunks(TEXT, max_tokens, words)
    check(TEXT, chunks, max_tokens, words)


def test_whole_text_is_one_chunk_when_it_fits():
    assert split_chunks(TEXT, 1000, words) == [TEXT]


def test_paragraph_boundaries_come_first():
    chunks = split_chunks(TEXT, 14, words)  # each paragraph fits, two do not
    assert [c.strip() for c in chunks] == PARAGRAPHS


def test_sentence_boundaries_before_words():
    chunks = split_chunks(PARAGRAPHS[0], 7, words)  # 12 words: the paragraph must be cut
    assert chunks == ["The first paragraph has two sentences. ",
                      "It talks about volcanoes and lava."]


def test_giant_word_is_split_by_characters():
    text = "short words " + "x" * 50 + " end"

    def chars(texts):  # one token per character
        return [len(t) for t in texts]

    chunks = split_chunks(text, 8, chars)
    check(text, chunks, 8, chars)
    assert any(set(c) == {"x"} and len(c) == 8 for c in chunks)


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t"])
def test_blank_text_has_no_chunks(text):
    assert split_chunks(text, 10, words) == []


def test_non_positive_limit_is_an_error():
    with pytest.raises(ValueError):
        split_chunks(TEXT, 0, words)


@pytest.mark.parametrize("max_tokens", [5, 40, 90])
def test_real_tokenizer_counts_bound_every_chunk(tiny_counter, max_tokens):
    chunks = split_chunks(TEXT, max_tokens, tiny_counter)
    check(TEXT, chunks, max_tokens, tiny_counter)
    assert len(chunks) > 1


def test_token_counter_counts_without_special_tokens(tiny_counter):
    assert tiny_counter(["abc", "", "hello world"]) == [3, 0, 11]  # byte-level, no merges


def test_token_counter_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(LongctxError, match="not found"):
        token_counter(tmp_path / "nope")
