"""Smoke test of the R-FAST reproduction (quick version: directed ring, packet loss 0 and 30%)."""

import json

import numpy as np

from jaxasync._src.reproduce import REPRODUCTIONS
from jaxasync._src.reproduce import rfast as rfast_repro


def test_quick_reproduction(tmp_path):
    report = rfast_repro.reproduce(quick=True, progress=False)
    assert report.name == "rfast" and "[quick]" in report.title
    assert [(row[1], row[3]) for row in report.rows] == [
        ("rfast", "p=0"),
        ("rfast", "p=0.3"),
        ("rfast_nonrobust", "p=0"),
        ("rfast_nonrobust", "p=0.3"),
    ]
    for row in report.rows:
        assert len(row) == len(report.columns)
        assert np.isfinite(row[5]) and row[5] > 0  # final gap
    gap = {(row[1], row[3]): row[5] for row in report.rows}
    assert gap["rfast_nonrobust", "p=0.3"] > 5 * gap["rfast", "p=0.3"]
    assert len(report.checks) == 3
    failed = [c.claim for c in report.checks if not c.passed]
    assert not failed, failed
    assert "[PASS]" in report.table()
    files = report.save(tmp_path)
    with open(files[0]) as f:
        assert json.load(f)["passed"] is True
    assert REPRODUCTIONS["rfast"].__name__ == "reproduce_rfast"
