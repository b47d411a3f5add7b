"""Tests of the MPI runtime (:mod:`jaxasync._src.runtime.mpi`): real ``mpiexec -n 2`` / ``-n 3`` jobs.

Each job runs a small script (``_SCRIPT``) in every rank; rank 0 saves the traces as JSON and every
rank writes what ``run_mpi`` returned or raised. One job serves several tests (module-scoped
fixtures): a job costs a few seconds of jax start-up and compilation per rank on a 2-core machine.
Assertions are on exact counts, invariants and convergence, never on timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxasync as ja
from jaxasync._src.runtime import local, mpi, worker

pytest.importorskip("mpi4py", reason="the MPI runtime needs mpi4py (pip install 'jaxasync[mpi]')")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists():
    pytest.skip(f"no mpiexec next to {sys.executable} (pip install mpich)", allow_module_level=True)

TIMEOUT = 180  # seconds for one job (start-up is slow on a loaded 2-core machine)
_DIM, _SAMPLES, _BATCH = 10, 32, 8

_SCRIPT = """
import dataclasses, json, os, sys
import jax
import jaxasync as ja
from mpi4py import MPI

scenario, out = sys.argv[1], sys.argv[2]
rank, n = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
problem = ja.problems.least_squares(n, dim=DIM, samples_per_node=SAMPLES, batch_size=BATCH, seed=0)
ring = ja.topology.ring(n)
seen = {}


def run(name, program, problem=problem, **kwargs):
    try:
        trace = ja.run_mpi(program, problem, **kwargs)
    except ValueError as e:
        seen[name] = "ValueError: " + str(e)
        return
    seen[name] = None if trace is None else "trace"
    if trace is not None:
        trace.save(os.path.join(out, name + ".json"))


if scenario == "two":
    run("rfast", ja.algorithms.rfast(ring, ring, learning_rate=0.02), steps=601,
        asynchrony=ja.Asynchrony(loss=0.2))
    run("dpsgd", ja.algorithms.dpsgd(ring, learning_rate=0.05), steps=400)
    run("hogwild", ja.algorithms.hogwild(learning_rate=0.05), steps=10)
    three = ja.problems.least_squares(3, dim=DIM, samples_per_node=SAMPLES, batch_size=BATCH)
    run("shards", ja.algorithms.dpsgd(ring, learning_rate=0.05), problem=three, steps=10)
elif scenario == "three":
    run("dpsgd", ja.algorithms.dpsgd(ring, learning_rate=0.05), steps=300)
    run("rfast", ja.algorithms.rfast(ring, ring, learning_rate=0.02), steps=1200)
    run("timed", ja.algorithms.rfast(ring, ring, learning_rate=0.02), time_limit=0.5, record_every=0.1)
    run("target", ja.algorithms.rfast(ring, ring, learning_rate=0.02), steps=10**7, target_loss=4.0,
        record_every=0.02)
elif scenario == "fail":
    calls = [0]

    def boom():
        calls[0] += 1
        if rank == 1 and calls[0] == 50:
            raise RuntimeError("boom: on purpose")

    program = ja.algorithms.rfast(ring, ring, learning_rate=0.05)
    step = program.step

    def faulty(state, grad_fn, batch, key):
        jax.debug.callback(boom)
        return step(state, grad_fn, batch, key)

    run("fail", dataclasses.replace(program, step=faulty), steps=10**7, stall_timeout=30)
with open(os.path.join(out, "rank%d.json" % rank), "w") as f:
    json.dump(seen, f)
