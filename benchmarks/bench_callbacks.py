"""What the callback machinery costs per event, run, level and step, against floors and peers.

Run from the repo root: ``python benchmarks/bench_callbacks.py`` (a few minutes), or with
``--quick`` (a few seconds: 3 rounds of short samples, fewer sizes; rough numbers). Standard
library only; langchain_core, blinker and pluggy are measured when importable, else skipped
with a note. Scenarios, each a markdown table:

- ``event``: one ``on_text`` to k no-op handlers: the floor (the same handlers' methods called
  in a loop with the keywords this project's run manager passes), this project's run manager,
  langchain_core's run manager, blinker ``Signal.send``, a pluggy hook call.
- ``token``: the same for ``on_llm_new_token`` on an LLM run (no event may be special-cased).
- ``run``: start, ``get_child()`` and end of one chain run, this project vs langchain_core.
- ``depth``: a Lambda invoking a nested Lambda, per level, vs ``RunnableLambda`` and vs the
  same number of nested plain functions.
- ``async``: ``ainvoke`` of an async Lambda awaiting a nested async Lambda, per level, with no
  handler or one async handler, vs ``RunnableLambda`` (wall clock: work may leave the thread).
- ``chain``: a Chain of Lambda steps, per step, vs ``RunnableSequence``.
- ``flatness``: per level, a chain of child managers (start, get_child) 64 deep vs 16 deep.
- ``memory``: tracemalloc peak per nested level, and bytes retained after 10,000 runs.

With ``--against REV`` (a git revision, or the path of another ``callbacks.py``), that version
is measured beside this one, in the same process and rounds, in every scenario where this
project is; a closing table gives the ratio of each (above 1: that version was slower).

Method: one process, gc enabled. Each case is a `timeit` statement whose loop count is set so
that a sample lasts at least 0.2 s, timed in the thread's CPU time (`time.thread_time`: what
other processes on a shared machine do is not counted), the async cases by wall clock. Every
round times each case once, in turn (7 rounds); a case reports the median of its rounds, and a
ratio between two cases is the median of their per-round ratios, so that a slow spell of the
machine, which hits both sides of a round alike, cancels out. Every side calls the very same
no-op handler methods. Timings are not tests: nothing is asserted, and the closing ``targets``
table only reads the team's ratios off the measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.metadata
import importlib.util
import operator
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # callbacks.py at the repo root

from callbacks import CallbackManager, Chain, Lambda

ROOT = Path(__file__).resolve().parent.parent


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


LC_CALLBACKS: Any = _optional("langchain_core.callbacks")
LC_RUNNABLES: Any = _optional("langchain_core.runnables")
BLINKER: Any = _optional("blinker")
PLUGGY: Any = _optional("pluggy")
PEERS = {"langchain-core": LC_RUNNABLES, "blinker": BLINKER, "pluggy": PLUGGY}

FLOOR, THIS, LC, PLAIN = "floor", "this project", "langchain_core", "plain functions"
BEFORE = "before"  # another version of callbacks.py (--against)
SERIALIZED, INPUTS, OUTPUTS = {"name": "bench"}, {"input": 1}, {"output": 1}
Key = tuple[str, str, int, int]  # scenario, side, handlers, size (depth, steps or 1)


class NoOp:
    """A handler that does nothing, its methods declared with the keywords managers pass."""

    raise_error = run_inline = ignore_chain = ignore_llm = False  # the flags langchain_core reads

    def on_llm_new_token(
        self,
        token: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: Any = None,
        tags: Any = None,
        **kw: Any,
    ) -> None:
        pass

    def on_llm_start(self, serialized: Any, prompts: Any, **kw: Any) -> None:
        pass

    def on_text(
        self,
        text: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: Any = None,
        tags: Any = None,
        **kw: Any,
    ) -> None:
        pass

    def on_chain_start(
        self,
        serialized: Any,
        inputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: Any = None,
        tags: Any = None,
        metadata: Any = None,
        **kw: Any,
    ) -> None:
        pass

    def on_chain_end(
        self,
        outputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: Any = None,
        tags: Any = None,
        **kw: Any,
    ) -> None:
        pass

    def on_chain_error(
        self,
        error: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: Any = None,
        tags: Any = None,
        **kw: Any,
    ) -> None:
        pass


class AsyncNoOp:
    """An async handler that does nothing (a chain run's three events)."""

    raise_error = run_inline = ignore_chain = False

    async def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        pass

    async def on_chain_end(self, outputs: Any, **kw: Any) -> None:
        pass

    async def on_chain_error(self, error: Any, **kw: Any) -> None:
        pass


class _Recorder:
    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def on_text(self, text: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs


def passed_keywords() -> dict[str, dict[str, Any]]:
    """The keyword arguments this project's run managers pass with ``on_text`` and
    ``on_llm_new_token``: the floor passes the same."""
    recorder = _Recorder()
    CallbackManager([recorder]).on_chain_start(SERIALIZED, INPUTS).on_text("x")
    text = recorder.kwargs
    CallbackManager([recorder]).on_llm_start(SERIALIZED, ["p"])[0].on_llm_new_token("x")
    return {"event": text, "token": recorder.kwargs}


def pluggy_manager(count: int) -> Any:
    """A pluggy manager with an ``on_text`` hook and ``count`` no-op plugins."""

    class Spec:
        def on_text(self, text: Any, run_id: Any, parent_run_id: Any, tags: Any) -> None:
            pass

    class Plugin:  # pluggy passes arguments by position, and no keyword-only ones: its own class
        def on_text(self, text: Any, run_id: Any, parent_run_id: Any, tags: Any) -> None:
            pass

    PLUGGY.HookspecMarker("bench")(Spec.on_text)
    PLUGGY.HookimplMarker("bench")(Plugin.on_text)
    manager = PLUGGY.PluginManager("bench")
    manager.add_hookspecs(Spec)
    for _ in range(count):
        manager.register(Plugin())
    return manager


def load_before(rev: str) -> Any:
    """``callbacks.py`` as of git revision ``rev`` (or the file at path ``rev``), imported
    under another name so that both versions live in one process."""
    path = Path(rev)
    if not path.is_file():
        show = ["git", "show", f"{rev}:callbacks.py"]
        source = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, check=True)
        path = Path(tempfile.mkdtemp()) / "callbacks_before.py"
        path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("callbacks_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["callbacks_before"] = module  # its dataclasses and pickles look it up
    spec.loader.exec_module(module)
    return module


def identity(x: Any) -> Any:
    return x


def _invoking(inner: Any) -> Callable[[Any], Any]:
    return lambda x: inner.invoke(x)


def _calling(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda x: inner(x)


def nested(wrap: Callable[[Callable[[Any], Any]], Any], depth: int) -> Any:
    """``depth`` runnables, each invoking the next (no config: implicit child), then identity."""
    runnable = wrap(identity)
    for _ in range(depth - 1):
        runnable = wrap(_invoking(runnable))
    return runnable


def nested_async(lam: Any, depth: int) -> Any:
    """``depth`` async Lambdas, each awaiting the next's ``ainvoke`` (implicit child)."""

    async def leaf(x: Any) -> Any:
        return x

    runnable = lam(leaf)
    for _ in range(depth - 1):

        async def call(x: Any, inner: Any = runnable) -> Any:
            return await inner.ainvoke(x)

        runnable = lam(call)
    return runnable


def async_driver(runnable: Any, config: Any, times: int) -> Callable[[], None]:
    """``times`` ``ainvoke`` calls on one event loop, made once: what a sample times."""
    loop = asyncio.new_event_loop()

    async def many() -> None:
        for _ in range(times):
            await runnable.ainvoke(1, config)

    return lambda: loop.run_until_complete(many())


def nested_plain(depth: int) -> Callable[[Any], Any]:
    func: Callable[[Any], Any] = identity
    for _ in range(depth - 1):
        func = _calling(func)
    return func


@dataclass
class Case:
    key: Key
    stmt: str
    namespace: dict[str, Any]
    units: int = 1  # events, runs, levels or steps per execution of stmt
    clock: Callable[[], float] = time.thread_time  # wall clock for the async cases
    number: int = 0
    samples: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:  # timeit disables gc; its setup enables it again
        self.timer = timeit.Timer(
            self.stmt, "gc.enable()", self.clock, globals={"gc": gc, **self.namespace}
        )

    def calibrate(self, min_time: float) -> None:
        number = 1
        while (elapsed := self.timer.timeit(number)) < min_time * 1.1:
            grow = number * min_time * 1.25 / elapsed
            number = number * 10 if elapsed < min_time / 100 else int(grow) + 1
        self.number = number

    def sample(self) -> None:
        self.samples.append(self.timer.timeit(self.number) / self.number / self.units * 1e9)


@dataclass
class Sizes:
    events: Sequence[int] = (0, 1, 10, 100)
    runs: Sequence[int] = (0, 1, 10)
    depths: Sequence[int] = (1, 8, 32)
    async_depths: Sequence[int] = (1, 8)
    steps: Sequence[int] = (1, 10, 100)
    flat: Sequence[int] = (16, 64)


def build_cases(
    sizes: Sizes, keywords: dict[str, dict[str, Any]], before: Any = None
) -> list[Case]:
    cases: list[Case] = []

    def add(key: Key, stmt: str, namespace: dict[str, Any], units: int = 1, **more: Any) -> None:
        cases.append(Case(key, stmt, namespace, units, **more))

    fixed: dict[str, Any] = {"run_id": uuid.uuid4(), "parent_run_id": None, "tags": []}
    pairs: list[tuple[str, Any]] = [(THIS, CallbackManager)]  # each side's callback manager
    if LC_CALLBACKS:
        pairs.append((LC, LC_CALLBACKS.CallbackManager))
    if before is not None:
        pairs.append((BEFORE, before.CallbackManager))
    for scenario, method in (("event", "on_text"), ("token", "on_llm_new_token")):
        call = ", ".join(f"{name}={name}" for name in keywords[scenario])  # run_id=run_id, ...
        for k in sizes.events:
            hs = [NoOp() for _ in range(k)]
            stmt = f"for h in hs: h.{method}('x', {call})"
            add((scenario, FLOOR, k, 1), stmt, {"hs": hs, **keywords[scenario]})
            for side, manager in pairs:
                if scenario == "event":
                    run = manager(list(hs), list(hs)).on_chain_start(SERIALIZED, INPUTS)
                else:
                    run = manager(list(hs), list(hs)).on_llm_start(SERIALIZED, ["p"])[0]
                add((scenario, side, k, 1), f"run.{method}('x')", {"run": run})
    for k in sizes.events:
        hs = [NoOp() for _ in range(k)]
        if BLINKER:
            signal = BLINKER.Signal()
            for h in hs:
                signal.connect(h.on_text)
            call = ", ".join(f"{name}={name}" for name in keywords["event"])
            namespace = {"sig": signal, "hs": hs, **keywords["event"]}  # hs: blinker: weak refs
            add(("event", "blinker", k, 1), f"sig.send('x', {call})", namespace)
        if PLUGGY:
            stmt = (
                "pm.hook.on_text(text='x', run_id=run_id, parent_run_id=parent_run_id, tags=tags)"
            )
            add(("event", "pluggy", k, 1), stmt, {"pm": pluggy_manager(k), **fixed})

    run_stmt = "r = m.on_chain_start(s, i)\nr.get_child()\nr.on_chain_end(o)"
    flat_stmt = "m = root\nfor _ in levels:\n    m = m.on_chain_start(s, i).get_child()"
    payloads = {"s": SERIALIZED, "i": INPUTS, "o": OUTPUTS}
    managers = pairs
    for side, manager in managers:
        for k in sizes.runs:
            hs = [NoOp() for _ in range(k)]
            add(("run", side, k, 1), run_stmt, {"m": manager(hs, list(hs)), **payloads})
        for depth in sizes.flat:
            hs = [NoOp()]
            namespace = {"root": manager(hs, list(hs)), "levels": range(depth), **payloads}
            add(("flatness", side, 1, depth), flat_stmt, namespace, depth)

    for depth in sizes.depths:
        add(("depth", PLAIN, 0, depth), "f(1)", {"f": nested_plain(depth)}, depth)
    runnables: list[tuple[str, Any, Any]] = [(THIS, Lambda, Chain)]
    if LC_RUNNABLES:
        runnables.append((LC, LC_RUNNABLES.RunnableLambda, LC_RUNNABLES.RunnableSequence))
    if before is not None:
        runnables.append((BEFORE, before.Lambda, before.Chain))
    for side, lam, sequence in runnables:
        for k in (0, 1):
            config = {"callbacks": [NoOp()]} if k else None
            for depth in sizes.depths:
                namespace = {"r": nested(lam, depth), "config": config}
                add(("depth", side, k, depth), "r.invoke(1, config)", namespace, depth)
            for n in sizes.steps:
                if n == 1 and side == LC:
                    continue  # a RunnableSequence needs two steps
                namespace = {"r": sequence(*[lam(identity) for _ in range(n)]), "config": config}
                add(("chain", side, k, n), "r.invoke(1, config)", namespace, n)
        for k in (0, 1):
            handlers: list[Any] = [AsyncNoOp()] if k else []
            for depth in sizes.async_depths:
                drive = async_driver(nested_async(lam, depth), {"callbacks": handlers}, 20)
                key = ("async", side, k, depth)
                add(key, "drive()", {"drive": drive}, depth * 20, clock=time.perf_counter)
    return cases


def measure(cases: list[Case], rounds: int, min_time: float) -> dict[Key, list[float]]:
    """Each case's samples (ns per unit), one per round, the rounds interleaved."""
    for case in cases:
        case.calibrate(min_time)
    for i in range(rounds):
        print(f"round {i + 1}/{rounds}", file=sys.stderr, flush=True)
        for case in cases:
            case.sample()
    return {case.key: case.samples for case in cases}


def ratio(r: dict[Key, list[float]], key: Key, ref: Key) -> float | None:
    """The median of the per-round ratios ``key / ref``, or None if either was not measured."""
    if key not in r or ref not in r:
        return None
    return statistics.median(a / b for a, b in zip(r[key], r[ref], strict=True))


def memory(runs: int, depth: int = 32) -> tuple[float, float, float]:
    """Peak traced bytes per nested level (0 and 1 handler) and bytes retained after ``runs``."""
    deep, pair = nested(Lambda, depth), nested(Lambda, 2)
    one = {"callbacks": [NoOp()]}
    peaks: list[float] = []
    tracemalloc.start()
    try:
        for config in (None, one):
            deep.invoke(1, config)
            gc.collect()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            deep.invoke(1, config)
            peaks.append((tracemalloc.get_traced_memory()[1] - base) / depth)
        for _ in range(1000):
            pair.invoke(1, one)
        gc.collect()
        before = tracemalloc.take_snapshot()
        for _ in range(runs // 2):  # two runs per invoke
            pair.invoke(1, one)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
    return peaks[0], peaks[1], float(sum(stat.size_diff for stat in diff))


def fmt(samples: list[float] | None, times: float | None = None) -> str:
    """The median of ``samples`` in ns, and ``times`` (a ratio) beside it."""
    if samples is None:
        return "n/a"
    value = statistics.median(samples)
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if times is not None:
        text += f" ({times:.2f}x)" if times < 10 else f" ({times:.1f}x)"
    return text


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def report(r: dict[Key, list[float]], sizes: Sizes) -> None:
    def cell(key: Key, ref: Key | None = None) -> str:
        return fmt(r.get(key), ratio(r, key, ref) if ref else None)

    for scenario, method in (("event", "on_text"), ("token", "on_llm_new_token")):

        def ev(side: str, k: int, scenario: str = scenario) -> Key:
            return (scenario, side, k, 1)

        peers = ("blinker", "pluggy") if scenario == "event" else ()  # they have no tokens
        rows = [
            [str(k), cell(ev(FLOOR, k)), cell(ev(THIS, k), ev(FLOOR, k))]
            + [cell(ev(LC, k), ev(THIS, k))]
            + [cell(ev(peer, k), ev(FLOOR, k)) for peer in peers]
            for k in sizes.events
        ]
        header = ["handlers", FLOOR, "this project (x floor)", "langchain_core (x this)"]
        header += [f"{peer} (x floor)" for peer in peers]
        table(f"{scenario}: one {method} to k no-op handlers, ns per event", header, rows)

    run, lc_run = ("run", THIS), ("run", LC)
    rows = [[str(k), cell((*run, k, 1)), cell((*lc_run, k, 1), (*run, k, 1))] for k in sizes.runs]
    header = ["handlers", THIS, "langchain_core (x this)"]
    table("run: on_chain_start + get_child + on_chain_end, ns per run", header, rows)

    def dp(side: str, k: int, d: int) -> Key:
        return ("depth", side, k, d)

    rows = [
        [
            str(k),
            str(d),
            cell(dp(PLAIN, 0, d)),
            cell(dp(THIS, k, d), dp(PLAIN, 0, d)),
            cell(dp(LC, k, d), dp(THIS, k, d)),
        ]
        for k in (0, 1)
        for d in sizes.depths
    ]
    header = ["handlers", "depth", PLAIN, "this project (x plain)", "RunnableLambda (x this)"]
    table("depth: a Lambda invoking a nested Lambda, ns per level", header, rows)

    def against_lc(scenario: str, sizes_: Sequence[int], size: str, peer: str, title: str) -> None:
        """A table of this project's time per unit, and langchain_core's as a multiple of it."""
        rows = [
            [
                str(k),
                str(n),
                cell((scenario, THIS, k, n)),
                cell((scenario, LC, k, n), (scenario, THIS, k, n)),
            ]
            for k in (0, 1)
            for n in sizes_
        ]
        handlers = "async handlers" if scenario == "async" else "handlers"
        table(title, [handlers, size, THIS, f"{peer} (x this)"], rows)

    title = "chain: a Chain of Lambda steps, ns per step"
    against_lc("chain", sizes.steps, "steps", "RunnableSequence", title)
    title = "async: ainvoke of an async Lambda awaiting a nested one, ns per level"
    against_lc("async", sizes.async_depths, "depth", "RunnableLambda", title)

    low = sizes.flat[0]
    rows = [
        [side, *(cell(("flatness", side, 1, d), ("flatness", side, 1, low)) for d in sizes.flat)]
        for side in (THIS, LC)
    ]
    header = ["1 handler", *(f"{d} deep (x {low} deep)" for d in sizes.flat)]
    table("flatness: on_chain_start + get_child per level of a chain, ns", header, rows)


def against(r: dict[Key, list[float]], rev: str) -> None:
    """Each case measured for both versions: the other version's time over this one's."""
    rows = [
        [" ".join(map(str, key[0:1] + key[2:])), fmt(r[key]), cell]
        for key in r
        if key[1] == THIS and (other := (key[0], BEFORE, *key[2:])) in r
        for cell in [fmt(r[other], ratio(r, other, key))]
    ]
    header = ["scenario handlers size", THIS, f"{rev} (x this)"]
    table(f"against {rev}: ns per unit", header, rows)


def targets(r: dict[Key, list[float]], sizes: Sizes, retained: float, runs: int) -> None:
    """Issue 15's targets, read off the measurements."""
    d, low, high = sizes.depths[-1], sizes.flat[0], sizes.flat[-1]
    checks: list[tuple[str, Key, Key, str, float]] = []
    for scenario in ("event", "token"):
        this, lc, floor = (scenario, THIS), (scenario, LC), (scenario, FLOOR)
        for k, most in ((1, 1.6), (10, 1.25)):
            label = f"{scenario}, {k} handler(s)"
            checks.append((f"{label}: this / floor", (*this, k, 1), (*floor, k, 1), "<=", most))
            checks.append((f"{label}: langchain_core / this", (*lc, k, 1), (*this, k, 1), ">=", 6))
    run, lc_run = ("run", THIS, 1, 1), ("run", LC, 1, 1)
    checks.append(("run, 1 handler: langchain_core / this", lc_run, run, ">=", 4))
    for k, least in ((1, 30.0), (0, 100.0)):
        label = f"depth {d}, {k} handler(s): RunnableLambda / this, per level"
        checks.append((label, ("depth", LC, k, d), ("depth", THIS, k, d), ">=", least))
    label = f"depth {d}, 0 handlers: this / plain functions, per level"
    checks.append((label, ("depth", THIS, 0, d), ("depth", PLAIN, 0, d), "<=", 10))
    a = sizes.async_depths[-1]
    for k, least in ((0, 100.0), (1, 6.0)):
        label = f"async depth {a}, {k} async handler(s): RunnableLambda / this, per level"
        checks.append((label, ("async", LC, k, a), ("async", THIS, k, a), ">=", least))
    label = f"flatness, 1 handler: {high} deep / {low} deep, per level"
    checks.append((label, ("flatness", THIS, 1, high), ("flatness", THIS, 1, low), "<=", 1.25))

    ops = {"<=": operator.le, ">=": operator.ge}
    rows = []
    for label, key, ref, op, bound in checks:
        value = ratio(r, key, ref)
        if value is not None:
            verdict = "met" if ops[op](value, bound) else "NOT met"
            rows.append([label, f"{value:.2f}x", f"{op} {bound}x", verdict])
        else:
            rows.append([label, "n/a", f"{op} {bound}x", "n/a (peer missing)"])
    verdict = "met" if retained < 64 * 1024 else "NOT met"
    rows.append(
        [f"memory: bytes retained after {runs:,} runs", f"{retained:,.0f}", "< 65,536", verdict]
    )
    table("targets (read off, not asserted)", ["target", "measured", "wanted", "verdict"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 short rounds, fewer sizes")
    parser.add_argument("--against", metavar="REV", help="also measure this git revision")
    args = parser.parse_args(argv)
    before = load_before(args.against) if args.against else None
    if args.quick:
        rounds, min_time = 3, 0.02
        sizes = Sizes(events=(0, 1, 10), depths=(1, 8), steps=(1, 10), async_depths=(8,))
    else:
        rounds, min_time, sizes = 7, 0.2, Sizes()
    runs = 10_000

    versions = ", ".join(
        f"{name} {importlib.metadata.version(name) if module else 'not installed'}"
        for name, module in PEERS.items()
    )
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs; {versions}; "
        f"median of {rounds} interleaved rounds (ratios: of per-round ratios), samples >= "
        f"{min_time} s of thread CPU time (async: wall clock), gc enabled"
        f"{'; --quick' if args.quick else ''}"
    )
    for name, module in PEERS.items():
        if module is None:
            print(f"note: {name} is not importable; its cases are skipped (n/a)")
    keywords = passed_keywords()
    for scenario, passed in keywords.items():
        if set(passed) != {"run_id", "parent_run_id", "tags"}:
            print(f"note: the {scenario} passes {sorted(passed)}; the floor passes the same")

    results = measure(build_cases(sizes, keywords, before), rounds, min_time)
    report(results, sizes)
    if args.against:
        against(results, args.against)
    peak0, peak1, retained = memory(runs)
    rows = [
        ["peak traced bytes per nested level (depth 32), 0 handlers", f"{peak0:,.0f}"],
        ["peak traced bytes per nested level (depth 32), 1 handler", f"{peak1:,.0f}"],
        [
            f"bytes retained after {runs:,} runs (2-level nested Lambda, 1 handler)",
            f"{retained:,.0f}",
        ],
    ]
    table("memory: this project (tracemalloc)", ["measure", "bytes"], rows)
    targets(results, sizes, retained, runs)


if __name__ == "__main__":
    main()
