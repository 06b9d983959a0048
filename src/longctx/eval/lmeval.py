"""lm-evaluation-harness on a local model directory: our shipped tasks plus standard ones.

Shipped tasks (YAMLs + utils.py in `longctx/eval/tasks/`, over jsonl files written here):
- `longctx_cloze`: a short-context regression check built offline from the corpus, HellaSwag
  style: the opening sentences of a paragraph, the true next sentence among 3 sentences of
  similar length from other documents, scored by log-likelihood (acc, acc_norm).
- `longctx_ruler`: our generated RULER samples, so lm-eval can cross-check our RULER runner
  (score: RULER's string match in percent).

Runs with only shipped tasks are offline (the hub flags are forced on); a standard task
(ifeval, mmlu_pro, ...) needs hub access or its dataset in the local Hugging Face cache.
Log-likelihood tasks run without the chat template (a cloze is text continuation, and base
and trained stages then compare on equal terms), generation tasks with it (the models are chat
models, and our RULER runner prompts them that way); lm-eval applies the choice per call, so
we make one call per kind with the same loaded model. The model runs on the engine of
`eval.backend`, as our own runner's do: lm-eval's HFLM, `vllm` or `local-completions`
(lmeval_models.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longctx.config import LMEVAL_SHIPPED, EvalConfig, LmevalConfig
from longctx.errors import LongctxError, one_line
from longctx.eval.ruler.sources import SENTENCE_WORDS, ends_sentence, split_sentences
from longctx.eval.samples import EvalSample
from longctx.repro import atomic_path, write_json

TASKS_DIR = Path(__file__).parent / "tasks"
CLOZE_KEYS = ("id", "context", "choices", "label")
RULER_KEYS = ("id", "task", "length", "input", "gen_prefix", "outputs", "metric",
              "max_new_tokens")

# --- longctx_cloze ------------------------------------------------------------------------

CONTEXT_WORDS = (40, 120)  # the opening sentences shown
CONTEXT_SENTENCES = (2, 4)
_START = re.compile(r"[\"\u201c]?[A-Z]")


def _words(sentence: str) -> int:
    return len(sentence.split())


def _usable(sentence: str) -> bool:
    """A whole sentence of moderate length: starts like one, ends like one, quotes balanced
    (so split mistakes and markup such as "; Term: ..." lists give no distractors)."""
    return SENTENCE_WORDS[0] <= _words(sentence) <= SENTENCE_WORDS[1] \
        and bool(_START.match(sentence) and ends_sentence(sentence)) \
        and sentence.count('"') % 2 == 0 and sentence.count("(") == sentence.count(")")


def _opening(sentences: list[str]) -> tuple[str, str] | None:
    """(context, true next sentence): the fewest opening sentences that reach the word range."""
    lo, hi = CONTEXT_SENTENCES
    for m in range(lo, min(hi, len(sentences) - 1) + 1):
        words = sum(_words(s) for s in sentences[:m])
        if words > CONTEXT_WORDS[1]:
            return None
        if words >= CONTEXT_WORDS[0]:
            head, nxt = sentences[:m], sentences[m]
            if all(ends_sentence(s) for s in head) and _usable(nxt):
                return " ".join(head), nxt
            return None
    return None


def build_cloze(docs: list[str], n: int, seed: int) -> list[dict]:
    """Up to n cloze questions: {"id", "context", "choices" (4), "label"}, from random.Random(seed).

    Documents are visited round-robin in a shuffled order, so a few long documents do not
    fill the set. Distractors are usable sentences of other documents whose length is within
    a quarter of the true sentence's (widened when too few), so length gives nothing away.
    """
    rng = random.Random(seed)
    candidates: list[list[tuple[str, str, str]]] = []  # per document: (id, context, next)
    pool: list[tuple[int, str, int]] = []  # (words, sentence, document)
    seen: set[str] = set()
    for d, text in enumerate(docs):
        found = []
        for p, paragraph in enumerate(line.strip() for line in text.splitlines()):
            sentences = split_sentences(" ".join(paragraph.split()))
            if (pair := _opening(sentences)) is not None:
                found.append((f"d{d}-p{p}", *pair))
            for s in sentences:
                if _usable(s) and s not in seen:
                    seen.add(s)
                    pool.append((_words(s), s, d))
        candidates.append(found)
    pool.sort()
    lengths = [w for w, _, _ in pool]

    def distractors(true: str, doc: int) -> list[str] | None:
        words = _words(true)
        for slack in (0.25, 0.5, 1.0, math.inf):
            span = max(2.0, slack * words)
            lo, hi = bisect_left(lengths, words - span), bisect_right(lengths, words + span)
            picks = [s for _, s, d in pool[lo:hi] if d != doc and s != true]
            if len(picks) >= 3:
                return rng.sample(picks, 3)
        return None

    for found in candidates:
        rng.shuffle(found)
    order = [d for d in range(len(docs)) if candidates[d]]
    rng.shuffle(order)
    records: list[dict] = []
    for rnd in range(max((len(c) for c in candidates), default=0)):
        for d in order:
            if len(records) == n:
                return records
            if rnd >= len(candidates[d]):
                continue
            rid, context, true = candidates[d][rnd]
            if (others := distractors(true, d)) is None:
                continue
            label = rng.randrange(4)
            records.append({"id": rid, "context": context, "label": label,
                            "choices": others[:label] + [true] + others[label:]})
    if not records:
        raise LongctxError(
            f"longctx_cloze: none of {len(docs)} documents has a paragraph opening with "
            f"{CONTEXT_SENTENCES[0]}-{CONTEXT_SENTENCES[1]} sentences of {CONTEXT_WORDS[0]}-"
            f"{CONTEXT_WORDS[1]} words followed by another sentence (with 3 distractors from "
            f"other documents)")
    return records


def read_docs(path: Path) -> list[str]:
    """The `text` column of a corpus parquet (id, text[, title]), in file order."""
    import polars as pl

    try:
        frame = pl.read_parquet(path, columns=["text"])
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise LongctxError(f"{path}: cannot read the corpus text column ({one_line(exc)})") \
            from None
    return [t for t in frame["text"].to_list() if t]


# --- task data ----------------------------------------------------------------------------


def ruler_record(sample: EvalSample) -> dict:
    """A samples-table row as a longctx_ruler record (ids unique per task/length/depth/index)."""
    depth = "" if sample.depth is None else f"-d{sample.depth:g}"
    return {"id": f"{sample.task}-{sample.length}{depth}-{sample.index}", "task": sample.task,
            "length": sample.length, "input": sample.prompt, "gen_prefix": sample.answer_prefix,
            "outputs": list(sample.references), "metric": sample.metric,
            "max_new_tokens": sample.max_new_tokens}


def _check(task: str, records: list[dict], keys: tuple[str, ...]) -> None:
    if not records:
        raise LongctxError(f"{task}: no records to write")
    for i, rec in enumerate(records):
        missing = [k for k in keys if k not in rec]
        if missing:
            raise LongctxError(f"{task}: record {i} ({rec.get('id')}) lacks {missing}")
        if task == "longctx_cloze" and not (
                len(rec["choices"]) >= 2 and 0 <= rec["label"] < len(rec["choices"])):
            raise LongctxError(f"{task}: record {rec['id']}: label {rec['label']} is not an "
                               f"index into its {len(rec['choices'])} choices")
        if task == "longctx_ruler" and (rec["metric"] not in ("all", "part")
                                        or rec["max_new_tokens"] < 1 or not rec["outputs"]):
            raise LongctxError(f"{task}: record {rec['id']}: needs metric 'all' or 'part', "
                               f"max_new_tokens >= 1 and at least one output")


def write_task_data(out_dir: Path, cloze: list[dict] | None,
                    ruler_samples: list[EvalSample | dict] | None) -> dict[str, Path]:
    """Write `<task>.jsonl` for each shipped task given (None: the task's file is removed, so
    the directory says exactly which tasks have data). Returns {task: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ruler = None if ruler_samples is None else [
        ruler_record(s) if isinstance(s, EvalSample) else dict(s) for s in ruler_samples]
    written = {}
    for task, records, keys in (("longctx_cloze", cloze, CLOZE_KEYS),
                                ("longctx_ruler", ruler, RULER_KEYS)):
        path = out_dir / f"{task}.jsonl"
        if records is None:
            path.unlink(missing_ok=True)
            continue
        _check(task, records, keys)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"
                                   for r in records), encoding="utf-8")
        written[task] = path
    return written


