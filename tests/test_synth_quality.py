"""Output checks shared by the synthesis steps: loops are caught, ordinary prose is not."""

import pytest
from retrieval_data import TOPICS

from longctx.synth.quality import is_refusal, is_repetitive, max_compression_ratio

PROSE = " ".join(TOPICS.values())  # ~1,800 characters of varied sentences


@pytest.mark.parametrize("text", [
    "The excerpt is: " * 12,  # one phrase again and again
    "Write a detailed article about the language of the Austronesian Austronesian Austronesic "
    "Austronesian Austronesian Austronesian Austronesian Austronesian Austronesian Austronesian "
    "Austronesian Austronesian Austronesic Austronesian",  # a varied one-word loop
    PROSE[:600] + " It also includes details about the shift of ASCII values." * 6,
])
def test_loops_are_repetitive(text):
    assert is_repetitive(text, 0.3)


def test_prose_of_any_length_is_not_repetitive():
    assert not is_repetitive(PROSE, 0.3)
    assert max_compression_ratio(PROSE) < 2.0  # windows: length alone does not raise it
    assert not is_repetitive("Bees make honey.", 0.3)
    assert max_compression_ratio("") == 0.0


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("The documents do not mention any eruption in 1990.", True),
    ("Unfortunately, there is no information about it.", True),
    ("Volcanoes erupt when magma rises; I cannot stress this enough.", False),
])
def test_refusals_are_recognised_by_their_opening(text, refused):
    assert is_refusal(text) == refused