"""

# Every metric of the local runtime's records (local._record) and its meta keys.
_METRICS = {
    "time",
    "events",
    "steps",
    "node_steps",
    "node_cpu_time",
    "in_flight",
    "sent",
    "lost",
    "delivered",
    "dropped",
    "overflow",
    "bytes_sent",
    "alive",
    "staleness_mean",
    "staleness_max",
    "loss",
    "grad_norm",
    "consensus",
    "gap",
}
_META = {
    "algorithm",
    "problem",
    "nodes",
    "workers",
    "steps",
    "time_limit",
    "target_loss",
    "record_every",
    "seed",
    "asynchrony",
    "executor",
    "buffer_mode",
    "wall_time",
    "crashed",
    "interrupted",
    "stalled",
    "lost_updates",
}


def _env() -> dict:
    return dict(os.environ, **worker.thread_env("cpu"))


def _mpiexec(n: int, args: list, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", str(n), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _job(n: int, scenario: str, out: Path) -> dict:
    script = out / "script.py"
    text = _SCRIPT.replace("DIM", str(_DIM)).replace("SAMPLES", str(_SAMPLES)).replace("BATCH", str(_BATCH))
    script.write_text(text)
    proc = _mpiexec(n, [sys.executable, str(script), scenario, str(out)], out)
    assert proc.returncode == 0, f"mpiexec failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    traces = {p.stem: ja.Trace.load(str(p)) for p in out.glob("*.json") if not p.stem.startswith("rank")}
    return dict(ranks=ranks, traces=traces)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _job(2, "two", tmp_path_factory.mktemp("mpi2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _job(3, "three", tmp_path_factory.mktemp("mpi3"))


def _final(trace, name):
    return np.asarray(trace[name])[-1]


def _check_accounting(trace):
    """Every message sent is lost, delivered or dropped: nothing is left in flight at the end."""
    sent, lost, delivered, dropped = (int(_final(trace, k)) for k in ("sent", "lost", "delivered", "dropped"))
    assert sent == lost + delivered + dropped and int(_final(trace, "in_flight")) == 0
    assert trace.meta["drained"]


# ------------------------------------------------------------------------- no MPI in this process


def test_steps_are_split_exactly_over_the_ranks():
    assert mpi._shares(601, 2) == [301, 300]
    assert mpi._shares(300, 3) == [100, 100, 100]
    assert mpi._shares(2, 3) == [1, 1, 0]
    assert mpi._shares(None, 2) == [-1, -1]
    assert mpi._shares(7, 4, data_nodes=3) == [3, 2, 2, 0]  # the server (rank 3) never steps


def test_local_stand_ins_behave_like_the_shared_objects():
    cells = mpi.LocalCells(4)
    assert cells.fetch_add(1, 3) == 0 and cells.fetch_add(1) == 3 and cells.load(1) == 4
    reg = mpi.LocalRegister(3)
    assert reg.read()[0] == -1 and not reg.read()[1].any()  # like an unwritten Register
    reg.write(np.array([1, 2, 3], np.uint8), 7)
    tag, value = reg.read(np.zeros(3, np.uint8))
    assert tag == 7 and value.tolist() == [1, 2, 3]


def test_the_local_runtime_points_to_run_mpi():
    problem = ja.problems.least_squares(2, dim=_DIM, samples_per_node=_SAMPLES)
    program = ja.algorithms.dpsgd(ja.topology.ring(2), learning_rate=0.05)
    with pytest.raises(ValueError, match="run_mpi"):
        ja.run(program, problem, workers=2, steps=10, transport="mpi")


# ------------------------------------------------------------------------- mpiexec -n 2


def test_rfast_converges_with_exact_counts_and_the_local_fields(two):
    tr = two["traces"]["rfast"]
    # 601 steps over 2 ranks: 301 + 300, exactly.
    assert _final(tr, "node_steps").tolist() == [301, 300] and int(_final(tr, "steps")) == 601
    _check_accounting(tr)
    lost, sent = int(_final(tr, "lost")), int(_final(tr, "sent"))
    assert 0.1 < lost / sent < 0.3  # Bernoulli(0.2) per message, injected before the send
    loss = np.asarray(tr["loss"])
    assert loss[-1] < 0.25 * loss[0]
    assert _METRICS <= set(tr.metrics) and _META <= set(tr.meta)
    assert tr.meta["executor"] == "mpi" and tr.meta["ranks"] == 2 and tr.meta["hosts"] == 1
    assert np.all(np.diff(tr["time"]) >= 0) and np.all(np.diff(tr["steps"]) >= 0)


def test_dpsgd_ends_where_the_local_runtime_ends(two):
    """D-PSGD runs in lock-step with per-node keys: both runtimes execute the same handlers on the
    same messages, so they end in the same models."""
    tr = two["traces"]["dpsgd"]
    assert _final(tr, "node_steps").tolist() == [200, 200]
    # Each round sends the model to the one ring neighbour; nothing is lost without injection.
    assert int(_final(tr, "sent")) == int(_final(tr, "delivered")) == 400
    _check_accounting(tr)
    problem = ja.problems.least_squares(2, dim=_DIM, samples_per_node=_SAMPLES, batch_size=_BATCH, seed=0)
    program = ja.algorithms.dpsgd(ja.topology.ring(2), learning_rate=0.05)
    ref = local.run(program, problem, workers=2, steps=400)
    assert _final(ref, "node_steps").tolist() == [200, 200]
    np.testing.assert_allclose(_final(tr, "loss"), _final(ref, "loss"), rtol=1e-6)
    np.testing.assert_allclose(_final(tr, "consensus"), _final(ref, "consensus"), rtol=1e-5, atol=1e-9)


def test_only_rank_0_gets_a_trace(two):
    assert two["ranks"][0]["rfast"] == "trace" and two["ranks"][1]["rfast"] is None


def test_shared_memory_algorithms_and_bad_sizes_are_refused_on_every_rank(two):
    for seen in two["ranks"]:
        assert "needs shared memory" in seen["hogwild"] and "jaxasync.run" in seen["hogwild"]
        assert "2 MPI ranks but the problem has 3 data shard(s)" in seen["shards"]


# ------------------------------------------------------------------------- mpiexec -n 3


def test_three_ranks_step_exactly_and_drain(three):
    tr = three["traces"]["dpsgd"]
    assert _final(tr, "node_steps").tolist() == [100, 100, 100]
    assert int(_final(tr, "sent")) == 2 * 300  # two ring neighbours per round
    _check_accounting(tr)
    loss = np.asarray(tr["loss"])
    assert loss[-1] < 0.5 * loss[0]
    assert [r["dpsgd"] for r in three["ranks"]] == ["trace", None, None]


def test_rfast_converges_as_in_the_simulator(three):
    """Messages between ranks are not delayed much: with 64 untaken messages per edge allowed,
    MPICH's one-message-per-progress-call delivery kept standing queues and R-FAST ended at 2.5x
    the simulator's loss; with the default of 4 it ends within a few percent of it."""
    tr = three["traces"]["rfast"]
    assert _final(tr, "node_steps").tolist() == [400, 400, 400]
    _check_accounting(tr)
    problem = ja.problems.least_squares(3, dim=_DIM, samples_per_node=_SAMPLES, batch_size=_BATCH, seed=0)
    ring = ja.topology.ring(3)
    sim = ja.simulate(ja.algorithms.rfast(ring, ring, learning_rate=0.02), problem, steps=1200)
    assert _final(tr, "loss") < 1.15 * sim.final("loss")


