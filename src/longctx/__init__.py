"""longctx: bootstrap long-context ability from a short-context LLM."""

__version__ = "0.1.0"
