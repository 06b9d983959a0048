"""`eval.backend: openai` against `transformers serve` for real: one `longctx serve --eval`
replica (offline, CPU, unpinned) serves the evaluated models of a project laid out as the
DAG lays it out (models/base: the bundled model, models/stage-0: a tiny chat model), each
by its path. Greedy, it gives the hf backend's answers and the same report; through lm-eval's
local-completions the same longctx_ruler score as HFLM. A server whose tokenizer differs from
the model directory's, and one without prompt log-probabilities for a log-likelihood task,
are refused in one line naming the URL."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from llm_data import build_tiny_chat_model
from serving import READY_S, Replica, free_port, serve_workdir

from longctx.config import EvalConfig
from longctx.errors import LongctxError
from longctx.eval import ruler
from longctx.eval.lmeval import ruler_window, run_lmeval, write_task_data
from longctx.eval.lmeval_models import make_lm
from longctx.eval.niah import niah_grid
from longctx.eval.report import build_report
from longctx.eval.ruler.sources import TextSources
from longctx.eval.run import evaluate
from longctx.eval.samples import ChatMeasure, read_samples, write_samples
from longctx.llm.cache import CallCache

pytest.importorskip("uvicorn", reason="transformers serve needs pip install 'longctx[serve]'")

HF = EvalConfig(batch_size=8, device="cpu", dtype="float32")
# per model: (NIAH lengths, RULER tasks, RULER length): the micro profile's for the base
# model; the tiny model's tokenizer (bytes) needs longer prompts for the same haystacks
GRIDS = {"base": ([256, 512], ["niah_single_1", "vt"], 512),
         "stage-0": ([640], ["niah_single_1"], 768)}


@pytest.fixture(scope="module")
def project(bundled_model_dir, tmp_path_factory, root):
    """A project dir: models/base and models/stage-0, each model's samples in data/eval/, a
    replica of `longctx serve --eval` running there."""
    workdir = serve_workdir(tmp_path_factory.mktemp("project"), root, "eval")
    (workdir / "models").mkdir()
    (workdir / "models" / "base").symlink_to(bundled_model_dir)
    build_tiny_chat_model(workdir / "models" / "stage-0", max_positions=2048)
    replica = Replica(None, workdir, "eval", endpoint="/v1/completions")
    replica.start()
    try:
        replica.wait_ready(time.monotonic() + READY_S)
        yield workdir, replica
    finally:
        replica.stop()


def _samples(project_dir: Path, name: str, texts: list[str]) -> dict[str, Path]:
    """The NIAH grid and RULER samples of model `name`, sized in its own tokenizer."""
    lengths, tasks, length = GRIDS[name]
    measure, sources = ChatMeasure(project_dir / "models" / name), TextSources(texts)
    out = {"niah": project_dir / "data" / "eval" / name / "niah.parquet",
           "ruler": project_dir / "data" / "eval" / name / "ruler.parquet"}
    write_samples(out["niah"], niah_grid(lengths, [0, 100], 1, 7, measure, sources))
    write_samples(out["ruler"], [s for task in tasks
                                 for s in ruler.generate(task, length, 1, 7, measure, sources)])
    return out


def _evaluate_all(cfg: EvalConfig, samples: dict, results: Path) -> dict:
    """What the eval_niah and eval_ruler jobs of every model write, then `report`'s metrics."""
    written: dict[str, list[Path]] = {"niah": [], "ruler": []}
    for name, paths in samples.items():
        for kind, path in paths.items():
            out = results / name / f"{kind}.json"
            evaluate(kind, cfg, name=name, model=Path("models") / name, samples=path,
                     results=out, cache_path=results / "calls.sqlite")
            written[kind].append(out)
    metrics = build_report(models=list(samples), niah=written["niah"], ruler=written["ruler"],
                           lmeval=[], train=[], train_plots=[],
                           metrics=results / "metrics.json", curves=results / "curves.tsv",
                           plots=results / "plots", report=results / "report.html")
    return {"metrics": metrics, "rows": {
        str(p): [r["prediction"] for r in json.loads(p.read_text())["rows"]]
        for p in written["niah"] + written["ruler"]}}


def test_openai_on_transformers_serve_answers_and_reports_as_hf(project, texts, monkeypatch):
    workdir, replica = project
    monkeypatch.chdir(workdir)  # the jobs name models as the DAG does: models/<name>
    samples = {name: _samples(workdir, name, texts) for name in GRIDS}
    calls = sum(len(read_samples(p)) for paths in samples.values() for p in paths.values())
    hf = _evaluate_all(HF, samples, workdir / "results-hf")
    before = replica.answered()
    down = f"http://127.0.0.1:{free_port()}/v1"  # a replica that is down: the live one answers
    served = EvalConfig(backend="openai", base_url=[down, replica.url], max_retries=0)
    openai = _evaluate_all(served, samples, workdir / "results-openai")

    assert openai["rows"] == {k.replace("results-hf", "results-openai"): v
                              for k, v in hf["rows"].items()}
    assert openai["metrics"] == hf["metrics"]
    assert (workdir / "results-openai" / "metrics.json").read_bytes() == \
        (workdir / "results-hf" / "metrics.json").read_bytes()
    assert hf["metrics"]["base"]["niah"] == 100  # SmolLM2 finds its needles: scores that count
    assert hf["metrics"]["stage-0"]["niah"] == 0  # a random model does not
    # every answer came from the server: each job (NIAH, RULER per model) probes it once,
    # then sends one request per sample
    jobs = 2 * len(GRIDS)
    assert replica.answered_since(before, calls + jobs) == calls + jobs


