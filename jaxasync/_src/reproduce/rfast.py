"""R-FAST (ALGORITHMS.md section 2.11): robustness to packet loss, and wall-clock with a straggler.

Two experiments on 8 nodes with heterogeneous least squares (``d = 20``, 50 rows per node, minibatch
32, planted node solutions spread by ``heterogeneity = 1``), compute times ``Exp(1)`` and message
delays ``Exp(0.5)``:

* **Packet loss** ``p in {0, 0.1, 0.3}`` on the directed ring (both graphs) and on the
  parameter-server-like pair (pull down an out-tree, push up an in-tree, root 0): R-FAST against
  its non-robust ablation (increments instead of running sums) at one step size, with the tracker
  conservation error.
* **Straggler** (node 0, or leaf 7, five times slower): R-FAST on three topology pairs (directed
  ring, undirected ring, tree) against all-reduce SGD (a barrier per round, so a round lasts the
  slowest node's job plus the message delay), D-PSGD and AD-PSGD on the undirected ring. Every method
  gets its best step size from one common grid; all-reduce's target is its lowest plateau (mean over
  ``[0.8 T, T]``), read at two horizons ``T = 600`` and ``1200`` from the same runs, and the time to
  that target is taken on each method's seed-mean curve. A time-to-accuracy table at fixed gap
  levels, with and without the straggler, shows where R-FAST's speedup holds and where not.
"""

from __future__ import annotations

import time

import numpy as np
import optax

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import problems as problems_lib
from jaxasync._src import progress as progress_lib
from jaxasync._src import simulator as simulator_lib
from jaxasync._src import topology as topology_lib
from jaxasync._src.algorithms import gossip as gossip_lib
from jaxasync._src.algorithms import rfast as rfast_lib
from jaxasync._src.reproduce import common
from jaxasync._src.reproduce import curves as curves_lib

_N = 8
_LOSSES = (0.0, 0.1, 0.3)
_LOSS_LR = 0.02  # the step of the packet-loss table (the prototype's ring value)
# Straggler experiment: one step-size grid for every method (each method gets its best step per
# target from the same grid), a horizon long enough for the small steps to finish descending.
_GRID = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
_HORIZON = 1200.0
_ASYNC_STEPS = 9000
_EPS = (0.05, 0.03, 0.02, 0.01)  # gap levels of the time-to-accuracy table


def _graphs():
    ring = topology_lib.directed_ring(_N)
    return {"ring": (ring, ring), "tree": (topology_lib.out_tree(_N), topology_lib.in_tree(_N))}


def _rfast(pull, push, robust=True):
    # optax.sgd(h) rather than learning_rate=h: the sweep passes a traced step (one compile per grid).
    return lambda h: rfast_lib.rfast(pull, push, optimizer=optax.sgd(h), robust=robust)


