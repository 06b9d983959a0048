"""Rule `pack`: one stage's training sequences, their loss masks, the mixture, and pack-show.

The tiny tokenizer is byte-level without merges, so one ASCII character is one token and the
ChatML template adds 21 tokens around a user + assistant chat: sizes below are exact.
"""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llm_data import build_tokenizer
from retrieval_data import TOPICS, doc_id, write_docs
from synth_data import run_sharded, scripted_llm

from longctx.cli import main
from longctx.config import EmbedConfig, IndexConfig, Params, SummarizeConfig
from longctx.errors import LongctxError
from longctx.pack import first_fit, largest_remainder, pack_stage, qfs_chats
from longctx.pack_show import pack_show
from longctx.retrieval.embed import embed_corpus
from longctx.retrieval.index import build_index
from longctx.retrieval.search import Retriever
from longctx.sequences import SCHEMA, read_sequences
from longctx.synth.long_output import LONG_OUTPUT_SCHEMA
from longctx.synth.respond import RESPONSES_SCHEMA
from longctx.synth.retrieve import SCHEMA as RETRIEVED_SCHEMA
from longctx.synth.retrieve import vector_column
from longctx.synth.summarize import gather_summaries, summarize
from longctx.synth.tables import write_table
from longctx.train.data import pack_samples as data_pack
from longctx.train.data import to_samples
from longctx.train.loss import IGNORE_INDEX

SEED = 11
END = "<|im_end|>\n"
ONLY_LONG = {"long": 1.0, "long_output": 0.0, "short": 0.0}
ONLY_SHORT = {"long": 0.0, "long_output": 0.0, "short": 1.0}


def paragraphs(name: str, n: int) -> str:
    return "\n\n".join(f"{name} paragraph {k} has words " + " ".join(f"w{k}{j:02d}"
                                                                    for j in range(6)) + "."
                       for k in range(n))


def headers(content: str) -> list[str]:
    return [line for line in content.split("\n") if line.startswith("Document ")]


ALPHA, BETA, GAMMA = paragraphs("Alpha", 2), paragraphs("Beta", 8), paragraphs("Gamma", 30)
LONG = {"Alpha": 20, "Beta": 21, "Gamma": 22}  # document indices after the 20 topics


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer dir, the 20 topics + 3 long documents, their embeddings and a flat index."""
    root = tmp_path_factory.mktemp("pack")
    build_tokenizer().save_pretrained(root / "model")
    texts = list(TOPICS.values()) + [ALPHA, BETA, GAMMA]
    titles = list(TOPICS) + ["Alpha", "Beta", None]
    write_docs(root / "docs.parquet", texts, titles)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGCTX_CACHE", str(root / "cache"))
        embed_corpus(EmbedConfig(shard_size=8), docs=root / "docs.parquet", embeddings=root / "emb")
        build_index(IndexConfig(type="flat"), 0, embeddings=root / "emb", index=root / "index")
    return root


def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(world / "model"))


def write_synth(root, instructions, retrieved=None, responses=None, long_output=(),
                world=None):
    """instructions {id: text}; retrieved {id: [doc index]} (else none: one empty row per
    instruction, as retrieve writes it); responses {id: (text, kept)}; long_output [(id,
    instruction, target, kept)]. With `world`, the query vectors are its embedder's, as
    retrieve keeps them for pack's fill."""
    root.mkdir(parents=True, exist_ok=True)
    write_table(root / "instructions.parquet",
                [{"id": k, "instruction": v} for k, v in instructions.items()],
                pa.schema([("id", pa.string()), ("instruction", pa.string())]))
    ranked = {k: (retrieved or {}).get(k, []) for k in instructions}
    queries = np.zeros((len(ranked), 0), dtype=np.float32)
    if world is not None and ranked:
        queries = Retriever(world / "index", world / "emb").embed_queries(
            [instructions[k] for k in ranked])
    write_table(root / "retrieved.parquet",
                [{"instruction_id": k, "doc_ids": [doc_id(d) for d in v],
                  "scores": [1.0] * len(v)} for k, v in ranked.items()],
                RETRIEVED_SCHEMA, query=vector_column(queries))
    write_table(root / "responses.parquet",
                [{"instruction_id": k, "response": text, "finish_reason": "stop",
                  "n_tokens": len(text.split()), "kept": kept, "reason": None if kept else "empty"}
                 for k, (text, kept) in (responses or {}).items()], RESPONSES_SCHEMA)
    write_table(root / "long_output.parquet",
                [{"id": i, "doc_id": None, "instruction": ins, "target": target,
                  "target_tokens": len(target), "finish_reason": "stop", "kept": kept,
                  "reason": None if kept else "empty"} for i, ins, target, kept in long_output],
                LONG_OUTPUT_SCHEMA)
    return root


