"""The results database of a study's output directory: ``DIR/results.sqlite`` (+ ``summary.json``).

SQLite in WAL mode, so that several worker processes may write while the driver reads. Every write is
one short transaction; a process killed at any moment leaves the database readable and loses at most
the write in flight. ``summary.json`` is derived from the database and replaced atomically.

Schema (the report reads only this):

``runs``: one row per run.
    run_id TEXT PRIMARY KEY, study TEXT, position INTEGER (order in the study), status TEXT
    (``pending`` | ``running`` | ``done`` | ``failed``), error TEXT, config TEXT (JSON of the resolved
    run config), summary TEXT (JSON of the DESIGN.md summary entry once known), started_at REAL,
    finished_at REAL, wall_seconds REAL.
``epochs``: per-epoch metrics. run_id TEXT, epoch INTEGER, metrics TEXT (JSON), PRIMARY KEY (run_id, epoch).
``events``: structural changes over training (optional). run_id TEXT, epoch INTEGER, step INTEGER,
    kind TEXT, detail TEXT (JSON).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DB_NAME = "results.sqlite"
SUMMARY_NAME = "summary.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, study TEXT NOT NULL, position INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL, error TEXT, config TEXT NOT NULL, summary TEXT,
    started_at REAL, finished_at REAL, wall_seconds REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, epoch INTEGER, step INTEGER, kind TEXT NOT NULL, detail TEXT
);
"""


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: store them as null / strings so every reader can parse the file."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), sort_keys=True)


class StoreError(ValueError):
    """``results.sqlite`` cannot be used (damaged, not a database, unwritable); says what to do."""


def _damaged(path: Path, detail: str) -> StoreError:
    return StoreError(f"{path}: the results database is damaged ({detail}); rebuild it from the run "
                      f"folders with `widthlab report {path.parent} --rebuild` (the damaged file is kept "
                      "next to it)")


