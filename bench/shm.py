"""Benchmark of the native shared-memory core against anchors measured in the same run.

    python bench/shm.py            # the full run (a minute or two on 2 cores)
    python bench/shm.py --quick    # a small, fast run

Prints progress on stderr and one table on stdout, and writes the rows to
results/bench_shm.json. Machines are shared and noisy, so absolute numbers are
not comparable between runs; every figure is a ratio against an anchor measured
in the same run, each the best (minimum time) of several trials:

* `ParamBuffer.add` per mode against numpy `np.subtract(buf, g, out=buf)` on a
  shared buffer and torch `share_memory_()` + `add_` (the faster of the two),
  with 1 process and with 2 spawned processes adding into the same buffer at
  once (aggregate throughput); and as % of memcpy bandwidth (`np.copyto` between
  two arrays of the same size, run by the same number of processes). Bytes
  counted: 12 per float for an add (read buffer, read delta, write buffer),
  8 per float for a copy.
* `Register` write / read of 16, 1k and 1M float32 from Python, against
  `np.copyto` of the same array, and reads of 1M as % of memcpy bandwidth.
* `AtomicArray.fetch_add` from Python against `multiprocessing.Value` with its lock.
* `Mailbox` send + recv of 1k float32 between two processes against
  `multiprocessing.Queue`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import pathlib
import platform
import sys
import time

import numpy as np

try:
    import torch
except ImportError:  # torch is only an anchor
    torch = None

from jaxasync import shm

CTX = multiprocessing.get_context("spawn")
ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALE = -1e-3


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def best_time(fn, calls: int, trials: int) -> float:
    """Seconds per call: the best of `trials` loops of `calls` calls."""
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls


# ----------------------------------------------------------------------------- workers


def _single_thread() -> None:
    # Our kernels run on one thread per process; so do the anchors.
    if torch is not None:
        torch.set_num_threads(1)


def _worker(conn, barrier, queue, torch_bufs) -> None:
    """Runs commands from the parent until it sends None."""
    _single_thread()
    cache: dict = {}
    while (msg := conn.recv()) is not None:
        op, kw = msg
        conn.send(OPS[op](barrier=barrier, queue=queue, torch_bufs=torch_bufs, cache=cache, **kw))


def _op_loop(kind, d, seconds, trials, sync, target, barrier, torch_bufs, cache, **_):
    """Times one kind of update `trials` times; returns (start, end, calls) per trial.

    Each trial makes as many calls as fit in about `seconds`, so that with two
    processes the trials are long enough to really overlap.
    """
    key = (kind, d, str(target))
    if key not in cache:
        g = np.full(d, 1e-3, np.float32)
        if kind in ("racy", "relaxed", "atomic"):
            buf = target  # a ParamBuffer, attached by unpickling

            def fn(buf=buf, g=g, kind=kind):
                buf.add(g, SCALE, kind)

            cache[key] = (fn, buf)
        elif kind == "numpy":
            fd = os.open(target, os.O_RDWR)
            view = np.frombuffer(mmap.mmap(fd, 4 * d), np.float32)
            os.close(fd)
            cache[key] = (lambda: np.subtract(view, g, out=view), view)
        elif kind == "torch":
            t, tg = torch_bufs[d], torch.from_numpy(g)
            cache[key] = (lambda: t.add_(tg, alpha=SCALE), t)
        elif kind == "memcpy":
            dst = np.empty_like(g)
            cache[key] = (lambda: np.copyto(dst, g), dst)
    fn = cache[key][0]
    fn()  # warm up: page faults, caches
    t0 = time.perf_counter()
    fn()
    reps = max(1, round(seconds / (time.perf_counter() - t0)))
    spans = []
    for _ in range(trials):
        if sync:
            barrier.wait()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        spans.append((t0, time.perf_counter(), reps))
    return spans


def backoff(spins: int) -> int:
    """Spin a little, then yield: on a loaded machine two pure spinners starve each other."""
    if spins > 50:
        os.sched_yield()
    return spins + 1


def _op_produce(box, n, **_):
    value = np.ones(box.shape, box.dtype)
    t0 = time.perf_counter()
    for tag in range(n):
        spins = 0
        while not box.send(value, tag):
            spins = backoff(spins)
    return t0


def _op_queue_produce(n, d, queue, **_):
    value = np.ones(d, np.float32)
    t0 = time.perf_counter()
    for _ in range(n):
        queue.put(value)
    return t0


def _op_release(cache, **_):
    for entry in cache.values():
        if isinstance(entry[1], shm.ParamBuffer):
            entry[1].close()
    cache.clear()


OPS = {
    "loop": _op_loop,
    "produce": _op_produce,
    "queue_produce": _op_queue_produce,
    "release": _op_release,
}


class Pool:
    """Two spawned workers (enough for 2-process runs on a 2-core machine)."""

    def __init__(self, torch_bufs):
        self.barrier = CTX.Barrier(2)
        self.queue = CTX.Queue(maxsize=256)
        self.conns, self.procs = [], []
        for _ in range(2):
            parent, child = CTX.Pipe()
            p = CTX.Process(target=_worker, args=(child, self.barrier, self.queue, torch_bufs), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, nproc, op, **kw):
        for c in self.conns[:nproc]:
            c.send((op, kw))
        return [c.recv() for c in self.conns[:nproc]]

    def close(self):
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------- measurements


def aggregate_rate(spans_per_proc, bytes_per_call):
    """Best aggregate bytes/s over trials: all processes' bytes over the union span."""
    best = 0.0
    for trial in zip(*spans_per_proc):
        span = max(e for _, e, _ in trial) - min(s for s, _, _ in trial)
        best = max(best, sum(calls for _, _, calls in trial) * bytes_per_call / span)
    return best