def params(length, sequences=None, mixture=None, seed=SEED, **pack):
    return Params.model_validate({
        "seed": seed, "pack": pack,
        "stages": {"schedule": [{"length": length, "steps": 1, "sequences": sequences,
                                 "mixture": mixture}]},
    })


def run(world, synth, p, out=None, stage=0, docs=None, summaries=None):
    out = out or synth / "out"
    stats = pack_stage(p, stage=stage, model=world / "model", docs=docs or world / "docs.parquet",
                       instructions=synth / "instructions.parquet",
                       retrieved=synth / "retrieved.parquet",
                       summaries=summaries or synth / "summaries.parquet",
                       responses=synth / "responses.parquet",
                       long_output=synth / "long_output.parquet", index=world / "index",
                       embeddings=world / "emb", sequences=out / "sequences.parquet",
                       metrics=out / "stats.json")
    assert json.loads((out / "stats.json").read_text()) == stats
    return pq.read_table(out / "sequences.parquet").to_pylist(), stats


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def user_content(text):
    return text.split("<|im_start|>user\n", 1)[1].split(END, 1)[0]


# --------------------------------------------------------------------------- long samples

COMPARE = "Compare alpha and beta in detail."
ANSWER = "Alpha and beta differ."


def test_long_sample_fits_cuts_the_last_document_on_a_boundary_and_learns_everything(
        world, tmp_path):
    synth = write_synth(tmp_path, {"i1": COMPARE, "i2": "Too long.", "i3": "Not kept."},
                        {"i1": [LONG["Alpha"], LONG["Beta"], 0], "i2": [0], "i3": [0]},
                        {"i1": (ANSWER, True), "i2": ("x" * 500, True), "i3": ("no", False)})
    rows, stats = run(world, synth, params(400, mixture=ONLY_LONG, min_cut_tokens=40))
    assert len(rows) == 1 and rows[0]["kind"] == "long" and rows[0]["sample_ids"] == ["i1"]
    row = rows[0]
    # every token but the first, which nothing predicts
    assert not row["learn"][0] and all(row["learn"][1:])
    assert row["sample_lengths"] == [len(row["input_ids"])]
    assert len(row["input_ids"]) <= 400
    text = decode(tokenizer(world), row["input_ids"])
    assert text.endswith(f"<|im_start|>assistant\n{ANSWER}{END}")  # the response is whole
    content = user_content(text)
    assert content.startswith(f"Document 1: Alpha\n{ALPHA}\n\nDocument 2: Beta\n")
    assert content.endswith(f"\n\n{COMPARE}")
    cut = content.split("Document 2: Beta\n", 1)[1].rsplit(f"\n\n{COMPARE}", 1)[0]
    assert BETA.startswith(cut) and len(cut) < len(BETA)
    assert BETA[len(cut):].startswith("\n\n")  # cut at a paragraph boundary
    next_paragraph = BETA[len(cut):].split("\n\n")[1]
    assert len(row["input_ids"]) + len(next_paragraph) + 2 > 400  # as much as fits
    assert "Document 3" not in content  # nothing after the cut document
    assert stats["long_documents"] == {"whole": 1, "cut": 1, "filled": 0, "samples_filled": 0}
    long = stats["kinds"]["long"]
    assert long["available_samples"] == 2  # the kept responses
    assert long["dropped"] == {"too_long": 1, "under_filled": 0}
    n = len(row["input_ids"])
    assert (long["samples"], long["tokens"], long["learnt_tokens"]) == (1, n, n - 1)
    assert stats["padding_fraction"] == round(1 - len(row["input_ids"]) / 400, 6)


