"""Smoke test of the Elastic Consistency reproduction (quick version)."""

import numpy as np
import pytest

from jaxasync._src.reproduce import elastic


@pytest.fixture(scope="module")
def report():
    return elastic.reproduce(quick=True, progress=False)


def test_rows_and_columns(report):
    assert report.name == "elastic" and "quick" in report.title
    variants = {(row[2], row[3]) for row in report.rows}
    assert {("dense Hogwild", "100%"), ("TopK+EF", "1%"), ("TopK", "1%")} <= variants
    assert all(len(row) == len(report.columns) for row in report.rows)


def test_quick_checks_pass(report):
    assert len(report.checks) >= 2
    for check in report.checks:
        assert check.passed, (check.claim, check.detail)


def test_numbers_are_sane(report):
    col = {name: i for i, name in enumerate(report.columns)}
    for row in report.rows:
        assert np.isfinite(row[col["loss end"]]) and row[col["loss end"]] < row[col["loss start"]]
        assert 0 <= row[col["B_hat mean"]] <= row[col["B_hat max"]]
        assert 0 < row[col["staleness"]] < 8  # p = 4 workers: about 3 updates missed per step
    assert report.curves
