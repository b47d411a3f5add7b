"""Smoke test of the DASGD reproduction (quick version: 4 nodes, message delays 0.1 and 5)."""

import json

import numpy as np

from jaxasync._src.reproduce import REPRODUCTIONS
from jaxasync._src.reproduce import dasgd as dasgd_repro


def test_quick_reproduction(tmp_path):
    report = dasgd_repro.reproduce(quick=True, progress=False)
    assert report.name == "dasgd" and "[quick]" in report.title
    assert [(row[1], row[3]) for row in report.rows] == [
        ("sequential SGD", "-"),
        ("DASGD", "D=0.1"),
        ("DASGD", "D=5"),
    ]
    s_avg = [row[5] for row in report.rows]
    assert s_avg[0] == 0 and 0 < s_avg[1] < 1 < s_avg[2]  # S_avg ~ (n - 1) x mean delay
    for row in report.rows:
        assert len(row) == len(report.columns)
        assert np.isfinite(row[7]) and row[7] > 0  # K(0.01): converged with the fixed step
        assert row[-1] <= 1e-2  # final |grad f|^2
    assert len(report.checks) == 2
    failed = [c.claim for c in report.checks if not c.passed]
    assert not failed, failed
    files = report.save(tmp_path)
    with open(files[0]) as f:
        assert json.load(f)["passed"] is True
    assert REPRODUCTIONS["dasgd"].__name__ == "reproduce_dasgd"
