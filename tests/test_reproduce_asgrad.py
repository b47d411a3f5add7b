"""Smoke test of the AsGrad reproduction (quick version: synthetic problem, 2000 iterations)."""

import numpy as np

from jaxasync._src.reproduce import REPRODUCTIONS
from jaxasync._src.reproduce import asgrad as asgrad_repro


def test_quick_reproduction():
    report = asgrad_repro.reproduce(quick=True, progress=False)
    assert report.name == "asgrad" and "[quick]" in report.title
    rules = [row[1] for row in report.rows]
    assert rules == ["pure", "random", "shuffled"]
    for row in report.rows:
        values = row[3], row[5]
        assert all(np.isfinite(v) and v > 0 for v in values)
    assert len(report.checks) == 5
    failed = [c.claim for c in report.checks if not c.passed]
    assert not failed, failed
    assert set(report.curves) == {f"synthetic {r} (2^-6)" for r in rules}
    text = report.table()
    assert "[PASS]" in text and "shuffled" in text
    assert REPRODUCTIONS["asgrad"].__name__ == "reproduce_asgrad"
