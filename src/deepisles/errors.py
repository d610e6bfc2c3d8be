"""Exceptions that the CLI turns into a one-line ``error: ...`` message (no traceback) and an exit code."""

from __future__ import annotations


class DeepIslesError(Exception):
    """Base class of every error deepisles reports to the user without a traceback.

    ``exit_code``: 2 for problems with what the user asked for (inputs, options, output folder), 1 for a run
    that failed while working (e.g. the disk filled up while writing results)."""

    exit_code = 2


class InputError(DeepIslesError):
    """A problem with an input file: names the file and what is wrong with it."""

    def __init__(self, path: object, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputExistsError(DeepIslesError):
    """The output location already holds results and overwriting was not asked for."""


class OutputLockedError(DeepIslesError):
    """Another run holds the output folder."""


class OutputUnwritableError(DeepIslesError):
    """The output folder cannot be created or written (found before any work)."""


class OutputWriteError(DeepIslesError):
    """Writing results failed during the run (disk full, folder removed, ...)."""

    exit_code = 1


class Interrupted(DeepIslesError):
    """The user interrupted a run (Ctrl-C); the message says what was left behind."""

    exit_code = 130
