"""Smoke test of the Attiya & Schiller reproduction (quick version)."""

import numpy as np
import pytest

from jaxasync._src.reproduce import cluster


@pytest.fixture(scope="module")
def report():
    return cluster.reproduce(quick=True, progress=False)


def test_rows_and_columns(report):
    assert report.name == "cluster" and "quick" in report.title
    runs = [row[0] for row in report.rows]
    assert "A, no crash" in runs and any(r.startswith("A, clusters 2+3 crash") for r in runs)
    assert any(r.startswith("B, crash: none") for r in runs)
    assert any("5/12 alive" in r for r in runs)
    assert all(len(row) == len(report.columns) for row in report.rows)


def test_quick_checks_pass(report):
    assert len(report.checks) >= 4
    for check in report.checks:
        assert check.passed, (check.claim, check.detail)


def test_numbers_are_sane(report):
    rows = {row[0]: row for row in report.rows}
    a_free = rows["A, no crash"]
    a_crash = next(row for name, row in rows.items() if name.startswith("A, clusters 2+3 crash"))
    assert a_free[1] == "12/12" and a_crash[1] == "5/12"
    k = a_free[4]
    assert 1.0 < k <= 12.0
    assert np.isfinite(a_free[5]) and 0 < a_free[5] < a_free[6] * 10
    blocked = [row for row in report.rows if "5/12 alive" in row[0]][0]
    done, requested = map(int, blocked[3].split("/"))
    assert done < requested  # Algorithm B stalls without a weight majority
    assert report.curves and all(len(x) == len(y) for x, y in report.curves.values())
