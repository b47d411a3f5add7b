"""Benchmark of the local multi-process runtime; prints one table of ratios measured in this run.

Rows (every figure is a ratio against an anchor measured in the same run; absolute rates are shown
for context only, they depend on the machine's load):

1. overhead: steps/s of one runtime worker (sequential SGD node program, d = 100k least squares)
   against the bare jitted gradient step in a plain Python loop, in a process with the same single
   XLA thread. Target: overhead <= 10 %.
2. scaling: Hogwild! (racy buffer) on an MLP, steps/s with 2 workers against 1. Target >= 1.6x.
3. torch: the same MLP, data, step size and batch with the PyTorch Hogwild! pattern
   (torch.multiprocessing + share_memory_(), 2 processes, one thread each): steps/s and wall-clock
   time to a target loss, jaxasync / torch. Skipped if torch is not importable.
4. straggler: wall-clock time to a target loss with one of 3 data workers slowed 4x, for R-FAST,
   AsGrad (shuffled) and Hogwild!, against synchronous all-reduce SGD on the same runtime.
   Target: >= 1.5x faster. Every method has the same small step size (R-FAST divides it by its
   effective-step factor, so it means the same progress per round of steps) and full local
   gradients, so progress is proportional to the steps taken and the row measures how much of the
   machine's work each method turns into progress with a straggler (the simulator, at this step,
   gives R-FAST 3.4x; its reproductions compare step sizes on grids).
   The straggler is paced like a processor 4x slower at steps: each of its rounds lasts the
   round's CPU time plus 3x its step's (see the runtime's docstring). Each method runs 3 times
   (the methods alternate, in a rotating order); the time of a method is its median run.
5. lost updates: the update mass a racy Hogwild! buffer loses with 2 workers (each worker sums
   the deltas it added in float64; the difference to the buffer's net change), against the
   atomic (compare-and-swap) mode, whose difference is float32 rounding only.

Usage: ``PYTHONPATH=. python bench/runtime.py [--quick]``. On a shared 2-core machine the scaling
row measures the cores you actually get.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import os
import sys
import time

import numpy as np

ERR = sys.stderr

# -------------------------------------------------------------------------------- problems


def lsq_data(n_shards, rows, d, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    x_star = rng.normal(size=d).astype(np.float32) / np.sqrt(d)
    shards = []
    for _ in range(n_shards):
        a = rng.normal(size=(rows, d)).astype(np.float32)
        b = (a @ x_star + noise * rng.normal(size=rows)).astype(np.float32)
        shards.append({"a": a, "b": b})
    return shards


def lsq_problem(shards, batch_size):
    import jax.numpy as jnp

    import jaxasync as ja

    def loss(x, d):
        return 0.5 * jnp.mean((d["a"] @ x - d["b"]) ** 2)

    d = shards[0]["a"].shape[1]
    return ja.Problem(loss, jnp.zeros(d, jnp.float32), shards, batch_size=batch_size, name=f"lsq{d}")


MLP = dict(inputs=64, hidden=256, classes=10, rows=4096, batch=32, lr=0.05, target=0.5)


def mlp_data(seed=0):
    """Inputs and labels of a random teacher MLP, plus the student's initial parameters."""
    rng = np.random.default_rng(seed)
    i, h, c, m = MLP["inputs"], MLP["hidden"], MLP["classes"], MLP["rows"]
    x = rng.normal(size=(m, i)).astype(np.float32)
    t1 = rng.normal(size=(i, 64)).astype(np.float32) / np.sqrt(i)
    t2 = rng.normal(size=(64, c)).astype(np.float32) / 8.0
    y = np.argmax(np.tanh(x @ t1) @ t2, axis=1).astype(np.int32)
    params = {
        "w1": (rng.normal(size=(i, h)) / np.sqrt(i)).astype(np.float32),
        "b1": np.zeros(h, np.float32),
        "w2": (rng.normal(size=(h, c)) / np.sqrt(h)).astype(np.float32),
        "b2": np.zeros(c, np.float32),
    }
    return x, y, params


