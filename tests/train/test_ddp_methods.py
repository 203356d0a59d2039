"""Data-parallel training of the wide & sparse and adaptive-width methods (2 CPU processes, gloo).

Each method trains on 2 ranks (launched with the environment torchrun sets) and in this process, with
the same global batch (25 rows: rank slices of 13 and 12). The 2-rank run must follow the 1-process
run to float tolerance, both ranks must end bitwise identical, with the same masks (wide & sparse,
masked weights exactly zero on every rank) or the same width after every optimizer step (adaptive:
every rank resizes at the same step, and DDP is rebuilt after each resize). A checkpoint written by
rank 0 resumes with another number of ranks (2 -> 1 and 1 -> 2). Ranks that disagree on masks or on
widths stop together with a clear error.

Everything 2-rank runs in one launch (a module fixture), to pay the interpreter start-up once.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_methods_job import run_task  # noqa: E402

JOB = Path(__file__).resolve().parent / "ddp_methods_job.py"
EPOCHS, CUT = 6, 3  # full runs, and the epoch after which a run is "interrupted" (checkpoint_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tasks: list[dict], tmp: Path, world: int = 2) -> None:
    """Run ``tasks`` as a ``world``-rank gloo job, the ranks started as torchrun would start them."""
    spec = tmp / "tasks.json"
    spec.write_text(json.dumps(tasks))
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, str(JOB), str(spec)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"


def _load(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> {rank: result} for every run of this module (rank 0 only for 1-process runs)."""
    tmp = tmp_path_factory.mktemp("ddp_methods")

    def task(name, method, **kw):
        return {"method": method, "out": str(tmp / name), "run_dir": str(tmp / f"{name}-run"), **kw}

    # 1 process, here: the references, and the first half of the adaptive run resumed on 2 ranks.
    for name, method in (("ws-1", "widesparse"), ("ad-1", "adaptive")):
        run_task(task(name, method, epochs=EPOCHS))
    run_task(task("ad-1to2", "adaptive", epochs=CUT))
    # 2 ranks, one launch: both methods in full, the first half of the wide & sparse run resumed on
    # 1 rank, the second half of the adaptive one, and the two disagreement cases.
    _launch([task("ws-2", "widesparse", epochs=EPOCHS), task("ad-2", "adaptive", epochs=EPOCHS),
             task("ws-2to1", "widesparse", epochs=CUT),
             {**task("ad-1to2", "adaptive", epochs=EPOCHS, resume=True), "out": str(tmp / "ad-1to2-b")},
             task("ws-bad", "widesparse", epochs=1, corrupt=True),
             task("ad-bad", "adaptive", epochs=1, corrupt=True)], tmp)
    run_task({**task("ws-2to1", "widesparse", epochs=EPOCHS, resume=True), "out": str(tmp / "ws-2to1-b")})

    def ranks(name, world):
        return {r: _load(tmp / name, r) for r in range(world)}

    return {"ws-1": ranks("ws-1", 1), "ad-1": ranks("ad-1", 1), "ws-2": ranks("ws-2", 2),
            "ad-2": ranks("ad-2", 2), "ws-2to1": ranks("ws-2to1-b", 1), "ad-1to2": ranks("ad-1to2-b", 2),
            "ws-bad": ranks("ws-bad", 2), "ad-bad": ranks("ad-bad", 2)}


def _assert_ranks_identical(by_rank: dict) -> None:
    first = by_rank[0]
    for r, res in by_rank.items():
        assert res["error"] is None, res["error"]
        assert res["model"].keys() == first["model"].keys()
        for k, v in res["model"].items():
            assert torch.equal(v, first["model"][k]), f"rank {r} differs from rank 0 at {k}"
        assert res["widths"] == first["widths"]


def _assert_close_models(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        if a[k].dtype == torch.bool:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _assert_masked_zero(state: dict) -> int:
    masks = {k[: -len("_mask")]: m for k, m in state.items() if k.endswith("weight_mask")}
    assert masks, "no masked layer"
    for name, m in masks.items():
        assert not state[name][~m].any(), f"{name} is nonzero off its mask"
    return sum(int(m.sum()) for m in masks.values())


def test_widesparse_two_ranks_match_one(runs):
    one, two = runs["ws-1"][0], runs["ws-2"]
    _assert_ranks_identical(two)
    _assert_close_models(two[0]["model"], one["model"])  # masks equal exactly, weights to tolerance
    assert two[0]["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4, abs=1e-6)
    for res in two.values():  # exactly zero off the mask on every rank, not only on rank 0
        assert _assert_masked_zero(res["model"]) == _assert_masked_zero(one["model"])


def test_adaptive_two_ranks_match_one(runs):
    one, two = runs["ad-1"][0], runs["ad-2"]
    _assert_ranks_identical(two)  # includes the width after every step on both ranks
    widths = one["widths"]
    assert len(widths) == EPOCHS * 11
    assert sum(a != b for a, b in zip(widths, widths[1:])) >= 3, "too few resizes to test anything"
    assert two[0]["widths"] == widths  # same step, same width as the 1-process run
    _assert_close_models(two[0]["model"], one["model"])
    assert two[0]["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method, name", [("widesparse", "ws-2to1"), ("adaptive", "ad-1to2")])
def test_checkpoint_resumes_with_another_number_of_ranks(runs, method, name):
    ref = runs["ws-1" if method == "widesparse" else "ad-1"][0]
    resumed = runs[name]
    _assert_ranks_identical(resumed)
    assert len(resumed[0]["widths"]) == (EPOCHS - CUT) * 11  # trained only the epochs after the cut
    assert resumed[0]["widths"] == ref["widths"][CUT * 11:]
    _assert_close_models(resumed[0]["model"], ref["model"])
    if method == "widesparse":
        _assert_masked_zero(resumed[0]["model"])


def test_ranks_that_disagree_stop_together_with_a_clear_error(runs):
    for r in (0, 1):
        ws, ad = runs["ws-bad"][r]["error"], runs["ad-bad"][r]["error"]
        assert ws and "rank 1 differs from rank 0 at buffer 'layers.0.weight_mask'" in ws, ws
        assert "same seed" in ws
        assert ad and ad.startswith("data-parallel ranks disagree on adaptive target widths (rank 0: "), ad
        assert runs["ws-bad"][r]["widths"] == runs["ad-bad"][r]["widths"] == []  # no step was taken
