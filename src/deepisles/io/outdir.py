"""The output folder of one ``segment`` run: locked, checked before any work, published as one result set.

:class:`OutputFolder` is entered before any input is read and guarantees:

* **one run per folder** - an exclusive ``flock`` on the folder itself (nothing is written for the lock) is held
  for the whole run; a second run into the same folder fails at once with :class:`OutputLockedError`;
* **no work for nothing** - a folder that already holds results is refused unless ``overwrite``; the folder is
  created when missing and must be writable (a probe file is created and removed), else
  :class:`OutputUnwritableError`; both before any input is read or any model loaded;
* **no stale results** - the run writes every file into a private staging folder
  (``.deepisles-staging-<token>/``) and :meth:`publish` then removes the earlier report.json (the completion
  marker) and every file this tool owns that the new set does not contain, renames the new files into place
  and renames report.json last. Files that are not ours stay untouched;
* **no leftovers of killed runs** - while holding the lock, staging folders and the atomic writer's temp
  files (``.<stem>.<random>.tmp<suffixes>``) of owned names left by a killed run are removed;
* **interrupts are honest** - Ctrl-C before publishing leaves the folder exactly as it was (the staging folder
  is removed); during the short publish step SIGINT is deferred until the result set is complete.

A folder this run created is removed again when the run fails before publishing and the folder is empty.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from deepisles.errors import (
    DeepIslesError,
    OutputExistsError,
    OutputLockedError,
    OutputUnwritableError,
    OutputWriteError,
)
from deepisles.io.write import fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

STAGING_PREFIX = ".deepisles-staging-"
# the atomic writer's temp names: ".<first part of the name>.<mkstemp's 8 random chars>.tmp<suffixes>"
_TMP_RE = re.compile(r"^\.(?P<stem>[^./]+)\.[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?$")


def _stem(name: str) -> str:
    return Path(name).name.split(".")[0]


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def ensure_writable_folder(path: Path) -> None:
    """Create ``path`` when missing and check that files can be created in it (a probe file is created and
    removed); :class:`OutputUnwritableError` with the reason otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputUnwritableError(f"{path}: cannot create the output folder ({_oserror_text(exc)})") from None
    try:
        fd, name = tempfile.mkstemp(prefix=".deepisles-probe.", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputUnwritableError(f"{path}: output folder is not writable ({_oserror_text(exc)})") from None


class OutputFolder:
    """Context manager for one run's output folder (see the module docstring).

    ``owned`` are the relative paths of every file this tool may write there (``members/x_prob.nii.gz``
    included); ``owned_dirs`` the sub-folders it creates (removed when empty after a publish).
    """

    def __init__(self, path: str | Path, owned: Iterable[str], overwrite: bool = False,
                 owned_dirs: Iterable[str] = ()):  # fmt: skip
        self.path = Path(path)
        self.owned = tuple(dict.fromkeys(owned))
        self.owned_dirs = tuple(owned_dirs)
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.published: list[str] = []
        self.publishing = False
        self.swept: list[str] = []
        self.lock_warning: str | None = None
        self._fd: int | None = None
        self._created: list[Path] = []

    # --- entering: checks, lock, sweep ------------------------------------------------------------------
    def existing_results(self) -> list[str]:
        return sorted(n for n in self.owned if (self.path / n).exists())

    def _refuse_existing(self) -> None:
        if self.overwrite:
            return
        existing = self.existing_results()
        if existing:
            shown = ", ".join(existing[:6]) + (", …" if len(existing) > 6 else "")
            raise OutputExistsError(
                f"{self.path}: already holds results ({shown}); pass --overwrite to replace them"
            )

    def __enter__(self) -> OutputFolder:
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputExistsError(f"{p}: exists and is not a folder")
        self._refuse_existing()  # before creating anything
        try:
            missing = []
            q = p
            while not q.exists() and q != q.parent:
                missing.append(q)
                q = q.parent
            p.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first
        except OSError as exc:
            raise OutputUnwritableError(f"{p}: cannot create the output folder ({_oserror_text(exc)})") from None
        try:
            self._lock()
            self._refuse_existing()  # again under the lock: a run that just finished may have written results
            self._probe_writable()
            self.sweep()
        except BaseException:
            self._release()
            self._remove_created()
            raise
        return self

    def _lock(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise OutputUnwritableError(f"{self.path}: cannot open the output folder ({_oserror_text(exc)})") from None
        if fcntl is None:  # pragma: no cover
            self.lock_warning = f"{self.path}: folder locks are not available on this platform; not locked"
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(
                f"{self.path}: another deepisles run is writing into this folder; wait for it to finish or "
                "choose another output folder"
            ) from None
        except OSError as exc:  # e.g. ENOLCK on some network file systems
            self.lock_warning = f"{self.path}: could not lock the output folder ({_oserror_text(exc)}); not locked"

    def _probe_writable(self) -> None:
        ensure_writable_folder(self.path)

    def sweep(self) -> list[str]:
        """Remove staging folders and owned temp files left by killed runs (we hold the lock: they are dead)."""
        stems = {_stem(n) for n in self.owned}
        folders = {self.path, *(self.path / d for d in self.owned_dirs)}
        for folder in sorted(folders):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                m = _TMP_RE.match(e.name)
                stale_tmp = m is not None and m.group("stem") in stems and e.is_file(follow_symlinks=False)
                stale_stage = folder == self.path and e.name.startswith(STAGING_PREFIX)
                if not (stale_tmp or stale_stage):
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path)
                    else:
                        os.unlink(e.path)
                    self.swept.append(os.path.relpath(e.path, self.path))
                except OSError:
                    pass
        return self.swept

    # --- staging and publishing -------------------------------------------------------------------------
    def stage(self) -> Path:
        """The private folder this run writes its files into (created on first use)."""
        if self.staging is None:
            try:
                self.staging = self.path / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
                self.staging.mkdir()
            except OSError as exc:
                raise OutputWriteError(f"{self.path}: cannot write results ({_oserror_text(exc)})") from None
        return self.staging

    def publish(self, marker: str = "report.json") -> list[str]:
        """Replace the owned results by the staged set; ``marker`` (written last) says the set is complete.

        SIGINT is deferred until the set is in place (main thread only)."""
        if self.staging is None:
            raise DeepIslesError("nothing staged to publish")
        staged = sorted(
            str(p.relative_to(self.staging)) for p in self.staging.rglob("*") if p.is_file() and not p.is_symlink()
        )
        unknown = [s for s in staged if s not in self.owned]
        if unknown:  # programming error: every file we write must be declared as ours
            raise DeepIslesError(f"internal error: undeclared output file(s) {unknown}")
        deferred: list[int] = []
        old_handler = None
        main = threading.current_thread() is threading.main_thread()
        if main:
            old_handler = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, lambda signum, _frame: deferred.append(signum))
        self.publishing = True
        try:
            try:
                order = [s for s in staged if s != marker] + ([marker] if marker in staged else [])
                # 1. the old completion marker goes first: a crash below never leaves a report.json describing
                #    files of two different runs
                (self.path / marker).unlink(missing_ok=True)
                # 2. owned files the new set does not contain (other options of an earlier run)
                for name in self.owned:
                    if name not in staged:
                        target = self.path / name
                        if target.is_file() or target.is_symlink():
                            target.unlink()
                # 3. the new files, the marker last
                for name in order:
                    dst = self.path / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.staging / name, dst)
                    self.published.append(name)
                for d in self.owned_dirs:
                    try:
                        (self.path / d).rmdir()  # only when empty (no results of ours, no user files)
                    except OSError:
                        pass
                fsync_dir(self.path)
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            except OSError as exc:
                raise OutputWriteError(
                    f"{self.path}: writing the results failed ({_oserror_text(exc)}); "
                    f"published: {', '.join(self.published) or 'none'}"
                ) from None
        finally:
            self.publishing = False
            if main:
                signal.signal(signal.SIGINT, old_handler)
        if deferred:
            raise KeyboardInterrupt
        return list(self.published)

    # --- leaving ------------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; only folders that are (still) empty
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self._release()
        if exc_type is not None and not self.published:
            self._remove_created()

    def remaining_note(self) -> str:
        """What an interrupt left in the folder, for the user."""
        if self.published:
            return f"results published before the interrupt: {', '.join(self.published)} in {self.path}"
        return "no result files were written; the output folder is as it was"
