"""The matrix's output folder: one run at a time (a lock) and a journal of finished cells, so an
interrupted matrix resumes under the same run id with nothing lost or measured twice.

``OUT/.matrix.lock``: an exclusive ``flock`` held for the whole run (a second ``deploykit
matrix`` into the same folder fails at once, naming the first one's pid).

``OUT/matrix.journal.jsonl``: line 1 is the run header (run id, spec fingerprint, database),
then one line per finished cell, appended and flushed as each cell ends. A run whose header
says ``complete`` is not resumed: the next run is a new run (its unchanged artifacts are
reused from the cache all the same). A torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from deploykit.errors import OutputDirError
from deploykit.fileio import atomic_output

JOURNAL = "matrix.journal.jsonl"
LOCK = ".matrix.lock"


class Journal:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / JOURNAL
        self._lock_fh: IO[str] | None = None
        self.header: dict[str, Any] = {}
        self.cells: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputDirError(f"{self.out_dir}: exists and is not a folder; choose another --out")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.out_dir / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held until unlock()
        except OSError as exc:
            raise OutputDirError(f"{self.out_dir}: cannot write the output folder ({exc.strerror})") from None
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: no advisory lock, the journal still works
            pass
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputDirError(f"{self.out_dir}: a matrix is already running into this folder ({holder}); "
                                 f"wait for it or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the flock
            self._lock_fh = None

    # ------------------------------------------------------------------ journal
    def read(self) -> None:
        """Load the header and finished cells of the previous run into this folder, if any."""
        self.header, self.cells = {}, {}
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    break  # a line torn by a kill: that cell is measured again
                raise OutputDirError(f"{self.path}: line {i + 1} is not JSON; remove the file to start afresh") from None
            if i == 0:
                if not isinstance(entry, dict) or "run_id" not in entry:
                    raise OutputDirError(f"{self.path}: not a deploykit matrix journal; choose another --out")
                self.header = entry
            elif isinstance(entry, dict) and "key" in entry and "cell" in entry:
                self.cells[entry["key"]] = entry["cell"]

    def resumable(self, fingerprint: str, db: str) -> bool:
        h = self.header
        return bool(h) and h.get("status") != "complete" and h.get("fingerprint") == fingerprint and h.get("db") == db

    def start(self, header: dict[str, Any], keep_cells: bool) -> None:
        """Write a new header (a new run), or rewrite it keeping the finished cells (a resume)."""
        self.header = dict(header)
        if not keep_cells:
            self.cells = {}
        self._rewrite()

    def add(self, key: str, cell: dict[str, Any]) -> None:
        self.cells[key] = cell
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "cell": cell}, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def complete(self) -> None:
        self.header["status"] = "complete"
        self._rewrite()

    def _rewrite(self) -> None:
        lines = [json.dumps(self.header)] + [json.dumps({"key": k, "cell": c}) for k, c in self.cells.items()]
        with atomic_output(self.path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
