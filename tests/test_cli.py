"""The command line: simulate from flags and from a config file, run for real, reproduce a paper (and
the same reproductions from Python), bad input."""

import json
import subprocess
import sys

import pytest

import jaxasync
from jaxasync import cli, reproductions
from jaxasync._src import reproduce as reproduce_lib
from jaxasync._src.reproduce import common


def test_simulate_from_flags_writes_trace_and_plot(tmp_path, capsys):
    code = cli.main(
        [
            "simulate",
            "--algorithm",
            "rfast",
            "--nodes",
            "4",
            "--steps",
            "200",
            "--loss",
            "0.2",
            "--straggler",
            "0:3",
            "--delay",
            "exponential:0.5",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "rfast" in out and "messages sent / lost" in out
    trace = json.loads((tmp_path / "simulate_rfast_least_squares.json").read_text())
    assert trace["meta"]["asynchrony"]["loss"] == pytest.approx(0.2)
    assert trace["meta"]["asynchrony"]["stragglers"] == {"0": 3.0}
    assert trace["metrics"]["steps"][-1] == 200
    assert (tmp_path / "simulate_rfast_least_squares.png").stat().st_size > 0


def test_simulate_from_a_config_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "algorithm": "asgrad",
                "nodes": 3,
                "steps": 90,
                "compute": "abs_normal:1,2,3,1",
                "option": ["policy=shuffled"],
            }
        )
    )
    assert cli.main(["simulate", "--config", str(config), "--out", str(tmp_path)]) == 0
    trace = json.loads((tmp_path / "simulate_asgrad_shuffled_least_squares.json").read_text())
    assert trace["metrics"]["steps"][-1] == 90
    assert trace["meta"]["asynchrony"]["compute_time"] == ["abs_normal", [1.0, 2.0, 3.0, 1.0]]
    assert trace["meta"]["simulator"] == "events"


def test_simulate_on_the_schedule_executor(tmp_path):
    argv = ["simulate", "--algorithm", "rfast", "--nodes", "4", "--steps", "200", "--loss", "0.2"]
    assert cli.main([*argv, "--executor", "schedule", "--out", str(tmp_path)]) == 0
    trace = json.loads((tmp_path / "simulate_rfast_least_squares.json").read_text())
    assert trace["meta"]["simulator"] == "schedule" and trace["metrics"]["steps"][-1] == 200


def test_run_trains_for_real(tmp_path, capsys):
    code = cli.main(
        [
            "run",
            "--algorithm",
            "hogwild",
            "--workers",
            "2",
            "--steps",
            "400",
            "--problem",
            "least_squares",
            "--buffer-mode",
            "racy",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    trace = json.loads((tmp_path / "run_hogwild_least_squares.json").read_text())
    assert trace["meta"]["executor"] == "local" and trace["meta"]["buffer_mode"] == "racy"
    assert trace["metrics"]["steps"][-1] == 400
    loss = trace["metrics"]["loss"]
    assert loss[-1] < loss[0]
    lost = trace["meta"]["lost_updates"]["params"]  # racy mode measures the updates it loses
    assert lost["adds"] == 400 and 0 <= lost["lost_fraction"] < 0.5
    assert "lost updates (params)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--algorithm", "nope", "--steps", "10"], "unknown algorithm"),
        (["simulate", "--topology", "moebius", "--steps", "10"], "unknown topology"),
        (["simulate", "--straggler", "zero:5", "--steps", "10"], "NODE:VALUE"),
        (["simulate", "--option", "policy", "--steps", "10"], "KEY=VALUE"),
        (["simulate", "--algorithm", "hogwild", "--executor", "schedule"], "cannot run on the schedule"),
    ],
)
def test_bad_input_is_named(argv, message, tmp_path):
    with pytest.raises((SystemExit, ValueError), match=message):
        cli.main([*argv, "--out", str(tmp_path)])


def test_bad_distribution_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--compute", "gamma:1"])
    assert "unknown distribution kind" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Reproductions: the CLI and the public Python path, with fast fakes in the registry.


