"""Attiya & Schiller's SGD in the cluster-based model: Algorithm A (average) and B (agreement)."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxasync._src import asynchrony as asynchrony_lib
from jaxasync._src import problem as problem_lib
from jaxasync._src import program as program_lib
from jaxasync._src import schedules, simulator
from jaxasync._src.algorithms import cluster

D = 8
CLUSTERS = [5, 4, 3]
N = sum(CLUSTERS)
SCHEDULE = schedules.inverse_time(2.0, 1.0, 10.0)  # mu ~ 1 on this problem; eta_0 = 0.2


def _data(seed=0, rows=120):
    rng = np.random.default_rng(seed)
    x_true = rng.normal(size=D)
    a = rng.normal(size=(rows, D)).astype(np.float32)
    b = (a @ x_true + rng.normal(size=rows)).astype(np.float32)
    return {"a": a, "b": b}, np.linalg.lstsq(a, b, rcond=None)[0].astype(np.float32)


DATA, X_STAR = _data()


def _loss(x, batch):
    r = batch["a"].astype(x.dtype) @ x - batch["b"].astype(x.dtype)
    return 0.5 * jnp.mean(jnp.square(r.astype(jnp.float32)))


def _problem(n, dtype=jnp.float32):
    """Strongly convex least squares; every process samples the same distribution (the paper's
    model), so the objective does not depend on the number of processes."""
    return problem_lib.Problem(
        _loss, jnp.zeros(D, dtype), [DATA] * n, batch_size=1, optimum=jnp.asarray(X_STAR)
    )


GRAD_FN = jax.grad(_loss)


def _sample(key):
    return _problem(1).sample(key, 0)


def _run(prog, problem, scenarios, seeds, steps, record_every):
    """Simulates every (scenario, seed) with one compilation: asynchrony specs of the same kinds
    only differ in arrays (crash times, ...), which the jitted run takes as arguments.

    Returns (final states with leading [scenario, seed] axes, records likewise).
    """
    static = simulator.make_static(prog, problem, scenarios[0], None)
    fn = jax.jit(
        functools.partial(
            simulator.run,
            static,
            num_records=steps // record_every,
            record_every=record_every,
            max_events_per_record=1000 * record_every,
        )
    )
    outs = [
        [fn(simulator.make_params(a, problem.num_nodes), jnp.int32(seed)) for seed in seeds]
        for a in scenarios
    ]
    stacked = jax.tree.map(
        lambda *xs: np.stack(xs), *[jax.tree.map(lambda *ys: np.stack(ys), *o) for o in outs]
    )
    carry, records = stacked
    return carry.states, records


# ---------------------------------------------------------------------------------------------
# Algorithm A in simulation (one compilation each for the 12-process and the 1-process runs).

T_A = 150  # iterations per process
SEEDS = [0, 1, 2]
CRASH_TIME = 40.0
A_SCENARIOS = [
    asynchrony_lib.Asynchrony(delay=asynchrony_lib.exponential(0.3)),
    asynchrony_lib.Asynchrony(
        delay=asynchrony_lib.exponential(0.3),
        crashes={i: CRASH_TIME for i in range(5, N)},  # clusters 2 and 3
    ),
]


@pytest.fixture(scope="module")
def average_runs():
    prog = cluster.cluster_sgd(CLUSTERS, schedule=SCHEDULE)
    _, rec = _run(prog, _problem(N), A_SCENARIOS, SEEDS, T_A * N, 3 * N)
    return rec, _sequential_sgd_gaps(T_A, seeds=8)


def _sequential_sgd_gaps(steps, seeds):
    """Sequential SGD (one process, same schedule and batch size), gap every 3 iterations."""
    problem, opt = _problem(1), optax.sgd(SCHEDULE)

    def one(key):
        def body(carry, k):
            x, s = carry
            updates, s = opt.update(GRAD_FN(x, problem.sample(k, 0)), s, x)
            x = optax.apply_updates(x, updates)
            return (x, s), problem.loss(x) - problem.f_star

        x0 = jnp.zeros(D)
        _, gaps = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(key, steps))
        return gaps[2::3]

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), seeds)))


def test_average_beats_sequential_sgd(average_runs):
    rec, rec1 = average_runs
    # Records are taken every 3 iterations per process; compare the last third of the run.
    tail = rec["gap"][0, :, -17:].mean()
    tail1 = rec1[:, -17:].mean()
    # Each process averages ~k values per iteration (k > 1 here; the theory predicts a gain ~k
    # when every process collects k): a clear gain with margin over seed noise.
    assert rec["cluster_k_mean"][0, :, -1].min() > 2.0
    assert tail < 0.6 * tail1, (tail, tail1)
    assert np.all(rec["overflow"] == 0)


def test_average_keeps_running_when_two_clusters_crash(average_runs):
    rec, _ = average_runs
    crashed = jax.tree.map(lambda x: x[1], rec)
    alive = crashed["alive"]
    assert np.all(alive[:, 0] == N) and np.all(alive[:, -1] == 5)
    # Never blocks: every requested step was taken by the survivors.
    np.testing.assert_array_equal(crashed["steps"][:, -1], T_A * N)
    # The loss keeps decreasing after the crash.
    after = np.argmax(crashed["time"] > CRASH_TIME, axis=1)
    for s in range(len(SEEDS)):
        assert crashed["gap"][s, -5:].mean() < 0.5 * crashed["gap"][s, after[s]], s
    assert np.all(crashed["dropped"][:, -1] > 0)  # messages to crashed processes were dropped


# ---------------------------------------------------------------------------------------------
# Algorithm A driven by hand: with everybody's value visible it is minibatch SGD, exactly.


class _Executor:
    """A minimal executor: shared registers with visibility, instant message delivery."""

    def __init__(self, prog, n, params):
        self.prog, self.n = prog, n
        self.regs = {}
        for name, spec in prog.shared.items():
            self.regs[name] = program_lib.RegistersView(
                jnp.full((n, spec.slots), -1, jnp.int32),
                jax.tree.map(
                    lambda t: jnp.zeros((n, spec.slots, *t.shape), t.dtype),
                    program_lib.resolve(spec.template, params),
                ),
            )
        self.states = [prog.init(jnp.int32(i), params, jax.random.key(i)) for i in range(n)]
        self.states = [prog.observe(s, self.views(i)) for i, s in enumerate(self.states)]
        self.step = jax.jit(lambda s, b: prog.step(s, GRAD_FN, b, jax.random.key(0)))

    def views(self, i):
        out = {}
        for name, spec in self.prog.shared.items():
            reg = self.regs[name]
            seen = np.asarray(spec.visible)[i][:, None]
            out[name] = reg._replace(tags=jnp.where(seen, reg.tags, -1))
        return out

    def apply(self, i, ops):
        for name, op in ops.items():
            reg = self.regs[name]
            if bool(op.mask):
                self.regs[name] = program_lib.RegistersView(
                    reg.tags.at[i, op.slot].set(op.tag),
                    jax.tree.map(lambda v, x: v.at[i, op.slot].set(x), reg.values, op.value),
                )

    def deliver(self, i, emit):
        for cname, ob in emit.outbox.items():
            ob = program_lib.expand_outbox(ob)
            graph = self.prog.channels[cname].graph
            for k in range(graph.max_out_degree):
                if bool(ob.mask[k]):
                    dst = int(graph.out_table[i, k])
                    msg = program_lib.Message(
                        jnp.int32(graph.out_recv_slot[i, k]),
                        jnp.int32(0),
                        jax.tree.map(lambda p: p[k], ob.payload),
                    )
                    self.states[dst], e = self.prog.receive[cname](self.states[dst], msg)
                    self.apply(dst, e.ops)

    def round(self, batches):
        """Everybody steps (writes, sends; messages relayed at once), then everybody collects."""
        for i in range(self.n):
            self.states[i], emit = self.step(self.states[i], batches[i])
            self.apply(i, emit.ops)
            self.deliver(i, emit)
        self.states = [self.prog.observe(s, self.views(i)) for i, s in enumerate(self.states)]


def test_average_with_full_visibility_is_minibatch_sgd_exactly():
    clusters, lr = [2, 1], 0.1
    prog = cluster.cluster_sgd(clusters, learning_rate=lr)
    ex = _Executor(prog, 3, jnp.zeros(D))
    x = jnp.zeros(D)
    for t in range(4):
        batches = [_sample(jax.random.key(10 * t + i)) for i in range(3)]
        ex.round(batches)
        ys = [x - lr * GRAD_FN(x, b) for b in batches]
        x = (ys[0] + ys[1] + ys[2]) / 3
        for s in ex.states:
            np.testing.assert_allclose(s.x, x, rtol=1e-6, atol=1e-7)
            assert int(s.t) == t + 1 and int(s.collected) == 3


def test_one_process_is_plain_optax_exactly():
    opt = optax.adam(0.05)
    prog = cluster.cluster_sgd([1], optimizer=opt)
    ex = _Executor(prog, 1, jnp.zeros(D))

    @jax.jit
    def sgd_step(p, s, b):  # the same jitted computation as the process's step
        updates, s = opt.update(GRAD_FN(p, b), s, p)
        return optax.apply_updates(p, updates), s

    params, opt_state = jnp.zeros(D), opt.init(jnp.zeros(D))
    for t in range(10):
        batch = _sample(jax.random.key(t))
        ex.round([batch])
        params, opt_state = sgd_step(params, opt_state, batch)
        np.testing.assert_array_equal(ex.states[0].x, params)


def test_late_relay_never_overwrites_a_newer_value():
    prog = cluster.cluster_sgd([1, 1], learning_rate=0.1, slots=2)
    state = prog.init(jnp.int32(1), jnp.zeros(D), jax.random.key(0))
    recv = jax.jit(prog.receive["vals"])

    def msg(t):
        return program_lib.Message(
            jnp.int32(0), jnp.int32(t), {"t": jnp.int32(t), "y": jnp.full(D, float(t))}
        )

    state, emit = recv(state, msg(4))
    assert bool(emit.ops["relay"].mask) and int(emit.ops["relay"].slot) == 0 * 2 + 0
    state, emit = recv(state, msg(2))  # same slot (2 % 2 == 4 % 2), older: dropped
    assert not bool(emit.ops["relay"].mask)
    state, emit = recv(state, msg(5))
    assert bool(emit.ops["relay"].mask) and int(emit.ops["relay"].slot) == 1


# ---------------------------------------------------------------------------------------------
# Algorithm B (agreement): diameter halving per round, validity, liveness iff quorum.

ROUNDS = 5
B_SCENARIOS = [
    asynchrony_lib.Asynchrony(delay=asynchrony_lib.exponential(0.3)),
    # Cluster 3 crashes: clusters 1 and 2 still hold 9 of 12 processes.
    asynchrony_lib.Asynchrony(delay=asynchrony_lib.exponential(0.3), crashes={i: 20.0 for i in range(9, N)}),
    # Clusters 2 and 3 crash: 5 of 12 processes left, no quorum: the survivors must block.
    asynchrony_lib.Asynchrony(delay=asynchrony_lib.exponential(0.3), crashes={i: 20.0 for i in range(5, N)}),
]
B_STEPS = 1800


@pytest.fixture(scope="module")
def agreement_runs():
    prog = cluster.cluster_sgd(
        CLUSTERS,
        variant="agreement",
        learning_rate=0.05,
        agreement_rounds=ROUNDS,
        epsilon=0.05,
        slots=4,
    )
    states, rec = _run(prog, _problem(N), B_SCENARIOS, [0], B_STEPS, 60)
    return jax.device_get(states), rec


def _per_iteration(states, scenario):
    """(inputs, outputs) of the recent iterations whose records nobody has overwritten yet, so
    every input of the iteration is there (processes that skipped it by a jump or a catch-up
    contributed no input)."""
    s = jax.tree.map(lambda x: x[scenario, 0], states)
    out = []
    recent = (s.out_tag >= 0) & (s.out_tag > s.t.max() - s.in_tag.shape[1])
    for t in np.unique(s.out_tag[recent]):
        has_in = (s.in_tag == t).any(axis=1)
        has_out = (s.out_tag == t).any(axis=1)
        if has_in.sum() < 2 or has_out.sum() < 2:
            continue
        ins = np.stack([s.in_val[p][s.in_tag[p] == t][0] for p in np.flatnonzero(has_in)])
        outs = np.stack([s.out_val[p][s.out_tag[p] == t][0] for p in np.flatnonzero(has_out)])
        out.append((t, ins, outs))
    return out


@pytest.mark.parametrize("scenario", [0, 1])
def test_agreement_halves_the_diameter_every_round_and_stays_valid(agreement_runs, scenario):
    states, rec = agreement_runs
    checked = _per_iteration(states, scenario)
    assert len(checked) >= 2
    for t, ins, outs in checked:
        d_in = np.max(ins.max(0) - ins.min(0))
        d_out = np.max(outs.max(0) - outs.min(0))
        assert d_out <= d_in / 2**ROUNDS + 1e-6, (t, d_in, d_out)
        # Validity: every output inside the inputs' bounding box.
        assert np.all(outs >= ins.min(0) - 1e-6) and np.all(outs <= ins.max(0) + 1e-6)
    r = jax.tree.map(lambda x: x[scenario, 0], rec)
    assert np.all(r["agreement_ok"])  # diameter <= epsilon at every record
    assert r["steps"][-1] == B_STEPS  # live, with or without the crash of cluster 3
    assert r["gap"][-1] < 0.5 * r["gap"][0]  # ~20 iterations of SGD with agreement


def test_agreement_blocks_without_a_quorum_and_average_does_not(agreement_runs, average_runs):
    _, rec = agreement_runs
    r = jax.tree.map(lambda x: x[2, 0], rec)
    assert r["alive"][-1] == 5
    assert r["steps"][-1] < B_STEPS  # stalled: no event left to process
    stalled = r["steps"] == r["steps"][-1]
    assert stalled.sum() > len(stalled) // 2
    # Algorithm A in the same situation (clusters 2 and 3 crashed) took every step.
    np.testing.assert_array_equal(average_runs[0]["steps"][1, :, -1], T_A * N)


def test_agreement_with_a_majority_cluster_never_waits():
    """quorum="processes": a cluster holding most processes is a quorum on its own."""
    prog = cluster.cluster_sgd([3, 1], variant="agreement", learning_rate=0.05, agreement_rounds=2)
    state = prog.init(jnp.int32(0), jnp.zeros(D), jax.random.key(0))
    state = state._replace(phase=jnp.int32(cluster._WAIT))
    assert bool(prog.ready(state))
    other = prog.init(jnp.int32(3), jnp.zeros(D), jax.random.key(0))
    other = other._replace(phase=jnp.int32(cluster._WAIT))
    assert not bool(prog.ready(other))  # the single process must hear from the big cluster
    prog = cluster.cluster_sgd([3, 1], variant="agreement", learning_rate=0.05, quorum="clusters")
    assert not bool(prog.ready(state))  # 1 of 2 clusters is no majority


# ---------------------------------------------------------------------------------------------
# Contract: jit, stable state structure, no recompilation, bfloat16, bad input.

VARIANTS = {
    "average": dict(learning_rate=0.1),
    "average_schedule": dict(schedule=SCHEDULE),
    "agreement": dict(variant="agreement", learning_rate=0.1, agreement_rounds=2),
}


def _signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def _views_for(prog, n):
    views = {}
    for name, spec in prog.shared.items():
        template = program_lib.resolve(spec.template, jnp.zeros(D))
        views[name] = program_lib.RegistersView(
            jnp.full((n, spec.slots), -1, jnp.int32),
            jax.tree.map(lambda t: jnp.zeros((n, spec.slots, *t.shape), t.dtype), template),
        )
    return views


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_handlers_jit_keep_state_structure_and_compile_once(name):
    prog = cluster.cluster_sgd([2, 1], **VARIANTS[name])
    problem = _problem(3)
    traces = []

    def counted(state, batch, key):
        traces.append(1)  # runs only while tracing
        return prog.step(state, problem.grad_fn, batch, key)

    step, observe = jax.jit(counted), jax.jit(prog.observe)
    (cname,) = prog.channels
    receive = jax.jit(prog.receive[cname])
    state = observe(prog.init(jnp.int32(0), problem.init_params, jax.random.key(0)), _views_for(prog, 3))
    before = _signature(state)
    for t in range(2):
        state, emit = step(state, problem.sample(jax.random.key(t), 0), jax.random.key(t))
        assert _signature(state) == before
        state = observe(state, _views_for(prog, 3))
        assert _signature(state) == before
        payload = jax.tree.map(lambda p: p[0], program_lib.expand_outbox(emit.outbox[cname]).payload)
        state, _ = receive(state, program_lib.Message(jnp.int32(0), jnp.int32(t), payload))
        assert _signature(state) == before
    assert len(traces) == 1
    assert prog.crash_tolerant and prog.num_nodes == 3


@pytest.mark.parametrize("variant", ["average", "agreement"])
def test_bfloat16_params_run_and_decrease_the_loss(variant):
    kwargs = dict(learning_rate=0.05) if variant == "average" else VARIANTS["agreement"]
    kwargs = {**kwargs, "learning_rate": 0.05}
    prog = cluster.cluster_sgd([2, 1], **kwargs)
    tr = simulator.simulate(prog, _problem(3, jnp.bfloat16), steps=600, seed=0, record_every=30)
    assert np.all(np.isfinite(tr["loss"]))
    assert tr["gap"][-1] < 0.2 * tr["gap"][0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(clusters=[3, 0]), ValueError, "positive int sizes"),
        (dict(clusters=[]), ValueError, "at least one"),
        (dict(clusters=np.array([0, 2, 2])), ValueError, "non-empty"),
        (dict(clusters=np.array([[0, 1]])), ValueError, "1-D"),
        (dict(clusters="abc"), TypeError, "clusters"),
        (dict(learning_rate=None), ValueError, "exactly one"),
        (dict(schedule=SCHEDULE), ValueError, "exactly one"),
        (dict(learning_rate=-0.1), ValueError, "positive"),
        (dict(learning_rate=None, schedule=3.0), TypeError, "callable"),
        (dict(learning_rate=None, optimizer="sgd"), TypeError, "GradientTransformation"),
        (dict(variant="gossip"), ValueError, "variant"),
        (dict(quorum="most"), ValueError, "quorum"),
        (dict(slots=0), ValueError, "slots"),
        (dict(agreement_rounds=3), ValueError, "only apply"),
        (dict(variant="agreement", agreement_rounds=0), ValueError, "agreement_rounds"),
        (dict(variant="agreement", epsilon=-1.0), ValueError, "epsilon"),
    ],
)
def test_bad_input_raises_at_factory_time(kwargs, error, match):
    args = dict(clusters=[2, 1], learning_rate=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cluster.cluster_sgd(args.pop("clusters"), **args)