def reproduce(quick: bool = False, progress: bool = True) -> common.Report:
    """Runs the R-FAST reproduction and returns its report.

    Args:
      quick: the smoke-test version (ring only, packet loss only, one seed pair, 1 600 updates).
      progress: draw a progress bar on a terminal.

    Returns:
      A :class:`~jaxasync._src.reproduce.common.Report`.
    """
    start = time.monotonic()
    problem = problems_lib.least_squares(_N, 20, 50, heterogeneity=1.0, batch_size=32, seed=0)
    gap0 = float(problem.loss(problem.init_params)) - problem.f_star
    delay = asynchrony_lib.exponential(0.5)
    lossy = [asynchrony_lib.Asynchrony(delay=delay, loss=p) for p in _LOSSES]
    slow_root = asynchrony_lib.Asynchrony(delay=delay, stragglers={0: 5.0})
    slow_leaf = asynchrony_lib.Asynchrony(delay=delay, stragglers={_N - 1: 5.0})
    graphs = _graphs()
    if quick:
        seeds, async_steps, losses = [0, 1], 1600, (0.0, 0.3)
        lossy = [s for s in lossy if s.loss in losses]
        graphs = {"ring": graphs["ring"]}
    else:
        seeds, async_steps, losses = [0, 1, 2], 4800, _LOSSES
    horizon = _HORIZON  # simulated time every straggler run covers
    grid = np.linspace(0.0, horizon, 601)

    # (label, make_program, [(step, spec)], steps, record_every)
    jobs = []
    for topo, (pull, push) in graphs.items():
        lossy_runs = [(_LOSS_LR, s) for s in lossy]
        jobs.append((f"rfast/{topo}", _rfast(pull, push), lossy_runs, async_steps, 24))
        jobs.append(
            (f"rfast_nonrobust/{topo}", _rfast(pull, push, robust=False), lossy_runs, async_steps, 24)
        )
    if not quick:
        ring = topology_lib.ring(_N)
        stragglers = (slow_root, slow_leaf)
        free = asynchrony_lib.Asynchrony(delay=delay)
        every = [(h, s) for h in _GRID for s in stragglers]
        # Straggler runs: ~7.1 async updates per time unit (7 nodes at rate 1, one at 1/5), an
        # all-reduce round ~6 time units, a D-PSGD round ~6.5: every run covers the horizon.
        jobs += [
            ("T:rfast/ring", _rfast(*graphs["ring"]), [(h, free) for h in _GRID] + every, _ASYNC_STEPS, 48),
            ("T:rfast/uring", _rfast(ring, ring), [(h, free) for h in _GRID] + every, _ASYNC_STEPS, 48),
            ("T:rfast/tree", _rfast(*graphs["tree"]), every, _ASYNC_STEPS, 48),
            (
                "T:allreduce",
                lambda h: gossip_lib.allreduce_sgd(num_nodes=_N, optimizer=optax.sgd(h)),
                [(h, free) for h in _GRID] + every,
                2000,
                8,
            ),
            ("T:dpsgd", lambda h: gossip_lib.dpsgd(ring, optimizer=optax.sgd(h)), every, 2000, 8),
            (
                "T:adpsgd",
                lambda h: gossip_lib.adpsgd(ring, optimizer=optax.sgd(h)),
                [(h, free) for h in _GRID] + every,
                _ASYNC_STEPS,
                48,
            ),
        ]
    total = sum(len(runs) * len(seeds) for _, _, runs, _, _ in jobs)
    bar = progress_lib.Progress("rfast", total, enabled=None if progress else False)
    done = [0]

    def tick():
        done[0] += 1
        bar.update(done[0])

    traces = {}
    for label, make, runs, steps, every in jobs:
        out = simulator_lib.sweep(
            make,
            problem,
            runs,
            seeds=seeds,
            steps=steps,
            record_every=every,
            overflow="raise",
            on_run=tick,
        )
        for (h, spec), trace in zip(runs, out):
            traces[label, h, _key(spec)] = trace
    bar.close()

    rows, checks, notes, curves = [], [], [], {}
    columns = [
        "experiment",
        "method",
        "graphs",
        "setting",
        "lr",
        "final gap",
        "consensus",
        "conserv. err",
        "t(target)",
        "speedup vs AR",
    ]

    # ---- packet loss.
    loss_res = {}
    for topo in graphs:
        for variant in ("rfast", "rfast_nonrobust"):
            for p in losses:
                tr = traces[f"{variant}/{topo}", _LOSS_LR, ("loss", p)]
                gap = float(np.mean(tr.final("gap")))
                err = float(np.max(tr["conservation_error"]))
                loss_res[variant, topo, p] = (gap, err)
                rows.append(
                    [
                        "packet loss",
                        variant,
                        topo,
                        f"p={p:g}",
                        _LOSS_LR,
                        gap,
                        float(np.mean(tr.final("consensus"))),
                        err,
                        "-",
                        "-",
                    ]
                )
            loss_grid = np.linspace(0.0, 600.0, 301)  # the packet-loss runs cover ~600 time units
            curves[f"{variant} {topo} p={p:g} (no straggler)"] = (
                loss_grid,
                curves_lib.on_grid(tr, loss_grid, "gap"),
            )
    # Quick runs stop 3x earlier, still in the transient: looser bounds, same direction.
    rel, frac, factor = (None, 0.25, 5) if quick else (3, 0.05, 10)
    for topo in graphs:
        r0, r3 = loss_res["rfast", topo, 0.0][0], loss_res["rfast", topo, max(losses)][0]
        n3 = loss_res["rfast_nonrobust", topo, max(losses)][0]
        checks.append(
            common.Check(
                f"{topo}: R-FAST converges at {max(losses):.0%} packet loss where the non-robust ablation "
                "does "
                f"not (R-FAST gap"
                + (f" <= {rel}x its loss-free gap and" if rel else "")
                + f" <= {frac:.0%} of the initial gap; non-robust >= {factor}x R-FAST)",
                (rel is None or r3 <= rel * r0) and r3 <= frac * gap0 and n3 >= factor * r3,
                f"gap R-FAST {r0:.3g} -> {r3:.3g}, non-robust {n3:.3g}, initial {gap0:.3g}",
            )
        )
    robust_err = max(loss_res["rfast", t, p][1] for t in graphs for p in losses)
    nonrobust_err = {p: max(loss_res["rfast_nonrobust", t, p][1] for t in graphs) for p in losses}
    checks.append(
        common.Check(
            "tracker mass is conserved by R-FAST under loss (max |residual| <= 1e-3, float32 round-off) and "
            "not by the non-robust ablation, whose residual grows with the loss rate",
            robust_err <= 1e-3 and nonrobust_err[max(losses)] > nonrobust_err[0.0] > 100 * robust_err,
            f"R-FAST {robust_err:.2g}; non-robust "
            + ", ".join(f"p={p:g}: {e:.3g}" for p, e in nonrobust_err.items()),
        )
    )
    blow = {t: [loss_res["rfast_nonrobust", t, p][0] for p in losses] for t in graphs}
    checks.append(
        common.Check(
            f"the non-robust ablation's gap blows up with the loss rate (every lossy gap >= {factor}x its "
            "loss-free gap)",
            all(all(g >= factor * v[0] for g in v[1:]) for v in blow.values()),
            "; ".join(f"{t}: " + " -> ".join(f"{g:.3g}" for g in v) for t, v in blow.items()),
        )
    )

    if quick:
        notes.append("quick: ring only, p in {0, 0.3}, 2 seeds, 1600 updates; no straggler experiment")
    else:
        _straggler(traces, grid, horizon, rows, checks, notes, curves)
    notes += [
        f"problem: least squares, 8 nodes, d=20, 50 rows/node, minibatch 32, heterogeneity 1 "
        f"(f* = {problem.f_star:.3g}, initial gap {gap0:.3g}); compute Exp(1), delay Exp(0.5); "
        f"seeds {seeds}; "
        f"gap = f(mean of the node models) - f*, seed mean at the end of the run",
        f"packet-loss table: lr {_LOSS_LR} (the effective step: rfast divides it by n sum_i u_i c_ii v_i, "
        "8 on the tree, 1/2 on the directed ring), "
        f"{async_steps} updates, no straggler",
        "conservation error: max over records of max|sum z + sum (rho_hat - rho_tilde) + in-flight - sum g|; "
        "for the non-robust ablation the metric cannot see increments still in flight, so even at p=0 it "
        "is the in-flight mass (not an error); with loss it is dominated by the mass lost for good",
        "prototype numbers of ALGORITHMS.md 2.11 (ring, 8000 updates, minibatch not stated): R-FAST "
        "2.5e-2 at 30% loss, non-robust 3.3e+1; tree 6e-2 vs 5.7e+2; the heterogeneous least squares "
        "here differs, so only the orders of magnitude compare",
        f"run time {time.monotonic() - start:.0f} s on this machine (compiles included)",
    ]
    checks = [common.Check(c.claim, bool(c.passed), c.detail) for c in checks]  # numpy bools -> JSON
    title = "R-FAST reproduction (ALGORITHMS.md 2.11)" + (" [quick]" if quick else "")
    return common.Report("rfast", title, columns, rows, checks, notes, curves, "simulated time", "f(x) - f*")