def _fake(name, passed, calls):
    """A reproduction that returns a real :class:`Report` at once and records how it was called."""

    def run(**kwargs):
        calls.append((name, kwargs))
        return common.Report(
            name=name,
            title=f"fake {name} reproduction",
            columns=["rule", "loss"],
            rows=[["pure", 0.5], ["shuffled", 0.25]],
            checks=[common.Check("loss falls", passed, "0.5 -> 0.25")],
            curves={
                "pure": ([0.0, 1.0, 2.0], [1.0, 0.7, 0.5]),
                "shuffled": ([0.0, 1.0, 2.0], [1.0, 0.5, 0.25]),
            },
        )

    return run


@pytest.mark.parametrize("passed, code", [(True, 0), (False, 1)])
def test_reproduce_prints_the_table_writes_the_files_and_exits_on_the_verdict(
    passed, code, tmp_path, monkeypatch, capsys
):
    calls = []
    monkeypatch.setitem(reproduce_lib.REPRODUCTIONS, "elastic", _fake("elastic", passed, calls))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce", "elastic", "--quick"]) == code
    assert calls == [("elastic", {"quick": True, "progress": True})]
    out = capsys.readouterr().out
    assert "fake elastic reproduction" in out and "shuffled" in out and "0.25" in out
    assert f"[{'PASS' if passed else 'FAIL'}] loss falls (0.5 -> 0.25)" in out
    results = tmp_path / "results"  # the default --out, relative to the working directory
    assert "files: results/elastic.json, results/elastic.png" in out
    saved = json.loads((results / "elastic.json").read_text())
    assert saved["name"] == "elastic" and saved["passed"] is passed
    assert saved["rows"] == [["pure", 0.5], ["shuffled", 0.25]]
    assert saved["curves"]["shuffled"] == [[0.0, 1.0, 2.0], [1.0, 0.5, 0.25]]
    assert (results / "elastic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in results.iterdir()) == ["elastic.json", "elastic.png"]


def test_reproduce_all_runs_every_paper_and_fails_if_one_fails(tmp_path, monkeypatch, capsys):
    calls = []
    names = ["rfast", "dasgd", "asgrad", "elastic", "cluster"]
    for name in names:
        monkeypatch.setitem(reproduce_lib.REPRODUCTIONS, name, _fake(name, name != "asgrad", calls))
    assert cli.main(["reproduce", "all", "--out", str(tmp_path)]) == 1
    assert calls == [(name, {"quick": False, "progress": True}) for name in names]
    out = capsys.readouterr().out
    assert out.count("[PASS]") == 4 and out.count("[FAIL]") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.{e}" for n in names for e in ("json", "png")
    )


def test_reproduce_rejects_an_unknown_paper(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "adam"])
    assert e.value.code == 2 and "invalid choice: 'adam'" in capsys.readouterr().err


def test_reproductions_are_public(tmp_path, monkeypatch):
    assert jaxasync.reproduce is reproductions.reproduce is reproduce_lib.reproduce
    assert reproductions.REPRODUCTIONS is reproduce_lib.REPRODUCTIONS
    assert list(reproductions.REPRODUCTIONS) == ["rfast", "dasgd", "asgrad", "elastic", "cluster"]
    assert reproductions.Report is common.Report and reproductions.Check is common.Check
    assert sorted(reproductions.__all__) == ["Check", "REPRODUCTIONS", "Report", "reproduce"]
    assert {"reproduce", "reproductions"} <= set(jaxasync.__all__)

    calls = []
    monkeypatch.setitem(reproduce_lib.REPRODUCTIONS, "asgrad", _fake("asgrad", True, calls))
    report = jaxasync.reproduce("asgrad", quick=True, progress=False, seeds=(3,))
    assert calls == [("asgrad", {"quick": True, "progress": False, "seeds": (3,)})]
    assert isinstance(report, reproductions.Report) and report.passed and report.files == []
    assert list(tmp_path.iterdir()) == []
    report = reproductions.reproduce("asgrad", out=tmp_path / "out")
    assert calls[1] == ("asgrad", {"quick": False, "progress": True})
    assert report.files == [str(tmp_path / "out" / "asgrad.json"), str(tmp_path / "out" / "asgrad.png")]
    assert "[PASS] loss falls" in report.table()
    with pytest.raises(ValueError, match="unknown reproduction 'adam'; choose from rfast, dasgd"):
        jaxasync.reproduce("adam")


def test_importing_jaxasync_loads_no_reproduction():
    code = (
        "import sys, jaxasync; print(*sorted(m for m in sys.modules if m.startswith('jaxasync._src.repro')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["jaxasync._src.reproduce", "jaxasync._src.reproduce.common"]