def bench_add(pool, sizes, procs_list, trials, seconds, torch_ok, rows, step):
    for e in sizes:
        d = 1 << e
        buf = shm.ParamBuffer.create(d)
        np_path = f"/dev/shm/jaxasync-bench-{os.getpid()}-np{e}"
        fd = os.open(np_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, 4 * d)
            os.close(fd)
            for nproc in procs_list:
                rates = {}
                kinds = ["memcpy", "numpy"] + (["torch"] if torch_ok else []) + ["racy", "relaxed", "atomic"]
                for kind in kinds:
                    step(f"add d=2^{e} {nproc} proc: {kind}")
                    per_call = (8 if kind == "memcpy" else 12) * d
                    target = {"numpy": np_path}.get(kind, buf)
                    n_trials = max(2, trials // 2) if kind == "atomic" else trials  # slow
                    spans = pool.run(
                        nproc,
                        "loop",
                        kind=kind,
                        d=d,
                        seconds=seconds,
                        trials=n_trials,
                        sync=nproc > 1,
                        target=target,
                    )
                    rates[kind] = aggregate_rate(spans, per_call)
                anchor = max(("numpy", "torch") if torch_ok else ("numpy",), key=rates.get)
                label = {"numpy": "numpy subtract", "torch": "torch add_"}
                where = f"d=2^{e}, {nproc} proc"
                for kind in ("numpy", "torch") if torch_ok else ("numpy",):
                    rows.append(
                        row(
                            f"anchor: {label[kind]} ({where})",
                            gbs(rates[kind]),
                            None,
                            None,
                            None,
                            None,
                            rates[kind] / rates["memcpy"],
                        )
                    )
                for kind, target in (("racy", 1.0), ("relaxed", 0.5), ("atomic", None)):
                    rows.append(
                        row(
                            f"ParamBuffer.add {kind} ({where})",
                            gbs(rates[kind]),
                            f"{label[anchor]} {gbs(rates[anchor])}",
                            rates[kind] / rates[anchor],
                            target,
                            "x",
                            rates[kind] / rates["memcpy"],
                        )
                    )
                rows.append(
                    row(
                        f"anchor: memcpy np.copyto ({where})",
                        gbs(rates["memcpy"]),
                        None,
                        None,
                        None,
                        None,
                        1.0,
                    )
                )
        finally:
            pool.run(2, "release")
            buf.close()
            buf.unlink()
            os.unlink(np_path)
        if not torch_ok:
            rows.append(
                row(f"anchor: torch add_ (d=2^{e})", "torch not installed", None, None, None, None, None)
            )


def bench_register(sizes, calls, trials, rows, step):
    for d in sizes:
        step(f"Register d={d}")
        with shm.Register.create(d, np.float32) as reg:
            v, out = np.ones(d, np.float32), np.empty(d, np.float32)
            n = max(1, calls // max(1, d // 1024))
            t_copy = best_time(lambda: np.copyto(out, v), n, trials)  # noqa: B023
            t_write = best_time(lambda: reg.write(v, 1), n, trials)  # noqa: B023
            t_read = best_time(lambda: reg.read(out), n, trials)  # noqa: B023
            t_alloc = best_time(reg.read, n, trials)
        anchor = f"np.copyto {us(t_copy)}"
        if d >= 1 << 20:
            rows.append(
                row(
                    f"Register.read(out) d={d}",
                    us(t_read),
                    anchor,
                    t_copy / t_read,
                    0.5,
                    "% memcpy",
                    t_copy / t_read,
                )
            )
            rows.append(
                row(
                    f"Register.write d={d}",
                    us(t_write),
                    anchor,
                    t_copy / t_write,
                    None,
                    "% memcpy",
                    t_copy / t_write,
                )
            )
        else:
            for what, t in (("write", t_write), ("read(out)", t_read), ("read()", t_alloc)):
                rows.append(
                    row(
                        f"Register.{what} d={d}",
                        us(t),
                        anchor,
                        t_copy / t,
                        None,
                        "x",
                        None,
                        limit_us=2.0,
                        t=t,
                    )
                )


def bench_atomic(calls, trials, rows, step):
    step("AtomicArray.fetch_add vs multiprocessing.Value")
    with shm.AtomicArray.create(1) as arr:
        t_ours = best_time(lambda: arr.fetch_add(0, 1), calls, trials)
    v = CTX.Value("q", 0)

    def locked_add():
        with v.get_lock():
            v.value += 1

    t_anchor = best_time(locked_add, calls, trials)
    rows.append(
        row(
            "AtomicArray.fetch_add",
            us(t_ours),
            f"mp.Value+lock {us(t_anchor)}",
            t_anchor / t_ours,
            3.0,
            "x",
            None,
            limit_us=0.5,
            t=t_ours,
        )
    )


def bench_mailbox(pool, n, trials, rows, step):
    d = 1024
    step(f"Mailbox vs multiprocessing.Queue, {n} messages of {d} float32")
    out = np.empty(d, np.float32)
    best_ours = best_queue = 0.0
    with shm.Mailbox.create(64, d, np.float32) as box:
        for _ in range(trials):
            for c in pool.conns[:1]:
                c.send(("produce", {"box": box, "n": n}))
            got = spins = 0
            while got < n:
                if box.recv(out) is None:
                    spins = backoff(spins)
                else:
                    got, spins = got + 1, 0
            t1 = time.perf_counter()
            best_ours = max(best_ours, n / (t1 - pool.conns[0].recv()))
    for _ in range(trials):
        pool.conns[0].send(("queue_produce", {"n": n, "d": d}))
        for _ in range(n):
            pool.queue.get()
        t1 = time.perf_counter()
        best_queue = max(best_queue, n / (t1 - pool.conns[0].recv()))
    rows.append(
        row(
            "Mailbox send+recv 1k float32, 2 procs",
            f"{best_ours / 1e3:.0f}k msg/s",
            f"mp.Queue {best_queue / 1e3:.0f}k msg/s",
            best_ours / best_queue,
            10.0,
            "x",
            None,
        )
    )


# ----------------------------------------------------------------------------- table


def gbs(rate: float) -> str:
    return f"{rate / 1e9:.1f} GB/s"


def us(t: float) -> str:
    return f"{t * 1e6:.2f} us"


def row(what, measured, anchor, ratio, target, unit, memcpy, limit_us=None, t=None):
    """A table row; `target` applies to the ratio, `limit_us` to the time per call."""
    ok = None
    if target is not None:
        ok = ratio >= target
    if limit_us is not None:
        ok = (ok is None or ok) and t <= limit_us * 1e-6
    fmt = (lambda x: f"{100 * x:.0f}%") if unit == "% memcpy" else (lambda x: f"{x:.2f}x")
    goal = []
    if target is not None:
        goal.append(f">={fmt(target)}")
    if limit_us is not None:
        goal.append(f"<={limit_us:g} us")
    return {
        "what": what,
        "measured": measured,
        "anchor": anchor or "",
        "ratio": "" if ratio is None else fmt(ratio),
        "target": ", ".join(goal),
        "ok": "" if ok is None else ("PASS" if ok else "FAIL"),
        "% memcpy": "" if memcpy is None else f"{100 * memcpy:.0f}%",
        "ratio_value": ratio,
    }


def print_table(rows, command):
    cols = ["what", "measured", "anchor", "ratio", "target", "ok", "% memcpy"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(width[c]) for c in cols)
    print(f"\n{command}\n")
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(r[c].ljust(width[c]) for c in cols).rstrip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few trials")
    parser.add_argument("--json", default=str(ROOT / "results" / "bench_shm.json"))
    args = parser.parse_args(argv)
    _single_thread()

    if args.quick:
        sizes, trials, seconds, calls, msgs = [20], 2, 0.04, 20_000, 5_000
    else:
        sizes, trials, seconds, calls, msgs = [20, 25], 5, 0.15, 100_000, 20_000
    torch_ok = torch is not None
    total = len(sizes) * 2 * (5 + torch_ok) + 3 + 1 + 1
    done = [0]

    def step(msg):
        done[0] += 1
        progress(f"[{done[0]}/{total}] {msg}")

    progress(f"starting 2 worker processes (torch {'found' if torch_ok else 'not installed'})")
    torch_bufs = {1 << e: torch.zeros(1 << e).share_memory_() for e in sizes} if torch_ok else {}
    pool = Pool(torch_bufs)
    rows: list = []
    try:
        bench_add(pool, sizes, (1, 2), trials, seconds, torch_ok, rows, step)
        bench_register([16, 1024, 1 << 20], calls, trials, rows, step)
        bench_atomic(calls * 2, trials, rows, step)
        bench_mailbox(pool, msgs, max(2, trials // 2), rows, step)
    finally:
        pool.close()

    command = "python bench/shm.py" + (" --quick" if args.quick else "")
    print_table(rows, command)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "torch": torch.__version__ if torch_ok else None,
                },
                "rows": rows,
            },
            indent=1,
        )
    )
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
