"""The sizes `longctx plan` needs before anything runs: the models' shapes and the corpus's.

A model's shape comes from its config.json when it is local (a directory, models/base, the
bundled packages, a hub cache snapshot), else from KNOWN (the config.json values of the
models the profiles name), else the user gives a config.json by flag; nothing downloads.
The corpus's size comes from the corpus step's docs.parquet when it exists (every document's
length), else from the params (per-source and total max_documents) and a mean length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.config import BUNDLED, Params
from longctx.errors import ConfigError, LongctxError

# config.json values (the keys a shape reads) of the models the shipped profiles name
_LLAMA = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              intermediate_size=14336)
_SMOLLM2 = dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                max_position_embeddings=8192, rope_theta=100000.0)
KNOWN: dict[str, dict[str, Any]] = {
    "llama-3.1-8b-instruct": {**_LLAMA, "vocab_size": 128256, "tie_word_embeddings": False,
                              "max_position_embeddings": 131072, "rope_theta": 500000.0},
    "e5-mistral-7b-instruct": {**_LLAMA, "model_type": "mistral", "vocab_size": 32000,
                               "tie_word_embeddings": False, "max_position_embeddings": 32768,
                               "rope_theta": 10000.0},
    "smollm2-135m-instruct": _SMOLLM2,
    "smollm2-135m": _SMOLLM2,
    "all-minilm-l6-v2": dict(model_type="bert", hidden_size=384, num_hidden_layers=6,
                             num_attention_heads=12, intermediate_size=1536, vocab_size=30522,
                             max_position_embeddings=512),
}
BUNDLED_NAMES = {"base": "smollm2-135m-instruct", "embed": "all-minilm-l6-v2"}

FINEWEB_EDU_MEAN_TOKENS = 1034  # fineweb-edu sample-10BT: ~10B GPT-2 tokens over 9.67M rows
DEMO_CORPUS = (370, 782_000)  # the demo corpus (README, measured): documents, SmolLM2 tokens
PAPER_LONG_OUTPUT_TOKENS = 7700  # arXiv 2412.18860: 10K long-output samples, 77M tokens


@dataclass(frozen=True)
class Shape:
    """The sizes of a transformer that the costs need, and where they were read."""

    name: str
    origin: str
    kind: str  # "decoder" (Llama-style: RMSNorm, gated MLP, no biases) or "bert"
    layers: int
    hidden: int
    heads: int
    head_dim: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int | None
    rope_theta: float | None

    @property
    def non_embedding(self) -> int:
        """Parameters outside the token embedding and the output projection."""
        d = self.hidden
        if self.kind == "bert":  # 4 biased projections, biased MLP, 2 LayerNorms; pooler
            layer = 4 * (d * d + d) + 2 * d * self.intermediate + self.intermediate + 5 * d
            return self.layers * layer + d * d + d
        attn = d * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + 3 * d * self.intermediate + 2 * d) + d

    @property
    def parameters(self) -> int:
        extra = self.vocab * self.hidden * (1 if self.tied or self.kind == "bert" else 2)
        if self.kind == "bert":
            extra += (self.max_positions or 512) * self.hidden + 2 * self.hidden + 2 * self.hidden
        return self.non_embedding + extra

    @property
    def compute_params(self) -> int:
        """N of 6N per trained token: every matmul a token goes through, the output
        projection included (it is computed, in chunks, whether or not it is tied)."""
        return self.non_embedding + self.vocab * self.hidden

    @property
    def attention_dim(self) -> int:
        return self.heads * self.head_dim


def shape_from_config(config: dict[str, Any], name: str, origin: str) -> Shape:
    """A Shape from config.json's keys (Llama/Mistral/Qwen-style decoders and BERT)."""
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        rope = config.get("rope_parameters") or {}
        return Shape(
            name=name, origin=origin,
            kind="bert" if config.get("model_type") == "bert" else "decoder",
            layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
            head_dim=int(config.get("head_dim") or hidden // heads),
            kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            max_positions=config.get("max_position_embeddings"),
            rope_theta=config.get("rope_theta") or rope.get("rope_theta"))
    except (KeyError, TypeError, ValueError) as exc:
        raise LongctxError(f"{origin}: not a transformer config.json ({exc!r} missing or "
                           "wrong)") from None


def _read_config(path: Path, name: str) -> Shape:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LongctxError(f"{path}: cannot read a config.json ({exc})") from None
    return shape_from_config(config, name, str(path))


def _local_config(ref: str, role: str, base_dir: Path) -> Path | None:
    """config.json of a model on this machine: a dir, models/base, a bundled package."""
    from longctx.hub import cached_snapshot, looks_like_path

    if ref in (BUNDLED, "base") and role in ("base", "llm"):
        candidate = base_dir / "config.json"
        return candidate if candidate.is_file() else None
    if ref == BUNDLED and role == "embed":
        from longctx.assets import bundled_embedder

        try:
            return bundled_embedder() / "config.json"
        except LongctxError:
            return None
    if Path(ref).expanduser().is_dir() or looks_like_path(ref):
        candidate = Path(ref).expanduser() / "config.json"
        return candidate if candidate.is_file() else None
    snapshot = cached_snapshot(ref)
    return snapshot / "config.json" if snapshot and (snapshot / "config.json").is_file() \
        else None


def resolve_shape(ref: str, role: str, key: str, flag: str, given: Path | None,
                  base_dir: Path) -> Shape:
    """The shape of the model `ref` that params key `key` names: from `given` (the flag),
    a local config.json, or KNOWN; otherwise one line saying which flag to give."""
    name = ref.rstrip("/").split("/")[-1]
    if ref in (BUNDLED, "base"):
        name = BUNDLED_NAMES["embed" if role == "embed" else "base"]
    if given is not None:
        return _read_config(given, name)
    local = _local_config(ref, role, base_dir)
    if local is not None:
        return _read_config(local, name)
    if name.lower() in KNOWN:
        return shape_from_config(KNOWN[name.lower()], name, "longctx's table of known models")
    raise ConfigError(f"{key}: {ref!r} is not local, not in the Hugging Face cache and not a "
                      f"known model ({', '.join(sorted(KNOWN))}): give {flag} "
                      "PATH/config.json")


def corpus_size(params: Params, docs: Path, mean_tokens: float, documents: int | None,
                long_output_tokens: float = PAPER_LONG_OUTPUT_TOKENS) -> Corpus:
    """The corpus as the corpus step made it (docs.parquet), else as the params bound it:
    the demo corpus's measured size, other sources at their max_documents x mean_tokens."""
    if docs.is_file():
        import numpy as np
        import pyarrow.parquet as pq

        lengths = pq.read_table(docs, columns=["n_tokens"]).column("n_tokens").to_numpy()
        return Corpus(len(lengths), float(lengths.mean()) if len(lengths) else 0.0,
                      str(docs), lengths.astype(np.int64), long_output_tokens)
    cfg = params.corpus
    count, tokens, unbounded = 0, 0.0, False
    for i, src in enumerate(cfg.sources):
        if src.format == "demo":
            count, tokens = count + DEMO_CORPUS[0], tokens + DEMO_CORPUS[1]
        elif src.max_documents is not None:
            count, tokens = count + src.max_documents, tokens + src.max_documents * mean_tokens
        elif cfg.max_documents is None and documents is None:
            raise ConfigError(f"corpus.sources[{i}] ({src.label}): its size is unknown until "
                              f"the corpus step has run ({docs} is not there): give "
                              "--documents N or set corpus.max_documents")
        else:
            unbounded = True
    if documents is None:
        documents = cfg.max_documents if unbounded else min(count, cfg.max_documents or count)
    mean = tokens / count if count and not unbounded else mean_tokens
    return Corpus(documents, mean, "from the params' max_documents and --mean-doc-tokens; "
                  f"{docs} is not there yet", None, long_output_tokens)


@dataclass(frozen=True)
class Corpus:
    """How many documents and how long: every length when docs.parquet exists."""

    documents: int
    mean_tokens: float
    origin: str
    lengths: Any = None  # numpy array
    long_output_tokens: float = PAPER_LONG_OUTPUT_TOKENS  # mean target without lengths

    def expect(self, f) -> float:
        """E[f(n)] over the documents' lengths n: exact from docs.parquet, else f at the
        mean length (which understates a convex f such as chunks per document)."""
        import numpy as np

        n = self.lengths if self.lengths is not None else np.array([self.mean_tokens])
        return float(np.mean(f(n))) if len(n) else 0.0

    def within(self, low: int, high: int) -> tuple[int | None, float]:
        """(documents of low..high tokens, their mean length); without the lengths: (None:
        unknown, long_output_tokens clamped into the range)."""
        if self.lengths is None:
            return None, float(min(max(self.long_output_tokens, low), high))
        inside = self.lengths[(self.lengths >= low) & (self.lengths <= high)]
        return len(inside), float(inside.mean()) if len(inside) else 0.0
