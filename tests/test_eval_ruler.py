"""RULER's 13 tasks and the NIAH grid: templates, answers findable, token-exact sizing.

Prompts are measured with the real SmolLM2 tokenizer and chat template (read from the bundled
GGUF once per module, about 10 s); the haystack text is built here, not read from data/.
"""

import itertools
import json
import re
from collections import Counter

import pytest

from longctx.errors import LongctxError
from longctx.eval.niah import niah_grid
from longctx.eval.ruler import TASKS, generate
from longctx.eval.ruler import cwe as cwe_mod
from longctx.eval.ruler.niah import NOISE
from longctx.eval.ruler.sources import (
    TextSources,
    read_hotpotqa,
    read_squad,
    split_sentences,
)
from longctx.eval.samples import ChatMeasure

MAX_NEW = {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: (\S+?)\.(?=\s|$)")
MENTIONED = "mentioned in the provided text"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
PLACES = ["Avonford", "Brackley", "Carrow", "Dunmere", "Eastwick", "Fallowby", "Greystone",
          "Harwell", "Ivybridge", "Jessop"]
NOUNS = ["bridge", "harbour", "library", "market", "orchard", "railway", "school", "tower",
         "mill", "canal", "garden", "museum"]


def make_texts(docs: int = 10, paragraphs: int = 5) -> list[str]:
    """Plain English documents of 40-50 word paragraphs, each with a year and a name."""
    texts = []
    for d in range(docs):
        paras = []
        for p in range(paragraphs):
            k = d * paragraphs + p
            place, noun = PLACES[k % len(PLACES)], NOUNS[k % len(NOUNS)]
            other = NOUNS[(k * 5 + 3) % len(NOUNS)]
            paras.append(
                f"The {noun} of {place} was first described in {1700 + 3 * k}. Local records "
                f"say it was built by Master Builder {place.upper()[:3].title()}dale with help "
                f"from the whole town. The {other} nearby was smaller and older. People from "
                f"the valley came every week to trade wool, grain and stories there. Nobody "
                f"remembers when the last repairs to the {noun} were finished.")
        texts.append("\n\n".join(paras))
    return texts


@pytest.fixture(scope="module")
def measure(tmp_path_factory):
    from transformers import AutoTokenizer

    from longctx import assets

    gguf = assets.bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(path)
    return ChatMeasure(path)


@pytest.fixture(scope="module")
def sources():
    return TextSources(make_texts())


def check_fit(samples, measure, length, tight=0.9):
    for s in samples:
        assert s.prompt_tokens == measure(s.prompt, s.answer_prefix)
        assert s.prompt_tokens + s.max_new_tokens <= length
        assert s.prompt_tokens + s.max_new_tokens >= tight * length, (s.task, length)


def check_answers(samples):
    for s in samples:
        assert s.references
        if s.task == "fwe":
            context = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:", 1)[0]
            counts = Counter(w for w in context.split() if w != "...")
            top = [w for w, _ in counts.most_common(4)]
            assert set(top[:3]) == set(s.references)
            assert counts[top[2]] > counts[top[3]]  # the third is not tied with the fourth
        else:
            assert all(r in s.prompt for r in s.references), s.task


@pytest.mark.parametrize("task", TASKS)
def test_every_task_fits_its_length_exactly_and_tightly(task, measure, sources):
    for length in (512, 1024):
        samples = generate(task, length, 2, 7, measure, sources)
        assert [s.index for s in samples] == [0, 1]
        assert {s.max_new_tokens for s in samples} == {MAX_NEW.get(task, 128)}
        assert {s.metric for s in samples} == {"part" if task.startswith("qa") else "all"}
        assert all(s.task == task and s.length == length and s.depth is None for s in samples)
        # At 512, one haystack unit can exceed the 10% slack: a uuid needle line (~75 tokens)
        # or one of these test documents (~80 tokens with its header): tight to within one.
        coarse = length == 512 and task in ("niah_multikey_3", "qa_1", "qa_2")
        check_fit(samples, measure, length, (length - 100) / length if coarse else 0.9)
        check_answers(samples)


@pytest.mark.parametrize("task", ["niah_multikey_1", "vt", "cwe", "fwe", "qa_1"])
def test_long_lengths_fit(task, measure, sources):
    samples = generate(task, 4096, 1, 3, measure, sources)
    check_fit(samples, measure, 4096)
    check_answers(samples)


def test_niah_single_1_follows_rulers_template(measure, sources):
    (s,) = generate("niah_single_1", 1024, 1, 0, measure, sources)
    head = ("A special magic number is hidden within the following text. Make sure to memorize "
            "it. I will quiz you about the number afterwards.\n")
    assert s.prompt.startswith(head)
    context, question = s.prompt[len(head):].rsplit("\n", 1)
    needles = NEEDLE_RE.findall(context)
    assert len(needles) == 1
    kind, key, value = needles[0]
    assert kind == "numbers" and re.fullmatch(r"\d{7}", value) and s.references == (value,)
    assert re.fullmatch(r"[a-z -]+-[a-z -]+", key)
    lines = context.split("\n")
    assert lines.count(NOISE) == len(lines) - 1
    assert f"One of the special magic numbers for {key} is: {value}." in lines
    assert question == f"What is the special magic number for {key} mentioned in the provided text?"
    assert s.answer_prefix == f"The special magic number for {key} {MENTIONED} is"
    assert s.meta["haystack"] == "repeat"


def test_multi_needle_tasks_have_their_counts(measure, sources):
    (mk,) = generate("niah_multikey_1", 1024, 1, 1, measure, sources)
    assert len(NEEDLE_RE.findall(mk.prompt)) == 4 and len(mk.references) == 1
    assert mk.prompt.startswith("A special magic number is hidden")

    (mv,) = generate("niah_multivalue", 1024, 1, 1, measure, sources)
    found = NEEDLE_RE.findall(mv.prompt)
    assert len(found) == 4 and len({key for _, key, _ in found}) == 1
    assert sorted(v for _, _, v in found) == sorted(mv.references)
    assert mv.prompt.startswith("Some special magic numbers are hidden")
    assert mv.prompt.endswith(f"What are all the special magic numbers for {found[0][1]} "
                              "mentioned in the provided text?")
    assert mv.answer_prefix == (f"The special magic numbers for {found[0][1]} mentioned in the "
                                "provided text are")

    (mq,) = generate("niah_multiquery", 1024, 1, 1, measure, sources)
    found = NEEDLE_RE.findall(mq.prompt)
    assert len(found) == 4 and len({key for _, key, _ in found}) == 4
    assert len(mq.references) == 4
    keys = mq.answer_prefix.removeprefix("The special magic numbers for ").removesuffix(
        " mentioned in the provided text are")
    assert ", and " in keys and keys.count(", ") == 3
    value_of = {key: value for _, key, value in found}
    asked = keys.replace(", and ", ", ").split(", ")
    assert tuple(value_of[k] for k in asked) == mq.references


@pytest.mark.parametrize("task,kind",
                         [("niah_multikey_2", "numbers"), ("niah_multikey_3", "uuids")])
def test_needle_haystack_is_distractor_needles(task, kind, measure, sources):
    (s,) = generate(task, 1024, 1, 2, measure, sources)
    context = s.prompt.split("\n", 1)[1].rsplit("\n", 1)[0]
    lines = context.split("\n")
    assert len(lines) > 5 and all(NEEDLE_RE.fullmatch(line) for line in lines)
    found = NEEDLE_RE.findall(context)
    key = s.answer_prefix.removeprefix(f"The special magic {kind[:-1]} for ").removesuffix(
        " mentioned in the provided text is")
    assert [v for _, k, v in found if k == key] == list(s.references)
    if kind == "uuids":
        assert re.fullmatch(UUID, key) and re.fullmatch(UUID, s.references[0])
    assert s.meta["haystack"] == "needle"


def test_vt_chain_and_worked_example(measure, sources):
    (s,) = generate("vt", 1024, 1, 5, measure, sources)
    names = s.references
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d{{5}})", s.prompt).group(1)
    for prev, cur in itertools.pairwise(names):
        assert f"VAR {cur} = VAR {prev} " in s.prompt
    assert s.answer_prefix == (
        "Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
        f"are assgined the value {value}, they are:")
    example, task = s.prompt.split("\n\n\n\n", 1)
    assert example.startswith("Memorize and track the chain(s)")
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", example)
    assert task.endswith(f"Question: Find all variables that are assigned the value {value} in "
                         "the text above.")