def test_a_document_is_not_cut_below_min_cut_tokens(world, tmp_path):
    synth = write_synth(tmp_path, {"i1": COMPARE}, {"i1": [LONG["Alpha"], LONG["Beta"]]},
                        {"i1": (ANSWER, True)})
    rows, stats = run(world, synth, params(400, mixture=ONLY_LONG, min_cut_tokens=300,
                                           min_fill=0.1))
    content = user_content(decode(tokenizer(world), rows[0]["input_ids"]))
    assert content == f"Document 1: Alpha\n{ALPHA}\n\n{COMPARE}"
    assert stats["long_documents"]["cut"] == 0


def test_estimates_are_verified_whole_and_the_last_document_shrunk(world, tmp_path,
                                                                    monkeypatch):
    """A counter that undercounts (as seams can) lets too much in; the whole-sample check
    shrinks the last document until the sample fits."""
    import longctx.pack

    monkeypatch.setattr(longctx.pack, "token_counter",
                        lambda _: lambda texts: [len(t) - len(t) // 10 for t in texts])
    synth = write_synth(tmp_path, {"i1": COMPARE}, {"i1": [LONG["Alpha"], LONG["Beta"]]},
                        {"i1": (ANSWER, True)})
    rows, stats = run(world, synth, params(400, mixture=ONLY_LONG, min_cut_tokens=20))
    ids = rows[0]["input_ids"]
    assert 300 < len(ids) <= 400
    text = decode(tokenizer(world), ids)
    assert text.endswith(f"{ANSWER}{END}")
    cut = user_content(text).split("Document 2: Beta\n", 1)[1].rsplit("\n\n" + COMPARE)[0]
    assert BETA.startswith(cut) and BETA[len(cut):][:1] in ("\n", " ")
    assert stats["long_documents"]["cut"] == 1


@pytest.mark.parametrize("order,position", [("reversed", "start"), ("shuffled", "end")])
def test_document_order_and_instruction_position(world, tmp_path, order, position):
    synth = write_synth(tmp_path, {"i1": COMPARE}, {"i1": [LONG["Alpha"], 0, 2, LONG["Gamma"]]},
                        {"i1": (ANSWER, True)})
    p = params(1000, mixture=ONLY_LONG, document_order=order, instruction_position=position,
               min_cut_tokens=40)  # Gamma (untitled) is cut to fill the length
    rows, stats = run(world, synth, p)
    content = user_content(decode(tokenizer(world), rows[0]["input_ids"]))
    assert stats["long_documents"]["cut"] == 1
    if order == "reversed":
        assert headers(content) == ["Document 1:", "Document 2: Chess", "Document 3: Volcano",
                                    "Document 4: Alpha"]
    else:
        assert sorted(h.split(":")[1] for h in headers(content)) == ["", " Alpha", " Chess",
                                                                    " Volcano"]
        assert [h.split(":")[0] for h in headers(content)] == [f"Document {k}"
                                                               for k in range(1, 5)]
    assert content.startswith(COMPARE + "\n\n") == (position == "start")
    assert content.endswith("\n\n" + COMPARE) == (position == "end")


def test_room_left_is_filled_from_a_new_search_and_thin_samples_are_dropped(world, tmp_path,
                                                                           monkeypatch):
    question = "Compare how lava flows and ash clouds from volcanoes bury towns."
    synth = write_synth(tmp_path, {"v": question, "bare": "Explain honeybees and hives."},
                        {"v": [0, LONG["Alpha"]]},
                        {"v": ("Lava and ash.", True), "bare": ("Bees.", True)}, world=world)
    with monkeypatch.context() as mp:  # pack searches with the query vectors retrieve kept
        mp.setattr("longctx.retrieval.search.load_embedder", lambda *a: pytest.fail("loaded"))
        rows, stats = run(world, synth, params(2000, mixture=ONLY_LONG, fill_top_k=4,
                                               min_fill=0.33))
    hits = Retriever(world / "index", world / "emb").search([question], 4)[0]
    expected = [h.doc_id for h in hits if h.doc_id not in (doc_id(0), doc_id(LONG["Alpha"]))]
    assert len(expected) >= 3
    titles = {doc_id(i): t for i, t in enumerate(TOPICS)}
    content = user_content(decode(tokenizer(world), rows[0]["input_ids"]))
    assert headers(content) == ["Document 1: Volcano", "Document 2: Alpha"] + [
        f"Document {k}: {titles[d]}" for k, d in enumerate(expected, 3)]
    assert stats["long_documents"] == {"whole": 2 + len(expected), "cut": 0,
                                       "filled": len(expected), "samples_filled": 1}
    # "bare" had no retrieved documents: filled with 4 short topics it stays under 0.33 x 2000
    assert stats["kinds"]["long"]["dropped"] == {"too_long": 0, "under_filled": 1}
    assert [r["sample_ids"] for r in rows] == [["v"]]


# --------------------------------------------------------------------------- short samples


def qfs_reply(message):
    if "Document excerpt:" in message:
        chunk = message.split('"""\n', 1)[1]
        return "NOTHING RELEVANT" if "chess" in chunk.lower() else f"about {chunk.split()[0]} a b c"
    return "merged notes here ok"


@pytest.fixture
def qfs(world, tmp_path):
    """summarize (scripted) over three documents: level 0 with a dropped chunk, merges above."""
    synth = write_synth(tmp_path / "synth", {"q1": "Tell me about volcanoes and bees."},
                        {"q1": [0, 6, 2, LONG["Alpha"]]})
    llm = scripted_llm(qfs_reply)
    run_sharded(summarize, gather_summaries,
                SummarizeConfig(chunk_tokens=12, budget_tokens=12, max_new_tokens=16), llm, SEED,
                instructions=synth / "instructions.parquet", retrieved=synth / "retrieved.parquet",
                docs=world / "docs.parquet", summaries=synth / "summaries.parquet",
                metrics=synth / "summaries.json")
    return synth, llm


def test_qfs_prompts_are_rebuilt_exactly_as_summarize_sent_them(world, qfs):
    synth, llm = qfs
    summaries = pq.read_table(synth / "summaries.parquet").to_pylist()
    calls = [r for r in summaries if r["kept"] and r["finish_reason"] != "carried"]
    assert {r["level"] for r in calls} >= {0, 1}
    assert any(not r["kept"] for r in summaries)
    chats = qfs_chats(synth / "summaries.parquet", synth / "instructions.parquet",
                      world / "docs.parquet")
    assert [key for key, _ in chats] == [f"q1/{r['level']}/{r['position']}" for r in calls]
    served = set(llm.backend.served)
    for (_, chat), row in zip(chats, calls):
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert chat[0]["content"] in served
        assert qfs_reply(chat[0]["content"]) == chat[1]["content"] == row["summary"]


def test_short_samples_learn_exactly_the_summary_and_end_of_turn(world, qfs):
    synth, llm = qfs
    rows, stats = run(world, synth, params(2048, mixture=ONLY_SHORT,
                                           short_sequence_tokens=1000))
    tok = tokenizer(world)
    summaries = {f"q1/{r['level']}/{r['position']}": r["summary"]
                 for r in pq.read_table(synth / "summaries.parquet").to_pylist()}
    seen = 0
    for row in rows:
        assert row["kind"] == "short" and len(row["input_ids"]) <= 1000
        start = 0
        for n, key in zip(row["sample_lengths"], row["sample_ids"]):
            ids, learn = row["input_ids"][start:start + n], row["learn"][start:start + n]
            first = learn.index(True)
            assert all(learn[first:]) and not any(learn[:first])
            assert decode(tok, ids[first:]) == summaries[key] + END
            prompt = decode(tok, ids[:first])
            assert prompt.startswith("<|im_start|>user\n")
            assert prompt.endswith(f"{END}<|im_start|>assistant\n")
            assert user_content(prompt) in llm.backend.served
            start += n
            seen += 1
    assert seen == stats["kinds"]["short"]["samples"] == stats["kinds"]["short"][
        "available_samples"]
    assert max(len(r["sample_lengths"]) for r in rows) > 1  # packed several per sequence
    assert stats["kinds"]["short"]["sequence_tokens"] == 1000


def test_a_packed_short_sequence_trains_only_on_learnt_tokens(world, qfs):
    synth, _ = qfs
    run(world, synth, params(2048, mixture=ONLY_SHORT, short_sequence_tokens=1000))
    table = read_sequences(synth / "out" / "sequences.parquet")
    i = max(range(len(table)), key=lambda k: len(table[k].sample_lengths))
    ids, learn, lengths, kind = table[i]
    samples = to_samples(ids, learn, lengths)
    assert kind == "short" and [len(s.input_ids) for s in samples] == lengths
    packed = data_pack(samples, 1000, pad_id=0)
    targets = packed.targets[0].tolist()
    learnt_targets = [t for t, target in enumerate(targets) if target != IGNORE_INDEX]
    # position t predicts token t + 1: exactly the learnt tokens (never a sample's first)
    assert [t + 1 for t in learnt_targets] == [t for t, flag in enumerate(learn) if flag]
    assert all(targets[t] == ids[t + 1] for t in learnt_targets)
    assert packed.position_ids[0, lengths[0]].item() == 0  # the second sample restarts


def test_chat_file_learns_every_assistant_turn(world, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    chats.write_text(json.dumps({"messages": chat}) + "\n\n", encoding="utf-8")
    synth = write_synth(tmp_path / "synth", {})
    rows, _ = run(world, synth, params(512, mixture=ONLY_SHORT, short_source="file",
                                       short_path=str(chats)))
    assert rows[0]["sample_ids"] == ["file:0"]
    tok = tokenizer(world)
    learnt = [decode(tok, [t]) for t, f in zip(rows[0]["input_ids"], rows[0]["learn"]) if f]
    assert "".join(learnt) == "Hello." + END + "Goodbye." + END


@pytest.mark.parametrize("line,match", [
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"record 1 \(line 2\): message 0"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"record 1 \(line 2\): no assistant"),
    ('{"text": "x"}', r"record 1 \(line 2\): no `messages`"),
    ("not json", r"record 1 \(line 2\): not JSON"),
])
def test_a_bad_chat_record_names_the_file_and_the_record(world, tmp_path, line, match):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                            "content": "b"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n", encoding="utf-8")
    synth = write_synth(tmp_path / "synth", {})
    with pytest.raises(LongctxError, match=r"chats\.jsonl: " + match):
        run(world, synth, params(512, mixture=ONLY_SHORT, short_source="file",
                                 short_path=str(path)))


def test_a_bad_parquet_chat_record_names_the_file_and_the_record(world, tmp_path):
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}],
                                          [{"role": "user", "content": "only"}]]}), path)
    synth = write_synth(tmp_path / "synth", {})
    with pytest.raises(LongctxError, match=r"chats\.parquet: record 1: no assistant"):
        run(world, synth, params(512, mixture=ONLY_SHORT, short_source="file",
                                 short_path=str(path)))


