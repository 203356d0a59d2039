"""Readers refuse non-finite table values, overflowing IDX headers, and read Python-3 CIFAR pickles."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from widthlab.cli import main
from widthlab.data.readers.cifar import parse_batch, unpickle
from widthlab.data.readers.idx import parse_idx
from widthlab.data.registry import load_dataset


def _csv(path, rows):
    path.write_text("a,b,target\n" + "".join(f"{a},{b},{t}\n" for a, b, t in rows))
    return path


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999"])
def test_csv_non_finite_feature_names_file_line_and_column(tmp_path, bad):
    p = _csv(tmp_path / "t.csv", [(1, 2, 0), (3, bad, 1), (5, 6, 0)])
    with pytest.raises(ValueError, match=r"t\.csv: line 3, column 'b': non-finite"):
        load_dataset("table", path=p)


def test_csv_non_finite_regression_target_is_refused(tmp_path):
    p = _csv(tmp_path / "r.csv", [(1, 2, 0.5), (3, 4, "nan"), (5, 6, 1.5)])
    with pytest.raises(ValueError, match=r"r\.csv: targets: non-finite value .* row 1"):
        load_dataset("table", path=p, task="regression")


def test_npz_non_finite_inputs_name_row_and_column(tmp_path):
    x = np.zeros((6, 3), dtype=np.float32)
    x[4, 2] = np.inf
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=np.arange(6) % 2)
    with pytest.raises(ValueError, match=r"d\.npz: array 'x': non-finite value .* row 4, column 2"):
        load_dataset("table", path=p)


def test_npz_non_finite_targets_are_refused(tmp_path):
    y = np.linspace(0, 1, 6)
    y[1] = np.nan
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((6, 2)), y=y)
    with pytest.raises(ValueError, match=r"d\.npz: array 'y': non-finite value nan at row 1"):
        load_dataset("table", path=p, task="regression")


def test_kernel_inputs_with_nan_exit_2_naming_the_file(tmp_path, capsys):
    rows = [(float(i), float(i % 3), i % 2) for i in range(10)]
    rows[7] = ("nan", 1.0, 0)
    p = _csv(tmp_path / "nan.csv", rows)
    assert main(["kernel", "--d", "2", "--width", "10", "--connectivity", "0.5", "--inputs", str(p)]) == 2
    err = capsys.readouterr().err
    assert "nan.csv: line 9, column 'a'" in err and len(err.strip().splitlines()) == 1


def test_idx_header_whose_dimensions_overflow_is_refused():
    # 4 dimensions of 65536: their product is 2**64, which wraps to 0 in int64 arithmetic.
    raw = bytes([0, 0, 0x08, 4]) + struct.pack(">4I", *(65536,) * 4)
    with pytest.raises(ValueError, match=r"huge\.idx: expected \d+ bytes of data .* got 0 \(truncated\)"):
        parse_idx(raw, "huge.idx")


def test_cifar_batch_pickled_by_python3_protocol_2_is_read():
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({"data": data, "labels": [3, 7], "batch_label": b"bytes too"}, protocol=2)
    x, y = parse_batch(blob, "data_batch_1", "labels")
    assert x.shape == (2, 3, 32, 32) and (x.reshape(2, -1) == data).all() and list(y) == [3, 7]


def test_codecs_encode_is_allowed_only_for_latin1_text():
    # GLOBAL _codecs.encode, then encode('abcd', 'base64') -- another codec than a bytes pickle needs.
    evil = (b"\x80\x02c_codecs\nencode\nq\x00X\x04\x00\x00\x00abcdq\x01"
            b"X\x06\x00\x00\x00base64q\x02\x86q\x03Rq\x04.")
    with pytest.raises(ValueError, match=r"x\.bin: refused to unpickle"):
        unpickle(evil, "x.bin")
