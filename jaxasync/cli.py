"""The ``jaxasync`` command: simulate, reproduce a paper, run for real.

  jaxasync simulate --algorithm rfast --problem least_squares --nodes 8 --loss 0.3 --straggler 0:5
  jaxasync reproduce asgrad            # or rfast, dasgd, elastic, cluster, all
  jaxasync run --algorithm hogwild --workers 2
  mpiexec -n 4 jaxasync run --transport mpi --algorithm rfast   # one node per MPI rank

Every command prints a results table, and writes a JSON file of the numbers and a PNG plot under
``--out`` (default ``results/``). ``--config FILE.json`` reads the same options from a file (command
line flags win).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROBLEMS = ("least_squares", "logistic", "asgrad_w7a", "asgrad_synthetic", "mlp")


def _distribution(text: str):
    """``kind:scale`` or ``kind:s1,s2,...`` (per node), e.g. ``exponential:1`` or ``fixed:1,2,3``."""
    from jaxasync._src import asynchrony

    kind, _, scale = text.partition(":")
    if not scale:
        raise argparse.ArgumentTypeError(f"expected kind:scale, got {text!r}")
    try:
        values = [float(s) for s in scale.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad scale in {text!r}") from None
    try:
        return asynchrony.Distribution(kind, values[0] if len(values) == 1 else values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _node_values(items: list[str] | None, what: str) -> dict[int, float]:
    """``["0:5", "3:2.5"]`` -> ``{0: 5.0, 3: 2.5}``."""
    out = {}
    for item in items or []:
        node, _, value = item.partition(":")
        try:
            out[int(node)] = float(value)
        except ValueError:
            raise SystemExit(f"jaxasync: --{what} expects NODE:VALUE, got {item!r}") from None
    return out


def _options(items: list[str] | None) -> dict:
    """``["policy=shuffled", "density=0.01"]`` -> typed keyword arguments (JSON values when they parse)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"jaxasync: --option expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def make_problem(name: str, nodes: int, *, seed: int = 0, batch_size: int | None = None, dim: int = 20):
    """A ready-made problem by name, split over ``nodes`` nodes."""
    from jaxasync import problems

    if name == "least_squares":
        return problems.least_squares(nodes, dim, 64, batch_size=batch_size, seed=seed)
    if name == "logistic":
        shards = problems.synthetic_fedprox(nodes, 100, dim, 1.0, 1.0, num_classes=2, seed=seed)
        return problems.logistic_regression(shards, l2=1e-3, batch_size=batch_size)
    if name == "asgrad_w7a":
        return problems.asgrad_logistic(nodes, dataset="w7a", batch_size=batch_size, seed=seed)
    if name == "asgrad_synthetic":
        return problems.asgrad_logistic(nodes, dataset="synthetic", batch_size=batch_size, seed=seed)
    if name == "mlp":
        x, y = problems.gaussian_mixture(200 * nodes, dim, 10, seed=seed)
        return problems.mlp_classifier(
            problems.split_iid(x, y, nodes, seed=seed), hidden=(32,), batch_size=batch_size or 32, seed=seed
        )
    raise SystemExit(f"jaxasync: unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")


def _add_training_args(p: argparse.ArgumentParser, nodes_flag: str) -> None:
    p.add_argument("--algorithm", default=None, help="algorithm name (see --list)")
    p.add_argument("--problem", default=None, choices=PROBLEMS)
    p.add_argument(nodes_flag, type=int, default=None, dest="nodes", help="data nodes / workers")
    p.add_argument("--steps", type=int, default=None, help="local steps, summed over nodes")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument(
        "--topology",
        default=None,
        help="ring, directed_ring, exponential, complete, star, torus, tree (R-FAST)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: full shard)")
    p.add_argument("--dim", type=int, default=None, help="feature dimension of synthetic problems")
    p.add_argument(
        "--compute",
        type=_distribution,
        default=None,
        help="compute time per job, kind:scale[,per-node...] (default exponential:1)",
    )
    p.add_argument("--delay", type=_distribution, default=None, help="message delay, kind:scale")
    p.add_argument("--loss", type=float, default=None, help="packet loss probability")
    p.add_argument("--straggler", action="append", metavar="NODE:FACTOR", help="slow node down")
    p.add_argument("--crash", action="append", metavar="NODE:TIME", help="crash a node at a time")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="algorithm option")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="directory for the JSON trace and PNG plot")
    p.add_argument("--config", default=None, help="JSON file with any of these options")
    p.add_argument("--list", action="store_true", help="list algorithms and exit")