def test_cwe_counts_and_example(measure, sources):
    for length, (common, uncommon) in ((1024, (6, 1)), (4096, (30, 3))):
        (s,) = generate("cwe", length, 1, 4, measure, sources)
        task_list = s.prompt.rsplit("Memorize the ones that appear most often.\n", 1)[1]
        task_list = task_list.split("\nQuestion:")[0]
        words = re.findall(r"\d+\. (.+?)(?= \d+\. |$)", task_list)
        counts = Counter(words)
        assert {counts[w] for w in s.references} == {common}
        assert set(counts.values()) <= {common, uncommon} and len(s.references) == 10
        assert s.prompt.count("Question: What are the 10 most common words in the above list?") == 2
        assert "list are:1. " in s.prompt  # the example's answer, joined as RULER joins it
        assert s.answer_prefix == "Answer: The top 10 words that appear most often in the list are:"
        assert len(cwe_mod.words()) > 8000


def test_samples_are_deterministic(measure, sources):
    for task in ("niah_single_3", "niah_multikey_2", "vt", "cwe", "fwe", "qa_1"):
        first = generate(task, 512, 2, 11, measure, sources)
        assert first == generate(task, 512, 2, 11, measure, sources)
        assert first != generate(task, 512, 2, 12, measure, sources)
        assert first[0].prompt != first[1].prompt