def _empty_chat_file(path, kind):
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "blank lines":
        path.write_text("\n\n", encoding="utf-8")
    else:  # a parquet file of 0 rows
        chat = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        pq.write_table(pa.table({"messages": pa.array([], chat)}), path)


@pytest.mark.parametrize("name, kind, detail", [
    ("chats.jsonl", "zero bytes", " (0 bytes)"), ("chats.parquet", "zero bytes", " (0 bytes)"),
    ("chats.jsonl", "blank lines", ""), ("chats.parquet", "no rows", ""),
])
def test_an_empty_chat_file_is_named(world, tmp_path, name, kind, detail):
    """Not a stage whose short share silently goes to the other kinds."""
    path = tmp_path / name
    _empty_chat_file(path, kind)
    synth = write_synth(tmp_path / "synth", {})
    with pytest.raises(LongctxError) as info:
        run(world, synth, params(512, short_source="file", short_path=str(path)))
    assert str(info.value) == f"pack.short_path: {path} holds no records{detail}"
    assert not (synth / "out").exists()


# --------------------------------------------------------------------------- mixture


def mixed(tmp_path, chats=10):
    """2 long samples (one sequence each), 6 long_output samples (3 per 400-token sequence)
    and `chats` short chats from a file (3 per 250-token sequence)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i:02d} " + "q" * 20},
        {"role": "assistant", "content": f"Answer {i:02d} " + "a" * 20}]}) + "\n"
        for i in range(chats)), encoding="utf-8")
    synth = write_synth(tmp_path / "synth", {"i1": COMPARE, "i2": "Compare beta and gamma."},
                        {"i1": [LONG["Beta"]], "i2": [LONG["Gamma"]]},
                        {"i1": (ANSWER, True), "i2": ("Beta and gamma.", True)},
                        [(f"lo{i}", f"Write text {i}.", "t" * 95, True) for i in range(6)])
    return synth, {"short_source": "file", "short_path": str(path), "short_sequence_tokens": 250,
                   "min_cut_tokens": 40}


def test_mixture_counts_and_repeats(world, tmp_path):
    synth, pack = mixed(tmp_path)
    mixture = {"long": 0.5, "long_output": 0.3, "short": 0.2}
    rows, stats = run(world, synth, params(400, sequences=10, mixture=mixture, **pack))
    kinds = stats["kinds"]
    assert [kinds[k]["packed_sequences"] for k in ("long", "long_output", "short")] == [2, 2, 4]
    assert Counter(r["kind"] for r in rows) == {"long": 5, "long_output": 3, "short": 2}
    assert [kinds[k]["repeats"] for k in ("long", "long_output", "short")] == [3, 1, 0]
    assert [r["sequence"] for r in rows] == list(range(10))
    kinds_in_order = [r["kind"] for r in rows]
    assert kinds_in_order != sorted(kinds_in_order, key=["long", "long_output",
                                                         "short"].index)  # shuffled
    longs = Counter(tuple(r["sample_ids"]) for r in rows if r["kind"] == "long")
    assert set(longs) == {("i1",), ("i2",)} and min(longs.values()) >= 2
    lo = [r for r in rows if r["kind"] == "long_output"]
    for r in lo:  # each sample learns all but its first token
        starts = np.cumsum([0] + r["sample_lengths"][:-1]).tolist()
        assert len(starts) == 3 and [t for t, f in enumerate(r["learn"]) if not f] == starts
    assert all(len(r["input_ids"]) <= 250 for r in rows if r["kind"] == "short")
    assert stats["mixture"] == mixture and stats["sequences"] == 10
    assert sum(h["sequences"] for h in stats["length_histogram"]) == 10
    assert [h["upto"] for h in stats["length_histogram"]] == [50 * k for k in range(1, 9)]
    assert kinds["long_output"]["samples"] == 9  # 3 sequences of 3
    assert stats["tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert stats["learnt_tokens"] == sum(sum(r["learn"]) for r in rows)


def test_auto_sequences_repeat_nothing(world, tmp_path, caplog):
    synth, pack = mixed(tmp_path)
    mixture = {"long": 0.5, "long_output": 0.3, "short": 0.2}
    rows, stats = run(world, synth, params(400, mixture=mixture, **pack))
    # 4 sequences: 2 long, 1 long_output, 1 short; a 5th would need a third long one
    assert Counter(r["kind"] for r in rows) == {"long": 2, "long_output": 1, "short": 1}
    assert all(v["repeats"] == 0 for v in stats["kinds"].values())
    assert len({tuple(r["sample_ids"]) for r in rows}) == 4

    empty, pack = mixed(tmp_path / "empty")
    write_synth(empty, {"i1": COMPARE, "i2": "Compare beta and gamma."},
                {"i1": [LONG["Beta"]], "i2": [LONG["Gamma"]]},
                {"i1": (ANSWER, True), "i2": ("Beta and gamma.", True)})  # no long_output
    rows, stats = run(world, empty, params(400, mixture=mixture, **pack))
    assert "no long_output sequences" in caplog.text
    assert stats["mixture"] == {"long": round(5 / 7, 6), "long_output": 0.0,
                                "short": round(2 / 7, 6)}
    assert Counter(r["kind"] for r in rows) == {"long": 2, "short": 1}


def test_same_seed_same_bytes(world, tmp_path):
    synth, pack = mixed(tmp_path)
    mixture = {"long": 0.4, "long_output": 0.3, "short": 0.3}

    def go(out, seed):
        run(world, synth, params(400, sequences=12, mixture=mixture, seed=seed,
                                 document_order="shuffled", **pack), out=out)
        return [(out / n).read_bytes() for n in ("sequences.parquet", "stats.json")]

    assert go(tmp_path / "a", SEED) == go(tmp_path / "b", SEED)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sequences.parquet",
                                                                  "stats.json"]  # no spill
    assert go(tmp_path / "c", SEED + 1)[0] != go(tmp_path / "a", SEED)[0]
    assert pq.read_schema(tmp_path / "a" / "sequences.parquet").remove_metadata() == SCHEMA


def test_nothing_fits_is_an_error_naming_the_stage_and_length(world, tmp_path):
    synth = write_synth(tmp_path, {"i1": COMPARE}, {"i1": []}, {"i1": ("x" * 300, True)},
                        [("lo", "Write.", "y" * 300, True)])
    with pytest.raises(LongctxError, match=r"stages\.schedule\[0\] \(length 200\): no sequence"
                                           r".*long: all 1 samples dropped \(1 too_long"):
        run(world, synth, params(200, mixture={"long": 0.5, "long_output": 0.5, "short": 0}))
    with pytest.raises(LongctxError, match=r"stages\.schedule: no stage 3"):
        run(world, synth, params(200), stage=3)
    assert not (tmp_path / "out").exists()


def test_first_fit_and_largest_remainder():
    assert first_fit([5, 7, 3, 2, 6, 1], 10) == [[0, 2, 3], [1, 5], [4]]
    assert first_fit([], 10) == []
    from fractions import Fraction as F
    assert largest_remainder(10, {"long": F(1, 2), "long_output": F(3, 10),
                                  "short": F(1, 5)}) == {"long": 5, "long_output": 3, "short": 2}
    assert largest_remainder(5, {"long": F(1, 3), "long_output": F(1, 3),
                                 "short": F(1, 3)}) == {"long": 2, "long_output": 2, "short": 1}


# --------------------------------------------------------------------------- reading, showing


def test_reader_names_the_file_on_bad_tables(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sequence": pa.array([0], pa.int32())}), bad)
    with pytest.raises(LongctxError, match=r"bad\.parquet: missing column\(s\) kind"):
        read_sequences(bad)
    worse = tmp_path / "worse.parquet"
    pq.write_table(pa.Table.from_pylist([{
        "sequence": 0, "kind": "short", "input_ids": [1, 2, 3], "learn": [True, False],
        "sample_lengths": [3], "sample_ids": ["x"]}], schema=SCHEMA), worse)
    table = read_sequences(worse)
    assert len(table) == 1
    with pytest.raises(LongctxError, match=r"worse\.parquet: sequence 0: 3 tokens, 2 learn"):
        table[0]
    with pytest.raises(LongctxError, match=r"missing\.parquet: file not found"):
        read_sequences(tmp_path / "missing.parquet")


def test_reader_reads_row_groups_of_a_large_file(world, tmp_path):
    synth, pack = mixed(tmp_path)
    run(world, synth, params(400, sequences=150, mixture={"long": 0, "long_output": 0.5,
                                                          "short": 0.5}, **pack))
    path = synth / "out" / "sequences.parquet"
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    rows = pq.read_table(path).to_pylist()
    table = read_sequences(path)
    assert len(table) == 150
    for i in (0, 63, 64, 149, 5, -1):
        r = rows[i]
        assert table[i] == (r["input_ids"], r["learn"], r["sample_lengths"], r["kind"])
        assert table.sample_ids(i) == r["sample_ids"]


def test_pack_show_marks_exactly_the_learnt_tokens(world, qfs, capsys):
    synth, _ = qfs
    rows, _ = run(world, synth, params(2048, mixture=ONLY_SHORT, short_sequence_tokens=1000))
    path = synth / "out" / "sequences.parquet"
    assert main(["pack-show", str(path), "--sequence", "0", "--model", str(world / "model"),
                 "--color", "never"]) == 0
    shown = capsys.readouterr().out
    row, tok = rows[0], tokenizer(world)
    n = len(row["sample_lengths"])
    assert shown.startswith(f"═══ sequence 0 of {len(rows)} · short · {n} samples · "
                            f"{len(row['input_ids'])} tokens · {sum(row['learn'])} learnt ═══")
    assert f"── sample 1/{n} · short · {row['sample_ids'][0]} · {row['sample_lengths'][0]} " \
           f"tokens · " in shown
    marked = [part.split("]]", 1)[0] for part in shown.split("[[")[1:]]
    start, expected = 0, []
    for length in row["sample_lengths"]:
        ids, learn = row["input_ids"][start:start + length], row["learn"][start:start + length]
        expected.append(decode(tok, [t for t, f in zip(ids, learn) if f]))
        start += length
    assert marked == expected
    assert all(m.endswith(END) for m in marked)

    colored = pack_show(path, world / "model", 0, color="always")
    assert "\x1b[32m" in colored and "[[" not in colored
    short = pack_show(path, world / "model", 0, color="never", max_tokens=20)
    assert f"… {row['sample_lengths'][0] - 20} tokens …" in short


def test_cli_pack_runs_the_stage_from_params(world, tmp_path):
    synth, pack = mixed(tmp_path)
    p = tmp_path / "params.yaml"
    p.write_text(json.dumps({"seed": SEED, "pack": pack, "stages": {"schedule": [
        {"length": 256}, {"length": 400, "steps": 5, "sequences": 5}]}}), encoding="utf-8")
    out = tmp_path / "stage-1"
    args = ["--params", str(p), "pack", "--stage", "1", "--model", str(world / "model"),
            "--docs", str(world / "docs.parquet")]
    for name in ("instructions", "retrieved", "summaries", "responses", "long-output"):
        args += [f"--{name}", str(synth / f"{name.replace('-', '_')}.parquet")]
    args += ["--index", str(world / "index"), "--embeddings", str(world / "emb"),
             "--sequences", str(out / "sequences.parquet"), "--metrics", str(out / "stats.json")]
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["stage"], stats["length"], stats["sequences"]) == (1, 400, 5)
    assert main(args[:4] + ["2"] + args[5:]) == 1