_DEFAULTS = dict(
    algorithm="rfast",
    problem="least_squares",
    nodes=8,
    steps=4000,
    lr=0.05,
    topology="ring",
    batch_size=None,
    dim=20,
    compute=None,
    delay=None,
    loss=0.0,
    straggler=None,
    crash=None,
    option=None,
    seed=0,
    out="results",
    executor="events",
)


def _resolve(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fills unset flags from ``--config`` and then from the defaults."""
    config = {}
    if args.config:
        with open(args.config) as f:
            config = {k.replace("-", "_"): v for k, v in json.load(f).items()}
        for k in ("compute", "delay"):
            if isinstance(config.get(k), str):
                config[k] = _distribution(config[k])
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, config.get(k, v))
    return args


def _asynchrony(args):
    from jaxasync._src import asynchrony

    kwargs = dict(
        loss=args.loss,
        stragglers=_node_values(args.straggler, "straggler") or None,
        crashes=_node_values(args.crash, "crash") or None,
    )
    if args.compute is not None:
        kwargs["compute_time"] = args.compute
    if args.delay is not None:
        kwargs["delay"] = args.delay
    return asynchrony.Asynchrony(**kwargs)


def _summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _cmd_simulate(args) -> int:
    from jaxasync._src import simulator
    from jaxasync._src.algorithms import registry

    if args.list:
        print("\n".join(sorted(registry.BUILDERS)))
        return 0
    args = _resolve(args, _DEFAULTS)
    problem = make_problem(args.problem, args.nodes, seed=args.seed, batch_size=args.batch_size, dim=args.dim)
    program = registry.build(
        args.algorithm, args.nodes, learning_rate=args.lr, topology=args.topology, **_options(args.option)
    )
    start = time.time()
    print(
        f"simulating {program.name} on {problem.name} ({problem.num_nodes} nodes, {args.steps} steps) ...",
        file=sys.stderr,
    )
    trace = simulator.simulate(
        program, problem, _asynchrony(args), steps=args.steps, seed=args.seed, executor=args.executor
    )
    elapsed = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"simulate_{program.name}_{args.problem}")
    trace.save(stem + ".json")
    trace.plot(stem + ".png", y="loss", x="time")
    rows = [
        ("algorithm", program.name),
        ("problem", problem.name),
        ("simulated time", f"{trace.final('time'):.4g}"),
        ("local steps", f"{trace.final('steps'):g}"),
        ("events", f"{trace.final('events'):g}"),
        ("loss", f"{trace['loss'][0]:.4g} -> {trace.final('loss'):.4g}"),
        ("grad norm", f"{trace.final('grad_norm'):.4g}"),
    ]
    if problem.optimum is not None:
        rows.append(("optimality gap", f"{trace.final('gap'):.4g}"))
    rows += [
        ("consensus distance", f"{trace.final('consensus'):.4g}"),
        ("messages sent / lost", f"{trace.final('sent'):g} / {trace.final('lost'):g}"),
        ("wall-clock (incl. compile)", f"{elapsed:.1f} s"),
        ("files", f"{stem}.json, {stem}.png"),
    ]
    print(_summary_table(rows))
    return 0


_RUN_DEFAULTS = dict(
    _DEFAULTS,
    algorithm="hogwild",
    problem="mlp",
    nodes=2,
    steps=20000,
    lr=0.05,
    batch_size=None,
    buffer_mode="atomic",
)


def _cmd_run(args) -> int:
    from jaxasync._src.algorithms import registry
    from jaxasync._src.runtime import local

    if args.list:
        print("\n".join(sorted(registry.BUILDERS)))
        return 0
    mpi_size = None
    if args.transport == "mpi":
        from jaxasync._src.runtime import mpi, worker

        # One XLA / BLAS thread per rank, like the local workers (read when jax's backend starts).
        os.environ.update(worker.thread_env(None))
        mpi_size = mpi._mpi().COMM_WORLD.Get_size()
        if args.algorithm is None:
            args.algorithm = "rfast"  # the default, hogwild, needs shared memory
    args = _resolve(args, _RUN_DEFAULTS if mpi_size is None else dict(_RUN_DEFAULTS, nodes=mpi_size))

    def build(nodes):
        return registry.build(
            args.algorithm, nodes, learning_rate=args.lr, topology=args.topology, **_options(args.option)
        )

    program = build(args.nodes)
    if mpi_size is not None and program.num_servers and args.nodes + program.num_servers > mpi_size:
        args.nodes = mpi_size - program.num_servers  # the ranks hold the data nodes and the servers
        program = build(args.nodes)
    problem = make_problem(args.problem, args.nodes, seed=args.seed, batch_size=args.batch_size, dim=args.dim)
    workers = problem.num_nodes + program.num_servers
    common = dict(
        asynchrony=_asynchrony(args),
        steps=args.steps,
        time_limit=args.time_limit,
        seed=args.seed,
        target_loss=args.target_loss,
        record_every=0.05,
    )
    where = f"{workers} worker processes" if mpi_size is None else f"{mpi_size} MPI ranks"
    if mpi_size is None or mpi._mpi().COMM_WORLD.Get_rank() == 0:
        print(
            f"running {program.name} on {problem.name} with {where} ({args.steps} steps) ...", file=sys.stderr
        )
    if mpi_size is None:
        trace = local.run(program, problem, workers=workers, buffer_mode=args.buffer_mode, **common)
    else:
        trace = mpi.run_mpi(program, problem, **common)
        if trace is None:  # not rank 0: rank 0 writes the files and prints the table
            return 0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"run_{program.name}_{args.problem}")
    trace.save(stem + ".json")
    trace.plot(stem + ".png", y="loss", x="time")
    steps = trace.final("steps")
    wall = trace.final("time")
    rows = [
        ("algorithm", program.name),
        ("problem", problem.name),
        ("MPI ranks" if mpi_size is not None else "worker processes", str(workers)),
        ("wall-clock", f"{wall:.2f} s"),
        ("local steps", f"{steps:g}"),
        ("steps / s", f"{steps / max(wall, 1e-9):.1f}"),
        ("loss", f"{trace['loss'][0]:.4g} -> {trace.final('loss'):.4g}"),
        ("grad norm", f"{trace.final('grad_norm'):.4g}"),
        *([("optimality gap", f"{trace.final('gap'):.4g}")] if problem.optimum is not None else []),
        ("staleness mean / max", f"{trace.final('staleness_mean'):.3g} / {trace.final('staleness_max'):.3g}"),
        ("messages sent / lost", f"{trace.final('sent'):g} / {trace.final('lost'):g}"),
        ("alive at the end", f"{trace.final('alive'):g}"),
        *_lost_update_rows(trace.meta.get("lost_updates")),
        ("files", f"{stem}.json, {stem}.png"),
    ]
    print(_summary_table(rows))
    return 0


def _lost_update_rows(lost: dict | None) -> list[tuple[str, str]]:
    """A summary row per shared buffer whose lost updates were measured (racy / relaxed modes)."""
    return [
        (
            f"lost updates ({name})",
            f"{r['lost_fraction']:.3%} of the update mass "
            f"(~{r['lost_element_updates']:.3g} of {r['element_updates']:.3g} element updates)",
        )
        for name, r in (lost or {}).items()
    ]


def _cmd_reproduce(args) -> int:
    from jaxasync._src import reproduce

    names = list(reproduce.REPRODUCTIONS) if args.paper == "all" else [args.paper]
    ok = True
    for name in names:
        report = reproduce.reproduce(name, quick=args.quick, out=args.out)
        print(report.table())
        print(f"files: {', '.join(report.files)}\n")
        ok &= report.passed
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxasync", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate an algorithm under controlled asynchrony")
    _add_training_args(sim, "--nodes")
    sim.add_argument(
        "--executor",
        choices=["events", "schedule"],
        default=None,
        help="'schedule': draw the schedule up front and apply all nodes' events at once "
        "(oblivious algorithms: rfast, dasgd, sgp)",
    )
    sim.set_defaults(func=_cmd_simulate)
    run = sub.add_parser("run", help="train for real: one process per node on shared memory")
    _add_training_args(run, "--workers")
    run.add_argument("--time-limit", type=float, default=None, help="wall-clock seconds")
    run.add_argument(
        "--buffer-mode",
        choices=["atomic", "relaxed", "racy"],
        default=None,
        help="how shared buffers apply updates; racy and relaxed also measure the updates they lose",
    )
    run.add_argument("--target-loss", type=float, default=None, help="stop at this loss")
    run.add_argument(
        "--transport",
        choices=["shm", "mpi"],
        default="shm",
        help="shm: worker processes on this machine; mpi: one node per rank of `mpiexec -n N jaxasync run`",
    )
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("reproduce", help="reproduce a paper's claim in the simulator")
    rep.add_argument("paper", choices=["rfast", "dasgd", "asgrad", "elastic", "cluster", "all"])
    rep.add_argument("--quick", action="store_true", help="a small, fast version (smoke test)")
    rep.add_argument("--out", default="results")
    rep.set_defaults(func=_cmd_reproduce)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