def _speedup(t_ref, t):
    """``t_ref / t`` as text ("never" if ``t`` is inf, "inf" if only the reference never gets there)."""
    if not np.isfinite(t):
        return "never (not reached by T)"
    return f"{t_ref / t:.2f}x" if np.isfinite(t_ref) else "inf (the baseline never reaches it)"


def _key(spec):
    if spec.stragglers:
        ((node, _),) = spec.stragglers.items()
        return ("straggler", node)
    return ("loss", float(spec.loss))  # ("loss", 0.0) is also the straggler-free setting


# (trace label, method, graphs) of the straggler experiment.
_METHODS = (
    ("T:allreduce", "allreduce", "complete"),
    ("T:rfast/ring", "rfast", "directed ring"),
    ("T:rfast/uring", "rfast", "ring (undirected)"),
    ("T:rfast/tree", "rfast", "tree"),
    ("T:dpsgd", "dpsgd", "ring (undirected)"),
    ("T:adpsgd", "adpsgd", "ring (undirected)"),
)
_FREE = ("loss", 0.0)


def _straggler(traces, grid, horizon, rows, checks, notes, curves):
    """Time to accuracy with one 5x straggler, every method tuned on the same step-size grid.

    The all-reduce target is read at two horizons, ``T/2`` and ``T``, from the same runs (a run's
    curve up to ``T/2`` is the run of horizon ``T/2``): a longer budget lowers all-reduce's plateau.
    """
    curve = {k: curves_lib.on_grid(tr, grid, "gap") for k, tr in traces.items() if k[0].startswith("T:")}
    consensus = {
        k: curves_lib.on_grid(tr, grid, "consensus") for k, tr in traces.items() if k[0].startswith("T:")
    }

    def plateau(label, h, key, T=horizon):
        return float(np.nanmean(curve[label, h, key][(grid >= 0.8 * T) & (grid <= T)]))

    def first(label, h, key, target, T=horizon):
        upto = grid <= T
        return curves_lib.first_time(grid[upto], curve[label, h, key][upto], target)

    def fastest(label, key, target, T=horizon):
        """(first time the seed-mean curve is <= target, its lr), best lr of the grid; (inf, None)."""
        times = {h: first(label, h, key, target, T) for h in _GRID}
        h = min(_GRID, key=lambda h: (times[h], plateau(label, h, key, T)))
        return (times[h], h) if np.isfinite(times[h]) else (float("inf"), None)

    def lowest(label, key, T=horizon):
        return min(_GRID, key=lambda h: plateau(label, h, key, T))

    ar = "T:allreduce"
    summary, edges = {}, []
    for T in (horizon / 2, horizon):
        at_t = int(np.searchsorted(grid, T))
        for node, where in ((0, "root/node 0"), (_N - 1, "leaf/node 7")):
            key = ("straggler", node)
            ar_lr = lowest(ar, key, T)
            target = plateau(ar, ar_lr, key, T)
            t_ar = first(ar, ar_lr, key, target, T)
            result, chosen = {}, []
            for label, method, graphs in _METHODS:
                t, h = (t_ar, ar_lr) if label == ar else fastest(label, key, target, T)
                shown = h if h is not None else lowest(label, key, T)
                chosen.append(shown)
                tr = traces[label, shown, key]
                result[label] = t
                rows.append(
                    [
                        f"straggler x5 at {where}",
                        method,
                        graphs,
                        f"T={T:g}",
                        shown,
                        plateau(label, shown, key, T),
                        float(consensus[label, shown, key][at_t]),
                        float(np.max(tr["conservation_error"])) if "conservation_error" in tr else "-",
                        t if np.isfinite(t) else "never",
                        t_ar / t if np.isfinite(t) else "-",
                    ]
                )
                if node == 0 and T == horizon:
                    curves[f"{method} {graphs} lr={shown:g} (straggler node 0)"] = (
                        grid,
                        curve[label, shown, key],
                    )
            summary[T, node] = (target, t_ar, ar_lr, result)
            edges += [
                f"{method} {graphs} (T={T:g}, node {node}, lr {h:g})"
                for (label, method, graphs), h in zip(_METHODS, chosen)
                if h in (_GRID[0], _GRID[-1])
            ]

    # Checks at the root straggler (the setting of ALGORITHMS.md 2.11), per R-FAST topology and horizon.
    for T in (horizon / 2, horizon):
        target, t_ar, ar_lr, result = summary[T, 0]
        for label, _, graphs in _METHODS[1:4]:
            t = result[label]
            checks.append(
                common.Check(
                    f"T={T:g}, {graphs}: with one 5x straggler (node 0) R-FAST reaches all-reduce's plateau "
                    ">= 1.5x sooner (both tuned on the same step grid)",
                    bool(np.isfinite(t) and t_ar / t >= 1.5),
                    f"target {target:.3g}: all-reduce t={t_ar:g} (lr {ar_lr:g}), R-FAST t={t:g}, "
                    f"speedup {_speedup(t_ar, t)}",
                )
            )
            t_dp = result["T:dpsgd"]
            checks.append(
                common.Check(
                    f"T={T:g}, {graphs}: with the straggler R-FAST reaches that target >= 1.5x sooner than "
                    "D-PSGD",
                    bool(np.isfinite(t) and (not np.isfinite(t_dp) or t_dp / t >= 1.5)),
                    f"D-PSGD t={t_dp:g}, R-FAST t={t:g}, speedup {_speedup(t_dp, t)}",
                )
            )
        notes.append(
            f"T={T:g}, straggler at node 0: all-reduce target (its lowest plateau, lr {ar_lr:g}) = "
            f"{target:.3g}, reached at t={t_ar:g}"
        )
        t7, t_ar7, lr7, res7 = summary[T, _N - 1]
        notes.append(
            f"T={T:g}, straggler at node 7 (a tree leaf): all-reduce target {t7:.3g} (lr {lr7:g}) at "
            f"t={t_ar7:g}; R-FAST speedup "
            + ", ".join(f"{g} {_speedup(t_ar7, res7[lb])}" for lb, _, g in _METHODS[1:4])
        )

    # Time to accuracy at several levels, with and without the straggler (best lr per level).
    for key, what, methods in (
        (("straggler", 0), "straggler node 0", _METHODS),
        (
            _FREE,
            "no straggler",
            [m for m in _METHODS if m[0] in ("T:allreduce", "T:rfast/ring", "T:rfast/uring")],
        ),
    ):
        for eps in _EPS:
            t_ref, _ = fastest(ar, key, eps)
            for label, method, graphs in methods:
                t, h = fastest(label, key, eps)
                rows.append(
                    [
                        f"time to gap {eps:g}, {what}",
                        method,
                        graphs,
                        f"eps={eps:g}",
                        h if h is not None else "-",
                        "-",
                        "-",
                        "-",
                        t if np.isfinite(t) else "never",
                        t_ref / t if np.isfinite(t) and np.isfinite(t_ref) else "-",
                    ]
                )
    key0 = ("straggler", 0)
    speed = {
        g: ", ".join(
            f"{eps:g}: {_speedup(fastest(ar, key0, eps)[0], fastest(lb, key0, eps)[0])}" for eps in _EPS
        )
        for lb, _, g in _METHODS[1:4]
    }
    notes.append(
        "where the 1.5x claim holds (straggler at node 0, time to gap eps, each method at its fastest lr "
        "for that eps; speedup over all-reduce): "
        + "; ".join(f"{g}: {v}" for g, v in speed.items())
        + ". At a fixed step R-FAST's plateau is not lower than all-reduce's, so the speedup is largest "
        "at moderate accuracy and shrinks as the target approaches all-reduce's own plateau (the target "
        "of the checks, which a longer T lowers): first-crossing times of a 3-seed mean curve are noisy "
        "near a plateau"
    )
    dring = {eps: (fastest("T:rfast/ring", _FREE, eps)[0], fastest(ar, _FREE, eps)[0]) for eps in _EPS}
    key0 = ("straggler", 0)
    per_lr = {
        g: ", ".join(f"{h:g}: {plateau(lb, h, key0):.3g}" for h in _GRID)
        for lb, g in (
            ("T:rfast/ring", "directed ring"),
            ("T:rfast/uring", "undirected ring"),
            ("T:rfast/tree", "tree"),
            (ar, "all-reduce"),
        )
    }
    floor = {
        g: min(plateau(lb, h, key0) for h in _GRID)
        for lb, g in (
            ("T:rfast/ring", "directed ring"),
            ("T:rfast/uring", "undirected ring"),
            ("T:rfast/tree", "tree"),
            (ar, "all-reduce"),
        )
    }
    gaps = {
        g: topology_lib.spectral_gap(topology_lib.pull_weights(graph))
        for g, graph in (
            ("directed ring", topology_lib.directed_ring(_N)),
            ("undirected ring", topology_lib.ring(_N)),
        )
    }
    notes.append(
        "why the directed ring fails: (1) it is slower than all-reduce even WITHOUT the straggler, at every "
        "accuracy (time to gap eps, R-FAST directed ring vs all-reduce, best lr each: "
        + ", ".join(f"{e:g}: {a:g} vs {b:g}" for e, (a, b) in dring.items())
        + "); (2) its noise floor is higher: its lowest plateau over the lr grid is "
        + ", ".join(f"{g} {v:.3g}" for g, v in floor.items())
        + " (plateau over [0.8T, T] per lr with the straggler: "
        + "; ".join(f"{g}: {v}" for g, v in per_lr.items())
        + f"), with a consensus error an order of magnitude higher: its mixing is slow (spectral gap of "
        f"the pull weights {gaps['directed ring']:.3f} vs {gaps['undirected ring']:.3f} for the "
        "undirected ring) and, with the straggler, every model value and all tracker mass must pass "
        "through the slow node, which forwards only when it updates; (3) a longer horizon does not help "
        "(exploratory T=2400: no lr reached all-reduce's T=2400 plateau, R-FAST directed ring 2-3x "
        "slower at every eps). Not an algorithm bug as far as we "
        "can tell: the same code on the tree and the undirected ring reaches the T=600 target >= 1.5x "
        "sooner"
    )
    notes.append(
        "effective step: the descent uses the tracker share a node keeps (c_ii z), so rfast normalises "
        "learning_rate by n sum_i u_i c_ii v_i (since commit 6ed5ce8, after this reproduction measured "
        "that rings ran at 1/2 (directed) and 1/3 (undirected) of the intended step under the earlier "
        "n u^T v normalisation); every method is tuned on the same grid, so the comparison does not "
        "depend on the normalisation as long as the best lrs are inside the grid"
    )
    # Gossip without tracking: a slow node takes fewer steps, so its data is under-weighted.
    rf = min(plateau("T:rfast/uring", h, key0) for h in _GRID)
    ad = min(plateau("T:adpsgd", h, key0) for h in _GRID)
    rf_free = min(plateau("T:rfast/uring", h, _FREE) for h in _GRID)
    ad_free = min(plateau("T:adpsgd", h, _FREE) for h in _GRID)
    notes.append(
        f"AD-PSGD best plateau {ad:.3g} with the straggler, {ad_free:.3g} without: with heterogeneous data, "
        "gossip without tracking weighs each node by its step count, so the 5x slower node's data is "
        "under-weighted (a speed bias that tracking removes)"
    )
    checks.append(
        common.Check(
            "R-FAST beats AD-PSGD (gossip without tracking) on the same undirected ring, by a larger margin "
            "with the straggler (best plateau of AD-PSGD / R-FAST, best lr each: > 1 with the straggler and "
            "larger than without)",
            bool(rf < ad and ad / rf > ad_free / rf_free),
            f"with straggler: R-FAST {rf:.3g}, AD-PSGD {ad:.3g} ({ad / rf:.1f}x); without: R-FAST "
            f"{rf_free:.3g}, AD-PSGD {ad_free:.3g} ({ad_free / rf_free:.2f}x)",
        )
    )
    notes.append(
        "lr at the edge of the grid in the straggler rows (the optimum may lie outside): "
        + (", ".join(edges) if edges else "none")
    )
    notes.append(
        f"straggler protocol: every run covers simulated time T={horizon:g}; one lr grid for every method "
        f"{list(_GRID)}; target = all-reduce's lowest plateau (mean of its seed-mean curve over [0.8T, T]); "
        "t(target) = first time a method's seed-mean gap curve (601-point grid) is <= target, with that "
        "method's fastest lr; 'time to gap eps' rows do the same for fixed levels (speedup vs all-reduce "
        "at its own fastest lr for that eps); all-reduce and D-PSGD pay the same Exp(0.5) message delays, "
        "so an all-reduce round lasts max(compute) + max(delay)"
    )
