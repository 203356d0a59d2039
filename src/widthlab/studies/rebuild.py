"""Rebuild a damaged ``DIR/results.sqlite`` from the run folders (``widthlab report DIR --rebuild``).

Every run folder holds what the database records about it: ``config.yaml`` (the resolved run config),
``metrics.jsonl`` (one record per epoch) and ``result.json`` (study, position, status and summary,
written when the run starts and when it ends). The damaged database is kept as
``results.sqlite.damaged`` (numbered if one exists); nothing in the run folders is changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from widthlab.studies.outdir import driver_lock
from widthlab.studies.store import DB_NAME, ResultStore, StoreError


def _move_aside(db: Path) -> Path | None:
    if not db.exists():
        return None
    n, target = 0, db.with_name(db.name + ".damaged")
    while target.exists():
        n += 1
        target = db.with_name(f"{db.name}.damaged.{n}")
    os.replace(db, target)
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    return target


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _epochs(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a killed write
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            out.append(rec)
    return out


def rebuild_store(out_dir: str | Path) -> tuple[int, Path | None]:
    """Recreate ``out_dir/results.sqlite`` from ``out_dir/runs/*``; returns (runs recovered, old file)."""
    out = Path(out_dir)
    runs_dir = out / "runs"
    if not runs_dir.is_dir():
        raise StoreError(f"{out}: no runs/ folder to rebuild the results database from")
    with driver_lock(out):
        folders = sorted(p for p in runs_dir.iterdir() if (p / "config.yaml").is_file())
        if not folders:
            raise StoreError(f"{runs_dir}: no run folder with a config.yaml to rebuild from")
        moved = _move_aside(out / DB_NAME)
        count = 0
        with ResultStore(out) as store:
            for i, folder in enumerate(folders):
                try:
                    config = yaml.safe_load((folder / "config.yaml").read_text())
                except (OSError, UnicodeDecodeError, yaml.YAMLError):
                    continue
                if not isinstance(config, dict):
                    continue
                record = _read_json(folder / "result.json")
                record = record if isinstance(record, dict) else {}
                run_id = str(config.get("run_id") or folder.name)
                study = str(record.get("study") or config.get("study") or "study")
                position = record.get("position", i)
                store.register(run_id, study, int(position) if isinstance(position, int) else i, config)
                for rec in _epochs(folder / "metrics.jsonl"):
                    store.add_epoch(run_id, rec["epoch"], rec)
                status = record.get("status")
                if status in ("done", "failed"):
                    store.finish(run_id, status, record.get("summary") or {}, error=record.get("error"),
                                 wall_seconds=record.get("wall_seconds"))
                elif status == "running":
                    store.mark_running(run_id)
                count += 1
            store.write_summary()
    return count, moved