def _guarded(fn):
    """Turn a SQLite error inside a store method into one :class:`StoreError` line naming the file."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
    return wrapper


class ResultStore:
    """Read/write access to ``DIR/results.sqlite``; open one per process."""

    def __init__(self, out_dir: str | Path, create: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / DB_NAME
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no results database here (run a study with --out first)")
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"{self.path}: is a folder, not a results database; move it away")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.out_dir}: cannot create the folder ({e.strerror or e})") from None
        try:
            self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot open the results database ({e})") from None
        try:
            self.conn.execute("PRAGMA busy_timeout = 60000")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            if "malformed" in str(e) or "corrupt" in str(e):
                raise _damaged(self.path, str(e)) from None
            if "readonly" in str(e) or "read-only" in str(e) or "unable to open" in str(e):
                raise StoreError(f"{self.path}: cannot write the results database ({e})") from None
            raise StoreError(f"{self.path}: not a readable widthlab results database ({e}); move it away, "
                             f"or rebuild it from the run folders with `widthlab report {self.out_dir} "
                             "--rebuild`") from None

    def _error(self, e: sqlite3.DatabaseError) -> StoreError:
        text = str(e)
        if "malformed" in text or "corrupt" in text or not isinstance(e, sqlite3.OperationalError):
            return _damaged(self.path, text)
        return StoreError(f"{self.path}: {text}")

    @_guarded
    def check_integrity(self) -> None:
        """Raise :class:`StoreError` unless SQLite's integrity check passes (every page is read)."""
        rows = [r[0] for r in self.conn.execute("PRAGMA integrity_check").fetchall()]
        if rows != ["ok"]:
            raise _damaged(self.path, "; ".join(map(str, rows[:3])) + (" ..." if len(rows) > 3 else ""))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_guarded
    def _write(self, sql: str, args: Iterable[Any] = ()) -> None:
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout
        # instead of failing half-way through a transaction.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(sql, tuple(args))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writes

    def register(self, run_id: str, study: str, position: int, config: dict) -> None:
        """Record a run as pending unless it is already known (resume keeps finished runs)."""
        self._write("INSERT OR IGNORE INTO runs (run_id, study, position, status, config) VALUES (?,?,?,?,?)",
                    (run_id, study, position, "pending", dumps(config)))

    def mark_running(self, run_id: str) -> None:
        self._write("UPDATE runs SET status='running', error=NULL, started_at=? WHERE run_id=?",
                    (time.time(), run_id))

    def add_epoch(self, run_id: str, epoch: int, metrics: dict) -> None:
        self._write("INSERT OR REPLACE INTO epochs (run_id, epoch, metrics) VALUES (?,?,?)",
                    (run_id, int(epoch), dumps(metrics)))

    def truncate_epochs(self, run_id: str, after_epoch: int) -> None:
        """Drop epochs recorded after a checkpoint, when a run restarts from that checkpoint."""
        self._write("DELETE FROM epochs WHERE run_id=? AND epoch>?", (run_id, int(after_epoch)))
        self._write("DELETE FROM events WHERE run_id=? AND epoch>?", (run_id, int(after_epoch)))

    def add_event(self, run_id: str, epoch: int, step: int, kind: str, detail: dict) -> None:
        self._write("INSERT INTO events (run_id, epoch, step, kind, detail) VALUES (?,?,?,?,?)",
                    (run_id, epoch, step, kind, dumps(detail)))

    def finish(self, run_id: str, status: str, summary: dict, error: str | None = None,
               wall_seconds: float | None = None) -> None:
        self._write("UPDATE runs SET status=?, error=?, summary=?, finished_at=?, wall_seconds=? "
                    "WHERE run_id=?", (status, error, dumps(summary), time.time(), wall_seconds, run_id))

    def delete_runs(self, run_ids: list[str]) -> None:
        """Forget runs (a study corrected after they failed no longer has them)."""
        for run_id in run_ids:
            for table in ("epochs", "events", "runs"):
                self._write(f"DELETE FROM {table} WHERE run_id=?", (run_id,))

    # ------------------------------------------------------------------ reads

    @_guarded
    def runs(self, study: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT run_id, study, position, status, error, config, summary, wall_seconds FROM runs"
        args: tuple = ()
        if study is not None:
            sql += " WHERE study=?"
            args = (study,)
        rows = self.conn.execute(sql + " ORDER BY study, position", args).fetchall()
        out = []
        for run_id, st, pos, status, error, config, summary, wall in rows:
            out.append({"run_id": run_id, "study": st, "position": pos, "status": status, "error": error,
                        "config": json.loads(config), "summary": json.loads(summary) if summary else None,
                        "wall_seconds": wall})
        return out

    @_guarded
    def status(self, run_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    @_guarded
    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT metrics FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,))
        return [json.loads(m) for (m,) in rows.fetchall()]

    @_guarded
    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT epoch, step, kind, detail FROM events WHERE run_id=? ORDER BY rowid",
                                 (run_id,)).fetchall()
        return [{"epoch": e, "step": s, "kind": k, **json.loads(d or "{}")} for e, s, k, d in rows]

    # ------------------------------------------------------------------ summary.json

    def summary_entries(self) -> list[dict[str, Any]]:
        entries = []
        for r in self.runs():
            entry = dict(r["summary"] or {})
            entry.update(run_id=r["run_id"], study=r["study"], status=r["status"], error=r["error"])
            entries.append(entry)
        return entries

    def write_summary(self) -> Path:
        """Rewrite ``summary.json`` atomically from the database."""
        path = self.out_dir / SUMMARY_NAME
        fd, tmp = tempfile.mkstemp(prefix=".summary.", suffix=".tmp", dir=self.out_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(_clean(self.summary_entries()), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


class BufferedRecords:
    """Stands in for a :class:`ResultStore` in a remote worker: records the writes, touches no file.

    The driver replays them with :func:`replay` into the one database it alone writes, so no SQLite
    file ever sits on shared network storage (Ray executor).
    """

    _WRITES = ("register", "mark_running", "add_epoch", "truncate_epochs", "add_event", "finish")

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        if name in BufferedRecords._WRITES:
            return lambda *args, **kw: self.calls.append((name, args, kw))
        raise AttributeError(name)

    def write_summary(self) -> None:
        pass

    def close(self) -> None:
        pass


def replay(store: ResultStore, calls: list[tuple[str, tuple, dict]]) -> None:
    """Apply a worker's buffered writes, in order, to ``store``."""
    for name, args, kw in calls:
        if name not in BufferedRecords._WRITES:
            raise ValueError(f"unexpected buffered store call {name!r}")
        getattr(store, name)(*args, **kw)
