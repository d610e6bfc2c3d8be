"""Exceptions that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class DeepIslesError(Exception):
    """Base class of every error deepisles reports to the user without a traceback."""


class InputError(DeepIslesError):
    """A problem with an input file: names the file and what is wrong with it."""

    def __init__(self, path: object, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputExistsError(DeepIslesError):
    """The output location already holds results and overwriting was not asked for."""
