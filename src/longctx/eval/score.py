"""RULER's scoring: case-insensitive substring matches of the references in the prediction.

string_match_all (niah, vt, cwe, fwe, the NIAH grid): the fraction of references found.
string_match_part (qa): 1 if any reference is found -- NVIDIA RULER's definition. (lm-eval's
port computes max over samples of the fraction found, divided by the number of samples; called
per document, as lm-eval does, that is the fraction of references found, which differs from
RULER's when a question has several accepted answers.)
"""

from __future__ import annotations

import re

from longctx.errors import LongctxError
from longctx.eval.samples import EvalSample

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _check(preds: list[str], refs: list[list[str]]) -> None:
    if not preds or len(preds) != len(refs):
        raise LongctxError(f"scoring needs one reference list per prediction and at least one "
                           f"prediction (got {len(preds)} predictions, {len(refs)} references)")
    if any(not ref for ref in refs):
        raise LongctxError("scoring: a sample has no references")


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of the fraction of the sample's references found (0..1)."""
    _check(preds, refs)
    return sum(sum(r.lower() in pred.lower() for r in ref) / len(ref)
               for pred, ref in zip(preds, refs, strict=True)) / len(preds)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of 1 if any of the sample's references is found (0..1)."""
    _check(preds, refs)
    return sum(max(float(r.lower() in pred.lower()) for r in ref)
               for pred, ref in zip(preds, refs, strict=True)) / len(preds)


def score(sample: EvalSample, prediction: str) -> float:
    """One sample's score in percent (0..100), by its metric, after RULER's postprocessing."""
    if sample.metric not in ("all", "part"):
        raise LongctxError(f"{sample.task}: unknown metric {sample.metric!r}")
    match = string_match_all if sample.metric == "all" else string_match_part
    return 100.0 * match([postprocess(prediction)], [list(sample.references)])
