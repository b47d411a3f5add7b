"""Smoke test of the DASGD reproduction (quick version: 4 nodes, message delays 0.1 and 5, and a
small logistic-regression staleness study with S_max from the event log)."""

import json

import numpy as np

from jaxasync._src.reproduce import REPRODUCTIONS
from jaxasync._src.reproduce import dasgd as dasgd_repro


def test_quick_reproduction(tmp_path):
    report = dasgd_repro.reproduce(quick=True, progress=False)
    assert report.name == "dasgd" and "[quick]" in report.title
    col = {name: i for i, name in enumerate(report.columns)}
    fixed = [row for row in report.rows if row[0] == "fixed step"]
    assert [(row[col["method"]], row[col["setting (delay Exp(D))"]]) for row in fixed] == [
        ("sequential SGD", "-"),
        ("DASGD", "D=0.1"),
        ("DASGD", "D=5"),
    ]
    s_avg = [row[col["S_avg"]] for row in fixed]
    assert s_avg[0] == 0 and 0 < s_avg[1] < 1 < s_avg[2]  # S_avg ~ (n - 1) x mean delay
    for row in report.rows:
        assert len(row) == len(report.columns)
    for row in fixed:
        assert np.isfinite(row[col["K(fine)"]]) and row[col["K(fine)"]] > 0  # converged, fixed step
        assert row[-1] <= 1e-2  # final |grad f|^2
    study = [row for row in report.rows if row[0] == "best step per S"]
    assert [(row[1], row[2]) for row in study] == [("logistic", "sequential SGD")] + [
        ("logistic", "DASGD")
    ] * 2
    for row in study[1:]:
        assert row[col["S_max"]] >= row[col["S_avg"]] > 0
    assert study[2][col["S_max"]] > study[1][col["S_max"]]  # longer delays, staler gradients
    assert len(report.checks) == 3
    failed = [c.claim for c in report.checks if not c.passed]
    assert not failed, failed
    files = report.save(tmp_path)
    with open(files[0]) as f:
        assert json.load(f)["passed"] is True
    assert REPRODUCTIONS["dasgd"].__name__ == "reproduce_dasgd"


def test_event_staleness_matches_the_trace():
    """S_avg from the event log equals the trace's exact gradient-set staleness, seed by seed."""
    import jaxasync
    from jaxasync._src.algorithms import dasgd as dasgd_lib

    _, make = dasgd_repro._problems(64, 4)
    problem = make(4)
    spec = jaxasync.Asynchrony(delay=jaxasync.exponential(2.0))
    prog = dasgd_lib.dasgd(num_nodes=4, learning_rate=0.01)
    s = dasgd_repro.event_staleness(prog, problem, [spec], [0, 1], 200, pool_size=256)
    trace = jaxasync.simulate(
        prog, problem, spec, steps=200, seeds=[0, 1], pool_size=256, executor="events"
    )
    np.testing.assert_allclose(s[0].mean(axis=1), trace.final("staleness_mean"), rtol=0, atol=1e-4)
    assert s.min() >= 0 and s[0].max(axis=1).min() > s[0].mean(axis=1).max()