def render_tasks(data_dir: Path, tasks: list[str], out: Path) -> dict[str, Any]:
    """Copy the shipped YAMLs for `tasks` (+ utils.py) into `out` with their data filled in:
    the absolute jsonl path, a private datasets cache, and longctx_ruler's generation budget.
    Returns what was filled in that affects scores ({"max_gen_toks": ...})."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TASKS_DIR / "utils.py", out / "utils.py")
    filled: dict[str, Any] = {}
    for task in tasks:
        data = (Path(data_dir) / f"{task}.jsonl").resolve()
        if not data.is_file():
            raise LongctxError(f"{data}: no data for the lm-eval task {task} "
                               f"(written by longctx.eval.lmeval.write_task_data)")
        text = (TASKS_DIR / f"{task}.yaml").read_text(encoding="utf-8")
        text = text.replace("__LONGCTX_DATA_FILE__", json.dumps(str(data)))
        text = text.replace("__LONGCTX_CACHE_DIR__", json.dumps(str(out.parent / "hf_cache")))
        if task == "longctx_ruler":
            try:
                budget = max(json.loads(line)["max_new_tokens"]
                             for line in data.read_text(encoding="utf-8").splitlines() if line)
            except (ValueError, KeyError, TypeError) as exc:
                raise LongctxError(f"{data}: not longctx_ruler records ({one_line(exc)})") \
                    from None
            text = text.replace("__LONGCTX_MAX_GEN_TOKS__", str(int(budget)))
            filled["max_gen_toks"] = {task: int(budget)}
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
    return filled


# --- running ------------------------------------------------------------------------------

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No downloads inside: the hub libraries read their offline flag once, at import, so the
    environment is set and the already-imported flags are patched too (restored on exit)."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    import datasets.config  # noqa: F401  (imported now, they read the environment set above)
    import huggingface_hub.constants  # noqa: F401

    saved = [(sys.modules[m], a, getattr(sys.modules[m], a)) for m, a in _OFFLINE_FLAGS]
    for module, attr, _ in saved:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _flat_scores(results: dict[str, dict]) -> dict[str, float]:
    """{"lmeval/<task>/<metric>": value}: lm-eval's "<metric>,<filter>" keys, the "none" filter
    dropped (others kept as "<metric>/<filter>"), stderr and non-numbers skipped."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric = name if filt == "none" else f"{name}/{filt}"
            out[f"lmeval/{task}/{metric}"] = float(value)
    return out