def mlp_loss_fn(p, d):
    import jax
    import jax.numpy as jnp

    logits = jnp.tanh(d["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, d["y"][:, None], 1)[:, 0])


def mlp_problem(n_shards, seed=0):
    import jax.numpy as jnp

    import jaxasync as ja

    x, y, params = mlp_data(seed)
    xs, ys = np.array_split(x, n_shards), np.array_split(y, n_shards)
    shards = [{"x": a, "y": b} for a, b in zip(xs, ys)]
    return ja.Problem(
        mlp_loss_fn,
        {k: jnp.asarray(v) for k, v in params.items()},
        shards,
        batch_size=MLP["batch"],
        name="mlp",
    )


# -------------------------------------------------------------------------------- anchors


def _bare_loop(d, rows, steps, out):
    """The anchor of row 1: the same gradient step, jitted, in a plain loop (key folded inside).

    Two ways a user writes it (data closed over, data passed as an argument); the faster counts.
    """
    import jax

    problem = lsq_problem(lsq_data(1, rows, d), batch_size=8)
    lr = 0.01
    base = jax.random.key(0)
    data = problem._stacked

    @jax.jit
    def closed(x, i):
        batch = problem.sample(jax.random.fold_in(base, i), 0)
        return x - lr * problem.grad_fn(x, batch)

    @jax.jit
    def passed(data, x, i):
        k = jax.random.fold_in(base, i)
        idx = jax.random.randint(k, (8,), 0, rows)
        batch = jax.tree.map(lambda a: a[0, idx], data)
        return x - lr * problem.grad_fn(x, batch)

    rates = []
    for fn, extra in ((closed, ()), (passed, (data,))) * 2:
        x = problem.init_params
        x = fn(*extra, x, 0)
        x.block_until_ready()
        t0 = time.perf_counter()
        for i in range(steps):
            x = fn(*extra, x, i)
        x.block_until_ready()
        rates.append(steps / (time.perf_counter() - t0))
    out.put(max(rates))


def _in_single_thread_process(fn, *args):
    import queue

    from jaxasync._src.runtime import local, worker

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    env = worker.thread_env(local._platform())
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the child imports jax with one thread, like a runtime worker
    try:
        p = ctx.Process(target=fn, args=(*args, q))
        p.start()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    while True:
        try:
            value = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"anchor process died with code {p.exitcode}") from None
    p.join()
    return value


def _torch_worker(rank, model, x, y, steps_done, ready, stop, start, lr, batch):
    import torch

    torch.set_num_threads(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(rank)
    xs, ys = x[rank], y[rank]
    n = xs.shape[0]
    lossf = torch.nn.CrossEntropyLoss()
    with ready.get_lock():
        ready.value += 1
    start.wait()
    count = 0
    while not stop.is_set():
        idx = torch.randint(0, n, (batch,), generator=gen)
        opt.zero_grad()
        loss = lossf(model(xs[idx]), ys[idx])
        loss.backward()
        opt.step()
        count += 1
        if count % 16 == 0:
            with steps_done.get_lock():
                steps_done.value += 16
    with steps_done.get_lock():
        steps_done.value += count % 16


def torch_hogwild(workers, target, time_limit):
    """PyTorch's Hogwild! example pattern; returns (steps/s, time to target loss)."""
    import torch
    import torch.multiprocessing as tmp

    torch.set_num_threads(1)
    x, y, params = mlp_data()
    model = torch.nn.Sequential(
        torch.nn.Linear(MLP["inputs"], MLP["hidden"]),
        torch.nn.Tanh(),
        torch.nn.Linear(MLP["hidden"], MLP["classes"]),
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(params["w1"].T.copy()))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.from_numpy(params["w2"].T.copy()))
        model[2].bias.zero_()
    model.share_memory()
    xs = [torch.from_numpy(a) for a in np.array_split(x, workers)]
    ys = [torch.from_numpy(a.astype(np.int64)) for a in np.array_split(y, workers)]
    X, Y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    ctx = tmp.get_context("spawn")
    steps_done, ready = ctx.Value("q", 0), ctx.Value("q", 0)
    stop, start = ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(
            target=_torch_worker,
            args=(r, model, xs, ys, steps_done, ready, stop, start, MLP["lr"], MLP["batch"]),
        )
        for r in range(workers)
    ]
    for p in procs:
        p.start()
    while ready.value < workers:  # like the runtime's clock: start when every worker is ready
        time.sleep(0.01)
    lossf = torch.nn.CrossEntropyLoss()
    start.set()
    t0 = time.perf_counter()
    t_hit = float("inf")
    while True:
        now = time.perf_counter() - t0
        with torch.no_grad():
            loss = float(lossf(model(X), Y))
        if loss <= target and t_hit == float("inf"):
            t_hit = now
            break
        if now > time_limit:
            break
        time.sleep(0.1)
    stop.set()
    elapsed = time.perf_counter() - t0  # workers stop within one step; exiting takes longer
    for p in procs:
        p.join()
    return steps_done.value / elapsed, t_hit


# -------------------------------------------------------------------------------- runtime runs


def _build(fn, *args, **kwargs):
    ok = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in ok})


