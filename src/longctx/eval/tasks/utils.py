"""Functions the longctx task YAMLs reference with `!function utils.<name>`.

lm-eval imports this file from next to the rendered YAML, so it must stay self-contained apart
from `longctx` itself (the scoring is RULER's, shared with the project's own runner).
"""

from __future__ import annotations


def ruler_target(doc: dict) -> str:
    """A readable target for logged samples; scoring uses all of `outputs`."""
    return ", ".join(doc["outputs"])


def ruler_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER's string match (all / part) of the postprocessed prediction, in percent."""
    from longctx.eval.score import postprocess, string_match_all, string_match_part

    match = string_match_all if doc["metric"] == "all" else string_match_part
    return {"score": 100.0 * match([postprocess(results[0])], [list(doc["outputs"])])}