def test_a_server_whose_tokenizer_differs_is_refused_before_any_answer(project, texts,
                                                                       monkeypatch, tmp_path):
    """models/stage-1 is loaded on the server as the tiny model, then the directory becomes
    the bundled model (a server left running on old weights): the probe tells them apart."""
    workdir, replica = project
    monkeypatch.chdir(workdir)
    stage = Path("models/stage-1")
    stage.symlink_to(workdir / "models" / "stage-0")
    body = {"model": str(stage), "prompt": "hello", "max_tokens": 1}
    request = urllib.request.Request(f"{replica.url}/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:  # the server loads it now
        assert json.loads(reply.read())["usage"]["prompt_tokens"] == 5  # a byte per token
    stage.unlink()
    stage.symlink_to(workdir / "models" / "base")
    samples = _samples(workdir, "base", texts)["niah"]  # sized in stage-1's tokenizer now
    served = EvalConfig(backend="openai", base_url=replica.url, max_retries=0)
    with pytest.raises(LongctxError) as info:
        evaluate("niah", served, name="stage-1", model=stage, samples=samples,
                 results=tmp_path / "niah.json", cache_path=tmp_path / "calls.sqlite")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"eval.base_url {replica.url}: the server counts ")
    assert "tokens in a probe prompt that models/stage-1's tokenizer counts as " in message
    assert not (tmp_path / "niah.json").exists()
    cache = CallCache(tmp_path / "calls.sqlite")
    assert len(cache) == 0  # nothing answered by the wrong model
    cache.close()


def test_lmeval_local_completions_answers_as_hflm_and_needs_logprobs_for_a_cloze(
        project, texts, monkeypatch, tmp_path):
    """The tiny model (HFLM is slow on CPU: minutes for SmolLM2's 128-token answers): its
    byte-level answers compared text for text, prompts included."""
    from lm_eval.models.api_models import TemplateAPI
    from lm_eval.models.huggingface import HFLM

    from longctx.eval.lmeval import build_cloze

    workdir, replica = project
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LONGCTX_TEST_KEY", "sk-never-written")
    answers: dict[str, list] = {}
    for name, cls in (("hf", HFLM), ("openai", TemplateAPI)):
        monkeypatch.setattr(cls, "generate_until", _recorded(cls.generate_until, answers, name))
    paths = _samples(workdir, "stage-0", texts)  # NIAH (16 new tokens) and RULER (128)
    samples = read_samples(paths["niah"]) + read_samples(paths["ruler"])
    write_task_data(tmp_path, build_cloze(texts, 4, seed=0), samples)
    run = dict(batch_size=4, limit=None, num_fewshot=None, seed=7,
               max_length=ruler_window(samples))
    model = Path("models/stage-0")
    hf = run_lmeval(model, ["longctx_ruler"], tmp_path, engine=HF, **run)
    served = EvalConfig(backend="openai", base_url=replica.url, api_key_env="LONGCTX_TEST_KEY")
    before = replica.answered()
    openai = run_lmeval(model, ["longctx_ruler"], tmp_path, engine=served, **run)
    assert len(answers["hf"]) == len(samples) and all(text for _, text in answers["hf"])
    assert answers["openai"] == answers["hf"]
    assert openai["scores"] == hf["scores"]
    assert openai["config"]["backend"] == "openai" and "device" not in openai["config"]
    assert "sk-never-written" not in json.dumps(openai)
    assert replica.answered_since(before, len(samples) + 1) == len(samples) + 1  # + the probe
    lm = make_lm(served, model, batch_size=1, max_length=None, seed=0, device="cpu",
                 dtype="float32", loglikelihood=[])
    assert lm.header == {"Authorization": "Bearer sk-never-written"}  # named in params
    assert lm.base_url == f"{replica.url}/completions" and lm.max_length + 1 == 2048
    with pytest.raises(LongctxError, match=(
            rf"^eval\.base_url {replica.url}: the server returns no prompt log-probabilities "
            r"\(echo with logprobs\), which the log-likelihood task\(s\) longctx_cloze read; "
            r"run them with eval\.backend hf or vllm, or a server that returns them \(vllm "
            r"serve\)$")):
        run_lmeval(model, ["longctx_ruler", "longctx_cloze"], tmp_path, engine=served, **run)


def _recorded(generate_until, answers: dict, name: str):
    """`generate_until` that also keeps (prompt, answer) pairs, sorted, under `name`."""
    def recording(self, requests, *args, **kwargs):
        out = generate_until(self, requests, *args, **kwargs)
        answers[name] = sorted(zip((r.args[0] for r in requests), out))
        return out
    return recording
