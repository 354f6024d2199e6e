"""Typed library errors.

Every error a user can cause carries a one-line message that names the fix. Messages never contain
corpus text, tokens or vectors: callers pass positions (line numbers, field names), never content.
"""


class PrivtextError(Exception):
    """Base class for errors the CLI turns into a one-line message and exit code 1."""


class UsageError(PrivtextError):
    """A bad combination of options or parameters (the CLI exits with code 2)."""


class ParameterError(UsageError):
    """A mechanism parameter or epsilon outside its valid range."""


class InfeasibleEpsilonError(ParameterError):
    """The requested epsilon cannot be reached by the mechanism on this index."""


class EmbeddingError(PrivtextError):
    """The embedding file is missing, unreadable or unusable."""


class IndexCacheError(PrivtextError):
    """The index cache is missing, corrupt or inconsistent."""


class InputFormatError(PrivtextError):
    """A record of the input cannot be processed (bad JSON, missing field, bad encoding)."""


class OutputError(PrivtextError):
    """The output cannot be written: read-only directory, disk full, file-size limit, a directory
    where a file is expected (an environment error, exit 1)."""


class ResumeError(UsageError):
    """`--resume` was asked for a run whose journal does not match the inputs or settings."""


class WorkerError(PrivtextError):
    """A worker process died or could not start (killed, out of memory, broken index cache)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: the run stops, cleans up and exits with 128 + the signal number.

    A KeyboardInterrupt subclass, so every `finally` and `except KeyboardInterrupt` that already
    cleans up after Ctrl-C does the same for the other signals."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InputTypeError(UsageError, TypeError):
    """A library call got the wrong kind of value (a bare string where a list of texts belongs,
    a non-string column); also a TypeError, so generic callers can catch it as one."""
