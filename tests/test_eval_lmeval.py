"""lm-eval step: the corpus cloze, the task data and rendered YAMLs, runs on a tiny chat model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_data import build_tiny_chat_model

from longctx.config import LMEVAL_SHIPPED, EvalConfig
from longctx.errors import LongctxError
from longctx.eval.lmeval import (
    build_cloze,
    render_tasks,
    run_lmeval,
    write_task_data,
)
from longctx.eval.samples import ChatMeasure, EvalSample

TOPICS = ["river", "castle", "engine", "garden", "comet", "violin"]


def _doc(topic: str, paragraphs: int = 2) -> str:
    """Paragraphs of 14-word sentences naming the topic, the paragraph and the sentence, so a
    sentence tells which document and place it came from."""
    return "\n\n".join(
        " ".join(f"The {topic} paragraph {p} sentence {s} says something plain about the "
                 f"{topic} and its long story." for s in range(6))
        for p in range(paragraphs))


DOCS = [_doc(t) for t in TOPICS]
RUN = dict(batch_size=2, engine=EvalConfig(device="cpu", dtype="float32"), num_fewshot=None,
           seed=7, max_length=None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("lmeval") / "model", max_positions=2048)


def test_build_cloze_structure_and_determinism():
    records = build_cloze(DOCS, 8, seed=3)
    assert len(records) == 8
    assert records == build_cloze(DOCS, 8, seed=3)
    assert records != build_cloze(DOCS, 8, seed=4)
    assert len({r["id"] for r in records}) == 8
    assert len({r["label"] for r in records}) > 1  # the gold position is randomized
    for rec in records:
        assert set(rec) == {"id", "context", "choices", "label"}
        assert len(rec["choices"]) == len(set(rec["choices"])) == 4
        topic = rec["context"].split()[1]
        assert 40 <= len(rec["context"].split()) <= 120
        true = rec["choices"][rec["label"]]
        # the true continuation follows the context in its own paragraph
        assert any(rec["context"] + " " + true in para for para in DOCS[TOPICS.index(topic)]
                   .split("\n\n"))
        others = [c for i, c in enumerate(rec["choices"]) if i != rec["label"]]
        assert all(c.split()[1] != topic for c in others)  # distractors: other documents


def test_build_cloze_returns_what_it_can_and_raises_on_nothing():
    assert len(build_cloze(DOCS, 1000, seed=0)) == len(DOCS) * 2  # one question per paragraph
    with pytest.raises(LongctxError, match="longctx_cloze"):
        build_cloze(["Too short.", "Also short. Very."], 5, seed=0)
    with pytest.raises(LongctxError):  # questions, but no other document for distractors
        build_cloze(DOCS[:1], 5, seed=0)


def _sample(index: int, refs: tuple[str, ...]) -> EvalSample:
    return EvalSample(task="niah_single_1", length=256, index=index, prompt=f"Say {index}.",
                      answer_prefix="The answer is", references=refs, metric="all",
                      max_new_tokens=3, prompt_tokens=40, depth=50.0)


def test_write_task_data_and_render(tmp_path):
    cloze = build_cloze(DOCS, 3, seed=0)
    paths = write_task_data(tmp_path, cloze, [_sample(0, ("a",)), _sample(1, ("b", "c"))])
    assert sorted(paths) == sorted(LMEVAL_SHIPPED)
    rows = [json.loads(x) for x in paths["longctx_ruler"].read_text().splitlines()]
    assert rows[1] == {"id": "niah_single_1-256-d50-1", "task": "niah_single_1", "length": 256,
                       "input": "Say 1.", "gen_prefix": "The answer is", "outputs": ["b", "c"],
                       "metric": "all", "max_new_tokens": 3}
    filled = render_tasks(tmp_path, list(LMEVAL_SHIPPED), tmp_path / "run" / "tasks")
    assert filled == {"max_gen_toks": {"longctx_ruler": 3}}
    yaml_text = (tmp_path / "run" / "tasks" / "longctx_cloze.yaml").read_text()
    assert json.dumps(str(paths["longctx_cloze"].resolve())) in yaml_text
    assert (tmp_path / "run" / "tasks" / "utils.py").is_file()

    write_task_data(tmp_path, cloze, None)  # a task without data loses its stale file
    assert not (tmp_path / "longctx_ruler.jsonl").exists()
    with pytest.raises(LongctxError, match="label 9"):
        write_task_data(tmp_path, [cloze[0] | {"label": 9}], None)
    with pytest.raises(LongctxError, match="longctx_ruler"):
        render_tasks(tmp_path, ["longctx_ruler"], tmp_path / "run2")


def test_run_lmeval_cloze_is_deterministic(tiny_model, tmp_path):
    write_task_data(tmp_path, build_cloze(DOCS, 6, seed=0), None)
    out = run_lmeval(tiny_model, ["longctx_cloze"], tmp_path, limit=3, **RUN)
    assert set(out["scores"]) == {"lmeval/longctx_cloze/acc", "lmeval/longctx_cloze/acc_norm"}
    assert all(0.0 <= v <= 1.0 for v in out["scores"].values())
    assert out["n_samples"]["longctx_cloze"]["effective"] == 3
    assert out["config"]["chat_template"] == {"longctx_cloze": False}
    assert run_lmeval(tiny_model, ["longctx_cloze"], tmp_path, limit=3, **RUN) == out


def test_run_lmeval_ruler_with_chat_template_and_cloze_without(tiny_model, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    requests, real = [], HFLM.generate_until

    def generate_until(self, reqs, *args, **kwargs):
        requests.extend(reqs)
        return real(self, reqs, *args, **kwargs)

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    # "" is in any prediction, the other reference in none: the scoring path gives 100 and 0.
    samples = [_sample(0, ("",)), _sample(1, ("zq#never#qz",))]
    write_task_data(tmp_path, build_cloze(DOCS, 2, seed=0), samples)
    out = run_lmeval(tiny_model, ["longctx_ruler", "longctx_cloze"], tmp_path, limit=None, **RUN)
    assert out["scores"]["lmeval/longctx_ruler/score"] == 50.0
    assert len(out["scores"]) == 3  # + the cloze's acc, acc_norm, from a second lm-eval call
    assert out["config"]["chat_template"] == {"longctx_ruler": True, "longctx_cloze": False}
    # lm-eval prompts exactly as our RULER runner does: the answer prefix opens the assistant turn
    measure = ChatMeasure(tiny_model)
    assert sorted(r.args[0] for r in requests) == [
        measure.render(s.prompt, s.answer_prefix) for s in samples]
    assert all(r.args[1]["max_gen_toks"] == 3 and not r.args[1]["do_sample"] for r in requests)
    assert out["config"]["max_gen_toks"] == {"longctx_ruler": 3}


def test_lm_eval_sees_every_ruler_prompt_whole_under_its_one_budget(tiny_model, tmp_path,
                                                                     monkeypatch):
    """lm-eval gives longctx_ruler the largest budget of its records and cuts each prompt to
    the window minus it: at the longest sample's length, the long prompt with a small
    budget would lose 37 tokens of its haystack."""
    from lm_eval.models.huggingface import HFLM

    from longctx.config import LmevalConfig
    from longctx.eval.lmeval import evaluate_lmeval, ruler_window
    from longctx.eval.samples import write_samples

    measure, samples = ChatMeasure(tiny_model), []
    for index, (words, budget) in enumerate([(40, 3), (4, 40)]):
        prompt = "Say the word. " + "lighthouse " * words
        n = measure(prompt, "The word is")
        samples.append(EvalSample("niah_single_1", n + budget, index, prompt, "The word is",
                                  ("word",), "all", budget, n))
    assert ruler_window(samples) == samples[0].prompt_tokens + 40 > samples[0].length
    write_samples(tmp_path / "ruler.parquet", samples)
    seen, real = [], HFLM._model_generate
    monkeypatch.setattr(HFLM, "_model_generate", lambda self, context, *a, **kw: seen.append(
        context.shape[1]) or real(self, context, *a, **kw))
    evaluate_lmeval(LmevalConfig(tasks=["longctx_ruler"], batch_size=1),
                    EvalConfig(device="cpu", dtype="float32"), 7, name="tiny", model=tiny_model,
                    docs=tmp_path / "unread.parquet", results=tmp_path / "lmeval.json",
                    ruler=tmp_path / "ruler.parquet")
    assert sorted(seen) == sorted(s.prompt_tokens for s in samples)


def test_run_lmeval_rejects_unknown_tasks(tiny_model, tmp_path):
    with pytest.raises(LongctxError, match="longctx_cloze"):
        run_lmeval(tiny_model, ["longctx_nope"], tmp_path, limit=1, **RUN)
    with pytest.raises(LongctxError, match="no data"):
        run_lmeval(tiny_model, ["longctx_cloze"], tmp_path, limit=1, **RUN)