def _load_tasks(manager: Any, tasks: list[str]) -> tuple[dict[bool, list[Any]], dict[str, bool]]:
    """The built tasks/groups split by whether they run with the chat template (a group or tag
    does only when all its tasks generate), and that choice per listed name."""
    split: dict[bool, list[Any]] = {False: [], True: []}
    chat_by_name: dict[str, bool] = {}
    for name in tasks:
        try:
            loaded = manager.load([name])
        except Exception as exc:  # datasets and lm-eval raise many kinds here
            raise LongctxError(f"lm-eval task {name}: cannot load it; a standard task needs "
                               f"hub access or its dataset in the local Hugging Face cache "
                               f"({one_line(exc)})") from None
        leaves = list(loaded["tasks"].values())
        chat = bool(leaves) and all(
            t.get_config("output_type") == "generate_until" for t in leaves)
        group = loaded["groups"].get(name)
        split[chat] += [group] if group is not None else leaves
        chat_by_name[name] = chat
    return split, chat_by_name


def run_lmeval(model_dir: Path, tasks: list[str], data_dir: Path, *, engine: EvalConfig,
               batch_size: int, limit: int | None, num_fewshot: int | None, seed: int,
               max_length: int | None) -> dict:
    """Evaluate the model at `model_dir` on `tasks` (shipped ones read their data from
    `data_dir`) on the engine of `engine.backend` (lmeval_models.py); returns {"scores",
    "versions", "n_samples", "config"}. Greedy, seeded and with a fixed batch size, so the
    same inputs give the same scores."""
    from longctx.eval.lmeval_models import make_lm
    from longctx.hub import resolve_device
    from longctx.llm.hf import resolve_dtype

    if not tasks:
        raise LongctxError("lm-eval: no tasks listed (lmeval.tasks)")
    # each task once and no unknown longctx_ name: the params refuse those (LmevalConfig)
    ours = [t for t in tasks if t in LMEVAL_SHIPPED]
    standard = [t for t in tasks if t not in LMEVAL_SHIPPED]
    if not (Path(model_dir) / "config.json").is_file():
        raise LongctxError(f"{model_dir}: not a Hugging Face model directory (no config.json)")

    # Only the shipped tasks are guaranteed offline; a standard task may fetch its dataset
    # where the user's environment allows the hub (HF_HUB_OFFLINE unset).
    no_downloads = offline() if not standard else contextlib.nullcontext()
    with no_downloads, tempfile.TemporaryDirectory(prefix="longctx-lmeval-") as tmp:
        filled = render_tasks(data_dir, ours, Path(tmp) / "tasks")
        import lm_eval
        from lm_eval.tasks import TaskManager

        # The default index (~15k YAMLs) takes seconds to build: only when it is needed.
        manager = TaskManager(include_path=str(Path(tmp) / "tasks"),
                              include_defaults=bool(standard))
        unknown = [t for t in standard if t not in manager.all_tasks]
        if unknown:
            raise LongctxError(
                f"lm-eval: unknown task(s) {unknown}; shipped: {list(LMEVAL_SHIPPED)}. Standard "
                f"lm-eval task names work with hub access, or with their datasets in the local "
                f"Hugging Face cache")
        split, chat_tasks = _load_tasks(manager, tasks)
        device = resolve_device(engine.device)
        dtype = resolve_dtype(engine.dtype, device)
        lm = make_lm(engine, Path(model_dir), batch_size=batch_size, max_length=max_length,
                     seed=seed, device=device, dtype=dtype,
                     loglikelihood=[t for t, chat in chat_tasks.items() if not chat])
        if split[True] and not getattr(lm.tokenizer, "chat_template", None):
            raise LongctxError(f"{model_dir}: the tokenizer has no chat template, which the "
                               f"generation tasks need")
        scores: dict[str, float] = {}
        versions: dict[str, Any] = {}
        n_samples: dict[str, Any] = {}
        for chat, objs in split.items():
            if not objs:
                continue
            res = lm_eval.simple_evaluate(
                model=lm, tasks=objs, task_manager=manager, num_fewshot=num_fewshot,
                limit=limit, bootstrap_iters=0, log_samples=False, apply_chat_template=chat,
                fewshot_as_multiturn=True, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
            scores |= _flat_scores(res["results"])
            versions |= res.get("versions", {})
            n_samples |= res.get("n-samples", {})
    return {"scores": dict(sorted(scores.items())), "versions": versions, "n_samples": n_samples,
            "config": {"tasks": list(tasks), "chat_template": chat_tasks, "limit": limit,
                       "num_fewshot": num_fewshot, "batch_size": batch_size,
                       "backend": engine.backend,
                       **({"dtype": dtype, "device": device} if engine.backend == "hf" else {}),
                       "max_length": max_length, "seed": seed,
                       "lm_eval": lm_eval.__version__, **filled}}


def ruler_window(samples: list[EvalSample]) -> int:
    """The window longctx_ruler needs: lm-eval gives a task one generation budget (the largest
    of its records, render_tasks) and left-truncates every prompt to the window minus that
    budget, so the window holds the longest prompt plus it. A sample's own length holds only
    its own budget: as the window, HFLM and vLLM would cut the haystack of a sample whose
    budget is smaller (vt's 30 tokens beside niah's 128)."""
    return max(s.prompt_tokens for s in samples) + max(s.max_new_tokens for s in samples)


def evaluate_lmeval(cfg: LmevalConfig, eval_cfg: EvalConfig, seed: int, *, name: str,
                    model: Path, docs: Path, results: Path, ruler: Path | None = None) -> dict:
    """The `eval_lmeval` step for the model dir `model`: build the shipped tasks' data (the
    cloze from the corpus `docs`, the RULER samples `ruler` as records), run lm-eval, write
    {"model": name, "scores", ...} to `results`."""
    from longctx.eval.samples import read_samples

    cloze = build_cloze(read_docs(docs), cfg.cloze_samples, seed) \
        if "longctx_cloze" in cfg.tasks else None
    ruler_samples = None
    if "longctx_ruler" in cfg.tasks:
        if ruler is None:
            raise LongctxError("lmeval.tasks lists longctx_ruler: give the RULER samples")
        ruler_samples = read_samples(ruler)
    max_length = ruler_window(ruler_samples) if ruler_samples else None
    with tempfile.TemporaryDirectory(prefix="longctx-lmeval-data-") as tmp:
        write_task_data(Path(tmp), cloze, ruler_samples)
        result = run_lmeval(model, cfg.tasks, Path(tmp), engine=eval_cfg,
                            batch_size=cfg.batch_size, limit=cfg.limit,
                            num_fewshot=cfg.num_fewshot, seed=seed, max_length=max_length)
    result = {"model": name, **result}
    write_json(results, result)
    return result
