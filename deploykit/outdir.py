"""The output folder as a locked, journaled, staged build.

Why: an interrupted or concurrent build must never lose finished work, mix two builds, leave
a stale report, or touch anything deploykit did not write. So:

- one build at a time: an exclusive ``flock`` on ``OUT/.deploykit/lock`` (a second build fails
  at once, naming the first one's pid);
- every step (calibration, each target) is built in ``.deploykit/staging/<step>`` with the
  journal written before and after it; finished steps wait in ``.deploykit/done/<step>``;
- a rerun keeps finished steps whose key still matches and redoes the rest from a clean slate;
- the finished build is published by a journaled swap: the previous build's files (as its
  manifest listed them) go, the new ones move in, the manifest last. A publish interrupted
  half-way is rolled forward by the next run;
- deploykit deletes only paths its journal or its previous manifest lists, and every path it
  writes or deletes is proven to lie inside ``OUT`` after resolving symlinks.

Usage::

    with OutDir(path) as out:
        if out.finished("calibration", key) is None:
            with out.step("calibration", key) as step:
                write files into step.dir; step.payload["x"] = ...
        out.publish({"calibration": "", "target-a": "a"}, manifest, report_text)
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import ConfigError, OutputDirError
from deploykit.fileio import sha256

STATE = ".deploykit"
MANIFEST = "manifest.json"
REPORT = "report.md"
#: Files other deploykit commands write beside a build (deploykit compare-layers): never foreign.
DERIVED = ("layers.json", "layers.png")
RESERVED = {MANIFEST, REPORT, STATE}
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_JOURNAL_VERSION = 1


def check_name(name: str, where: str = "target") -> str:
    """A name from configuration that becomes a folder name: a safe character set only (no
    separators, no ``..``, nothing hidden, none of deploykit's own file names)."""
    if not isinstance(name, str) or not _SAFE.fullmatch(name) or ".." in name or name in RESERVED \
            or name.endswith((".onnx", ".json", ".md")):
        shown = repr(name)[:80]
        raise ConfigError(f"{where} name {shown} is not allowed: use 1-64 letters, digits, '.', '_', '+' or '-', "
                          f"starting with a letter or digit (it becomes a folder name in --out)")
    return name


def strict_json(value: Any) -> Any:
    """``value`` with NaN/inf as null and numpy scalars as Python numbers (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar or 0-d array
        try:
            return strict_json(value.item())
        except (ValueError, TypeError):
            pass
    if hasattr(value, "tolist"):
        return strict_json(value.tolist())
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(strict_json(value), indent=2, allow_nan=False)


@dataclass
class Step:
    """A running step: write its files into ``dir``; ``payload`` is kept in the journal."""

    name: str
    dir: Path
    payload: dict[str, Any] = field(default_factory=dict)


class OutDir:
    """An output folder owned by one build at a time (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.state = self.root / STATE
        self.journal: dict[str, Any] = {}
        self._lock_fd: int | None = None
        self._created_root = False
        self._created_state = False
        self._retired = False

    # -- opening ------------------------------------------------------------------------
    def __enter__(self) -> OutDir:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        root = self.root
        if root.is_symlink() and not root.exists():
            raise OutputDirError(f"{root}: a dangling symlink; choose another --out")
        if root.exists() and not root.is_dir():
            raise OutputDirError(f"{root}: exists and is not a folder; choose another --out")
        try:
            if self.state.is_dir() and not self.state.is_symlink():
                self._lock()  # first: a build publishing right now must not look like foreign files
            if root.exists():
                self._refuse_foreign(self._previous_files(read_journal=True))
            if not root.exists():
                root.mkdir(parents=True)
                self._created_root = True
            if not self.state.exists():
                self.state.mkdir()
                self._created_state = True
            if self._lock_fd is None:
                self._lock()
            self._probe_writable()
            self._recover()
        except OSError as exc:
            self.close()
            raise OutputDirError(f"{root}: cannot write the output folder ({_why(exc)}); choose a writable --out") \
                from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            # nothing built and nothing published: leave no trace of a build that never started
            if self._created_state and not self.journal.get("steps") and not self.journal.get("published") \
                    and not self._retired:
                with contextlib.suppress(OSError):
                    self._remove_tree(self.state, check=False)
                if self._created_root:
                    with contextlib.suppress(OSError):
                        self.root.rmdir()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(f"{self.root}: another deploykit build (pid {pid}) is writing this folder; "
                                 f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _probe_writable(self) -> None:
        probe = self.state / f"probe-{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"deploykit")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()

    # -- what is ours ---------------------------------------------------------------------
    def _previous_files(self, read_journal: bool) -> set[str]:
        """Files the previous published build wrote (its manifest, or the journal when an
        interrupted rebuild already retired that manifest)."""
        files: set[str] = set()
        manifest = self.root / MANIFEST
        if manifest.is_file() and not manifest.is_symlink():
            try:
                previous = json.loads(manifest.read_text(encoding="utf-8"))
            except (ValueError, OSError, UnicodeDecodeError):
                previous = None
            if not isinstance(previous, dict) or not isinstance(previous.get("files", []), list) \
                    or not all(isinstance(f, str) for f in previous.get("files", [])):
                raise OutputDirError(f"{manifest}: not a deploykit manifest; choose an empty --out folder")
            files |= set(previous.get("files", []))
        if read_journal:
            journal = self._read_journal()
            files |= set(journal.get("published", []))
            if journal.get("publish"):
                files |= set(journal["publish"].get("remove", [])) | set(journal["publish"].get("files", []))
        for f in files:
            self.inside(f)  # a manifest naming a path outside OUT is refused, never followed
        return files | {MANIFEST, REPORT, *DERIVED}

    def _refuse_foreign(self, ours: set[str]) -> None:
        foreign = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == STATE or rel_dir.startswith(STATE + os.sep):
                dirnames[:] = []
                continue
            for d in list(dirnames):
                p = os.path.join(dirpath, d)
                if os.path.islink(p):  # a symlinked sub-folder is never written through
                    foreign.append(os.path.normpath(os.path.relpath(p, self.root)))
                    dirnames.remove(d)
            for f in filenames:
                rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, f), self.root))
                if rel not in ours or os.path.islink(os.path.join(dirpath, f)):
                    foreign.append(rel)
        if foreign:
            foreign.sort()
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputDirError(f"{self.root}: holds files deploykit did not write ({foreign[0]}{more}); "
                                 f"choose an empty or new --out folder")

    def inside(self, rel: str | Path) -> Path:
        """``OUT/rel``, proven to lie inside OUT after resolving symlinks (else refused)."""
        rel_s = str(rel)
        if not rel_s or os.path.isabs(rel_s) or ".." in Path(rel_s).parts:
            raise OutputDirError(f"{self.root}: refusing path '{rel_s}' (absolute or with '..'); "
                                 f"the manifest or journal was edited by hand")
        path = self.root / rel_s
        base = self.root.resolve()
        try:
            path.resolve().relative_to(base)
        except ValueError:
            raise OutputDirError(f"{self.root}: refusing '{rel_s}': it resolves outside the output folder "
                                 f"(a symlink?)") from None
        probe = self.root
        for part in Path(rel_s).parts[:-1]:
            probe = probe / part
            if probe.is_symlink():
                raise OutputDirError(f"{self.root}: refusing '{rel_s}': '{probe}' is a symlink")
        return path

    # -- the journal ------------------------------------------------------------------------
    def _read_journal(self) -> dict[str, Any]:
        path = self.state / "journal.json"
        if not path.is_file():
            return {}
        try:
            journal = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError, UnicodeDecodeError):
            journal = None
        if not isinstance(journal, dict) or journal.get("version") != _JOURNAL_VERSION:
            raise OutputDirError(f"{path}: unreadable journal; delete {self.state} to start this folder afresh")
        return journal

    def _save(self) -> None:
        self.journal["version"] = _JOURNAL_VERSION
        path = self.state / "journal.json"
        tmp = self.state / "journal.json.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(dumps(self.journal))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.state)

    def _recover(self) -> None:
        self.journal = self._read_journal()
        self.journal.setdefault("steps", {})
        if not self.journal.get("published"):
            # derived files (compare-layers) count only when present: a rebuild then removes them as stale
            absent = {d for d in DERIVED if not (self.root / d).is_file()}
            self.journal["published"] = sorted(self._previous_files(read_journal=False) - {MANIFEST, REPORT} - absent)
        if self.journal.get("publish"):  # interrupted while publishing: finish it
            self._roll_forward()
        for name, entry in list(self.journal["steps"].items()):
            if entry.get("state") != "done" or not self._step_intact(name, entry):
                self._discard(name)
        staging = self.state / "staging"
        if staging.is_dir():  # staging holds only running steps' files, journaled before they started
            self._remove_tree(staging)
        self._save()

    def _step_intact(self, name: str, entry: Mapping[str, Any]) -> bool:
        d = self.state / "done" / name
        files = entry.get("files", {})
        if not d.is_dir() or not isinstance(files, dict):
            return False
        return all((d / f).is_file() and sha256(d / f) == h for f, h in files.items())

    def _discard(self, name: str) -> None:
        self.journal["steps"].pop(name, None)
        self._remove_tree(self.state / "done" / name)
        self._remove_tree(self.state / "staging" / name)

    # -- steps ------------------------------------------------------------------------------
    def finished(self, name: str, key: str) -> dict[str, Any] | None:
        """The payload of step ``name`` if an earlier run finished it with the same ``key``."""
        entry = self.journal.get("steps", {}).get(name)
        if entry and entry.get("state") == "done" and entry.get("key") == key:
            return dict(entry.get("payload", {}))
        return None

    def step_dir(self, name: str) -> Path:
        """Where a finished step's files wait until publish."""
        return self.state / "done" / name

    @contextlib.contextmanager
    def step(self, name: str, key: str) -> Iterator[Step]:
        """Run a step in a clean staging folder; journaled before it starts and after it ends."""
        check_name(name, "step")
        self._retire_previous_report()
        self._discard(name)
        self.journal["steps"][name] = {"state": "running", "key": key}
        self._save()
        staging = self.state / "staging" / name
        staging.mkdir(parents=True)
        step = Step(name, staging)
        try:
            yield step
            files = {str(p.relative_to(staging)): sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
            done = self.state / "done" / name
            done.parent.mkdir(exist_ok=True)
            os.replace(staging, done)
            step.dir = done
            self.journal["steps"][name] = {"state": "done", "key": key, "files": files,
                                           "payload": strict_json(step.payload)}
            self._save()
        except BaseException:
            self._discard(name)
            with contextlib.suppress(OSError, OutputDirError):
                self._save()
            raise

    def _retire_previous_report(self) -> None:
        """A rebuild that starts work takes the previous report down first: if it then fails or
        is interrupted, no report describing another build is left behind (its files stay
        listed in the journal, so they remain ours)."""
        if self._retired:
            return
        self._retired = True
        self._save()  # the journal lists the previous build's files before its manifest goes
        for name in (REPORT, MANIFEST):
            path = self.root / name
            if path.is_file() and not path.is_symlink():
                path.unlink()

    # -- publishing -------------------------------------------------------------------------
    def publish(self, layout: Mapping[str, str], manifest: Mapping[str, Any], report: str | None) -> list[str]:
        """Swap the finished steps into place: ``layout`` maps a step to its folder in OUT
        ("" for the top level). The previous build's files go first, the manifest comes last.
        ``report``: the text of report.md, or None for none (a step wrote its own report).
        Returns the published files (relative paths)."""
        self._retire_previous_report()
        for name in list(self.journal["steps"]):
            if name not in layout:  # a step of an earlier, different request
                self._discard(name)
        pending = self.state / "publish"
        self._remove_tree(pending)
        pending.mkdir()
        moves: list[tuple[str, str]] = []
        for name, dest in layout.items():
            check_name(name, "step")
            if dest:
                check_name(dest, "target")
            done = self.step_dir(name)
            if not done.is_dir():
                continue
            for p in sorted(done.rglob("*")):
                if p.is_file():
                    rel = str(p.relative_to(done))
                    moves.append((str(p.relative_to(self.state)), str(Path(dest) / rel) if dest else rel))
        files = sorted({dst for _, dst in moves} | {MANIFEST} | ({REPORT} if report is not None else set()))
        full = dict(manifest)
        full["files"] = files
        if report is not None:
            (pending / REPORT).write_text(report, encoding="utf-8")
            moves.append((f"publish/{REPORT}", REPORT))
        (pending / MANIFEST).write_text(dumps(full), encoding="utf-8")
        moves.append((f"publish/{MANIFEST}", MANIFEST))  # manifest last
        for _, dst in moves:
            self.inside(dst)
        self.journal["publish"] = {"remove": sorted(set(self.journal.get("published", [])) | {MANIFEST, REPORT}),
                                   "moves": moves, "files": files}
        self._save()
        self._roll_forward()
        return files

    def _roll_forward(self) -> None:
        plan = self.journal["publish"]
        new = {dst for _, dst in plan["moves"]}
        for rel in (REPORT, MANIFEST, *plan["remove"]):
            path = self.inside(rel)
            moved_in = rel in new and not (self.state / _src_for(plan, rel)).exists()
            if moved_in:  # already replaced by this publish before an interruption
                continue
            if path.is_file() or path.is_symlink():
                path.unlink()
        self._prune_dirs({str(Path(r).parent) for r in plan["remove"]})
        for src, dst in plan["moves"]:
            s = self.state / src
            if not s.exists():
                continue  # moved before an interruption
            d = self.inside(dst)
            d.parent.mkdir(parents=True, exist_ok=True)
            self.inside(dst)  # again: the folder now exists and is not a symlink
            os.replace(s, d)
        _fsync_dir(self.root)
        self.journal["published"] = [f for f in plan["files"] if f not in (MANIFEST, REPORT)]
        self.journal["publish"] = None
        self.journal["steps"] = {}
        self._save()
        for leftover in ("done", "publish", "staging"):
            self._remove_tree(self.state / leftover)

    def _prune_dirs(self, dirs: set[str]) -> None:
        for rel in sorted(dirs, key=lambda d: -len(Path(d).parts)):
            while rel not in ("", "."):
                path = self.inside(rel)
                if not path.is_dir() or path.is_symlink() or any(path.iterdir()):
                    break
                path.rmdir()
                rel = str(Path(rel).parent)

    def _remove_tree(self, path: Path, check: bool = True) -> None:
        """Delete a folder of deploykit's own state (never through a symlink)."""
        if not path.exists() and not path.is_symlink():
            return
        if check:
            try:
                path.resolve().relative_to(self.state.resolve())
            except ValueError:
                raise OutputDirError(f"{self.root}: refusing to delete '{path}': outside {self.state}") from None
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


def _src_for(plan: Mapping[str, Any], dst: str) -> str:
    return str(next(s for s, d in plan["moves"] if d == dst))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.EROFS,):
        return "read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or type(exc).__name__