def runtime_rate(program, problem, workers, steps, **kw):
    from jaxasync._src.runtime import local

    tr = local.run(program, problem, workers=workers, steps=steps, record_every=60.0, **kw)
    return tr["steps"][-1] / tr.meta["wall_time"], tr


def crossing_time(tr, target):
    """When the loss first reached ``target``, interpolating log-linearly between the two records
    around the crossing (records are 0.1 s apart; runs take ~1 s)."""
    loss, t = np.asarray(tr["loss"], np.float64), np.asarray(tr["time"], np.float64)
    hit = np.nonzero(loss <= target)[0]
    if not len(hit):
        return float("inf")
    i = int(hit[0])
    if i == 0:
        return float(t[0])
    l0, l1 = np.log(loss[i - 1]), np.log(loss[i])
    return float(t[i - 1] + (t[i] - t[i - 1]) * (l0 - np.log(target)) / max(l0 - l1, 1e-12))


def time_to_target(program, problem, workers, target, time_limit, **kw):
    from jaxasync._src.runtime import local

    tr = local.run(
        program,
        problem,
        workers=workers,
        steps=10**9,
        time_limit=time_limit,
        target_loss=target,
        record_every=0.1,
        **kw,
    )
    return crossing_time(tr, target), tr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (noisier ratios)")
    ap.add_argument(
        "--skip", default="", help="comma-separated rows to skip: overhead,scaling,torch,straggler,lost"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    q = 0.4 if args.quick else 1.0
    import jax.numpy as jnp

    from jaxasync._src.algorithms import sequential, shared_memory

    rows = []

    def row(name, value, anchor, ratio, target, passed):
        rows.append((name, value, anchor, ratio, target, passed))
        print(f"  {name}: {value} vs {anchor} -> {ratio}", file=sys.stderr, flush=True)

    # 1. overhead --------------------------------------------------------------------------
    if "overhead" not in skip:
        d, m, steps = 100_000, 32, int(3000 * q)
        prog = sequential.sgd(learning_rate=0.01)
        problem = lsq_problem(lsq_data(1, m, d), 8)
        # Best of three for both, alternating (the machine is shared; the best run is the least
        # disturbed one, and alternating exposes both to the same spells of load).
        bare = rate = 0.0
        for _ in range(3):
            bare = max(bare, _in_single_thread_process(_bare_loop, d, m, steps))
            rate = max(rate, runtime_rate(prog, problem, 1, steps)[0])
        overhead = bare / rate - 1
        row(
            "overhead: 1 worker vs bare jitted step (d=100k)",
            f"{rate:.0f} steps/s",
            f"{bare:.0f} steps/s",
            f"{100 * overhead:+.1f}% time/step",
            "<= 10%",
            overhead <= 0.10,
        )

    # 2. scaling ---------------------------------------------------------------------------
    hog = shared_memory.hogwild(learning_rate=MLP["lr"])
    r1 = r2 = None
    if "scaling" not in skip:
        steps = int(3000 * q)
        # Best of two, alternating (the machine is shared).
        rates = {1: 0.0, 2: 0.0}
        for _ in range(2):
            for w in (1, 2):
                # lost_updates=False: the float64 tally costs ~10% of this step (row 5 measures it).
                rate, tr = runtime_rate(
                    hog, mlp_problem(w), w, w * steps, buffer_mode="racy", lost_updates=False
                )
                rates[w] = max(rates[w], rate)
                cpu = tr["node_cpu_time"][-1] / np.maximum(tr["node_steps"][-1], 1) * 1e6
                print(f"  scaling: {w} worker(s) {rate:.0f} steps/s, CPU us/step {cpu.round()}", file=ERR)
        r1, r2 = rates[1], rates[2]
        row(
            "scaling: Hogwild 2 workers vs 1 (MLP)",
            f"{r2:.0f} steps/s",
            f"{r1:.0f} steps/s",
            f"{r2 / r1:.2f}x",
            ">= 1.6x",
            r2 / r1 >= 1.6,
        )

    # 3. torch -----------------------------------------------------------------------------
    if "torch" not in skip:
        try:
            import torch  # noqa: F401
        except ImportError:
            rows.append(("torch Hogwild (share_memory_)", "-", "-", "skipped: no torch", "", None))
        else:
            target = MLP["target"]
            t_rate, t_time = torch_hogwild(2, target, time_limit=60 * q + 30)
            j_time, tr = time_to_target(
                hog, mlp_problem(2), 2, target, 60 * q + 30, buffer_mode="racy", lost_updates=False
            )
            print("  jaxasync loss:", np.round(tr["loss"][::5], 3), file=sys.stderr)
            j_rate = tr["steps"][-1] / tr.meta["wall_time"]
            row(
                "torch: Hogwild 2 workers, steps/s (jaxasync vs torch)",
                f"{j_rate:.0f} steps/s",
                f"{t_rate:.0f} steps/s",
                f"{j_rate / t_rate:.2f}x",
                "",
                None,
            )
            row(
                f"torch: time to loss {target} (torch / jaxasync)",
                f"{j_time:.2f}s",
                f"{t_time:.2f}s",
                f"{t_time / j_time:.2f}x",
                "",
                None,
            )

    # 4. straggler -------------------------------------------------------------------------
    if "straggler" not in skip:
        from jaxasync import topology
        from jaxasync._src.algorithms import asgrad, gossip, rfast

        n, dim = 3, 1000
        # Full local gradients (2048 x 1000 per step, ~0.2 ms of CPU). Messages are not free: an
        # R-FAST step sends 4 and handles 4, which costs the runtime about as much again.
        shards = lsq_data(n, 2048, dim, seed=1)
        problem = lsq_problem(shards, None)
        a = np.concatenate([s["a"] for s in shards])
        b = np.concatenate([s["b"] for s in shards])
        x_star = np.linalg.lstsq(a, b, rcond=None)[0]
        f_star = 0.5 * np.mean((a @ x_star - b) ** 2)
        f0 = 0.5 * np.mean(b**2)
        target = f_star + 0.05 * (f0 - f_star)
        lr = 0.005
        asyn = __import__("jaxasync").Asynchrony(stragglers={0: 4.0})
        p0 = jnp.zeros(dim)
        ring = topology.ring(n)
        limit = 60 * q + 30
        programs = {
            "allreduce_sgd": (_build(gossip.allreduce_sgd, num_nodes=n, params=p0, learning_rate=lr), n),
            "rfast": (_build(rfast.rfast, ring, ring, params=p0, learning_rate=lr), n),
            "asgrad_shuffled": (
                _build(asgrad.asgrad, params=p0, num_workers=n, policy="shuffled", learning_rate=lr),
                n + 1,
            ),
            "hogwild": (shared_memory.hogwild(learning_rate=lr), n),
        }
        runs = {name: [] for name in programs}
        names = list(programs)
        reps = 1 if args.quick else 3
        for rep in range(reps):
            # Alternate the methods (in a rotating order), so spells of load on the shared machine
            # fall on all of them; each method's time is its median run.
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                prog, workers = programs[name]
                t, tr = time_to_target(prog, problem, workers, target, limit, asynchrony=asyn)
                runs[name].append(t)
                print(
                    f"  straggler: {name} {t:.2f}s, steps/node {tr['node_steps'][-1]}, "
                    f"CPU s/node {np.round(tr['node_cpu_time'][-1], 2)}, "
                    f"loss {np.round(tr['loss'][::10], 4)} target {target:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
        times = {name: float(np.median(ts)) for name, ts in runs.items()}
        print(f"  straggler: times {dict((k, np.round(v, 2).tolist()) for k, v in runs.items())}", file=ERR)
        base = times["allreduce_sgd"]
        for name in ("rfast", "asgrad_shuffled", "hogwild"):
            t = times[name]
            row(
                f"straggler 4x: {name} vs all-reduce, time to loss",
                f"{t:.2f}s",
                f"{base:.2f}s",
                f"{base / t:.2f}x",
                ">= 1.5x",
                base / t >= 1.5,
            )

    # 5. lost updates ------------------------------------------------------------------------
    if "lost" not in skip:
        steps = int(3000 * q)
        lost = {}
        for mode in ("racy", "atomic"):
            tr = runtime_rate(hog, mlp_problem(2), 2, 2 * steps, buffer_mode=mode, lost_updates=True)[1]
            lost[mode] = tr.meta["lost_updates"]["params"]
            print(f"  lost updates ({mode}): {lost[mode]}", file=sys.stderr)
        racy, atomic = lost["racy"], lost["atomic"]
        row(
            "lost updates: Hogwild 2 workers, racy vs atomic (MLP)",
            f"{100 * racy['lost_fraction']:.4f}% of mass",
            f"{100 * atomic['lost_fraction']:.4f}% of mass",
            f"~{racy['lost_element_updates']:.3g} of {racy['element_updates']:.3g} updates",
            "",
            None,
        )

    # table ----------------------------------------------------------------------------------
    head = ("benchmark", "jaxasync", "anchor", "ratio", "target", "pass")
    table = [head] + [
        (r[0], r[1], r[2], r[3], r[4], "-" if r[5] is None else ("yes" if r[5] else "NO")) for r in rows
    ]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    print(f"\njaxasync local runtime benchmark ({os.cpu_count()} cores, pid {os.getpid()})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
