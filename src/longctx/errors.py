"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""


class LongctxError(Exception):
    """Bad input or configuration; the message names the file, key or record."""


class ConfigError(LongctxError):
    """A params file or value is invalid."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class RuleError(ValueError):
    """A params rule broken, raised by a config model's validator. `key` is the path, relative
    to the model validated, of the value to change: pydantic reports a validator's error at
    the model itself (`stages`), and `validate_params` appends the key so the message names
    `stages.schedule[1].length`. A ValueError, so pydantic collects it like its own errors;
    `merge` lets one validator report several broken rules at once."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.problems = [(key, reason)]

    def __str__(self) -> str:
        return "; ".join(f"{key}: {reason}" if key else reason for key, reason in self.problems)

    @classmethod
    def merge(cls, errors: "list[RuleError]") -> "RuleError":
        merged = cls(*errors[0].problems[0])
        merged.problems = [p for e in errors for p in e.problems]
        return merged

    def under(self, prefix: str) -> "RuleError":
        """The same problems, keyed from the model `prefix` above (a check written for a
        list of stages, raised for the `schedule` of a section)."""
        return RuleError.merge([RuleError(join_key(prefix, key), reason)
                                for key, reason in self.problems])


def join_key(path: str, key: str) -> str:
    """`key`, relative to the model at `path`, as one key path: stages + schedule[1].length
    is stages.schedule[1].length, schedule + [1].length is schedule[1].length."""
    if not key or not path:
        return path or key
    return path + key if key.startswith("[") else f"{path}.{key}"