def test_too_small_length_names_task_and_length(measure, sources):
    with pytest.raises(LongctxError, match=r"niah_multivalue: length 150 is too small"):
        generate("niah_multivalue", 150, 1, 0, measure, sources)
    with pytest.raises(LongctxError, match=r"qa_1: length 100 is too small"):
        generate("qa_1", 100, 1, 0, measure, sources)
    with pytest.raises(LongctxError, match="valid tasks: niah_single_1, .*qa_2"):
        generate("niah", 512, 1, 0, measure, sources)


def test_niah_grid_depths(measure, sources):
    samples = niah_grid([512, 1024], [0, 50, 100], 2, 3, measure, sources)
    assert [(s.length, s.depth, s.index) for s in samples] == [
        (n, float(d), t) for n in (512, 1024) for d in (0, 50, 100) for t in range(2)]
    for s in samples:
        check_fit([s], measure, s.length)
        assert s.task == "niah" and s.metric == "all" and s.max_new_tokens == 16
        head, context = s.prompt.split("\n", 1)
        context, question = context.rsplit("\n", 1)
        assert head.startswith("A special magic number is hidden")
        key = question.removeprefix("What is the special magic number for ").removesuffix(
            " mentioned in the provided text?")
        assert s.answer_prefix == f"The special magic number for {key} {MENTIONED} is"
        needle = f"One of the special magic numbers for {key} is: {s.references[0]}."
        at = context.index(needle)
        if s.depth == 0:
            assert at == 0
        elif s.depth == 100:
            assert context.endswith(needle)
        else:
            middle = (at + len(needle) / 2) / len(context)
            assert 0.4 < middle < 0.6
        sentences = split_sentences(context)
        assert needle in sentences  # at a sentence boundary
    # a trial's needle is the same at every depth of its length
    by_trial = {(s.length, s.index, s.references) for s in samples}
    assert len(by_trial) == 4
    with pytest.raises(LongctxError, match="depths"):
        niah_grid([512], [101], 1, 0, measure, sources)


def squad_json(path):
    contexts = [p for t in make_texts(3, 3) for p in t.split("\n\n")]
    data = {"version": "v2.0", "data": [
        {"title": f"Article {a}", "paragraphs": [
            {"context": contexts[3 * a + p], "qas": [
                {"id": f"{a}{p}", "question": f"When was the thing in paragraph {p} described?",
                 "answers": [{"text": str(1700 + 3 * (3 * a + p)), "answer_start": 0},
                             {"text": f"in {1700 + 3 * (3 * a + p)}", "answer_start": 0}],
                 "is_impossible": False},
                {"id": f"x{a}{p}", "question": "Unanswerable?", "answers": [],
                 "is_impossible": True}]}
            for p in range(3)]}
        for a in range(3)]}
    path.write_text(json.dumps(data))
    return path


def test_qa_from_a_squad_file(tmp_path, measure):
    data = read_squad(squad_json(tmp_path / "dev-v2.0.json"))
    assert len(data.pairs) == 9 and len(data.docs) == 9  # unanswerable questions skipped
    assert all(len(p.more_context) == 2 and p.context[0] not in p.more_context
               for p in data.pairs)
    sources = TextSources(make_texts(), squad=data)
    samples = generate("qa_1", 1024, 3, 0, measure, sources)
    check_fit(samples, measure, 1024, tight=0)  # 9 documents of ~70 tokens run out
    for s, pair in zip(samples, data.pairs):
        assert s.prompt.startswith("Answer the question based on the given documents.")
        assert s.prompt.endswith(f"\n\nQuestion: {pair.query}") and s.answer_prefix == "Answer:"
        assert data.docs[pair.context[0]] in s.prompt and s.references == pair.outputs
        assert [f"Document {i}:\n" in s.prompt for i in range(1, 11)].count(True) == 9


