"""Errors a user can fix, told in one line.

`UserError` is what every mistake a user can make raises: a config key, a data file, a model folder,
a storage URI, a cluster address, a request. Its message says what is wrong, where (file, field, row
or key) and what to do. The jobs print it as one `error: ...` line and exit with status 2
(`verbose=true` shows the traceback); anything else is an internal failure and keeps its traceback.

The library's error classes (ConfigError, DataError, ModelError, EncoderError, MissingInputError,
StorageError, ClusterError) all derive from it; a bad HTTP request is `recalign.rerank.api.ApiError`, a 4xx. `find_user_error` digs one out of
the wrappers Ray puts around an error raised in a task, an actor or a Train worker.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says what, where and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A stage's input that is not there yet (a stage not run, a file not written)."""


class StorageError(UserError):
    """A run-storage URI that cannot be reached or read (scheme, bucket, credentials, a corrupt file)."""


class ClusterError(UserError):
    """A Ray cluster address that cannot be joined."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def find_user_error(err: BaseException, depth: int = 8) -> UserError | None:
    """The UserError behind `err`: itself, its cause or context, a Ray task's cause, a Train worker's error."""
    seen: set[int] = set()
    todo = [(err, 0)]
    while todo:
        current, level = todo.pop(0)
        if current is None or id(current) in seen or level > depth:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        linked = [current.__cause__, current.__context__, getattr(current, "cause", None)]
        failures = getattr(current, "worker_failures", None)  # Ray Train V2's WorkerGroupError
        if isinstance(failures, dict):
            linked += list(failures.values())
        linked += [getattr(current, "error", None)]  # Ray Train V2's ControllerError
        todo += [(e, level + 1) for e in linked if isinstance(e, BaseException)]
    return None
