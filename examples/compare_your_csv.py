"""A comparison study on your own CSV: which width, found by which method, at what cost?

The script writes a small CSV (scikit-learn's bundled wine data, 178 rows, 13 numeric columns and a
``cultivar`` label column) to a temporary folder, writes a ``kind: compare`` study file pointing at it,
runs the study through the Python API (the same as ``widthlab run study.yaml --out DIR``) and prints
the verdict. Replace the CSV with yours: one header row, numeric feature columns, and the label column
named by ``data.target`` (default ``target``); labels may be numbers or strings.

Sizes are tiny so that it runs in seconds; the verdict's tie rule needs several seeds to call a tie,
so do not read much into a two-seed, few-epoch result.

Run: ``python examples/compare_your_csv.py``.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from sklearn.datasets import load_wine

from widthlab.report.verdict import verdict_text
from widthlab.studies.executor import run_study
from widthlab.studies.load import load_study

STUDY = """\
# widthlab run {study} --out {out}
name: my-csv-compare
kind: compare
seeds: [0, 1]
train:
  epochs: 6
  batch_size: 32
  optimizer: {{name: adam, lr: 0.01}}
  num_threads: 1
  checkpoint_every: 0
tasks:
  wine:
    data: {{name: table, path: {csv}, target: cultivar, normalize: feature}}
    model: {{name: mlp, width: 8}}
methods:
  dense: {{sweep: {{model.width: [4, 8, 16]}}}}              # a search: every width trained
  widesparse:                                           # the family at the width-8 base's weights
    method: {{base_width: 8, fract_cl: 0.3}}
    sweep: {{model.width: [8, 16]}}
  adaptive:                                             # one run per seed, learns its width
    model: {{depth: 1}}
    method: {{lambda0: 0.01, activation: relu6}}
  expanding:                                            # one run per seed, grows its width
    method: {{start_widths: [4], max_widths: [32], optimizer: kfac, tau: 0.03, cooldown: 2,
              proposals: 8, mala_bursts: 2}}
"""


def write_csv(path: Path) -> None:
    wine = load_wine()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*wine.feature_names, "cultivar"])
        for row, label in zip(wine.data, wine.target):
            w.writerow([*(f"{v:g}" for v in row), wine.target_names[label]])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv_path, study_path, out = tmp / "wine.csv", tmp / "my-compare.yaml", tmp / "out"
        write_csv(csv_path)
        study_path.write_text(STUDY.format(study=study_path, out=out, csv=csv_path))
        spec = load_study(str(study_path))  # validated: a bad key or value fails here, naming it
        outcome = run_study(spec, out, workers=1, quiet=True)
        print(f"{len(outcome.summaries)} runs, {len(outcome.failed)} failed")
        print(verdict_text(out))
        if outcome.failed:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