def test_qa_from_a_hotpotqa_file(tmp_path, measure):
    records = [{"_id": str(i), "question": f"Question {i}?", "answer": f"answer {i}",
                "context": [[f"Title {i}-{j}", [f"Sentence {i} {j}. ", f"More {j}."]]
                            for j in range(4)]} for i in range(3)]
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps(records))
    data = read_hotpotqa(path)
    assert len(data.docs) == 12 and data.docs[0] == "Title 0-0\nSentence 0 0. More 0."
    assert all(len(p.context) == 4 for p in data.pairs)
    (s,) = generate("qa_2", 512, 1, 0, measure, TextSources(make_texts(), hotpotqa=data))
    assert "Title 0-3\nSentence 0 3. More 3." in s.prompt and s.references == ("answer 0",)


def test_qa_from_corpus_text(measure, sources):
    for task in ("qa_1", "qa_2"):
        samples = generate(task, 1024, 3, 0, measure, sources)
        check_fit(samples, measure, 1024)
        check_answers(samples)
        for s in samples:
            question = s.prompt.rsplit("Question: ", 1)[1]
            assert question.startswith('What fills the blank "___" in this sentence')
            sentence = question.split(': "', 1)[1].removesuffix('"')
            assert sentence.replace("___", s.references[0]) in s.prompt
    data = sources.qa("qa_2")
    assert all(len(p.context) == 2 for p in data.pairs)


@pytest.mark.parametrize("content,match", [
    ("{not json", "dev.json: cannot read the SQuAD json"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}',
     r"dev.json: data\[0\].paragraphs\[0\].qas\[0\]: missing 'answers'"),
    ('{"data": 3}', "dev.json: top level.data: expected list"),
])
def test_bad_squad_file_is_named(tmp_path, content, match):
    path = tmp_path / "dev.json"
    path.write_text(content)
    with pytest.raises(LongctxError, match=match):
        read_squad(path)


def test_bad_hotpotqa_file_is_named(tmp_path):
    path = tmp_path / "hotpot.json"
    path.write_text('[{"question": "q", "answer": "a", "context": [["t", "not a list"]]}]')
    with pytest.raises(LongctxError, match=r"hotpot.json: record 0.context\[0\]"):
        read_hotpotqa(path)


@pytest.mark.parametrize("read, key, content, detail", [
    (read_squad, "ruler.squad_path", "", " (0 bytes)"),
    (read_squad, "ruler.squad_path", '{"data": []}', " ('data' is an empty list)"),
    (read_hotpotqa, "ruler.hotpotqa_path", "", " (0 bytes)"),
    (read_hotpotqa, "ruler.hotpotqa_path", "[]", " (an empty list)"),
])
def test_an_empty_qa_file_is_named(tmp_path, read, key, content, detail):
    path = tmp_path / "qa.json"
    path.write_text(content)
    with pytest.raises(LongctxError) as info:
        read(path)
    assert str(info.value) == f"{key}: {path} holds no records{detail}"


def test_sources_from_corpus_table(tmp_path):
    import polars as pl

    path = tmp_path / "docs.parquet"
    pl.DataFrame({"id": ["a", "b"], "text": ["One two.  Three\nfour.", "Five six."]}) \
        .write_parquet(path)
    src = TextSources.from_corpus(path)
    assert src.essay(3) == "One two. Three"
    assert src.essay(8) == "One two. Three four. Five six. One two."  # cycles
    assert src.essay_sentences(6) == ["One two.", "Three four.", "Five six."]
    with pytest.raises(LongctxError, match="missing.parquet"):
        TextSources.from_corpus(tmp_path / "missing.parquet")
    with pytest.raises(LongctxError, match="no .*paragraph"):
        src.qa("qa_1")


def test_split_sentences():
    text = 'He said "Go." Then 1990 came! Did it? Yes. e.g. lower case stays.'
    assert split_sentences(text) == ['He said "Go."', "Then 1990 came!", "Did it?",
                                     "Yes. e.g. lower case stays."]
    assert " ".join(split_sentences(text)) == text
    text = 'Dr. Smith met J. R. Doe in the U.S. Army. "Why?" he asked. It cost 5 dollars. 3 left.'
    assert split_sentences(text) == [  # abbreviations and initials end no sentence
        "Dr. Smith met J. R. Doe in the U.S. Army.", '"Why?" he asked.', "It cost 5 dollars.",
        "3 left."]
