"""The results history: every ``deploykit build`` and ``deploykit matrix`` run, in one SQLite file.

Where: ``--db FILE``, else ``$DEPLOYKIT_DB``, else the user's data folder
(``~/.local/share/deploykit/history.sqlite`` on Linux, ``~/Library/Application Support/deploykit``
on macOS, ``%LOCALAPPDATA%\\deploykit`` on Windows).

Schema (``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`; an older file is migrated in
place, a newer one is refused rather than misread):

- ``runs``: one row per run: kind (``matrix`` | ``build``), status (``running`` | ``complete``),
  start and finish times, the spec or model, its fingerprint, the output folder and the
  environment (host, CPU, toolchain versions, load average) as JSON.
- ``cells``: one row per measured cell, keyed by (run, cell key) so a resumed run never stores
  a cell twice; the indexed columns are for queries, ``data`` holds the whole cell as JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.errors import ConfigError

SCHEMA_VERSION = 1
DB_ENV = "DEPLOYKIT_DB"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    source TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    out_dir TEXT NOT NULL DEFAULT '',
    env TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS cells (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    target TEXT NOT NULL,
    backend TEXT NOT NULL,
    device TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    precision TEXT NOT NULL,
    status TEXT NOT NULL,
    p50_ms REAL,
    speedup REAL,
    accuracy REAL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX IF NOT EXISTS cells_by_model_target ON cells (model, target);
"""


def default_path() -> Path:
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env)
    home = Path.home()
    if sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "deploykit" / "history.sqlite"


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    status: str
    started: str
    finished: str | None
    source: str
    fingerprint: str
    out_dir: str
    env: dict[str, Any]
    cells: int = 0
    errors: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "started": self.started,
                "finished": self.finished, "source": self.source, "fingerprint": self.fingerprint,
                "out_dir": self.out_dir, "cells": self.cells, "errors": self.errors, "env": self.env}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class History:
    """A results database. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(f"{self.path}: results database path is not a file; pass --db FILE")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: not a deploykit results database ({exc}); pass another --db") from None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot open the results database ({exc}); pass --db FILE") from None

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{self.path}: written by a newer deploykit (schema {version}, this one reads "
                              f"{SCHEMA_VERSION}); upgrade deploykit or pass another --db")
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and tables - {"sqlite_sequence"}:
            raise ConfigError(f"{self.path}: an SQLite file that is not a deploykit results database; "
                              f"pass another --db")
        with self.db:
            self.db.executescript(_SCHEMA)
            # future migrations: `if version < 2: ALTER TABLE ...` here, in order
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> History:  # noqa: PYI034 - History is not subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    # -------------------------------------------------------------------------- writing
    def start_run(self, kind: str, source: str = "", fingerprint: str = "", out_dir: str = "",
                  env: Mapping[str, Any] | None = None) -> int:
        with self._tx() as db:
            cur = db.execute("INSERT INTO runs (kind, status, started, source, fingerprint, out_dir, env) "
                             "VALUES (?, 'running', ?, ?, ?, ?, ?)",
                             (kind, now(), source, fingerprint, out_dir, json.dumps(env or {}, default=str)))
            return int(cur.lastrowid or 0)

    def add_cells(self, run_id: int, cells: Iterable[Mapping[str, Any]]) -> None:
        """Store cells (JSON objects with model, target, backend, device, batch_size, precision,
        status); a cell already stored under the same key is replaced, never duplicated."""
        rows = []
        for c in cells:
            rows.append((run_id, cell_key(c), c["model"], c["target"], c.get("backend", ""),
                         c.get("device", ""), int(c["batch_size"]), c["precision"], c["status"],
                         _num(c.get("p50_ms")), _num(c.get("speedup")), _num(c.get("accuracy")),
                         json.dumps(c, default=str, allow_nan=False)))
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO cells (run_id, key, model, target, backend, device, batch_size, "
                           "precision, status, p50_ms, speedup, accuracy, data) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def finish_run(self, run_id: int, status: str = "complete") -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?", (status, now(), run_id))

    def reopen_run(self, run_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET status = 'running', finished = NULL WHERE id = ?", (run_id,))

    # -------------------------------------------------------------------------- reading
    def runs(self, kind: str | None = None, limit: int | None = None) -> list[Run]:
        sql = ("SELECT r.id, r.kind, r.status, r.started, r.finished, r.source, r.fingerprint, r.out_dir, r.env, "
               "COUNT(c.key), SUM(CASE WHEN c.status = 'error' THEN 1 ELSE 0 END) "
               "FROM runs r LEFT JOIN cells c ON c.run_id = r.id")
        args: list[Any] = []
        if kind:
            sql += " WHERE r.kind = ?"
            args.append(kind)
        sql += " GROUP BY r.id ORDER BY r.id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return [Run(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8] or "{}"), r[9], r[10] or 0)
                for r in self.db.execute(sql, args)]

    def run(self, run_id: int) -> Run:
        for r in self.runs():
            if r.id == run_id:
                return r
        raise ConfigError(f"{self.path}: no run {run_id} (see 'deploykit results')")

    def cells(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT data FROM cells WHERE run_id = ? ORDER BY rowid", (run_id,))
        return [json.loads(r[0]) for r in rows]


def cell_key(cell: Mapping[str, Any]) -> str:
    """model/target/batch/precision: the identity of a cell across runs."""
    return f"{cell['model']}/{cell['target']}/b{int(cell['batch_size'])}/{cell['precision']}"


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def record_build(manifest: Mapping[str, Any], db: Path | str | None = None, out_dir: str = "") -> int:
    """Store a ``deploykit build`` manifest as a run of kind ``build``: one INT8 cell per target
    and batch size (its latency, speed-up against FP32, accuracy). Returns the run id."""
    model = Path(str(manifest.get("model", {}).get("path", "model"))).name.removesuffix(".onnx")
    env = {"host": manifest.get("host", {}), "versions": manifest.get("versions", {})}
    cells = []
    for t in manifest.get("targets", []):
        checks = {c["name"]: c for c in t.get("checks", [])}

        def value(name: str, checks: dict[str, Any] = checks) -> Any:
            return checks.get(name, {}).get("value")

        latency = t.get("latency") or [{"batch_size": (t.get("batch_sizes") or [1])[0]}]
        for lat in latency:
            cells.append({
                "model": model, "target": t["name"], "backend": t.get("backend", ""),
                "device": (t.get("device") or {}).get("name", ""), "batch_size": int(lat.get("batch_size", 1)),
                "precision": "int8", "status": "ok" if t.get("status") in ("ok", "failed") else str(t.get("status")),
                "error": t.get("reason", "") if t.get("status") == "error" else "",
                "p50_ms": lat.get("p50_ms"), "p90_ms": lat.get("p90_ms"), "p99_ms": lat.get("p99_ms"),
                "throughput": lat.get("throughput"), "speedup": lat.get("speedup"),
                "fp32_p50_ms": lat.get("fp32_p50_ms"), "accuracy": value("accuracy"),
                "top1_agreement": value("top1_agreement"), "cosine": value("cosine"),
                "memory_mb": value("memory_mb"), "build_status": t.get("status"),
            })
    with History(db) as h:
        run_id = h.start_run("build", str(manifest.get("model", {}).get("path", "")),
                             str(manifest.get("model", {}).get("sha256", ""))[:16], out_dir, env)
        h.add_cells(run_id, cells)
        h.finish_run(run_id)
    return run_id
