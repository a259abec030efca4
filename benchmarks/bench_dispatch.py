"""How much the callback machinery costs, in nanoseconds per call.

Run from anywhere: ``python benchmarks/bench_dispatch.py`` (``--quick`` for a rough, fast run).
Each case is timed with `timeit`: the loop size is picked by ``autorange``, the loop is repeated,
and the best repeat is kept (the least disturbed by the rest of the machine). The first line is a
plain function call doing the same work as a `Lambda`, so the others can be read against it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # callbacks.py at the repo root

from callbacks import (
    LLM,
    AsyncCallbackHandler,
    BaseCallbackHandler,
    CallbackManager,
    Chain,
    Lambda,
    RunnableConfig,
)


def add_one(x: int) -> int:
    return x + 1


def cases() -> list[tuple[str, Callable[[], Any]]]:
    """The calls to time, each paired with its label, cheapest first within each group."""
    handler = BaseCallbackHandler()  # every event method a no-op
    one: RunnableConfig = {"callbacks": [handler]}
    lam = Lambda(add_one)
    chain = Chain(Lambda(add_one), Lambda(add_one), Lambda(add_one))
    llm = LLM("Paris is the capital of France.")
    run_1 = CallbackManager([handler]).on_chain_start({}, None)
    run_10 = CallbackManager([BaseCallbackHandler() for _ in range(10)]).on_chain_start({}, None)
    return [
        ("plain call add_one(1) (baseline)", lambda: add_one(1)),
        ("Lambda(add_one).invoke(1), no handlers", lambda: lam.invoke(1)),
        ("3-step Chain, no handlers", lambda: chain.invoke(1)),
        ("3-step Chain, 1 request-time handler", lambda: chain.invoke(1, one)),
        ("LLM.invoke, no handlers", lambda: llm.invoke("capital of France?")),
        ("LLM.invoke, 1 request-time handler", lambda: llm.invoke("capital of France?", one)),
        ("RunManager.on_text, 1 handler", lambda: run_1.on_text("note")),
        ("RunManager.on_text, 10 handlers", lambda: run_10.on_text("note")),
        *async_cases(chain, handler),
    ]


async def _nothing() -> None:
    return None


def async_cases(chain: Chain, handler: BaseCallbackHandler) -> list[tuple[str, Callable[[], Any]]]:
    """The async calls, each driven by ``run_until_complete`` on one loop (its cost is row 1)."""
    loop = asyncio.new_event_loop()
    inline = BaseCallbackHandler()
    inline.run_inline = True
    configs: list[tuple[str, RunnableConfig | None]] = [
        ("no handlers", None),
        ("1 inline sync handler", {"callbacks": [inline]}),
        ("1 AsyncCallbackHandler", {"callbacks": [AsyncCallbackHandler()]}),
        ("1 sync handler (worker thread)", {"callbacks": [handler]}),
    ]
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("run_until_complete(empty coroutine)", lambda: loop.run_until_complete(_nothing()))
    ]
    for label, config in configs:
        rows.append(
            (
                f"3-step Chain.ainvoke, {label}",
                lambda c=config: loop.run_until_complete(chain.ainvoke(1, c)),  # type: ignore[misc]
            )
        )
    return rows


def best_ns(func: Callable[[], Any], repeat: int, min_time: float) -> float:
    """The best of ``repeat`` timings of a loop lasting at least ``min_time`` s, per call in ns."""
    timer = timeit.Timer(func)
    number = 1
    while True:  # like Timer.autorange, but with our own floor
        elapsed = timer.timeit(number)
        if elapsed >= min_time:
            break
        number *= 10 if elapsed < min_time / 10 else 2
    best = min(timer.repeat(repeat=repeat, number=number))
    return best / number * 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    args = parser.parse_args(argv)
    repeat, min_time = (3, 0.02) if args.quick else (7, 0.2)

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
        f"{', --quick' if args.quick else ''}"
    )
    results = [(label, best_ns(func, repeat, min_time)) for label, func in cases()]
    baseline = results[0][1]
    width = max(len(label) for label, _ in results)
    print(f"{'case':<{width}}  {'ns/call':>9}  {'x plain':>8}")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 8}")
    for label, ns in results:
        print(f"{label:<{width}}  {ns:>9,.0f}  {ns / baseline:>8.1f}")


if __name__ == "__main__":
    main()
