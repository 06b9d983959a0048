"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""


class LongctxError(Exception):
    """Bad input or configuration; the message names the file, key or record."""


class ConfigError(LongctxError):
    """A params file or value is invalid."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
