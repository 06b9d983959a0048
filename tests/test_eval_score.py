"""RULER scoring, checked against lm-eval-harness's port (common_utils) where they agree and
against NVIDIA RULER's "any reference" definition of string_match_part where they differ."""

import pytest
from lm_eval.tasks.ruler import common_utils as lm

from longctx.errors import LongctxError
from longctx.eval.samples import EvalSample
from longctx.eval.score import postprocess, score, string_match_all, string_match_part

PREDS = [
    " The special magic number is 1234567.",
    "tasteful-advance and 7654321, also 1111111",
    "HELLO World",
    "",
    "partial 12345 only",
    "\x00noise\tline\x1f 9999999 \n",
    "apple banana",
]
REFS = [
    ["1234567"],
    ["7654321", "1111111", "2222222"],
    ["hello", "world"],
    ["1234567"],
    ["1234567"],
    ["9999999"],
    ["Apple", "cherry", "banana", "date"],
]


def test_postprocess_equals_lm_evals():
    assert [postprocess(p) for p in PREDS] == lm.postprocess_pred(PREDS)
    assert postprocess("  a\x01b\n") == "a\nb"


def test_string_match_all_equals_lm_evals():
    assert string_match_all(PREDS, REFS) == pytest.approx(lm.string_match_all(PREDS, REFS))
    for pred, ref in zip(PREDS, REFS):
        assert string_match_all([pred], [ref]) == pytest.approx(lm.string_match_all([pred], [ref]))
    assert string_match_all(["HELLO world"], [["hello", "World", "x"]]) == pytest.approx(2 / 3)


def test_string_match_part_with_one_reference_equals_lm_evals_per_document_score():
    for pred, ref in zip(PREDS, REFS):
        if len(ref) != 1:
            continue
        doc = {"max_length": 4096, "outputs": ref}
        expected = lm.process_results_part(doc, [pred])["4096"]
        assert string_match_part([postprocess(pred)], [ref]) == expected


def test_string_match_part_is_rulers_any_reference_not_lm_evals_fraction():
    pred, ref = "The answer is Paris.", ["Paris", "Paris, France"]
    doc = {"max_length": 4096, "outputs": ref}
    assert lm.process_results_part(doc, [pred])["4096"] == 0.5  # lm-eval: fraction found
    assert string_match_part([pred], [ref]) == 1.0  # NVIDIA RULER: any reference found
    # over several samples: RULER's mean of per-sample "any"; lm-eval's max over samples of the
    # fraction found, divided by the number of samples
    preds, refs = ["Paris", "Rome", "no"], [ref, ["rome", "x"], ["yes"]]
    assert string_match_part(preds, refs) == pytest.approx(2 / 3)
    assert lm.string_match_part(preds, refs) == pytest.approx(0.5 / 3)


def sample(metric, references):
    return EvalSample(task="t", length=512, index=0, prompt="p", answer_prefix="a",
                      references=tuple(references), metric=metric, max_new_tokens=8,
                      prompt_tokens=10)


@pytest.mark.parametrize("metric", ["all", "part"])
def test_score_in_percent(metric):
    refs = ["ALPHA-bravo", "1234567", "x9"]
    s = sample(metric, refs)
    assert score(s, " ".join(refs)) == 100.0
    assert score(s, "  " + ", ".join(r.lower() for r in refs) + "\x00") == 100.0
    assert score(s, "") == 0.0
    assert score(s, "nothing relevant here") == 0.0
    assert score(s, "the number is 1234567") == pytest.approx(100 / 3 if metric == "all" else 100)


def test_bad_inputs():
    with pytest.raises(LongctxError):
        string_match_all([], [])
    with pytest.raises(LongctxError):
        string_match_part(["a"], [["a"], ["b"]])
    with pytest.raises(LongctxError):
        string_match_all(["a"], [[]])