def test_a_time_limit_stops_every_rank_and_drains(three):
    tr = three["traces"]["timed"]
    assert tr.meta["time_limit"] == 0.5 and tr.meta["steps"] is None
    assert np.all(_final(tr, "node_steps") > 0)
    assert int(_final(tr, "steps")) == int(_final(tr, "node_steps").sum())
    _check_accounting(tr)


def test_target_loss_halts_every_rank(three):
    tr = three["traces"]["target"]
    loss = np.asarray(tr["loss"])
    assert loss[:-1].min() <= 4.0 < loss[0]  # the record that halted the run
    assert int(_final(tr, "steps")) < 10**7
    _check_accounting(tr)


# ------------------------------------------------------------------------- failures and the CLI


def test_a_failing_rank_stops_the_job_with_its_traceback(tmp_path):
    script = tmp_path / "script.py"
    text = _SCRIPT.replace("DIM", str(_DIM)).replace("SAMPLES", str(_SAMPLES)).replace("BATCH", str(_BATCH))
    script.write_text(text)
    proc = _mpiexec(2, [sys.executable, str(script), "fail", str(tmp_path)], tmp_path)
    assert proc.returncode != 0
    # Rank 1 raised; rank 0 raised WorkerError with rank 1's traceback instead of waiting for it.
    assert "WorkerError: rank 1 failed:" in proc.stderr and "boom: on purpose" in proc.stderr


def test_cli_runs_on_mpi_ranks(tmp_path):
    args = ["run", "--transport", "mpi", "--problem", "least_squares", "--steps", "400"]
    args += ["--out", str(tmp_path)]
    proc = _mpiexec(2, [sys.executable, "-m", "jaxasync.cli", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("MPI ranks") == 1  # only rank 0 prints the table
    trace = json.loads((tmp_path / "run_rfast_least_squares.json").read_text())
    assert trace["meta"]["executor"] == "mpi" and trace["metrics"]["steps"][-1] == 400
    assert (tmp_path / "run_rfast_least_squares.png").exists()
