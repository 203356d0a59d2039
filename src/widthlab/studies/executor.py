"""Run a study's runs: in this process (1 worker) or in N spawned worker processes.

Each worker process runs one run at a time with ``cores // workers`` torch threads, so that two
workers on two cores do not oversubscribe. The driver holds the output folder's lock for its whole
life and hands runs out from one queue; workers write their own rows to the WAL-mode database and send
progress messages back through their pipes. A worker that dies takes only its run in flight with it
(marked failed); the runs it never started go to the surviving workers. A failing run never stops the
study.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from widthlab.search.driver import WAIT
from widthlab.studies.load import RunSpec, StudyError, expand_runs
from widthlab.studies.outdir import job_lock
from widthlab.studies.runner import execute_run, final_model_problem
from widthlab.studies.schedule import Schedule, build_sources, known_dynamic_ids
from widthlab.studies.schema import StudySpec
from widthlab.studies.store import ResultStore, StoreError
from widthlab.train import distributed


@dataclass
class StudyOutcome:
    out_dir: Path
    summaries: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [s for s in self.summaries if s.get("status") not in ("done", "pruned")]


class ProgressPrinter:
    """Prints run starts/ends always and epoch progress every ``every`` seconds (a live line on a TTY)."""

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False, every: float = 2.0):
        self.total, self.stream, self.quiet, self.every = total, stream or sys.stderr, quiet, every
        self.done = self.failed = 0
        self.running: dict[str, str] = {}
        self._last = 0.0
        self._tty = self.stream.isatty()

    def _counts(self) -> str:
        return (f"[{self.done + self.failed}/{self.total} finished, {len(self.running)} running, "
                f"{self.failed} failed]")

    def _print(self, text: str, live: bool = False) -> None:
        if self.quiet:
            return
        if self._tty:
            self.stream.write("\r\033[K" + text + ("" if live else "\n"))
        elif not live:
            self.stream.write(text + "\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, msg: dict[str, Any]) -> None:
        kind = msg["kind"]
        if kind == "start":
            self.running[msg["run_id"]] = f"{msg['label']} seed {msg['seed']}"
        elif kind == "epoch":
            now = time.monotonic()
            if now - self._last >= self.every or msg["epoch"] == msg["epochs"]:
                self._last = now
                rec = msg["record"]
                metric = next((f"{k} {rec[k]:.4f}" for k in ("val_accuracy", "val_loss", "train_loss")
                               if rec.get(k) is not None), "")
                label = self.running.get(msg["run_id"], msg["run_id"])
                self._print(f"{self._counts()} {label}: epoch {msg['epoch']}/{msg['epochs']} {metric}",
                            live=True)
        elif kind == "note":
            label = self.running.get(msg["run_id"], msg["run_id"])
            self._print(f"{label}: {msg['text']}")
        elif kind == "end":
            label = self.running.pop(msg["run_id"], msg["run_id"])
            s = msg.get("summary") or {}
            if msg["status"] == "pruned":
                self.done += 1
                self._print(f"{self._counts()} pruned {label} ({msg['run_id']}) after epoch "
                            f"{s.get('epochs')} in {s.get('wall_seconds', 0):.1f}s")
            elif msg["status"] == "done":
                self.done += 1
                metric = s.get("test_accuracy")
                res = f"test_accuracy {metric:.4f}" if metric is not None else \
                    f"test_loss {s.get('test_loss', float('nan')):.4g}"
                self._print(f"{self._counts()} done   {label} ({msg['run_id']}): {res} "
                            f"in {s.get('wall_seconds', 0):.1f}s")
            else:
                self.failed += 1
                self._print(f"{self._counts()} FAILED {label} ({msg['run_id']}): {msg.get('error')}")


def _worker_main(conn, out_dir: str, resume: bool, threads: int, driver: int) -> None:
    """Entry of a spawned worker: ask the driver for a run, execute it, report through ``conn``; repeat.

    Runs come one at a time from the driver's single queue, so a run no worker has started yet goes to
    whichever worker is free, and a dead worker takes only its run in flight with it. A worker whose
    driver died (SIGKILL: daemonic children are only reaped on a clean exit) stops at its next message,
    at most an epoch later; its run stays ``running`` and ``--resume`` restarts it from its checkpoint.
    """
    def report(msg: dict[str, Any]) -> None:
        if os.getppid() != driver:
            os._exit(3)
        conn.send(msg)

    while True:
        try:
            report({"kind": "ready"})
            run = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            os._exit(3)
        if run is None:
            return
        execute_run(run, Path(out_dir), resume=resume, progress=report, num_threads=threads)


def plan_runs(spec: StudySpec, out_dir: Path, resume: bool, sources: list | None = None
              ) -> tuple[list[RunSpec], int]:
    """Which runs to execute; refuses to mix a new study into an output directory that holds results.

    Runs of the folder that never finished (pending, running, failed) and that the study no longer has
    (a corrected option value changes the run ids) are dropped, so fixing a bad value and running again
    on the same ``--out`` works; finished runs the study no longer has are refused.
    """
    runs = expand_runs(spec)
    db = out_dir / "results.sqlite"
    if not db.exists():
        return runs, 0
    with ResultStore(out_dir) as store:
        store.check_integrity()
    dynamic = known_dynamic_ids(sources or [], out_dir)  # search trials and retrains decided before
    with ResultStore(out_dir) as store:
        known = {r["run_id"]: r["status"] for r in store.runs()}
        wanted = {r.run_id for r in runs} | dynamic
        done = {k for k, v in known.items() if v in ("done", "pruned")}
        if done and not resume:
            raise StudyError(f"{out_dir} already holds results of {len(known)} run(s); use --resume to "
                             f"continue that study or choose another --out (nothing was changed)")
        # Resuming may add runs (a longer sweep) but not leave finished ones behind: the report would mix
        # them in (a comparison would even charge a search for them).
        stale = done - wanted
        if stale:
            raise StudyError(f"{out_dir} holds {len(stale)} finished run(s) that this study no longer has "
                             f"(its settings changed); choose another --out (nothing was changed)")
        unfinished = set(known) - wanted
        if unfinished:
            store.delete_runs(sorted(unfinished))
        damaged = [r.run_id for r in runs if known.get(r.run_id) == "done"
                   and final_model_problem(out_dir / "runs" / r.run_id) is not None]
    for run_id in damaged:
        problem = final_model_problem(out_dir / "runs" / run_id)
        sys.stderr.write(f"resume: run {run_id}: {problem}; running it again\n")
    todo = [r for r in runs if known.get(r.run_id) != "done" or r.run_id in damaged]
    return todo, len(runs) - len(todo) + len(dynamic & done)


def run_study(spec: StudySpec, out_dir: str | Path, *, workers: int = 1, resume: bool = False,
              stream: TextIO | None = None, quiet: bool = False, executor: str = "local",
              address: str | None = None, runs_root: str | Path | None = None,
              ray_init: dict | None = None) -> StudyOutcome:
    """Execute every run of ``spec`` into ``out_dir`` and return the summaries of this invocation.

    Args:
        workers: local worker processes (``executor="local"``).
        executor: ``local`` or ``ray`` (each run a Ray task; see ``studies/ray_executor.py``).
        address: Ray cluster address (None: start a local Ray instance).
        runs_root: where per-run folders (checkpoints) go; default ``out_dir/runs``.
    """
    out_dir = Path(out_dir)
    if executor not in ("local", "ray"):
        raise StudyError(f"unknown executor {executor!r}; known: local, ray")
    if workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    ctx = distributed.current()
    if ctx.active and (workers != 1 or executor != "local"):
        raise StudyError("under torchrun every rank trains the same run: use --workers 1 --executor local")
    if executor == "local" and runs_root is not None:
        raise StudyError("--checkpoint-dir is for --executor ray; local runs keep checkpoints in DIR/runs")
    with job_lock(out_dir, ctx):
        return _run_study_locked(spec, out_dir, ctx, workers=workers, resume=resume, stream=stream,
                                 quiet=quiet, executor=executor, address=address, runs_root=runs_root,
                                 ray_init=ray_init)


def _run_study_locked(spec: StudySpec, out_dir: Path, ctx, *, workers: int, resume: bool,
                      stream: TextIO | None, quiet: bool, executor: str, address: str | None,
                      runs_root: str | Path | None, ray_init: dict | None) -> StudyOutcome:
    plan: tuple | None = None
    sources: list = []
    if ctx.is_main:
        try:
            sources = build_sources(spec, out_dir, expand_runs(spec))
            plan = plan_runs(spec, out_dir, resume, sources)
            with ResultStore(out_dir) as store:
                for r in expand_runs(spec):
                    store.register(r.run_id, r.study, r.position, r.config())
                store.write_summary()
        except (StudyError, StoreError) as e:
            plan = ("error", str(e))
    # Rank 0 decides which runs to execute (it alone reads and writes the database).
    plan = ctx.broadcast_object(plan)
    if plan[0] == "error":
        raise StudyError(plan[1])
    todo, skipped = plan
    sched = Schedule(todo, sources, out_dir)
    quiet = quiet or not ctx.is_main
    printer = ProgressPrinter(sched.expected, stream=stream, quiet=quiet)
    if skipped and not quiet:
        (stream or sys.stderr).write(f"resume: {skipped} finished run(s) kept, {len(todo)} to run"
                                     + (" (and the searches' and retrains' next runs)" if sources else "")
                                     + "\n")
    outcome = StudyOutcome(out_dir, skipped=skipped)
    if executor == "ray":
        outcome.summaries.extend(_run_ray(sched, out_dir, resume=resume, printer=printer, address=address,
                                          runs_root=runs_root, ray_init=ray_init))
        return outcome
    cores = os.cpu_count() or 1
    threads = max(1, cores // min(workers, max(sched.expected, 1)))
    if workers == 1 or sched.expected <= 1:
        while True:
            # Under torchrun rank 0 decides (it alone reads the database) and every rank runs it.
            run = ctx.broadcast_object(sched.next() if ctx.is_main else None)
            if run is None:
                break
            if run == WAIT:  # nothing in flight in one process: a source waits on itself
                raise StudyError("internal error: every run source waits and nothing is running")
            outcome.summaries.append(execute_run(run, out_dir, resume=resume, progress=printer,
                                                 num_threads=threads))
        return outcome
    outcome.summaries.extend(_run_parallel(sched, out_dir, workers, resume, threads, printer))
    return outcome


def _run_ray(sched: Schedule, out_dir: Path, *, resume: bool, printer, address, runs_root, ray_init
             ) -> list[dict[str, Any]]:
    """Ray: every run available now as one batch of tasks, then the runs the results let the sources
    decide (search rounds, retrains), until none is left. Ray stays up across the batches."""
    from widthlab.studies.ray_executor import _import_ray, run_on_ray

    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, **{"include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
    out: list[dict[str, Any]] = []
    try:
        while True:
            batch = []
            while (run := sched.next()) not in (None, WAIT):
                batch.append(run)
            if not batch:
                break
            out.extend(run_on_ray(batch, out_dir, resume=resume, printer=printer, address=address,
                                  runs_root=Path(runs_root) if runs_root else None, init_kwargs=ray_init))
    finally:
        if started_here:
            ray.shutdown()
    return out


def _mark_lost(out_dir: Path, run_id: str, err: str, printer: ProgressPrinter,
               summaries: dict[str, dict[str, Any]]) -> None:
    with ResultStore(out_dir) as store:
        if store.status(run_id) in ("running", "pending"):
            store.finish(run_id, "failed", {"run_id": run_id, "status": "failed", "error": err}, error=err)
            printer({"kind": "end", "run_id": run_id, "status": "failed", "error": err})
            summaries[run_id] = {"run_id": run_id, "status": "failed", "error": err}
        store.write_summary()


def _run_parallel(sched: Schedule, out_dir: Path, workers: int, resume: bool, threads: int,
                  printer: ProgressPrinter) -> list[dict[str, Any]]:
    """Hand the runs out one at a time from the schedule to ``workers`` spawned processes.

    Each worker has its own pipe (no lock shared between processes, so a worker killed mid-message
    cannot block the others); the driver waits on every pipe and every process at once. A worker that
    asks while every source waits (a search round in flight) is answered once a run ends. A run lost
    with its worker is marked failed at once, so a search waiting on it moves on.
    """
    mpctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    workers_: dict[Any, dict[str, Any]] = {}
    for _ in range(min(workers, sched.expected)):
        parent, child = mpctx.Pipe()
        p = mpctx.Process(target=_worker_main, args=(child, str(out_dir), resume, threads, os.getpid()),
                          daemon=True)
        p.start()
        child.close()
        workers_[parent] = {"proc": p, "run": None, "waiting": False}
    summaries: dict[str, dict[str, Any]] = {}
    handed: list[str] = []
    exhausted = False

    def serve(conn) -> None:
        nonlocal exhausted
        w = workers_[conn]
        nxt = None if exhausted else sched.next()
        if nxt == WAIT:
            w["waiting"] = True
            return
        exhausted = exhausted or nxt is None
        w["run"], w["waiting"] = nxt, False
        if nxt is not None:
            handed.append(nxt.run_id)
        conn.send(nxt)

    while workers_:
        mp_connection.wait([*workers_, *(w["proc"].sentinel for w in workers_.values())],
                           timeout=0.5)
        ended = False
        for conn in list(workers_):
            w = workers_[conn]
            alive = w["proc"].is_alive()  # before draining: a dead worker's last messages are all there
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg["kind"] == "ready":
                        serve(conn)
                        continue
                    printer(msg)
                    if msg["kind"] == "end":
                        summaries[msg["run_id"]] = msg["summary"]
                        w["run"] = None
                        ended = True
            except (EOFError, OSError):
                alive = False
            if not alive:
                w["proc"].join(timeout=5)
                if w["run"] is not None and w["run"].run_id not in summaries:
                    code = w["proc"].exitcode
                    _mark_lost(out_dir, w["run"].run_id, f"worker process died (exit code "
                               f"{code if code is not None else '?'}) before the run finished",
                               printer, summaries)
                    ended = True
                conn.close()
                del workers_[conn]
        if ended or not any(w["run"] for w in workers_.values()):
            for conn in [c for c, w in workers_.items() if w["waiting"]]:
                serve(conn)
        if workers_ and all(w["waiting"] for w in workers_.values()) and \
                not any(w["run"] for w in workers_.values()):
            raise StudyError("internal error: every run source waits and nothing is running")
    # If every worker died: the runs nobody started.
    left = list(sched.static)
    for run in left:
        _mark_lost(out_dir, run.run_id, "not run: every worker process died before it started", printer,
                   summaries)
    return [summaries[i] for i in handed + [r.run_id for r in left] if i in summaries]
