"""One progress interface for every long job (segment, batch, evaluate, synth, train, weights download, the
sliding window): a named stage starts (``step``), and countable work advances (``advance``).

Library code takes ``progress: Progress | None`` and calls :func:`as_progress` once; the CLI passes its rich
implementation (``deepisles.cli``), the Python API may pass ``None`` (silent), a ``Progress`` or, for the
simplest use, a plain function of one string (each step's message and each advance are given to it as text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    def step(self, message: str) -> None:
        """A named stage starts (``"reading and validating inputs"``, ``"member seals"``, ...)."""

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        """``done`` of ``total`` units (cases, windows, bytes, iterations; ``total`` None when unknown) are
        finished; ``item`` names the latest one (a case id, a file)."""


class Silent:
    """Reports nothing."""

    def step(self, message: str) -> None:
        pass

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        pass


class Messages:
    """Every step and advance as one line of text, to a function (``print``, a logger, a test's list)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit

    def step(self, message: str) -> None:
        self.emit(message)

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        of = f"/{total}" if total is not None else ""
        self.emit(f"{done}{of}" + (f" {item}" if item else ""))


class Recorder:
    """Keeps every call: ``steps`` (messages) and ``advances`` (``(done, total, item)``): for tests and for
    callers that poll (a service reporting a job's state)."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.advances: list[tuple[int, int | None, str]] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        self.advances.append((done, total, item))


class Prefixed:
    """Steps of one item of a larger job (e.g. the stages of one case of a batch), prefixed with its name;
    advances of the inner job are not passed on (the outer job counts items)."""

    def __init__(self, outer: Progress, prefix: str):
        self.outer, self.prefix = outer, prefix

    def step(self, message: str) -> None:
        self.outer.step(f"{self.prefix}: {message}")

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        pass


def as_progress(progress: Progress | Callable[[str], None] | None) -> Progress:
    """``None`` -> :class:`Silent`; a ``Progress`` as is; a function of one string -> :class:`Messages`."""
    if progress is None:
        return Silent()
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Messages(progress)
    raise TypeError(f"progress must be a Progress, a function of one string or None, not {type(progress).__name__}")
