"""The command line: simulate from flags and from a config file, run for real, bad input."""

import json

import pytest

from jaxasync import cli


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
