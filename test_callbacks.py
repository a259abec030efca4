"""Tests for callbacks.py, in the module's own sections; each test name carries its rule id.

Example tests assert exact, ordered event lists; run ids come from ``sequential_run_ids()``, so
``uuid.UUID(int=n)`` shows up as ``n`` in ``_trace`` rows (ids are made on first need). Property
tests compare random run trees against a small pure model of the rules.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import dis
import doctest
import enum
import functools
import gc
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import os
import pathlib
import pickle
import random
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import tomllib
import traceback
import tracemalloc
import types
import typing
import uuid
import warnings
import weakref
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import callbacks
from callbacks import (
    LLM,
    AIMessage,
    AsyncCallbackHandler,
    AsyncCallbackManager,
    AsyncRunManager,
    BaseCallbackHandler,
    CallbackManager,
    Chain,
    ChatModel,
    Document,
    Event,
    Generation,
    HumanMessage,
    Lambda,
    LLMResult,
    Parallel,
    Record,
    Recorder,
    Retriever,
    RunManager,
    Runnable,
    RunnableConfig,
    SystemMessage,
    Tool,
    ToolMessage,
    TraceChecker,
    Violation,
    adispatch_custom_event,
    dispatch_custom_event,
    sequential_run_ids,
)

# Hypothesis loads its deterministic "ci" profile by itself when CI is set; it and the default
# run 200 examples per property. HYPOTHESIS_PROFILE=dev runs 2,000.
settings.register_profile("ci", settings.get_profile("ci"), max_examples=200)
settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=2000, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------

_Row = tuple[str, int | None, int | None, list[str] | None, dict[str, Any] | None]


def _int(run_id: uuid.UUID | None) -> int | None:
    return None if run_id is None else run_id.int


def _U(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def _row(r: Record) -> _Row:
    return (r.event.method, _int(r.run_id), _int(r.parent_run_id), r.tags, r.metadata)


def _trace(rec: Recorder) -> list[_Row]:
    """``(event method, run id, parent id, tags, metadata)`` for each recorded event, in order."""
    return [_row(r) for r in rec.records]


def _names(rec: Recorder) -> list[tuple[int | None, Any]]:
    """``(run id, name)`` of each recorded start event, in order."""
    return [(_int(r.run_id), r.kwargs.get("name")) for r in rec.records if r.event.phase == "start"]


def _payloads(rec: Recorder) -> list[tuple[str, tuple[Any, ...]]]:
    return [(r.event.method, r.args) for r in rec.records]


def _ident(x: Any) -> Any:
    return x


async def _until(
    condition: Callable[[], bool], task: asyncio.Future[Any], pause: float = 0.001
) -> None:
    """Wait until ``condition()`` holds. If ``task`` ends first, raise what it raised, or fail:
    code that broke the run then fails the test at once instead of leaving it waiting."""
    while not condition():
        if task.done():
            task.result()
            pytest.fail("the task ended before the awaited condition held")
        await asyncio.sleep(pause)


_LogEntry = tuple[str, str, int | None]


class _Shared(BaseCallbackHandler):
    """Appends ``(label, event method, run id)`` to a shared log for every event.

    With ``fail=(method, name, error)`` it raises ``error`` from ``method`` (for the run called
    ``name`` if ``name`` is given, else always), after logging the event.
    """

    def __init__(
        self,
        label: str,
        log: list[_LogEntry],
        *,
        fail: tuple[str, str | None, BaseException] | None = None,
        raise_error: bool = False,
    ) -> None:
        self.label = label
        self.log = log
        self.fail = fail
        self.raise_error = raise_error

    def _event(self, method: str, kwargs: dict[str, Any]) -> None:
        self.log.append((self.label, method, _int(kwargs.get("run_id"))))
        if self.fail is not None:
            fail_method, fail_name, error = self.fail
            if method == fail_method and fail_name in (None, kwargs.get("name")):
                raise error


def _shared_method(event: Event) -> Callable[..., None]:
    def method(self: _Shared, *args: Any, **kwargs: Any) -> None:
        self._event(event.method, kwargs)

    return method


for _e in Event:
    setattr(_Shared, _e.method, _shared_method(_e))
del _e


class _LLMStartOnly(BaseCallbackHandler):
    """Implements ``on_llm_start`` (and the LLM end) but not ``on_chat_model_start``."""

    def __init__(self, *, raise_error: bool = False, ignore_llm: bool = False) -> None:
        self.raise_error = raise_error
        self.ignore_llm = ignore_llm
        self.seen: list[tuple[str, Any, int | None]] = []

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.seen.append(("on_llm_start", prompts, _int(kwargs["run_id"])))

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.seen.append(("on_llm_end", response.generations[0][0].text, _int(kwargs["run_id"])))

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        self.seen.append(("on_chain_start", inputs, _int(kwargs["run_id"])))


class _PromptsDuck:
    """A duck-typed handler with ``on_llm_start`` only: it keeps the prompts it gets (D4)."""

    def __init__(self) -> None:
        self.prompts: list[list[str]] = []

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.prompts.append(prompts)


def _fail(message: str) -> Callable[[Any], Any]:
    def fail(x: Any) -> Any:
        raise ValueError(message)

    return fail


# ===============================================================================================
# Events and handlers (SPEC sections 1 and 2)
# ===============================================================================================


def test_public_surface_is_all() -> None:
    defined_here = {
        name
        for name, value in vars(callbacks).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == "callbacks"
    }
    assert defined_here == set(callbacks.__all__)
    assert callbacks.__version__ and callbacks.__license__ == "MIT"
    for name in ("RunManager", "HumanMessage", "Generation", "LLMResult", "Document"):
        cls = getattr(callbacks, name)
        assert "__slots__" in vars(cls) and getattr(cls, "__final__", False), name


def test_events_the_enum_is_the_table_of_spec_section_1() -> None:
    rows = [
        (e.name, e.method, e.js_name, e.run_type, e.phase, e.ignore_flag, e.payload) for e in Event
    ]
    assert len(rows) == 19
    assert rows[:3] == [
        ("CHAT_MODEL_START", "on_chat_model_start", "handleChatModelStart", "chat_model",
         "start", "ignore_chat_model", ("serialized", "messages")),
        ("LLM_START", "on_llm_start", "handleLLMStart", "llm", "start", "ignore_llm",
         ("serialized", "prompts")),
        ("LLM_NEW_TOKEN", "on_llm_new_token", "handleLLMNewToken", "llm", "stream", "ignore_llm",
         ("token",)),
    ]  # fmt: skip
    assert Event.TEXT.ignore_flag is None and Event.RETRY.js_name is None
    assert {e.ignore_flag for e in Event if e.run_type == "tool"} == {"ignore_agent"}
    assert len({e.method for e in Event}) == 19
    spec = _spec_text()
    if spec is not None:  # the brief lives beside the repository in this project's workspace
        table = re.findall(
            r"^\| ([A-Z_]+) \| (on_\w+)\((.*?)\) \| (\w+|\(none\)) \| (\w+) \| (\w+) \|", spec, re.M
        )
        assert [
            (n, m, js if js != "(none)" else None, rt, ph) for n, m, _, js, rt, ph in table
        ] == [(e.name, e.method, e.js_name, e.run_type, e.phase) for e in Event]


def test_events_handler_base_signatures_follow_langchain() -> None:
    assert str(_untyped(BaseCallbackHandler().on_llm_start)) == (
        "(serialized, prompts, *, run_id, parent_run_id=None, tags=None, metadata=None, **kwargs)"
    )
    assert str(_untyped(BaseCallbackHandler().on_llm_new_token)) == (
        "(token, *, chunk=None, run_id, parent_run_id=None, tags=None, **kwargs)"
    )
    assert str(_untyped(BaseCallbackHandler().on_tool_start)) == (
        "(serialized, input_str, *, inputs=None, run_id, parent_run_id=None, tags=None,"
        " metadata=None, **kwargs)"
    )
    assert str(_untyped(BaseCallbackHandler().on_custom_event)) == (
        "(name, data, *, run_id, tags=None, metadata=None, **kwargs)"
    )
    for event in Event:
        assert _untyped(getattr(BaseCallbackHandler, event.method)) == event.signature
        if event.phase != "start":
            assert callable(getattr(RunManager, event.method))


def _untyped(method: Callable[..., Any]) -> inspect.Signature:
    """``method``'s signature without its annotations: what `Event.signature` states."""
    signature = inspect.signature(method)
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )


@pytest.mark.parametrize("base", [BaseCallbackHandler, AsyncCallbackHandler])
def test_events_handler_bases_declare_every_method_in_the_table(base: type) -> None:
    """Each base class declares one method per row of the `Event` table, in the table's order,
    in its own body (so type checkers and IDEs see them): its signature is the row's, typed,
    its docstring one line, and the async base's are coroutine functions."""
    declared = [name for name in vars(base) if name.startswith("on_")]
    assert declared == [event.method for event in Event]
    for event in Event:
        method = vars(base)[event.method]
        assert _untyped(method) == event.signature
        assert all(
            p.annotation is not p.empty
            for p in inspect.signature(method).parameters.values()
            if p.name != "self"
        )
        assert method.__doc__ and "\n" not in method.__doc__
        assert inspect.iscoroutinefunction(method) == (base is AsyncCallbackHandler)


def test_events_run_managers_declare_their_event_methods_for_type_checkers() -> None:
    """The run managers' event methods are made at import from the `Event` table; each class
    also declares them for type checkers (under ``TYPE_CHECKING``), one per row that is not a
    start event, in the table's order, typed, with the signature of the method made at run
    time, and coroutines on `AsyncRunManager`."""
    tree = ast.parse(pathlib.Path(callbacks.__file__).read_text(encoding="utf-8"))
    for cls in (RunManager, AsyncRunManager):
        (body,) = [
            node.body
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__
            for node in node.body
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        ]
        declared = {
            node.name: node
            for node in body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("on_")
        }
        assert list(declared) == [e.method for e in Event if e.phase != "start"]
        for name, node in declared.items():
            arguments = [*node.args.args, *node.args.kwonlyargs, node.args.kwarg]
            assert all(a and a.annotation for a in arguments[1:]) and node.returns, name
            for argument in filter(None, arguments):
                argument.annotation = None
            assert f"({ast.unparse(node.args)})" == str(inspect.signature(getattr(cls, name)))
            assert isinstance(node, ast.AsyncFunctionDef) == (cls is AsyncRunManager), name
            assert inspect.iscoroutinefunction(getattr(cls, name)) == (cls is AsyncRunManager)


_USER_HANDLER = """
import sys
from typing import Any

from callbacks import AsyncCallbackHandler, BaseCallbackHandler, Lambda, Recorder, RunManager

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override


class Tokens(BaseCallbackHandler):
    @override
    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        print(token)


class AsyncTokens(AsyncCallbackHandler):
    @override
    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        print(token)


def stream(run: RunManager) -> None:
    run.on_llm_new_token("Hello", chunk=None)


def first_event(recorder: Recorder) -> str:
    return recorder.records[0].event.method


shout = Lambda(str.upper).with_config(tags=["loud"])
"""


def test_events_type_checkers_see_the_handler_methods(tmp_path: pathlib.Path) -> None:
    """``mypy --strict`` on a user's handlers, beside this checkout's module: ``@override`` on
    ``on_llm_new_token`` passes; on a misspelt method, or with a token typed as an int, it is an
    error, and so are a run manager's token that is not a string and a misspelt config key."""
    _check_user_types(tmp_path, cwd=pathlib.Path(__file__).parent)


def _check_user_types(tmp_path: pathlib.Path, cwd: pathlib.Path) -> None:
    """Run ``mypy --strict`` from ``cwd`` on `_USER_HANDLER` and three broken copies of it. (mypy
    runs in its own process: in this one it would raise the recursion limit for the tests
    after it.)"""
    if not os.environ.get("CALLBACKS_REQUIRE_INSTALLED") and (
        importlib.util.find_spec("mypy") is None
        or importlib.util.find_spec("typing_extensions") is None
    ):
        pytest.skip("mypy and typing_extensions are not installed")
    checks = {
        "good": _USER_HANDLER,
        "misspelt": _USER_HANDLER.replace("def on_llm_new_token", "def on_llm_new_tokens", 1),
        "mistyped": _USER_HANDLER.replace("token: str", "token: int", 1),
        "miscalled": _USER_HANDLER.replace('token("Hello"', "token(1", 1),
        "misbound": _USER_HANDLER.replace("tags=", "tagz=", 1),
    }
    for name, code in checks.items():
        (tmp_path / f"{name}.py").write_text(code, encoding="utf-8")
    files = [str(tmp_path / f"{name}.py") for name in checks]
    command = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    errors = {name: re.findall(rf"{name}\.py:\d+: error: (.*)", result.stdout) for name in checks}
    assert result.returncode == 1 and errors["good"] == [], result.stdout
    assert errors["misspelt"] == [
        'Method "on_llm_new_tokens" is marked as an override, but no base method was found with'
        " this name  [misc]"
    ]
    assert len(errors["mistyped"]) == 1 and "incompatible with supertype" in errors["mistyped"][0]
    assert errors["misbound"] == [
        'Unexpected keyword argument "tagz" for "with_config" of "Runnable"  [call-arg]'
    ]
    assert errors["miscalled"] == [
        'Argument 1 to "on_llm_new_token" of "RunManager" has incompatible type "int";'
        ' expected "str"  [arg-type]'
    ]


def test_events_handler_defaults_are_no_ops_except_chat_start() -> None:
    handler = BaseCallbackHandler()
    run_id = uuid.uuid4()
    for event in Event:
        args: list[Any] = [None] * len(event.payload)
        if event is Event.CHAT_MODEL_START:
            with pytest.raises(NotImplementedError, match=r"^BaseCallbackHandler does not imp"):
                handler.on_chat_model_start(*args, run_id=run_id)
            with pytest.raises(NotImplementedError, match=r"^AsyncCallbackHandler does not imp"):
                asyncio.run(AsyncCallbackHandler().on_chat_model_start(*args, run_id=run_id))
        else:
            assert getattr(handler, event.method)(*args, run_id=run_id) is None
    flags = ["raise_error", "run_inline", *sorted({e.ignore_flag for e in Event if e.ignore_flag})]
    assert [getattr(handler, f) for f in flags] == [False] * 9


_STARTS: dict[str, Callable[[Any], Any]] = {  # how a manager starts a run of each family
    "chain": lambda m: m.on_chain_start({}, {}),
    "llm": lambda m: m.on_llm_start({}, ["p"]),
    "tool": lambda m: m.on_tool_start({}, "in"),
    "retriever": lambda m: m.on_retriever_start({}, "q"),
}


async def _started(result: Any) -> Any:
    run = await result if inspect.isawaitable(result) else result
    return run[0] if isinstance(run, list) else run


def _check_generated_run_manager_methods(manager_class: type[Any]) -> None:
    """Each non-start event method of the run managers, for every event of the table: what it
    delivers, with which keywords, and what it refuses (a payload count, a run of another
    kind, a run already over: D3)."""

    async def call(run: Any, method: str, *args: Any, **kwargs: Any) -> None:
        result = getattr(run, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            await result

    async def main() -> None:
        for event in (e for e in Event if e.phase != "start"):
            family = "chain" if event.run_type == "any" else event.run_type
            rec, checker = Recorder(), TraceChecker(strict=True)
            handlers = [rec, checker]
            parent = await _started(manager_class(handlers, handlers).on_chain_start({}, {}))
            child = parent.get_child("step")
            child.add_tags(["t"])
            child.add_metadata({"k": 1})
            run = await _started(_STARTS[family](child))
            assert getattr(type(run), event.method).__name__ == event.method
            assert getattr(type(run), event.method).__doc__ == (
                f"Fire {event.method} for this run (phase {event.phase})."
            )
            payload = tuple(f"p{i}" for i in range(len(event.payload)))
            await call(run, event.method, *payload, x=1)
            last = rec.records[-1]
            assert (last.event, last.args, last.run_id) == (event, payload, run.run_id)
            assert last.tags == ["step", "t"]
            custom = event is Event.CUSTOM_EVENT
            assert last.parent_run_id == (None if custom else parent.run_id)
            assert last.metadata == ({"k": 1} if custom else None)
            # a keyword payload (a token's ``chunk``) is passed even when None, as LangChain does
            assert last.kwargs == {"x": 1, **dict.fromkeys(event.keyword_payload)}
            count = len(event.payload) + 1  # and ``self``: Python's own message
            with pytest.raises(TypeError, match=rf"{event.method}\(\) takes {count} positional"):
                await call(run, event.method, *payload, "one too many")
            other = "tool" if family != "tool" else "chain"
            if event.run_type != "any":
                wrong = await _started(_STARTS[other](child))
                with pytest.raises(TypeError, match=f"{event.method} does not apply to a"):
                    await call(wrong, event.method, *payload)
                await call(wrong, callbacks._END[other].method, None)
            if not event.closes:
                await call(run, callbacks._END[family].method, None)
            with pytest.raises(RuntimeError, match=f"{event.method} after the end of"):
                await call(run, event.method, *payload)
            await call(parent, "on_chain_end", None)
            checker.check()

    asyncio.run(main())


def test_events_generated_methods_rebuilt_from_the_table_behave_as_documented() -> None:
    """The run managers', the recorder's and the checker's event methods are generated from
    `Event`, once at import (the handler bases declare theirs, checked against it). Rebuilding
    them now gives methods that behave as the table says (and lets mutation testing, which
    switches code at call time, reach the generators)."""
    callbacks._generate_event_methods()
    test_events_handler_base_signatures_follow_langchain()
    test_events_handler_defaults_are_no_ops_except_chat_start()
    for base in (Recorder, TraceChecker):
        for event in Event:
            method = getattr(base, event.method)
            assert (method.__name__, method.__qualname__) == (event.method, event.method)
            assert inspect.signature(method) == event.signature
            assert method.__doc__
    for manager_class in (CallbackManager, AsyncCallbackManager):
        _check_generated_run_manager_methods(manager_class)
    for kind in sorted(_BROKEN_STREAMS):
        test_X1_trace_checker_finds_each_kind_of_violation(kind)
    test_X2_recorder_keeps_payload_positional_even_when_passed_by_keyword()
    test_D4_chat_start_falls_back_to_llm_start_with_rendered_messages("invoke")


@pytest.mark.parametrize(
    "bad", ["handler", 3, BaseCallbackHandler, print, lambda *a: None, object()], ids=repr
)
def test_events_plainly_not_a_handler_is_a_type_error(bad: Any) -> None:
    with pytest.raises(
        TypeError, match=r"expected a callback handler .* got " + re.escape(repr(bad))
    ):
        Lambda(_ident).invoke(1, {"callbacks": [bad]})
    for add in (CallbackManager().add_handler, CallbackManager().set_handler):
        with pytest.raises(TypeError, match=r"^handlers\[0\]: expected a callback handler"):
            add(bad)
    with pytest.raises(TypeError, match="expected a callback handler"):
        LLM("x", callbacks=[bad])


def test_events_a_handler_need_not_subclass_the_base() -> None:
    seen: list[tuple[str, Any]] = []

    class Duck:  # no base class, no flags, only the methods it cares about
        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            seen.append(("start", inputs))

        def on_chain_end(self, outputs: Any, **kw: Any) -> None:
            seen.append(("end", outputs))

        def on_llm_start(self, serialized: Any, prompts: list[str], **kw: Any) -> None:
            seen.append(("llm", prompts))  # also gets chat starts (D4: no on_chat_model_start)

    chain = Lambda(_ident, name="f") | ChatModel("ok") | Tool(_ident)
    assert chain.invoke("hi", {"callbacks": [Duck()]}) == AIMessage("ok")
    assert seen == [("start", "hi"), ("start", "hi"), ("end", "hi"), ("llm", ["Human: hi"]),
                    ("end", AIMessage("ok"))]  # fmt: skip
    LLM("x", callbacks=[Recorder()])  # checked once per class; a subclass of the base never
    assert (Duck in callbacks._DUCK_HANDLERS, Recorder in callbacks._DUCK_HANDLERS) == (True, False)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"callback": []}, "unknown config key 'callback' (str); valid keys are: callbacks, configurable, max_concurrency, metadata, recursion_limit, run_id, run_name, tags"),
        ({"configurable": [1]}, "config['configurable'] must be a dict with string keys, got a list"),
        ({"recursion_limit": "25"}, "config['recursion_limit'] must be a positive int, got '25' (str)"),
        ({"tags": "one"}, "config['tags'] must be a list of strings, got 'one' (str)"),
        ({"tags": ["a", 1]}, "config['tags'][1] must be a string, got 1 (int)"),
        ({"tags": {"a": 1}}, "config['tags'] must be a list of strings, got a dict"),
        ({"tags": (t for t in "ab")}, "config['tags'] must be a list of strings, got a generator"),
        ({"metadata": [1]}, "config['metadata'] must be a dict with string keys, got a list"),
        ({"run_name": 5}, "config['run_name'] must be a non-empty string, got 5 (int)"),
        ({"run_name": ""}, "config['run_name'] must be a non-empty string, got '' (str)"),
        ({"run_id": "abc"}, "config['run_id'] must be a uuid.UUID, got 'abc' (str)"),
        ({"max_concurrency": True}, "config['max_concurrency'] must be a positive int, got True (bool)"),
        ({"callbacks": "h"}, "config['callbacks'] must be a list of handlers, got 'h' (str)"),
        ({"callbacks": {Recorder(): 1}}, "config['callbacks'] must be a list of handlers, got a dict"),
        ({"callbacks": {Recorder()}}, "config['callbacks'] must be a list of handlers, got a set"),
        ({"callbacks": (h for h in [Recorder()])}, "config['callbacks'] must be a list of handlers, got a generator"),
    ],
)  # fmt: skip
def test_config_unknown_key_or_wrong_type_is_a_type_error(config: Any, message: str) -> None:
    """SPEC section 5: config validation, for invoke, stream, batch and with_config alike. Only
    ordered, reusable containers are taken (a dict's keys, a set or a one-shot generator are
    refused), and the message names the offending element and its type."""
    runnable = Lambda(_ident)
    calls: list[Callable[[], Any]] = [
        lambda: runnable.invoke(1, config),
        lambda: runnable.stream(1, config),
        lambda: runnable.batch([1, 2], config),
        lambda: runnable.with_config(config),
    ]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value).startswith(message)


def test_R8_every_key_of_langchains_config_is_taken_and_the_ignored_ones_change_nothing() -> None:
    """langchain_core 1.7's eight keys, as its ``ensure_config`` fills them: the call runs as it
    would without ``recursion_limit`` and ``configurable``, which the toys ignore."""
    full: Any = {
        "tags": ["t"],
        "metadata": {"m": 1},
        "callbacks": None,
        "run_name": "named",
        "max_concurrency": 2,
        "recursion_limit": 25,
        "configurable": {"session": "s1"},
        "run_id": None,
    }
    traces = []
    for config in (
        full,
        {k: v for k, v in full.items() if k not in {"recursion_limit", "configurable"}},
    ):
        rec = Recorder()
        chain = Chain(Lambda(_ident, name="a"), LLM("x", name="llm"))
        given: Any = {**config, "callbacks": [rec]}
        with sequential_run_ids():
            assert chain.invoke("q", given) == "x"
            assert chain.batch(["q", "r"], given) == ["x", "x"]
        traces.append(_trace(rec))
    assert traces[0] == traces[1] and len(traces[0]) == 18
    with pytest.raises(
        ValueError, match=r"config\['recursion_limit'\] must be a positive int, got 0"
    ):
        Lambda(_ident).invoke(1, {"recursion_limit": 0})


def test_R8_a_manager_with_langchains_fields_as_callbacks_continues_its_tree() -> None:
    """Any object with a manager's seven fields (as langchain_core's child manager, which a
    LangChain runnable puts in the config it passes on) is that manager: the run is its
    child, with its handlers, tags and metadata, and hands on only the inheritable ones."""
    rec, local = Recorder(), Recorder("local")
    parent = _U(99)
    foreign: Any = types.SimpleNamespace(
        handlers=[rec, local],
        inheritable_handlers=[rec],
        parent_run_id=parent,
        tags=["inherited", "own"],
        inheritable_tags=["inherited"],
        metadata={"k": 1, "own": 2},
        inheritable_metadata={"k": 1},
    )
    chain = Chain(Lambda(_ident, name="a"), name="c")
    with sequential_run_ids():
        assert chain.invoke("q", {"callbacks": foreign}) == "q"
    assert _trace(rec) == [
        ("on_chain_start", 1, 99, ["inherited", "own"], {"k": 1, "own": 2}),
        ("on_chain_start", 2, 1, ["inherited", "seq:step:1"], {"k": 1}),
        ("on_chain_end", 2, 1, ["inherited", "seq:step:1"], None),
        ("on_chain_end", 1, 99, ["inherited", "own"], None),
    ]
    assert local.events() == ["on_chain_start", "on_chain_end"]  # not inheritable
    runs = CallbackManager.configure(foreign).on_chain_start({}, {})
    fields = (runs.parent_run_id, runs.handlers, runs.inheritable_handlers)
    assert fields == (parent, [rec, local], [rec])
    foreign.handlers = "not a list"
    with pytest.raises(TypeError, match="handlers must be a list of handlers, got 'not a list'"):
        chain.invoke("q", {"callbacks": foreign})


def test_config_and_constructor_values_out_of_range_are_clear_errors() -> None:
    """SPEC section 5 and R0: values of the right type but unusable."""
    with pytest.raises(
        ValueError, match=r"config\['max_concurrency'\] must be a positive int, got 0"
    ):
        Lambda(_ident).invoke(1, {"max_concurrency": 0})
    with pytest.raises(ValueError, match="got 2 configs for 1 inputs"):
        Lambda(_ident).batch([1], [{}, {}])
    with pytest.raises(TypeError, match="run_id cannot be bound"):
        Lambda(_ident).with_config(run_id=uuid.uuid4())
    with pytest.raises(TypeError, match=r"cannot use 3 \(int\) as a step"):
        Chain(Lambda(_ident), 3)
    with pytest.raises(
        TypeError, match=r"error must be an exception instance or None, got 'x' \(str\)"
    ):
        LLM("a", error="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="responses must be a string or a non-empty list"):
        LLM([])
    absent: Any = {"tags": None, "callbacks": None}
    assert Lambda(_ident).invoke(1, absent) == 1  # None means absent


def test_events_a_handler_with_methods_on_the_instance_only_is_checked_each_time() -> None:
    """A duck-typed handler qualifies by its methods; when only the instance has them, its class
    is not remembered as a handler class, so a bare instance of it is still refused."""
    seen: list[str] = []
    duck = types.SimpleNamespace(on_chain_start=lambda *a, **kw: seen.append("start"))
    for _ in range(2):
        assert Lambda(_ident).invoke(1, {"callbacks": [duck]}) == 1
    assert seen == ["start", "start"]
    with pytest.raises(TypeError, match="expected a callback handler"):
        Lambda(_ident).invoke(1, {"callbacks": [types.SimpleNamespace()]})


# ===============================================================================================
# Dispatch (D1-D4, D7)
# ===============================================================================================


def test_D1_ignore_flags_skip_their_events() -> None:
    class NoLLM(Recorder):
        ignore_llm = True

    class NoChain(Recorder):
        ignore_chain = True

    class NoAgent(Recorder):
        ignore_agent = True

    class NoRetriever(Recorder):
        ignore_retriever = True

    class NoCustom(Recorder):
        ignore_custom_event = True

    def body(x: str) -> Any:
        dispatch_custom_event("c", 1)
        return x

    chain = Chain(
        Retriever(["q doc"], name="r"),
        Lambda(lambda docs: docs[0].page_content, name="f"),
        Tool(_ident, name="t"),
        Lambda(body, name="g"),
        LLM("x", name="llm"),
        ChatModel("y", name="chat"),
        name="c",
    )
    handlers = [NoLLM(), NoChain(), NoAgent(), NoRetriever(), NoCustom(), Recorder("all")]
    chain.invoke("q", {"callbacks": handlers})
    everything = (  # what a handler ignoring nothing hears, in order
        "on_chain_start on_retriever_start on_retriever_end on_chain_start on_chain_end"
        " on_tool_start on_tool_end on_chain_start on_custom_event on_chain_end on_llm_start"
        " on_llm_end on_chat_model_start on_llm_end on_chain_end"
    ).split()

    def without(*methods: str) -> list[str]:
        return [m for m in everything if m not in methods]

    assert [h.events() for h in handlers] == [
        without("on_llm_start", "on_llm_end"),
        without("on_chain_start", "on_chain_end"),
        without("on_tool_start", "on_tool_end"),
        without("on_retriever_start", "on_retriever_end"),
        without("on_custom_event"),
        everything,
    ]


def test_D1_a_runs_flags_are_read_once_for_an_event_it_fires_again() -> None:
    """A handler's ignore flag is read the first time a run fires an event it may fire many
    times (a note, a token, a custom event), then the methods resolved are reused: with or
    without extra keywords, through the run manager's fast path or the general one."""

    reads: list[str] = []

    class Counted(Recorder):
        @property
        def ignore_retry(self) -> bool:  # type: ignore[override]
            reads.append("ignore_retry")
            return True

        @property
        def ignore_custom_event(self) -> bool:  # type: ignore[override]
            reads.append("ignore_custom_event")
            return False

    counted, rec = Counted(), Recorder()
    run = CallbackManager([counted, rec]).on_chain_start({}, {})
    for extra in ({}, {}, {"attempt": 2}, {"attempt": 3}):
        run.on_retry("state", **extra)
    for i in range(3):
        run._fire(Event.CUSTOM_EVENT, ("c", i), {})  # as `dispatch_custom_event` fires it
    assert reads == ["ignore_retry", "ignore_custom_event"]
    assert counted.events() == ["on_chain_start", *["on_custom_event"] * 3]
    assert rec.events() == ["on_chain_start", *["on_retry"] * 4, *["on_custom_event"] * 3]
    assert [r.kwargs for r in rec.records[1:5]] == [{}, {}, {"attempt": 2}, {"attempt": 3}]


@pytest.mark.parametrize("before", ["async", "failing", "returning"])
def test_D1_a_handler_after_one_that_hands_over_keeps_the_flags_read_first(
    before: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler before it that is async (its coroutine run under sync dispatch), fails, or
    returns a value that is not awaitable (ignored) makes each token's fast path hand over to
    the general dispatch; the handlers after it still keep the flags and methods read at the
    run's first token (D1)."""

    class Late(Recorder):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            super().on_llm_new_token(token, **kwargs)
            self.ignore_llm = True  # counts from the next run

    class Failing(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            raise ValueError("token handler broke")

    class Returning(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> str:
            return token

    first = {"async": AsyncCallbackHandler, "failing": Failing, "returning": Returning}[before]()
    late = Late()
    assert "".join(LLM("a b c d").stream("q", {"callbacks": [first, late]})) == "a b c d"
    assert [r.args[0] for r in late.records if r.event is Event.LLM_NEW_TOKEN] == [
        "a ", "b ", "c ", "d",
    ]  # fmt: skip
    assert bool(caplog.records) == (before == "failing")  # a value returned is not awaited


def test_D1_ignore_chat_model_skips_only_the_chat_start() -> None:
    class NoChat(Recorder):
        ignore_chat_model = True

    rec = NoChat()
    ChatModel("y").invoke("q", {"callbacks": [rec]})
    assert rec.events() == ["on_llm_end"]


def test_D1_on_text_cannot_be_ignored_but_retry_can() -> None:
    class IgnoreAll(Recorder):
        ignore_llm = ignore_chat_model = ignore_chain = ignore_agent = True
        ignore_retriever = ignore_retry = ignore_custom_event = True

    ignoring, rec = IgnoreAll(), Recorder()
    with sequential_run_ids():
        run = CallbackManager([ignoring, rec]).on_chain_start({}, {})
        run.on_text("note")
        run.on_retry("state")
        run.on_chain_end({})
    assert _payloads(ignoring) == [("on_text", ("note",))]
    assert rec.events() == ["on_chain_start", "on_text", "on_retry", "on_chain_end"]


def test_D2_failing_handler_is_logged_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    log: list[_LogEntry] = []
    bad = _Shared("bad", log, fail=("on_chain_start", None, ValueError("boom")))
    good = _Shared("good", log)
    with caplog.at_level(logging.WARNING, logger="callbacks"), sequential_run_ids():
        assert Lambda(_ident, name="f").invoke("q", {"callbacks": [bad, good]}) == "q"
    assert log == [
        ("bad", "on_chain_start", 1),
        ("good", "on_chain_start", 1),
        ("bad", "on_chain_end", 1),
        ("good", "on_chain_end", 1),
    ]
    assert caplog.record_tuples == [
        (
            "callbacks",
            logging.WARNING,
            "error in _Shared.on_chain_start callback for run "
            "00000000-0000-0000-0000-000000000001: ValueError('boom')",
        )
    ]


def test_D2_raise_error_handler_failure_propagates_after_every_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[_LogEntry] = []
    first_error, second_error = ValueError("first"), KeyError("second")
    quiet = _Shared("quiet", log, fail=("on_chain_end", None, TypeError("quiet")))
    strict1 = _Shared("strict1", log, fail=("on_chain_end", None, first_error), raise_error=True)
    strict2 = _Shared("strict2", log, fail=("on_chain_end", None, second_error), raise_error=True)
    after = _Shared("after", log)
    with (
        caplog.at_level(logging.WARNING, logger="callbacks"),
        sequential_run_ids(),
        pytest.raises(ValueError) as info,
    ):
        Lambda(_ident, name="f").invoke("q", {"callbacks": [quiet, strict1, strict2, after]})
    assert info.value is first_error
    assert log == [
        ("quiet", "on_chain_start", 1),
        ("strict1", "on_chain_start", 1),
        ("strict2", "on_chain_start", 1),
        ("after", "on_chain_start", 1),
        ("quiet", "on_chain_end", 1),
        ("strict1", "on_chain_end", 1),
        ("strict2", "on_chain_end", 1),
        ("after", "on_chain_end", 1),
    ]
    assert [m for _, _, m in caplog.record_tuples] == [
        f"error in _Shared.on_chain_end callback for run {_U(1)}: TypeError('quiet')",
        f"error in _Shared.on_chain_end callback for run {_U(1)}: ValueError('first')",
        f"error in _Shared.on_chain_end callback for run {_U(1)}: KeyError('second')",
    ]


class _Hears(BaseCallbackHandler):
    """Logs each note it hears as ``(name, text)``; then fails, or hands back a coroutine
    (run under sync dispatch, D6), as asked."""

    def __init__(
        self,
        name: str,
        log: list[tuple[str, str]],
        fails: Exception | None = None,
        awaits: bool = False,
        raise_error: bool = False,
    ) -> None:
        self.name, self.log, self.fails, self.awaits = name, log, fails, awaits
        self.raise_error = raise_error

    def on_text(self, text: str, **kwargs: Any) -> Any:
        self.log.append((self.name, text))
        if self.fails is not None:
            raise self.fails
        return self._later(text) if self.awaits else None

    async def _later(self, text: str) -> None:
        self.log.append((f"{self.name} awaited", text))


def _hearing(log: list[tuple[str, str]]) -> list[_Hears]:
    return [
        _Hears("a", log),
        _Hears("bad", log, fails=ValueError("bad")),
        _Hears("async", log, awaits=True),
        _Hears("b", log),
    ]


_HEARD = ("a", "bad", "async", "async awaited", "b")  # what `_hearing`'s handlers log, in order


def test_D2_D6_a_note_fired_again_reaches_every_handler_whatever_one_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From a run's second note on, its methods resolved once (D1) are called by the run
    manager's fast path: a failing handler is logged and the rest hear the note (D2), a
    coroutine handed back runs (D6), and a ``raise_error`` failure leaves once all heard."""
    log: list[tuple[str, str]] = []
    run = CallbackManager(_hearing(log)).on_chain_start({}, {})
    with caplog.at_level(logging.WARNING, logger="callbacks"):
        for text in ("x", "y", "z"):
            run.on_text(text)
    assert log == [(name, text) for text in "xyz" for name in _HEARD]
    assert [r.getMessage()[:30] for r in caplog.records] == ["error in _Hears.on_text callba"] * 3
    log.clear()
    strict = _Hears("strict", log, fails=KeyError("strict"), raise_error=True)
    run = CallbackManager([strict, _Hears("after", log)]).on_chain_start({}, {})
    for text in ("x", "y"):
        with pytest.raises(KeyError):
            run.on_text(text)
    assert log == [("strict", "x"), ("after", "x"), ("strict", "y"), ("after", "y")]


def test_D2_an_interrupt_from_a_handler_beats_an_earlier_raise_error_failure() -> None:
    """...and a later interrupt does not replace it: the first one leaves."""
    log: list[_LogEntry] = []
    strict = _Shared(
        "strict", log, fail=("on_chain_start", None, ValueError("x")), raise_error=True
    )
    interrupt = KeyboardInterrupt()
    stopper = _Shared("stopper", log, fail=("on_chain_start", None, interrupt))
    later = _Shared("later", log, fail=("on_chain_start", None, KeyboardInterrupt()))
    with sequential_run_ids(), pytest.raises(KeyboardInterrupt) as info:
        Lambda(_ident, name="f").invoke("q", {"callbacks": [strict, stopper, later]})
    assert info.value is interrupt
    assert log == [
        *[(name, "on_chain_start", 1) for name in ("strict", "stopper", "later")],
        *[(name, "on_chain_error", 1) for name in ("strict", "stopper", "later")],
    ]


def test_D3_balance_when_the_runnable_raises() -> None:
    rec, checker = Recorder(), TraceChecker()
    error = ValueError("inner")
    chain = Chain(Lambda(_ident, name="a"), Tool(_ident, name="t", error=error), name="outer")
    with sequential_run_ids(), pytest.raises(ValueError) as info:
        chain.invoke("q", {"callbacks": [rec, checker]})
    assert str(info.value) == "inner"  # a copy of error= (R0)
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_start", 2, 1, ["seq:step:1"], {}),
        ("on_chain_end", 2, 1, ["seq:step:1"], None),
        ("on_tool_start", 3, 1, ["seq:step:2"], {}),
        ("on_tool_error", 3, 1, ["seq:step:2"], None),
        ("on_chain_error", 1, None, [], None),
    ]
    errors = [r.args for r in rec.records if r.event.phase == "error"]
    assert errors == [(info.value,), (info.value,)]  # R1: the one object, up to the root
    checker.check()


# What a handler hears when the second step of a chain fails: no later step starts.
_SECOND_STEP_FAILED: list[_Row] = [
    ("on_chain_start", 1, None, [], {}),
    ("on_chain_start", 2, 1, ["seq:step:1"], {}),
    ("on_chain_end", 2, 1, ["seq:step:1"], None),
    ("on_chain_start", 3, 1, ["seq:step:2"], {}),
    ("on_chain_error", 3, 1, ["seq:step:2"], None),
    ("on_chain_error", 1, None, [], None),
]


def test_D3_balance_when_raise_error_handler_fails_on_start() -> None:
    log: list[_LogEntry] = []
    error = RuntimeError("handler broke")
    strict = _Shared("strict", log, fail=("on_chain_start", "b", error), raise_error=True)
    rec, checker = Recorder(), TraceChecker()
    ran: list[str] = []

    def b(x: str) -> str:
        ran.append(x)
        return x

    chain = Chain(Lambda(_ident, name="a"), Lambda(b, name="b"), Lambda(_ident, name="c"))
    with sequential_run_ids(), pytest.raises(RuntimeError) as info:
        chain.invoke("q", {"callbacks": [strict, rec, checker]})
    assert info.value is error
    assert ran == []  # the failing start stops the run before its body
    assert _trace(rec) == _SECOND_STEP_FAILED
    assert [r.args for r in rec.records[-2:]] == [(error,), (error,)]
    assert log == [
        ("strict", "on_chain_start", 1),
        ("strict", "on_chain_start", 2),
        ("strict", "on_chain_end", 2),
        ("strict", "on_chain_start", 3),
        ("strict", "on_chain_error", 3),
        ("strict", "on_chain_error", 1),
    ]
    checker.check()


def test_D3_balance_on_keyboard_interrupt() -> None:
    rec, checker = Recorder(), TraceChecker()

    def interrupt(x: str) -> str:
        raise KeyboardInterrupt

    chain = Chain(Lambda(_ident, name="a"), Lambda(interrupt, name="b"), name="outer")
    with sequential_run_ids(), pytest.raises(KeyboardInterrupt):
        chain.invoke("q", {"callbacks": [rec, checker]})
    assert _trace(rec) == _SECOND_STEP_FAILED
    assert all(isinstance(r.args[0], KeyboardInterrupt) for r in rec.records[-2:])
    checker.check()


def test_D3_balance_when_retriever_and_tool_raise_system_exit() -> None:
    rec, checker = Recorder(), TraceChecker()
    for runnable in (Retriever(["d"], error=SystemExit(3)), Tool(_ident, error=SystemExit(4))):
        with pytest.raises(SystemExit):
            runnable.invoke("q", {"callbacks": [rec, checker]})
    assert [(r.event.method, type(r.args[-1]).__name__) for r in rec.records] == [
        ("on_retriever_start", "str"),
        ("on_retriever_error", "SystemExit"),
        ("on_tool_start", "str"),
        ("on_tool_error", "SystemExit"),
    ]
    checker.check()


def test_D3_children_close_before_the_parent_when_a_branch_fails() -> None:
    rec, checker = Recorder(), TraceChecker()
    par = Parallel(a=Lambda(_fail("a broke"), name="a"), b=Lambda(_ident, name="b"), name="par")
    with sequential_run_ids(), pytest.raises(ValueError, match="a broke"):
        par.invoke("q", {"callbacks": [rec, checker], "max_concurrency": 1})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_start", 2, 1, ["map:key:a"], {}),
        ("on_chain_error", 2, 1, ["map:key:a"], None),
        ("on_chain_start", 3, 1, ["map:key:b"], {}),
        ("on_chain_end", 3, 1, ["map:key:b"], None),
        ("on_chain_error", 1, None, [], None),
    ]
    checker.check()


def _take_then_close(
    runnable: Runnable, config: RunnableConfig, mode: str, taken: list[Any], n: int = 1
) -> None:
    """Put the first ``n`` chunks of ``runnable.stream`` or ``astream`` (``mode``, a generator
    either way) on "q" in ``taken``, then close the stream early; what closing raises leaves."""
    if mode == "stream":
        stream = runnable.stream("q", config)
        assert isinstance(stream, Generator)
        taken.extend(next(stream) for _ in range(n))
        stream.close()
        return

    async def main() -> None:
        stream = runnable.astream("q", config)
        assert isinstance(stream, AsyncGenerator)
        taken.extend([await anext(stream) for _ in range(n)])
        await stream.aclose()

    asyncio.run(main())


def _nested(step: Runnable) -> Chain:
    """``outer`` (run 1 of `sequential_run_ids`): ``a`` (2), then ``inner`` (3): ``b`` (4), then
    ``step`` (5)."""
    inner = Chain(Lambda(_ident, name="b"), step, name="inner")
    return Chain(Lambda(_ident, name="a"), inner, name="outer")


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_D3_D5_a_stream_closed_early_errors_innermost_first(mode: str) -> None:
    """Closing a stream after its first chunk fails every open run with `GeneratorExit`,
    innermost first, for every kind of handler, sync and async, inline or not."""
    probes = _mixed_probes([])
    chain = _nested(LLM("one two three", name="llm"))
    taken: list[Any] = []
    with sequential_run_ids():
        _take_then_close(chain, {"callbacks": probes}, mode, taken)
    assert taken == ["one "]
    for probe in probes:
        assert _trace(probe.recorder) == [
            ("on_chain_start", 1, None, [], {}),
            ("on_chain_start", 2, 1, ["seq:step:1"], {}),
            ("on_chain_start", 3, 1, ["seq:step:2"], {}),  # at a's first chunk (R7)
            ("on_chain_start", 4, 3, ["seq:step:1"], {}),
            ("on_chain_end", 2, 1, ["seq:step:1"], None),
            ("on_chain_end", 4, 3, ["seq:step:1"], None),
            ("on_llm_start", 5, 3, ["seq:step:2"], {}),  # a model reads its whole input first
            ("on_llm_new_token", 5, 3, ["seq:step:2"], None),
            ("on_llm_error", 5, 3, ["seq:step:2"], None),
            ("on_chain_error", 3, 1, ["seq:step:2"], None),
            ("on_chain_error", 1, None, [], None),
        ], probe.label
        errors = _errors(probe.recorder)
        assert len(errors) == 3 and all(isinstance(e, GeneratorExit) for e in errors)
        probe.checker.check()


def test_D3_run_manager_ends_exactly_once() -> None:
    rec = Recorder()
    run = CallbackManager([rec]).on_chain_start({}, {})
    run.on_chain_end({"out": 1})
    with pytest.raises(RuntimeError):
        run.on_chain_error(ValueError("late"))
    with pytest.raises(TypeError):
        CallbackManager([rec]).on_chain_start({}, {}).on_tool_end("wrong kind")
    assert rec.events() == ["on_chain_start", "on_chain_end", "on_chain_start"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_D4_chat_start_falls_back_to_llm_start_with_rendered_messages(mode: str) -> None:
    """Under sync and async dispatch alike, for a subclass and a duck-typed handler."""
    subclass = _LLMStartOnly(raise_error=True)

    duck = _PromptsDuck()
    messages = [
        SystemMessage("be brief"),
        HumanMessage("hi"),
        AIMessage("hello"),
        ToolMessage("42"),
        HumanMessage("again"),
    ]
    rendered = "System: be brief\nHuman: hi\nAI: hello\nTool: 42\nHuman: again"
    config: RunnableConfig = {"callbacks": [subclass, duck]}
    with sequential_run_ids():
        if mode == "invoke":
            ChatModel("ok").invoke(messages, config)
        else:
            asyncio.run(ChatModel("ok").ainvoke(messages, config))
    assert subclass.seen == [("on_llm_start", [rendered], 1), ("on_llm_end", "ok", 1)]
    assert duck.prompts == [[rendered]]


def test_D4_fallback_obeys_ignore_llm() -> None:
    ignoring, listening = _LLMStartOnly(ignore_llm=True), _LLMStartOnly()
    with sequential_run_ids():
        Chain(Lambda(_ident, name="a"), ChatModel("ok")).invoke(
            "hi", {"callbacks": [ignoring, listening]}
        )
    assert ignoring.seen == [("on_chain_start", "hi", 1), ("on_chain_start", "hi", 2)]
    assert listening.seen == [
        ("on_chain_start", "hi", 1),
        ("on_chain_start", "hi", 2),
        ("on_llm_start", ["Human: hi"], 3),
        ("on_llm_end", "ok", 3),
    ]


def test_D4_not_implemented_elsewhere_is_an_ordinary_handler_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NotImpl(_LLMStartOnly):
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            raise NotImplementedError("no chains")

    quiet, strict = NotImpl(), NotImpl(raise_error=True)
    with caplog.at_level(logging.WARNING, logger="callbacks"), sequential_run_ids():
        assert Lambda(_ident, name="f").invoke("q", {"callbacks": [quiet]}) == "q"
    assert quiet.seen == []  # no fallback to on_llm_start
    assert caplog.record_tuples == [
        (
            "callbacks",
            logging.WARNING,
            f"error in NotImpl.on_chain_start callback for run {_U(1)}: "
            "NotImplementedError('no chains')",
        )
    ]
    with pytest.raises(NotImplementedError, match="no chains"):
        Lambda(_ident, name="f").invoke("q", {"callbacks": [strict]})
    assert strict.seen == []


def test_D2_D4_a_failing_fallback_is_an_ordinary_handler_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(_LLMStartOnly):
        def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
            raise ValueError("fallback broke")

    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="callbacks"), sequential_run_ids():
        assert ChatModel("ok").invoke("hi", {"callbacks": [Broken(), rec]}) == AIMessage("ok")
    assert [m for _, _, m in caplog.record_tuples] == [
        f"error in Broken.on_llm_start callback for run {_U(1)}: ValueError('fallback broke')"
    ]
    assert rec.events() == ["on_chat_model_start", "on_llm_end"]
    with pytest.raises(ValueError, match="fallback broke"):
        ChatModel("ok").invoke("hi", {"callbacks": [Broken(raise_error=True), rec]})
    assert rec.events()[2:] == ["on_chat_model_start", "on_llm_error"]  # D3


def test_D2_D4_the_first_raise_error_failure_wins_over_a_later_handlers_fallback() -> None:
    """A ``raise_error`` handler fails on a chat start; a later handler without
    ``on_chat_model_start`` then gets ``on_llm_start`` instead (D4), which goes well: the
    first failure is still the one raised, once everyone heard the start (D2)."""

    class Strict(BaseCallbackHandler):
        raise_error = True

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            raise KeyError("strict")

    legacy = _LLMStartOnly()
    with pytest.raises(KeyError, match="strict"):
        ChatModel("ok").invoke("hi", {"callbacks": [Strict(), legacy]})
    assert [event for event, *_ in legacy.seen] == ["on_llm_start"]


def test_D8_a_flag_that_raises_is_read_again_at_each_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flag whose reading fails is that handler's failure, logged each time: its methods
    are not resolved for the run (D1), so the next event reads it again; the others hear
    every event."""

    class Moody(Recorder):
        @property
        def ignore_retry(self) -> bool:  # type: ignore[override]
            raise LookupError("no flag today")

    moody, rec = Moody(), Recorder()
    run = CallbackManager([moody, rec]).on_chain_start({}, {})
    with caplog.at_level(logging.WARNING, logger="callbacks"):
        for _ in range(3):
            run.on_retry("state")
    assert [r.getMessage().split(" for run")[0] for r in caplog.records] == [
        "error in Moody.on_retry callback"
    ] * 3
    assert moody.events() == ["on_chain_start"]
    assert rec.events() == ["on_chain_start", "on_retry", "on_retry", "on_retry"]


def test_D7_no_handlers_no_ids_and_no_payloads() -> None:
    calls: list[str] = []

    class Loud:
        def __str__(self) -> str:
            calls.append("str")
            return "loud"

    def use(x: Any) -> int:
        return 1

    tool = Tool(use)
    rec = Recorder()
    with sequential_run_ids():
        Chain(Lambda(_ident, name="a"), tool).invoke(Loud())
        assert calls == []  # the tool's input_str was never built
        tool.invoke(Loud(), {"callbacks": [rec]})
    assert calls == ["str"]
    assert _trace(rec) == [
        ("on_tool_start", 1, None, [], {}),  # no id was spent on the unobserved runs
        ("on_tool_end", 1, None, [], None),
    ]


def test_D7_parent_ids_stay_truthful_in_an_unobserved_tree() -> None:
    local = Recorder("local")
    chain = Chain(Lambda(_ident, name="a"), LLM("x", callbacks=[local]))
    with sequential_run_ids():
        chain.invoke("q")
    # the LLM's id is needed first (1), then its parent's (2): numbering follows need
    assert _trace(local) == [
        ("on_llm_start", 1, 2, ["seq:step:2"], {}),
        ("on_llm_end", 1, 2, ["seq:step:2"], None),
    ]


# -- D8: observing changes nothing -----------------------------------------------------------------

_ALL_MODES = ("invoke", "stream", "batch", "ainvoke", "astream", "abatch")


def _in_mode(
    runnable: Runnable, value: Any, config: RunnableConfig, mode: str, timeout: float = 20
) -> tuple[Any, BaseException | None]:
    """``(output, None)`` or ``(None, what it raised)`` of one call in ``mode``, made in a
    thread: a call that hangs fails the test instead of hanging it."""
    outcome: list[tuple[Any, BaseException | None]] = []

    async def arun() -> Any:
        if mode == "ainvoke":
            return await runnable.ainvoke(value, config)
        if mode == "abatch":
            return (await runnable.abatch([value], config))[0]
        return [chunk async for chunk in runnable.astream(value, config)][-1]

    def call() -> None:
        try:
            if mode == "invoke":
                outcome.append((runnable.invoke(value, config), None))
            elif mode == "stream":
                outcome.append((list(runnable.stream(value, config))[-1], None))
            elif mode == "batch":
                outcome.append((runnable.batch([value], config)[0], None))
            else:
                outcome.append((asyncio.run(arun()), None))
        except BaseException as error:
            outcome.append((None, error))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{mode} hung"
    return outcome[0]


class _Stops(BaseCallbackHandler):
    """Its ``on_chain_start`` raises `StopIteration`, as ``next()`` on an exhausted iterator."""

    def __init__(self, *, raise_error: bool = False) -> None:
        self.raise_error = raise_error

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        next(iter(()))


class _AsyncStops(AsyncCallbackHandler):
    async def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        next(iter(()))


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_D8_a_handler_raising_stop_iteration_is_a_logged_failure_in_every_mode(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync handler's `StopIteration` used to hang ``ainvoke``, ``astream`` and ``abatch``:
    asyncio cannot set it on a future, and the wait swallowed every cancellation. Now it is a
    handler failure like any other: logged, the run goes on (D2), the same in every mode. (An
    async handler's is a `RuntimeError` already: Python converts it in the coroutine.)"""
    for handler, logged in ((_Stops(), "StopIteration()"), (_AsyncStops(), "RuntimeError(")):
        rec = Recorder()
        caplog.clear()
        config: RunnableConfig = {"callbacks": [handler, rec]}
        assert _in_mode(Lambda(_ident, name="f"), "x", config, mode) == ("x", None)
        assert rec.events() == ["on_chain_start", "on_chain_end"]
        (warning,) = [r.getMessage() for r in caplog.records]
        start = f"error in {type(handler).__name__}.on_chain_start callback for run "
        assert warning.startswith(start) and f": {logged}" in warning


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_D8_a_stop_iteration_that_leaves_a_call_is_the_same_runtime_error_in_every_mode(
    mode: str,
) -> None:
    """A `StopIteration` cannot cross a generator or coroutine (PEP 479), so no mode can raise
    it as itself: from a body or a ``raise_error`` handler it becomes one `RuntimeError` from
    it, at its source, in every mode; the runs close with that very object (R1)."""

    def stops(x: Any) -> Any:
        return next(iter(()))

    lam, tool = Lambda(stops, name="f"), Tool(stops, name="t")
    cases: list[tuple[Runnable, list[Any], str]] = [
        (lam, [], f"the function of {lam!r} raised StopIteration"),
        (tool, [], f"the function of {tool!r} raised StopIteration"),
        (Lambda(_ident), [_Stops(raise_error=True)], "_Stops.on_chain_start raised StopIteration"),
    ]
    for runnable, handlers, message in cases:
        rec = Recorder()
        _, raised = _in_mode(runnable, "x", {"callbacks": [*handlers, rec]}, mode)
        assert type(raised) is RuntimeError and str(raised) == message
        assert type(raised.__cause__) is StopIteration
        assert rec.records[-1].event.phase == "error" and rec.records[-1].args[0] is raised


class _BrokenFlags(Recorder):
    """A handler each of whose flags raises when read, and whose chain start fails."""

    @property
    def ignore_chain(self) -> bool:  # type: ignore[override]
        raise ValueError("ignore_chain broke")

    @property
    def raise_error(self) -> bool:  # type: ignore[override]
        raise ValueError("raise_error broke")

    @property
    def run_inline(self) -> bool:  # type: ignore[override]
        raise ValueError("run_inline broke")

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("start broke")


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_D8_a_flag_that_raises_is_that_handlers_failure_never_the_runs(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Flags are read under the same guard as the handler's methods: a flag that raises is a
    logged failure of that handler (D2), and the other handlers lose no event."""
    before, after = Recorder("before"), Recorder("after")
    chain = Lambda(_ident, name="a") | LLM("y")
    config: RunnableConfig = {"callbacks": [before, _BrokenFlags(), after]}
    assert _in_mode(chain, "x", config, mode) == ("y", None)
    expected = ["on_chain_start", "on_chain_start", "on_chain_end", "on_llm_start", "on_llm_end",
                "on_chain_end"]  # fmt: skip
    for rec in (before, after):
        assert [e for e in rec.events() if e != "on_llm_new_token"] == expected
    flag = "run_inline" if mode.startswith("a") else "ignore_chain"  # the first flag read
    kinds = {
        re.sub(r"for run \S+:", "for run <id>:", r.getMessage())
        for r in caplog.records
        if r.levelname == "WARNING"
    }
    assert kinds == {
        f"error in _BrokenFlags.on_chain_start callback for run <id>: ValueError('{flag} broke')",
        f"error in _BrokenFlags.on_chain_end callback for run <id>: ValueError('{flag} broke')",
        "error in _BrokenFlags.raise_error: ValueError('raise_error broke')",
    } | (
        {  # under async dispatch, run_inline is read for every event
            "error in _BrokenFlags.on_llm_start callback for run <id>: ValueError('run_inline broke')",
            "error in _BrokenFlags.on_llm_end callback for run <id>: ValueError('run_inline broke')",
        }
        | (
            {
                "error in _BrokenFlags.on_llm_new_token callback for run <id>: ValueError('run_inline broke')"
            }
            if mode == "astream"
            else set()
        )
        if mode.startswith("a")
        else set()
    )


class _Unprintable:
    """An input that fails wherever it is looked at: as text, as a message, as a sequence."""

    def __str__(self) -> str:
        raise ValueError("no text")

    @property
    def content(self) -> str:
        raise ValueError("no content")

    type = "human"


class _BadSequence(list[Any]):
    def __iter__(self) -> Any:
        raise ValueError("cannot iterate")


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_D8_attaching_a_passive_handler_changes_no_output_or_error(mode: str) -> None:
    """Start payloads are built only when someone listens (D7), so building one must not fail
    a call that succeeds unobserved: an input that cannot be shown is shown as its type and
    address."""
    cases: list[tuple[Runnable, Any]] = [
        (LLM("ok"), _Unprintable()),
        (LLM("ok"), _BadSequence([HumanMessage("a")])),
        (ChatModel("ok"), _Unprintable()),
        (ChatModel("ok"), [HumanMessage("a"), _Unprintable()]),
        (LLM("ok"), [HumanMessage(_Unprintable())]),  # type: ignore[arg-type]
        (Tool(lambda x: "done", name="t"), _Unprintable()),
    ]
    for runnable, value in cases:
        unobserved = _in_mode(runnable, value, {}, mode)
        rec = Recorder()
        assert _in_mode(runnable, value, {"callbacks": [rec]}, mode) == unobserved
        assert unobserved[1] is None
        assert [e for e in rec.events() if e != "on_llm_new_token"][-1].endswith("_end")


def test_D8_a_body_writing_into_its_manager_changes_no_other_call() -> None:
    """The manager a body receives is its own: writing into it leaks into no later call (a
    tenant id put there by one request must not tag the runs of the next)."""

    def writes(x: Any, config: RunnableConfig) -> Any:
        manager: Any = config["callbacks"]
        manager.metadata["tenant"] = "a"
        manager.inheritable_metadata["tenant"] = "a"
        return LLM("ok").invoke(x, config)

    Lambda(writes).invoke("q")  # a root call: its manager came from the module's empty one
    rec = Recorder()

    def reads(x: Any, config: RunnableConfig) -> Any:
        return LLM("ok").invoke(x, config)

    Lambda(reads).invoke("q", {"callbacks": [rec]})
    assert [r.metadata for r in rec.records if r.event.phase == "start"] == [{}, {}]
    assert callbacks._EMPTY.metadata == callbacks._EMPTY.inheritable_metadata == {}


class _Bare:
    """A duck-typed handler: no base class, no flags at all, only the methods it has."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        self.log.append(("start", threading.current_thread() is threading.main_thread()))

    def on_chain_end(self, outputs: Any, **kw: Any) -> None:
        raise ValueError("bare handler broke")


def test_D1_D2_D5_a_handler_without_flags_is_not_inline_and_does_not_raise() -> None:
    """Flags default to False: a flagless handler's failure is only logged (D2), a handler
    missing a method does not stop delivery to the next one (D1), and under ``ainvoke`` a
    flagless sync handler runs in a worker thread, not inline (D5)."""
    log: list[tuple[str, Any]] = []
    rec = Recorder()
    assert Lambda(_ident).invoke(1, {"callbacks": [_Bare(log), rec]}) == 1
    assert rec.events() == ["on_chain_start", "on_chain_end"]
    assert ChatModel("ok").invoke("q", {"callbacks": [_Bare(log), rec]}) == AIMessage("ok")
    assert rec.events()[2:] == ["on_chat_model_start", "on_llm_end"]  # _Bare lacks both
    assert asyncio.run(Lambda(_ident).ainvoke(1, {"callbacks": [_Bare(log)]})) == 1
    assert log == [("start", True), ("start", False)]


def test_D2_D5_under_async_dispatch_the_first_raise_error_failure_wins_and_interrupts_outrank() -> (
    None
):
    first, second = ValueError("first"), ValueError("second")
    interrupt = KeyboardInterrupt("stop")

    def run(*handlers: _Shared) -> BaseException | None:
        return _drive(Lambda(_ident, name="f"), {"callbacks": list(handlers)}, "ainvoke")

    log: list[_LogEntry] = []
    a = _Shared("a", log, fail=("on_chain_start", None, first), raise_error=True)
    b = _Shared("b", log, fail=("on_chain_start", None, second), raise_error=True)
    assert run(a, b) is first
    c = _Shared("c", log, fail=("on_chain_start", None, interrupt))
    assert run(a, c) is interrupt


# ===============================================================================================
# Managers: scoping and inheritance (S1-S9)
# ===============================================================================================


def test_S1_request_callbacks_reach_every_descendant() -> None:
    rec = Recorder()
    llm = LLM("deep answer", name="llm")
    inner = Chain(Lambda(_ident, name="inner_step"), llm, name="inner")

    def call_inner(x: str) -> Any:
        return inner.invoke(x)

    outer = Chain(Lambda(_ident, name="first"), Lambda(call_inner, name="middle"), name="outer")
    with sequential_run_ids():
        assert outer.invoke("q", {"callbacks": [rec]}) == "deep answer"
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_start", 2, 1, ["seq:step:1"], {}),
        ("on_chain_end", 2, 1, ["seq:step:1"], None),
        ("on_chain_start", 3, 1, ["seq:step:2"], {}),
        ("on_chain_start", 4, 3, [], {}),
        ("on_chain_start", 5, 4, ["seq:step:1"], {}),
        ("on_chain_end", 5, 4, ["seq:step:1"], None),
        ("on_llm_start", 6, 4, ["seq:step:2"], {}),
        ("on_llm_end", 6, 4, ["seq:step:2"], None),
        ("on_chain_end", 4, 3, [], None),
        ("on_chain_end", 3, 1, ["seq:step:2"], None),
        ("on_chain_end", 1, None, [], None),
    ]
    assert _names(rec) == [
        (1, "outer"),
        (2, "first"),
        (3, "middle"),
        (4, "inner"),
        (5, "inner_step"),
        (6, "llm"),
    ]


def test_S2_constructor_callbacks_are_local_to_a_leaf() -> None:
    request, local = Recorder("request"), Recorder("local")
    chain = Chain(Lambda(_ident, name="a"), LLM("out", callbacks=[local]))
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [request]})
    # the LLM's handler sees the LLM run only, never its parent chain or sibling
    assert _trace(local) == [
        ("on_llm_start", 3, 1, ["seq:step:2"], {}),
        ("on_llm_end", 3, 1, ["seq:step:2"], None),
    ]
    assert request.events() == [
        "on_chain_start",
        "on_chain_start",
        "on_chain_end",
        "on_llm_start",
        "on_llm_end",
        "on_chain_end",
    ]


def test_S2_constructor_callbacks_of_a_chain_do_not_see_children() -> None:
    local = Recorder("local")
    inner_llm = LLM("x")
    chain = Chain(Lambda(_ident, name="a"), inner_llm, callbacks=[local])
    with sequential_run_ids():
        chain.invoke("q")
    assert _trace(local) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_end", 1, None, [], None),
    ]


def test_S2_constructor_callbacks_do_not_see_the_parent_of_a_nested_call() -> None:
    local = Recorder("local")
    llm = LLM("x", callbacks=[local])
    outer = Lambda(lambda x: llm.invoke(x), name="outer")
    with sequential_run_ids():
        outer.invoke("q")
        outer.invoke("q")
    # each LLM run is a child of its (unobserved) outer run, whose id is made on need
    assert _trace(local) == [
        ("on_llm_start", 1, 2, [], {}),
        ("on_llm_end", 1, 2, [], None),
        ("on_llm_start", 3, 4, [], {}),
        ("on_llm_end", 3, 4, [], None),
    ]


def test_S3_request_tags_and_metadata_are_inherited_constructor_ones_are_local() -> None:
    rec = Recorder()
    chain = Chain(
        Lambda(_ident, name="a", tags=["step-ctor"], metadata={"step": "ctor"}),
        LLM("x"),
        tags=["chain-ctor"],
        metadata={"chain": "ctor"},
    )
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [rec], "tags": ["req"], "metadata": {"r": 1}})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["req", "chain-ctor"], {"r": 1, "chain": "ctor"}),
        ("on_chain_start", 2, 1, ["req", "seq:step:1", "step-ctor"], {"r": 1, "step": "ctor"}),
        ("on_chain_end", 2, 1, ["req", "seq:step:1", "step-ctor"], None),
        ("on_llm_start", 3, 1, ["req", "seq:step:2"], {"r": 1}),
        ("on_llm_end", 3, 1, ["req", "seq:step:2"], None),
        ("on_chain_end", 1, None, ["req", "chain-ctor"], None),
    ]


def test_S4_get_child_takes_the_inheritable_half_and_a_local_tag() -> None:
    inherited, local = Recorder("inherited"), Recorder("local")
    manager = CallbackManager.configure(
        inheritable_callbacks=[inherited],
        local_callbacks=[local],
        inheritable_tags=["it"],
        local_tags=["lt"],
        inheritable_metadata={"im": 1},
        local_metadata={"lm": 2},
    )
    with sequential_run_ids():
        run = manager.on_chain_start({"name": "root"}, {"x": 1})
        assert run.handlers == [inherited, local]  # read: now the run's own lists
        child = run.get_child("seq:step:2")
        assert child.handlers == [inherited]  # LangChain's lists (S12)
        assert child.inheritable_handlers == [inherited]
        assert child.tags == ["it", "seq:step:2"]
        assert child.inheritable_tags == ["it"]
        assert child.metadata == {"im": 1}
        assert child.inheritable_metadata == {"im": 1}
        assert child.parent_run_id == run.run_id == _U(1)
        child_run = child.on_chain_start({"name": "child"}, {"x": 1})
        grandchild = child_run.get_child()
        assert grandchild.tags == ["it"]
        assert grandchild.parent_run_id == child_run.run_id == _U(2)
        grandchild_run = grandchild.on_chain_start({"name": "grandchild"}, {"x": 1})
        grandchild_run.on_chain_end({"out": 3})
        child_run.on_chain_end({"out": 2})
        run.on_chain_end({"out": 1})
    assert _trace(inherited) == [
        ("on_chain_start", 1, None, ["it", "lt"], {"im": 1, "lm": 2}),
        ("on_chain_start", 2, 1, ["it", "seq:step:2"], {"im": 1}),
        ("on_chain_start", 3, 2, ["it"], {"im": 1}),
        ("on_chain_end", 3, 2, ["it"], None),
        ("on_chain_end", 2, 1, ["it", "seq:step:2"], None),
        ("on_chain_end", 1, None, ["it", "lt"], None),
    ]
    assert _trace(local) == [
        ("on_chain_start", 1, None, ["it", "lt"], {"im": 1, "lm": 2}),
        ("on_chain_end", 1, None, ["it", "lt"], None),
    ]


def test_S5_request_handlers_in_order_then_constructor_handlers() -> None:
    log: list[_LogEntry] = []
    h1, h2, h3, h4 = (_Shared(label, log) for label in ("h1", "h2", "h3", "h4"))
    llm = LLM("x", callbacks=[h3, h4])
    with sequential_run_ids():
        llm.invoke("q", {"callbacks": [h2, h1]})
    assert log == [
        ("h2", "on_llm_start", 1),
        ("h1", "on_llm_start", 1),
        ("h3", "on_llm_start", 1),
        ("h4", "on_llm_start", 1),
        ("h2", "on_llm_end", 1),
        ("h1", "on_llm_end", 1),
        ("h3", "on_llm_end", 1),
        ("h4", "on_llm_end", 1),
    ]


def test_S5_configure_puts_inheritable_before_local() -> None:
    log: list[_LogEntry] = []
    a, b, c = (_Shared(label, log) for label in ("a", "b", "c"))
    manager = CallbackManager.configure(inheritable_callbacks=[b, a], local_callbacks=[c])
    assert list(manager.handlers) == [b, a, c]
    assert list(manager.inheritable_handlers) == [b, a]
    manager.add_handler(c, inherit=True)  # already there: keeps its place, becomes inheritable
    assert list(manager.handlers) == [b, a, c]
    assert list(manager.inheritable_handlers) == [b, a, c]


def test_S5_manager_constructor_keeps_the_order_given() -> None:
    a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
    manager = CallbackManager([a, b], [b, c], tags=["x", "y"], inheritable_tags=["y", "z"])
    assert (list(manager.handlers), list(manager.inheritable_handlers)) == ([a, b, c], [b, c])
    assert (list(manager.tags), list(manager.inheritable_tags)) == (["x", "y", "z"], ["y", "z"])
    manager = CallbackManager(metadata={"k": "run"}, inheritable_metadata={"k": "kids", "j": 1})
    metadata = (manager.metadata, manager.inheritable_metadata)
    assert metadata == ({"k": "run", "j": 1}, {"k": "kids", "j": 1})


def test_S6_handler_listed_twice_at_request_time_is_called_once() -> None:
    log: list[_LogEntry] = []
    h = _Shared("h", log)
    chain = Chain(Lambda(_ident, name="a"), LLM("x", callbacks=[h]), callbacks=[h])
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [h, h]})
    assert log == [
        ("h", "on_chain_start", 1),
        ("h", "on_chain_start", 2),
        ("h", "on_chain_end", 2),
        ("h", "on_llm_start", 3),
        ("h", "on_llm_end", 3),
        ("h", "on_chain_end", 1),
    ]


def test_S6_manager_dedupes_by_identity() -> None:
    log: list[_LogEntry] = []
    h, twin = _Shared("h", log), _Shared("h", log)
    manager = CallbackManager([h, h], [h])
    manager.add_handler(h)
    manager.add_handler(h, inherit=False)
    manager.add_handlers([twin, h])
    assert list(manager.handlers) == [h, twin]
    assert list(manager.inheritable_handlers) == [h, twin]
    manager.remove_handler(h)
    assert manager.handlers == manager.inheritable_handlers == [twin]
    manager.remove_handler(h)  # not there: nothing to do, as in LangChain (S12)
    assert manager.handlers == [twin]


def test_S7_tags_are_an_ordered_set() -> None:
    manager = CallbackManager()
    manager.add_tags(["a", "b", "a"])
    manager.add_tags(["c", "a"], inherit=False)
    assert manager.tags == ["a", "b", "c"]
    assert manager.inheritable_tags == ["a", "b"]
    rec = Recorder()
    with sequential_run_ids():
        Lambda(_ident, name="f", tags=["y", "x"]).invoke(
            "q", {"callbacks": [rec], "tags": ["x", "z", "x"]}
        )
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["x", "z", "y"], {}),
        ("on_chain_end", 1, None, ["x", "z", "y"], None),
    ]


def test_S7_a_local_tag_never_removes_an_inheritable_one() -> None:
    manager = CallbackManager.configure(inheritable_tags=["shared"], local_tags=["shared", "loc"])
    assert manager.tags == ["shared", "loc"]
    assert manager.inheritable_tags == ["shared"]
    rec = Recorder()
    chain = Chain(Lambda(_ident, name="a"), tags=["shared", "loc"], name="c")
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [rec], "tags": ["shared"]})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["shared", "loc"], {}),
        ("on_chain_start", 2, 1, ["shared", "seq:step:1"], {}),
        ("on_chain_end", 2, 1, ["shared", "seq:step:1"], None),
        ("on_chain_end", 1, None, ["shared", "loc"], None),
    ]


def test_S8_metadata_request_then_nested_then_constructor() -> None:
    rec = Recorder()
    inner = Chain(Lambda(_ident, name="leaf"), name="inner", metadata={"k": "ctor", "c": 3})

    def nested(x: str) -> Any:
        return inner.invoke(x, {"metadata": {"k": "nested", "n": 2}})

    outer = Lambda(nested, name="outer")
    with sequential_run_ids():
        outer.invoke("q", {"callbacks": [rec], "metadata": {"k": "req", "r": 1}})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {"k": "req", "r": 1}),
        ("on_chain_start", 2, 1, [], {"k": "ctor", "r": 1, "n": 2, "c": 3}),
        ("on_chain_start", 3, 2, ["seq:step:1"], {"k": "nested", "r": 1, "n": 2}),
        ("on_chain_end", 3, 2, ["seq:step:1"], None),
        ("on_chain_end", 2, 1, [], None),
        ("on_chain_end", 1, None, [], None),
    ]


def test_S8_manager_metadata_merges_key_by_key() -> None:
    manager = CallbackManager.configure(
        inheritable_metadata={"k": "inh", "i": 1}, local_metadata={"k": "loc", "l": 2}
    )
    assert manager.metadata == {"k": "loc", "i": 1, "l": 2}
    assert manager.inheritable_metadata == {"k": "inh", "i": 1}
    manager.add_metadata({"i": 10})
    assert manager.metadata == {"k": "loc", "i": 10, "l": 2}
    assert manager.inheritable_metadata == {"k": "inh", "i": 10}
    run = manager.on_chain_start({}, {})
    assert run.get_child().metadata == {"k": "inh", "i": 10}


def test_S9_bound_callbacks_are_inheritable() -> None:
    rec = Recorder()
    chain = Chain(Lambda(_ident, name="a"), LLM("x"), name="c").with_config(callbacks=[rec])
    with sequential_run_ids():
        chain.invoke("q")
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_start", 2, 1, ["seq:step:1"], {}),
        ("on_chain_end", 2, 1, ["seq:step:1"], None),
        ("on_llm_start", 3, 1, ["seq:step:2"], {}),
        ("on_llm_end", 3, 1, ["seq:step:2"], None),
        ("on_chain_end", 1, None, [], None),
    ]


def test_S9_bound_and_request_values_merge() -> None:
    log: list[_LogEntry] = []
    h1, h2 = _Shared("h1", log), _Shared("h2", log)
    rec = Recorder()
    bound = (
        Lambda(_ident, name="f")
        .with_config(callbacks=[h1, rec], tags=["b", "shared"])
        .with_config(tags=["b2", "b"])
    )
    with sequential_run_ids():
        bound.invoke("q", {"callbacks": [h2, h1], "tags": ["shared", "r"]})
    assert log == [
        ("h1", "on_chain_start", 1),
        ("h2", "on_chain_start", 1),
        ("h1", "on_chain_end", 1),
        ("h2", "on_chain_end", 1),
    ]
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["b", "shared", "b2", "r"], {}),
        ("on_chain_end", 1, None, ["b", "shared", "b2", "r"], None),
    ]


def test_S9_metadata_call_beats_binding_beats_inherited() -> None:
    rec = Recorder()
    bound = Lambda(_ident, name="bound").with_config(metadata={"k": "bound", "b": 2})

    def body(x: str) -> Any:
        bound.invoke(x)
        return bound.invoke(x, {"metadata": {"k": "call"}})

    outer = Lambda(body, name="outer")
    with sequential_run_ids():
        outer.invoke("q", {"callbacks": [rec], "metadata": {"k": "inherited", "i": 1}})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {"k": "inherited", "i": 1}),
        ("on_chain_start", 2, 1, [], {"k": "bound", "i": 1, "b": 2}),
        ("on_chain_end", 2, 1, [], None),
        ("on_chain_start", 3, 1, [], {"k": "call", "i": 1, "b": 2}),
        ("on_chain_end", 3, 1, [], None),
        ("on_chain_end", 1, None, [], None),
    ]


def test_S9_bound_runnable_invoked_without_config_stays_a_child() -> None:
    outer_rec, bound_rec = Recorder("outer"), Recorder("bound")
    llm = LLM("x", name="llm")
    bound = Lambda(lambda x: llm.invoke(x), name="bound").with_config(callbacks=[bound_rec])
    outer = Lambda(lambda x: bound.invoke(x), name="outer")
    with sequential_run_ids():
        outer.invoke("q", {"callbacks": [outer_rec], "tags": ["t"]})
    assert _trace(outer_rec) == [
        ("on_chain_start", 1, None, ["t"], {}),
        ("on_chain_start", 2, 1, ["t"], {}),
        ("on_llm_start", 3, 2, ["t"], {}),
        ("on_llm_end", 3, 2, ["t"], None),
        ("on_chain_end", 2, 1, ["t"], None),
        ("on_chain_end", 1, None, ["t"], None),
    ]
    assert _trace(bound_rec) == _trace(outer_rec)[1:5]  # the bound run and its child


class ManagerMachine(RuleBasedStateMachine):
    """Drives one `CallbackManager` (then its children) and a plain model side by side.

    The model keeps handlers and tags as lists (ordered sets) and metadata as dicts, split
    into current and inheritable. After every step the manager must equal the model, and a
    run started from it must reach exactly the current handlers with the current tags and
    metadata (D1, S5).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = [Recorder(f"h{i}") for i in range(3)]
        self.manager = CallbackManager()
        self.handlers: list[Recorder] = []
        self.inh_handlers: list[Recorder] = []
        self.tags: list[str] = []
        self.inh_tags: list[str] = []
        self.md: dict[str, int] = {}
        self.inh_md: dict[str, int] = {}
        self.parent: uuid.UUID | None = None

    @rule(i=st.integers(0, 2), inherit=st.booleans())
    def add_handler(self, i: int, inherit: bool) -> None:
        h = self.pool[i]
        self.manager.add_handler(h, inherit=inherit)
        if h not in self.handlers:
            self.handlers.append(h)
        if inherit and h not in self.inh_handlers:
            self.inh_handlers.append(h)

    @rule(i=st.integers(0, 2))
    def remove_handler(self, i: int) -> None:
        h = self.pool[i]
        self.manager.remove_handler(h)  # absent: nothing to do, as in LangChain (S12)
        self.handlers = [x for x in self.handlers if x is not h]
        self.inh_handlers = [x for x in self.inh_handlers if x is not h]

    @rule(ids=st.lists(st.integers(0, 2), max_size=3), inherit=st.booleans())
    def set_handlers(self, ids: list[int], inherit: bool) -> None:
        handlers = [self.pool[i] for i in ids]
        self.manager.set_handlers(handlers, inherit=inherit)
        self.handlers = list(dict.fromkeys(handlers))  # each once, in order (S6)
        self.inh_handlers = list(self.handlers) if inherit else []

    @rule(i=st.integers(0, 2))
    def append_to_the_list_itself(self, i: int) -> None:
        """LangChain code changes the lists in place (S12)."""
        h = self.pool[i]
        if h not in self.handlers:
            self.manager.handlers.append(h)
            self.handlers.append(h)

    @rule(
        ids=st.lists(st.integers(0, 2), max_size=2),
        tags=st.lists(st.sampled_from(["a", "b", "d"]), max_size=2),
        md=st.dictionaries(st.sampled_from("xw"), st.integers(0, 2), max_size=1),
    )
    def merge(self, ids: list[int], tags: list[str], md: dict[str, int]) -> None:
        """``merge`` keeps both managers' order, each value once (S6, S7, S12)."""
        other = CallbackManager([self.pool[i] for i in ids], tags=tags, metadata=md)
        merged = self.manager.merge(other)
        assert merged is not self.manager and merged is not other
        self.manager = merged
        for h in (self.pool[i] for i in ids):
            if h not in self.handlers:
                self.handlers.append(h)
        self.tags += [t for t in dict.fromkeys(tags) if t not in self.tags]
        self.md.update(md)

    @rule()
    def copy(self) -> None:
        """A copy is independent: changing it leaves the original as it was (S12, D8)."""
        copy_ = self.manager.copy()
        copy_.add_tags(["copy-only"])
        copy_.metadata["copy-only"] = 1
        copy_.handlers.clear()
        self.manager_matches_model()
        self.manager = self.manager.copy()

    @rule(tags=st.lists(st.sampled_from(["a", "b", "c"]), max_size=3), inherit=st.booleans())
    def add_tags(self, tags: list[str], inherit: bool) -> None:
        self.manager.add_tags(tags, inherit=inherit)
        for t in tags:
            if t not in self.tags:
                self.tags.append(t)
            if inherit and t not in self.inh_tags:
                self.inh_tags.append(t)

    @rule(tags=st.lists(st.sampled_from(["a", "b", "c"]), max_size=2))
    def remove_tags(self, tags: list[str]) -> None:
        self.manager.remove_tags(tags)
        self.tags = [t for t in self.tags if t not in tags]
        self.inh_tags = [t for t in self.inh_tags if t not in tags]

    @rule(
        md=st.dictionaries(st.sampled_from("xyz"), st.integers(0, 2), max_size=2),
        inherit=st.booleans(),
    )
    def add_metadata(self, md: dict[str, int], inherit: bool) -> None:
        self.manager.add_metadata(md, inherit=inherit)
        self.md.update(md)
        if inherit:
            self.inh_md.update(md)

    @rule(tag=st.none() | st.sampled_from(["a", "step"]))
    def get_child(self, tag: str | None) -> None:
        run = self.manager.on_chain_start({"name": "parent"}, "in")
        self.manager = run.get_child(tag)
        run.on_chain_end("out")
        self.parent = run.run_id
        self.handlers = list(self.inh_handlers)
        self.tags = list(self.inh_tags) + ([tag] if tag and tag not in self.inh_tags else [])
        self.md = dict(self.inh_md)
        for h in self.pool:
            h.records.clear()

    @rule()
    def dispatch(self) -> None:
        run = self.manager.on_chain_start({"name": "probe"}, "in")
        run.on_text("hello")
        run.on_chain_end("out")
        for h in self.pool:
            want = (
                [
                    ("on_chain_start", self.tags, self.md),
                    ("on_text", self.tags, None),
                    ("on_chain_end", self.tags, None),
                ]
                if h in self.handlers
                else []
            )
            got = [(r.event.method, r.tags, r.metadata) for r in h.records]
            assert got == want
            assert all(r.run_id == run.run_id and r.parent_run_id == self.parent for r in h.records)
            h.records.clear()

    @invariant()
    def manager_matches_model(self) -> None:
        m = self.manager
        assert m.handlers == self.handlers  # lists, as LangChain's (S12)
        assert m.inheritable_handlers == self.inh_handlers
        assert m.tags == self.tags
        assert m.inheritable_tags == self.inh_tags
        assert m.metadata == self.md
        assert m.inheritable_metadata == self.inh_md
        assert m.parent_run_id == self.parent
        assert set(map(id, m.inheritable_handlers)) <= set(map(id, m.handlers))
        assert set(m.inheritable_tags) <= set(m.tags)


TestManagerMachine = ManagerMachine.TestCase


def _manager_api_script(manager_class: Any, handler_class: type) -> list[tuple[str, Any]]:
    """What code written for langchain_core does with a callback manager, step by step: the
    manager's six fields after each step (handlers by label). Run on both libraries (S12)."""

    class Named(handler_class):  # type: ignore[misc]
        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

    a, b, c = Named("a"), Named("b"), Named("c")

    def fields(m: Any) -> tuple[Any, ...]:
        return (
            [h.label for h in m.handlers],
            [h.label for h in m.inheritable_handlers],
            list(m.tags),
            list(m.inheritable_tags),
            dict(m.metadata),
            dict(m.inheritable_metadata),
        )

    steps: list[tuple[str, Any]] = []
    m = manager_class.configure([a], [b], False, ["req"], ["local"], {"k": 1}, {"l": 2})
    steps.append(("configure", fields(m)))
    m.add_handler(c, False)
    steps.append(("add_handler", fields(m)))
    m.remove_handler(a)
    steps.append(("remove_handler", fields(m)))
    m.set_handlers([b, c])
    steps.append(("set_handlers", fields(m)))
    m.set_handler(a, False)
    steps.append(("set_handler", fields(m)))
    m.add_tags(["x"])
    m.add_tags(["y"], False)
    m.remove_tags(["req"])
    steps.append(("tags", fields(m)))
    m.add_metadata({"k": 3}, False)
    m.remove_metadata(["l"])
    steps.append(("metadata", fields(m)))
    copy = m.copy()
    copy.add_tags(["copy"])
    copy.handlers.append(b)
    steps.append(("copy", (fields(m), fields(copy), copy.parent_run_id is m.parent_run_id)))
    m.handlers.append(c)
    m.tags.append("appended")
    m.metadata["in place"] = 1
    steps.append(("in place", fields(m)))
    run = m.on_chain_start({"name": "x"}, {"in": 1})
    child = run.get_child("step:1")
    steps.append(("get_child", (fields(child), child.parent_run_id == run.run_id)))
    run.on_chain_end({"out": 1})
    steps.append(("is_async", (m.is_async, type(m).__name__)))
    return steps


def test_S12_code_written_for_langchains_manager_sees_the_same_lists() -> None:
    """Each step of the script leaves the fields as langchain_core 1.7 leaves them (the
    portability section runs the same script on langchain_core and compares)."""
    steps = dict(_manager_api_script(CallbackManager, BaseCallbackHandler))
    assert steps == _MANAGER_API_EXPECTED
    m = CallbackManager.configure([Recorder()], inheritable_tags=["t"])
    fields = (m.handlers, m.inheritable_handlers, m.tags, m.inheritable_tags)
    assert [type(f) for f in fields] == [list] * 4
    assert type(m.metadata) is type(m.inheritable_metadata) is dict


_MANAGER_API_EXPECTED: dict[str, Any] = {
    "configure": (["a", "b"], ["a"], ["req", "local"], ["req"], {"k": 1, "l": 2}, {"k": 1}),
    "add_handler": (["a", "b", "c"], ["a"], ["req", "local"], ["req"], {"k": 1, "l": 2}, {"k": 1}),
    "remove_handler": (["b", "c"], [], ["req", "local"], ["req"], {"k": 1, "l": 2}, {"k": 1}),
    "set_handlers": (["b", "c"], ["b", "c"], ["req", "local"], ["req"], {"k": 1, "l": 2}, {"k": 1}),
    "set_handler": (["a"], [], ["req", "local"], ["req"], {"k": 1, "l": 2}, {"k": 1}),
    "tags": (["a"], [], ["local", "x", "y"], ["x"], {"k": 1, "l": 2}, {"k": 1}),
    "metadata": (["a"], [], ["local", "x", "y"], ["x"], {"k": 3}, {"k": 1}),
    "copy": (
        (["a"], [], ["local", "x", "y"], ["x"], {"k": 3}, {"k": 1}),
        (["a", "b"], [], ["local", "x", "y", "copy"], ["x", "copy"], {"k": 3}, {"k": 1}),
        True,
    ),
    "in place": (
        ["a", "c"],
        [],
        ["local", "x", "y", "appended"],
        ["x"],
        {"k": 3, "in place": 1},
        {"k": 1},
    ),
    "get_child": (([], [], ["x", "step:1"], ["x"], {"k": 1}, {"k": 1}), True),
    "is_async": (False, "CallbackManager"),
}


def test_S12_fields_are_assigned_and_the_parent_set_as_in_langchain() -> None:
    """LangChain code assigns the fields and ``parent_run_id`` of a fresh manager; each is
    checked as the constructor checks it, and ``merge`` takes only a manager."""
    h, g = Recorder("h"), Recorder("g")
    parent = uuid.uuid4()
    m = CallbackManager()
    m.handlers = [h]
    m.metadata = {"k": 1}
    m.parent_run_id = parent
    fresh = CallbackManager()
    fresh.set_handlers([g, h], inherit=False)
    other = CallbackManager()
    other.add_metadata({"j": 2})
    run = m.merge(fresh).merge(other).on_chain_start({"name": "x"}, 1)
    assert (run.handlers, run.parent_run_id, run.metadata) == ([h, g], parent, {"k": 1, "j": 2})
    tags = m.tags
    m.set_handler(g)  # inheritable by default
    m.add_metadata({"j": 2})
    m.handlers = [h]
    tags.append("t")  # still the manager's own list, as in LangChain
    assert (m.handlers, m.inheritable_handlers, m.tags) == ([h], [g], ["t"])
    heir = CallbackManager([], [g], parent, inheritable_tags=["i"], inheritable_metadata={"i": 1})
    merged = CallbackManager().merge(heir)
    fields = (merged.inheritable_handlers, merged.inheritable_tags, merged.inheritable_metadata)
    assert (*fields, merged.parent_run_id) == ([g], ["i"], {"i": 1}, parent)
    for name, value in (("inheritable_handlers", [42]), ("inheritable_tags", [7])):
        with pytest.raises(TypeError, match=f"^{name}\\[0\\]"):
            setattr(m, name, value)
    with pytest.raises(TypeError, match=r"^inheritable_metadata keys must be strings"):
        m.inheritable_metadata = {1: 2}  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"^metadata keys must be strings, got 1 \(int\)$"):
        m.metadata = {1: 2}  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"^parent_run_id must be a uuid.UUID or None, got 'p'"):
        m.parent_run_id = "p"  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"^merge\(\) takes a callback manager, got a list$"):
        m.merge([h])  # type: ignore[arg-type]
    public = {name for name, _ in inspect.getmembers(CallbackManager) if name[0] != "_"}
    assert {"handlers", "inheritable_tags", "metadata", "parent_run_id"} <= public


class _EqualToAll(BaseCallbackHandler):
    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


def test_S12_S6_S7_an_item_appended_twice_to_a_field_is_heard_once_and_checked() -> None:
    """The lists are the manager's own to change in place; a run started from it takes each
    handler and tag once (S6, S7), and refuses, naming it, an element that is no handler or tag,
    before any handler hears anything."""
    h = Recorder()
    m = CallbackManager()
    m.handlers.extend([h, h])
    m.tags.extend(["t", "t"])
    m.on_chain_start({"name": "x"}, 1).on_chain_end(2)
    heard = [(r.event.method, r.tags) for r in h.records]
    assert heard == [("on_chain_start", ["t"]), ("on_chain_end", ["t"])]
    twins, tag = [_EqualToAll(), _EqualToAll()], "".join(["ta", "g"])  # equal, not the same
    m.handlers.extend(twins)
    m.inheritable_handlers.extend(twins)
    m.tags.extend(["tag", tag])
    m.inheritable_tags.extend(["tag", tag])
    run = m.on_chain_start({}, 1)
    assert (run._handlers, run.get_child()._handlers) == ((h, *twins), (*twins,))  # S6
    assert (run._tags, run.get_child()._tags) == (("t", "tag"), ("tag",))  # by equality (S7)
    fresh = CallbackManager()
    fresh.add_handlers(twins)
    fresh.add_tags(["tag", tag])
    ids = [[*map(id, fresh.handlers)], [*map(id, fresh.inheritable_handlers)]]
    assert (ids, fresh.tags, fresh.inheritable_tags) == ([[*map(id, twins)]] * 2, ["tag"], ["tag"])
    for field, value, message in (
        ("handlers", 42, r"handlers\[\d\]: expected a callback handler.*\(int\)"),
        ("tags", 7, r"tags\[\d\] must be a string, got 7 \(int\)"),
        ("inheritable_handlers", 42, r"inheritable_handlers\[\d\]: expected a callback"),
        ("inheritable_tags", 7, r"inheritable_tags\[\d\] must be a string"),
    ):
        getattr(m, field).append(value)
        with pytest.raises(TypeError, match=f"^{message}"):
            m.on_chain_start({"name": "x"}, 1)
        getattr(m, field).pop()
    m.inheritable_metadata[1] = 2  # type: ignore[index]
    with pytest.raises(TypeError, match=r"^inheritable_metadata keys must be strings"):
        m.on_chain_start({"name": "x"}, 1)
    assert len(h.records) == 3  # the start with twins; none of the refused ones
    with pytest.raises(TypeError, match=r"^tags must be a list of strings, got 'ab' \(str\)$"):
        m.tags = "ab"  # type: ignore[assignment]


def test_S12_D8_a_manager_changed_in_place_changes_no_other_manager_or_run() -> None:
    """A child manager's lists and dicts are its own: writing to them reaches the runs it starts
    and nothing else: not its sibling, not the parent run, not a later call (D8)."""
    h, late = Recorder("h"), Recorder("late")
    root = CallbackManager.configure([h], inheritable_tags=["req"], inheritable_metadata={"k": 1})
    parent = root.on_chain_start({"name": "parent"}, 1)
    first, second = parent.get_child("step:1"), parent.get_child("step:2")
    first.handlers.append(late)
    first.tags.append("first-only")
    first.metadata["tenant"] = "a"
    first.on_chain_start({"name": "one"}, 1).on_chain_end(1)
    second.on_chain_start({"name": "two"}, 1).on_chain_end(1)
    parent.on_chain_end(1)
    starts = [
        (r.args[0]["name"], r.tags, r.metadata) for r in h.records if r.event.phase == "start"
    ]
    assert starts == [
        ("parent", ["req"], {"k": 1}),
        ("one", ["req", "step:1", "first-only"], {"k": 1, "tenant": "a"}),
        ("two", ["req", "step:2"], {"k": 1}),
    ]
    one = h.records[1].run_id
    heard = [(r.event.method, r.run_id) for r in late.records]
    assert heard == [("on_chain_start", one), ("on_chain_end", one)]
    assert (parent.tags, parent.metadata, second.handlers) == (["req"], {"k": 1}, [h])
    assert Chain(Lambda(lambda x: x)).invoke(1, {"callbacks": [h]}) == 1
    assert all("tenant" not in (r.metadata or {}) for r in h.records[-4:])


def test_S12_a_manager_sends_a_custom_event_to_its_handlers_as_langchain_s_does() -> None:
    """``on_custom_event`` on a manager: every handler hears it, with the ``run_id`` given (else
    a new one), the manager's tags and metadata; another keyword is a `ValueError`."""
    h = Recorder()
    rid = uuid.uuid4()
    m = CallbackManager([h], tags=["t"], metadata={"k": 1})
    m.on_custom_event("progress", {"done": 1}, run_id=rid)
    m.on_custom_event("progress", 2)
    asyncio.run(AsyncCallbackManager([h]).on_custom_event("async", 3, rid))
    got = [(r.event.method, r.args, r.run_id, r.tags, r.metadata) for r in h.records]
    assert got == [
        ("on_custom_event", ("progress", {"done": 1}), rid, ["t"], {"k": 1}),
        ("on_custom_event", ("progress", 2), h.records[1].run_id, ["t"], {"k": 1}),
        ("on_custom_event", ("async", 3), rid, [], {}),
    ]
    assert isinstance(h.records[1].run_id, uuid.UUID) and h.records[1].run_id != rid
    with pytest.raises(ValueError, match=r"^on_custom_event\(\) takes no keyword .*'extra'"):
        m.on_custom_event("progress", 1, extra=True)
    with pytest.raises(TypeError, match=r"^custom event name must be a string, got 1 \(int\)$"):
        m.on_custom_event(1, 1)  # type: ignore[arg-type]
    assert len(h.records) == 3


def test_S12_D3_a_noop_run_manager_takes_every_event_of_its_type_and_ends_once() -> None:
    """``get_noop_manager`` gives a run nobody hears, for code that needs a run manager: its
    events of its run type go nowhere, an event of another type is refused, and it ends once."""
    llm = RunManager.get_noop_manager("llm")
    llm.on_llm_new_token("a")
    llm.on_llm_end(LLMResult([[Generation("a")]]))
    with pytest.raises(RuntimeError, match="after the end"):
        llm.on_llm_end(LLMResult([[Generation("a")]]))
    chain = RunManager.get_noop_manager()
    assert (chain.run_type, chain.parent_run_id, chain.handlers) == ("chain", None, [])
    with pytest.raises(TypeError, match=r"^on_llm_new_token does not apply to a chain run$"):
        chain.on_llm_new_token("a")
    tool = AsyncRunManager.get_noop_manager("tool")
    assert isinstance(tool, AsyncRunManager)
    face = tool.get_sync()  # of a run that has made no id yet
    face.on_tool_end("out")
    with pytest.raises(RuntimeError, match="after the end"):
        face.on_tool_end("out")
    with pytest.raises(ValueError, match=r"^run_type must be one of \[.*\], got 'agent' \(str\)$"):
        RunManager.get_noop_manager("agent")


@pytest.mark.parametrize("heard", [False, True], ids=["nobody-listens", "heard"])
def test_D3_notes_after_the_end_are_refused_even_once_their_fast_path_is_resolved(
    heard: bool,
) -> None:
    """A run's notes take a fast path once its handlers' methods are resolved (or once it is
    known that nobody listens, D7); after the run's end they are refused all the same, so
    that attaching a handler changes nothing (D8). Also when the end came while the first
    note was being delivered (a handler ending the run, or another thread)."""
    manager = CallbackManager([Recorder()] if heard else [])
    for run in [RunManager.get_noop_manager(), manager.on_chain_start({}, {})]:
        run.on_text("a")
        run.on_text("b")  # the fast path, resolved
        run.on_chain_end({}, reason="done")  # (an extra keyword: the general path)
        for note in (run.on_text, run.on_retry):
            with pytest.raises(RuntimeError, match=r"^on_(text|retry) after the end"):
                note("late")

    class EndsOnFirstNote(Recorder):
        def on_text(self, text: str, **kwargs: Any) -> None:
            super().on_text(text, **kwargs)
            if text == "first":
                run.on_chain_end({})  # while the note that resolves the methods is delivered

    rec = EndsOnFirstNote()
    run = CallbackManager([rec]).on_chain_start({}, {})
    run.on_text("first")
    with pytest.raises(RuntimeError, match=r"^on_text after the end"):
        run.on_text("late")

    async def under_asyncio() -> None:  # the same rule for an `AsyncRunManager`
        arun = await AsyncCallbackManager([Recorder()] if heard else []).on_chain_start({}, {})
        await arun.on_text("in time")
        await arun.on_chain_end({})
        with pytest.raises(RuntimeError, match=r"^on_text after the end"):
            await arun.on_text("late")

    asyncio.run(under_asyncio())
    assert [r.event.method for r in rec.records] == ["on_chain_start", "on_text", "on_chain_end"]


def test_S12_D6_get_sync_is_the_same_run_for_the_sync_code_it_calls() -> None:
    """An async run's ``get_sync()`` (what LangChain's async models hand to their sync
    ``_generate``): its tokens and notes reach the handlers that heard the start, async ones
    run to completion, and its children are children of the run."""
    h = Recorder("h")
    seen: list[str] = []

    class Async(AsyncCallbackHandler):
        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            await asyncio.sleep(0)
            seen.append(token)

    a = Async()

    async def main() -> None:
        manager = AsyncCallbackManager.configure([h, a])
        chain = await manager.on_chain_start({"name": "outer"}, 1)
        sync = chain.get_sync()
        assert isinstance(sync, RunManager)
        assert (sync.run_id, sync.parent_run_id, sync.handlers) == (chain.run_id, None, [h, a])
        sync.on_text("from sync code")
        [llm] = sync.get_child("step:1").on_llm_start({"name": "m"}, ["p"])
        allm = (await chain.get_child().on_llm_start({"name": "m2"}, ["p"]))[0]
        allm.get_sync().on_llm_new_token("tok")
        await allm.on_llm_end(LLMResult([[Generation("tok")]]))
        llm.on_llm_end(LLMResult([[Generation("x")]]))
        await chain.on_chain_end(2)

    with sequential_run_ids():
        asyncio.run(main())
    assert [row[:3] for row in _trace(h)] == [
        ("on_chain_start", 1, None),
        ("on_text", 1, None),
        ("on_llm_start", 2, 1),
        ("on_llm_start", 3, 1),
        ("on_llm_new_token", 3, 1),
        ("on_llm_end", 3, 1),
        ("on_llm_end", 2, 1),
        ("on_chain_end", 1, None),
    ]
    assert seen == ["tok"]


def test_S1_S2_configure_takes_a_manager_for_either_half() -> None:
    """A manager as the inheritable half is continued whole (its parent included); a manager as
    the local half gives its current handlers, which stay local (SPEC section 3)."""
    a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
    parent = CallbackManager([a], [a], tags=["x"], inheritable_tags=["y"])
    run = parent.on_chain_start({}, {})
    child = run.get_child()
    local = CallbackManager([b, c], [c])
    manager = CallbackManager.configure(child, local, local_tags=["z"])
    assert manager.parent_run_id == run.run_id
    assert (manager.handlers, manager.inheritable_handlers) == ([a, b, c], [a])
    assert (manager.tags, manager.inheritable_tags) == (["y", "z"], ["y"])


def test_S8_copy_and_removals_leave_the_original_alone() -> None:
    h1, h2 = Recorder("1"), Recorder("2")
    original = CallbackManager(
        [h1], [h1, h2], tags=["a"], inheritable_tags=["b"], metadata={"k": 1, "j": 2},
        inheritable_metadata={"k": 0, "i": 3},
    )  # fmt: skip
    copy_ = original.copy()
    copy_.remove_metadata(["k", "absent"])
    copy_.remove_handler(h2)
    copy_.remove_tags(["a"])
    assert (copy_.metadata, copy_.inheritable_metadata) == ({"j": 2, "i": 3}, {"i": 3})
    assert (copy_.handlers, copy_.inheritable_handlers, copy_.tags) == ([h1], [h1], ["b"])
    assert original.metadata == {"k": 1, "j": 2, "i": 3}
    assert original.handlers == [h1, h2] and original.tags == ["a", "b"]
    assert original.parent_run_id is None and copy_.parent_run_id is None


def test_managers_and_run_managers_have_readable_reprs() -> None:
    h = Recorder("h")
    manager = CallbackManager([h], [h], tags=["t"], metadata={"k": 1})
    assert repr(manager) == (
        "CallbackManager(handlers=[Recorder('h')], inheritable_handlers=[Recorder('h')], "
        "parent_run_id=None, tags=['t'], inheritable_tags=[], metadata={'k': 1}, "
        "inheritable_metadata={})"
    )
    with sequential_run_ids():
        run = manager.on_chain_start({}, {})
    assert repr(run) == f"<RunManager chain run_id={_U(1)}>"
    assert repr(Lambda(_ident, name="f")) == "Lambda(name='f')"


def test_config_bad_manager_arguments_and_direct_run_managers_are_refused() -> None:
    with pytest.raises(TypeError, match=r"parent_run_id must be a uuid\.UUID or None, got 'p'"):
        CallbackManager(parent_run_id="p")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"RunManager is made by a manager's on_\*_start"):
        RunManager()
    run = CallbackManager([Recorder()]).on_chain_start({}, {})
    with pytest.raises(TypeError, match="tag must be a string or None, got 3"):
        run.get_child(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("manager_class", [CallbackManager, AsyncCallbackManager])
def test_S4_R2_D7_a_manager_starts_every_kind_of_run_and_skips_work_without_handlers(
    manager_class: type[CallbackManager] | type[AsyncCallbackManager],
) -> None:
    rec = Recorder()

    async def main() -> None:
        manager = manager_class([rec])
        tool = await _started(manager.on_tool_start({"name": "t"}, "in", inputs={"x": 1}))
        await _started(tool.on_tool_end("out"))
        retriever = await _started(manager.on_retriever_start({"name": "r"}, "q"))
        await _started(retriever.on_retriever_end([Document("d")]))
        chat = await _started(manager.on_chat_model_start({}, [[HumanMessage("hi")]]))
        await _started(chat.on_llm_error(ValueError("down")))
        silent = await _started(manager_class().on_chain_start({}, {}))  # D7: nobody listens
        await _started(silent.on_chain_end({}))
        assert silent._run_id is None

    with sequential_run_ids():
        asyncio.run(main())
    assert [(e, run) for e, run, *_ in _trace(rec)] == [
        ("on_tool_start", 1), ("on_tool_end", 1), ("on_retriever_start", 2),
        ("on_retriever_end", 2), ("on_chat_model_start", 3), ("on_llm_error", 3),
    ]  # fmt: skip
    assert rec.records[0].kwargs == {"inputs": {"x": 1}}


def test_S9_with_config_twice_merges_the_bindings() -> None:
    rec1, rec2 = Recorder("1"), Recorder("2")
    bound = (
        Lambda(_ident, name="f")
        .with_config(callbacks=[rec1], tags=["a"], metadata={"k": 1, "j": 1})
        .with_config(callbacks=[rec2, rec1], tags=["b", "a"], metadata={"k": 2})
    )
    bound.invoke(1)
    assert rec1.records[0].tags == ["a", "b"] == rec2.records[0].tags
    assert rec1.records[0].metadata == {"k": 2, "j": 1}
    with pytest.raises(
        TypeError,
        match=r"^with_config\(callbacks=\.\.\.\) takes a list of handlers, not a manager$",
    ):
        Lambda(_ident).with_config(callbacks=CallbackManager())


def test_S4_S6_S7_manager_defaults_and_values_pass_through() -> None:
    parent = uuid.uuid4()
    rec, other = Recorder("r"), Recorder("o")
    manager = CallbackManager(parent_run_id=parent)
    manager.add_handler(rec)  # inheritable by default
    manager.add_tags(["ab"])
    manager.add_tags(["".join(["a", "b"])])  # an equal tag, another object: kept once (S7)
    assert manager.parent_run_id == parent
    assert manager.inheritable_handlers == [rec] and manager.tags == ["ab"]
    with pytest.raises(TypeError, match=r"^metadata must be a dict with string keys, got a list$"):
        manager.add_metadata([1])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"^handlers must be a list of handlers, got 'abc' \(str\)$"
    ):
        CallbackManager("abc")
    run_id = uuid.uuid4()
    starts: list[tuple[str, Callable[..., Any]]] = [
        ("on_chain_start", lambda m: m.on_chain_start({"s": 1}, {}, run_id=run_id)),
        ("on_tool_start", lambda m: m.on_tool_start({"s": 1}, "in", run_id=run_id)),
        ("on_retriever_start", lambda m: m.on_retriever_start({"s": 1}, "q", run_id=run_id)),
        ("on_llm_start", lambda m: m.on_llm_start({"s": 1}, ["p"], run_id=run_id)),
        ("on_chat_model_start", lambda m: m.on_chat_model_start({"s": 1}, [[]], run_id=run_id)),
    ]
    for manager_class in (CallbackManager, AsyncCallbackManager):
        for method, start in starts:
            log = Recorder()
            run = asyncio.run(_started(start(manager_class([log], parent_run_id=parent))))
            assert (run.run_id, run.parent_run_id) == (run_id, parent)
            record = log.records[0]
            assert (record.event.method, record.args[0], record.run_id) == (
                method, {"s": 1}, run_id,
            )  # fmt: skip
    assert other.records == []


def test_S9_bound_values_merge_with_order_and_bound_max_concurrency_holds() -> None:
    log: list[_LogEntry] = []
    one, two = _Shared("1", log), _Shared("2", log)
    bound = Lambda(_ident, name="f").with_config(callbacks=[one]).with_config(callbacks=[two, one])
    bound.invoke(1)
    assert [label for label, method, _ in log if method == "on_chain_start"] == ["1", "2"]
    with pytest.raises(TypeError, match=r"^run_id cannot be bound: it names one run; pass it"):
        Lambda(_ident).with_config(run_id=uuid.uuid4())
    peak = _Peak()
    assert Lambda(peak.branch).with_config(max_concurrency=1).batch([1, 2, 3]) == [1, 2, 3]
    assert peak.peak == 1


def test_S4_chain_with_only_tags_metadata_or_callbacks_is_not_spliced() -> None:
    a, b = Lambda(_ident, name="a"), Lambda(_ident, name="b")
    for options in ({"tags": ["t"]}, {"metadata": {"k": 1}}, {"callbacks": [Recorder()]}):
        assert len(Chain(Chain(a, b, **options), a).steps) == 2
    assert len(Chain(Chain(a, b), a).steps) == 3


class _Peak:
    """Counts the branches running at once; ``peak`` is the most there ever were. With
    ``meet=n`` each branch waits until n are running (and fails after 5 s if they cannot all
    be): how long a start event takes to reach its handlers then no longer matters."""

    def __init__(self, meet: int | None = None) -> None:
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.meet = meet
        self.barrier = threading.Barrier(meet, timeout=5) if meet else None

    def _enter(self) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)

    def _leave(self) -> None:
        with self.lock:
            self.active -= 1

    def branch(self, x: int) -> int:
        self._enter()
        if self.barrier is not None:
            self.barrier.wait()
        else:
            time.sleep(0.01)
        self._leave()
        return x

    async def abranch(self, x: int) -> int:
        self._enter()
        if self.meet is not None:
            async with asyncio.timeout(5):
                while self.peak < self.meet:  # all of them were running at once
                    await asyncio.sleep(0.001)
        else:
            for _ in range(3):  # let every other ready task run meanwhile
                await asyncio.sleep(0.001)
        self._leave()
        return x


def _merged(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A `Parallel`'s streamed ``{key: chunk}`` dicts as one (each branch makes one chunk)."""
    return functools.reduce(lambda merged, chunk: {**merged, **chunk}, chunks, {})


def _streamed_fan(shape: str, fan: Parallel) -> Runnable:
    if shape == "parallel":
        return fan
    if shape == "fan_first":
        return Chain(fan, Lambda(_ident, name="after"), name="c")
    return Chain(Lambda(_ident, name="before"), fan, name="c")  # fan_last, and inherited


@pytest.mark.parametrize("limit", [1, None])
@pytest.mark.parametrize("shape", ["parallel", "fan_first", "fan_last", "inherited"])
@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_S3_R3_max_concurrency_bounds_the_branches_a_stream_runs(
    mode: str, shape: str, limit: int | None
) -> None:
    """``max_concurrency`` given to ``stream()``/``astream()``, or inherited from the call that
    streams, bounds a `Parallel` anywhere in what is streamed: the first step of a streamed
    `Chain` (run whole), its last step (streamed), or the streamed runnable itself."""
    peak = _Peak(meet=None if limit else 3)
    step = peak.abranch if mode == "astream" else peak.branch
    fan = Parallel(a=Lambda(step, name="a"), b=Lambda(step, name="b"), c=Lambda(step, name="c"))
    target = _streamed_fan(shape, fan)
    config: RunnableConfig = {"callbacks": [TraceChecker(strict=True)]}
    if limit is not None:
        config["max_concurrency"] = limit
    want = {"a": 7, "b": 7, "c": 7}  # the chunks ({key: chunk}, R7), put together
    if shape != "inherited":
        assert _merged(_streamed(target, config, mode, 7)) == want
    elif mode == "stream":
        outer = Lambda(lambda x: _merged(target.stream(x)), name="outer")
        assert outer.invoke(7, config) == want
    else:

        async def drain(x: int) -> Any:
            return _merged([chunk async for chunk in target.astream(x)])

        assert asyncio.run(Lambda(drain, name="outer").ainvoke(7, config)) == want
    assert peak.peak == (limit or 3)  # all three at once without a limit: the count is real


def test_S6_S7_S9_binding_twice_keeps_equal_handlers_and_merges_equal_tags() -> None:
    """Bound handlers merge as an ordered set by identity (S6): two distinct handlers that
    compare equal both stay. Bound tags merge by equality (S7): an equal tag built at run time
    is not added again."""

    @dataclass(eq=True)
    class Same(Recorder):  # every two compare equal; unhashable, as dataclasses with eq are
        def __init__(self) -> None:
            super().__init__("same")

    first, second = Same(), Same()
    assert first == second and first is not second
    tag = "".join(["t", "ag"])  # equal to "tag", another object
    runnable = (
        Lambda(_ident, name="x")
        .with_config(callbacks=[first], tags=["tag"])
        .with_config(callbacks=[second, first], tags=[tag, "other"])
    )
    assert runnable.invoke(1) == 1
    for handler in (first, second):
        heard = [(r.event.method, r.tags) for r in handler.records]
        assert heard == [("on_chain_start", ["tag", "other"]), ("on_chain_end", ["tag", "other"])]


# ===============================================================================================
# Runnables and implicit propagation (S10, S11, R0-R6)
# ===============================================================================================


def test_S10_runnable_invoked_without_config_is_an_implicit_child() -> None:
    rec = Recorder()
    llm = LLM("answer", name="llm")
    retriever = Retriever(["alpha doc", "beta doc"], name="docs")

    def body(x: str) -> Any:
        docs = retriever.invoke(x)
        return llm.invoke(docs[0].page_content)

    with sequential_run_ids():
        Lambda(body, name="outer").invoke("alpha", {"callbacks": [rec], "tags": ["t"]})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["t"], {}),
        ("on_retriever_start", 2, 1, ["t"], {}),
        ("on_retriever_end", 2, 1, ["t"], None),
        ("on_llm_start", 3, 1, ["t"], {}),
        ("on_llm_end", 3, 1, ["t"], None),
        ("on_chain_end", 1, None, ["t"], None),
    ]
    assert rec.records[3].args[1] == ["alpha doc"]


def test_S10_config_with_callbacks_starts_a_new_root_inheriting_nothing() -> None:
    outer_rec, new_rec = Recorder("outer"), Recorder("new")
    inner = Chain(Lambda(_ident, name="a"), Lambda(_ident, name="b"), name="inner")
    outer = Lambda(lambda x: inner.invoke(x, {"callbacks": [new_rec]}), name="outer")
    with sequential_run_ids():
        outer.invoke("q", {"callbacks": [outer_rec], "tags": ["outer"], "metadata": {"o": 1}})
    assert _trace(outer_rec) == [
        ("on_chain_start", 1, None, ["outer"], {"o": 1}),
        ("on_chain_end", 1, None, ["outer"], None),
    ]
    assert _trace(new_rec) == [
        ("on_chain_start", 2, None, [], {}),
        ("on_chain_start", 3, 2, ["seq:step:1"], {}),
        ("on_chain_end", 3, 2, ["seq:step:1"], None),
        ("on_chain_start", 4, 2, ["seq:step:2"], {}),
        ("on_chain_end", 4, 2, ["seq:step:2"], None),
        ("on_chain_end", 2, None, [], None),
    ]


def test_S10_empty_callbacks_hide_the_subtree_from_inherited_handlers() -> None:
    outer_rec, local = Recorder("outer"), Recorder("local")
    inner = Chain(Lambda(_ident, name="a"), LLM("x", callbacks=[local]), callbacks=[local])
    outer = Lambda(lambda x: inner.invoke(x, {"callbacks": []}), name="outer")
    with sequential_run_ids():
        outer.invoke("q", {"callbacks": [outer_rec], "tags": ["outer"], "metadata": {"o": 1}})
    assert _trace(outer_rec) == [
        ("on_chain_start", 1, None, ["outer"], {"o": 1}),
        ("on_chain_end", 1, None, ["outer"], None),
    ]
    # constructor handlers inside still see their own runs, under a new root
    assert _trace(local) == [
        ("on_chain_start", 2, None, [], {}),
        ("on_llm_start", 3, 2, ["seq:step:2"], {}),
        ("on_llm_end", 3, 2, ["seq:step:2"], None),
        ("on_chain_end", 2, None, [], None),
    ]


def test_S10_config_with_only_tags_and_metadata_keeps_the_inherited_manager() -> None:
    rec = Recorder()
    inner = Chain(Lambda(_ident, name="a"), name="inner")
    outer = Lambda(
        lambda x: inner.invoke(x, {"tags": ["extra"], "metadata": {"m": 2}}), name="outer"
    )
    with sequential_run_ids():
        outer.invoke("q", {"callbacks": [rec], "tags": ["outer"], "metadata": {"o": 1}})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["outer"], {"o": 1}),
        ("on_chain_start", 2, 1, ["outer", "extra"], {"o": 1, "m": 2}),
        ("on_chain_start", 3, 2, ["outer", "extra", "seq:step:1"], {"o": 1, "m": 2}),
        ("on_chain_end", 3, 2, ["outer", "extra", "seq:step:1"], None),
        ("on_chain_end", 2, 1, ["outer", "extra"], None),
        ("on_chain_end", 1, None, ["outer"], None),
    ]


def test_S10_run_name_and_run_id_are_not_inherited() -> None:
    rec = Recorder()
    leaf = Lambda(_ident, name="leaf")

    def middle(x: str) -> Any:
        leaf.invoke(x)
        return leaf.invoke(x, {"run_name": "renamed", "run_id": _U(700)})

    chain = Chain(Lambda(_ident, name="a"), Lambda(middle, name="middle"), name="top")
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [rec], "run_name": "custom", "run_id": _U(500)})
    assert _names(rec) == [(500, "custom"), (1, "a"), (2, "middle"), (3, "leaf"), (700, "renamed")]
    assert [(m, i, p) for m, i, p, _, _ in _trace(rec)] == [
        ("on_chain_start", 500, None),
        ("on_chain_start", 1, 500),
        ("on_chain_end", 1, 500),
        ("on_chain_start", 2, 500),
        ("on_chain_start", 3, 2),
        ("on_chain_end", 3, 2),
        ("on_chain_start", 700, 2),
        ("on_chain_end", 700, 2),
        ("on_chain_end", 2, 500),
        ("on_chain_end", 500, None),
    ]


def test_S10_custom_event_belongs_to_the_enclosing_run() -> None:
    class Custom(BaseCallbackHandler):
        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            self.seen.append((name, data, sorted(kwargs), _int(kwargs["run_id"])))
            self.seen.append((kwargs["tags"], kwargs["metadata"]))

    rec, custom = Recorder(), Custom()

    def body(x: str, config: Any) -> str:
        dispatch_custom_event("progress", {"pct": 50})
        dispatch_custom_event("explicit", 1, config=config)
        return x

    chain = Chain(Lambda(_ident, name="a"), Lambda(body, name="f"), name="c")
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [rec, custom], "tags": ["t"], "metadata": {"m": 1}})
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["t"], {"m": 1}),
        ("on_chain_start", 2, 1, ["t", "seq:step:1"], {"m": 1}),
        ("on_chain_end", 2, 1, ["t", "seq:step:1"], None),
        ("on_chain_start", 3, 1, ["t", "seq:step:2"], {"m": 1}),
        ("on_custom_event", 3, None, ["t", "seq:step:2"], {"m": 1}),
        ("on_custom_event", 3, None, ["t", "seq:step:2"], {"m": 1}),
        ("on_chain_end", 3, 1, ["t", "seq:step:2"], None),
        ("on_chain_end", 1, None, ["t"], None),
    ]
    assert custom.seen == [
        ("progress", {"pct": 50}, ["metadata", "run_id", "tags"], 3),
        (["t", "seq:step:2"], {"m": 1}),
        ("explicit", 1, ["metadata", "run_id", "tags"], 3),
        (["t", "seq:step:2"], {"m": 1}),
    ]
    with pytest.raises(RuntimeError):
        dispatch_custom_event("outside", None)


def _assert_context_runs(local: Recorder, rec: Recorder) -> None:
    """The traces of S11's context tests: the model's constructor handler hears its run as the
    outer Lambda's child, then as a root of its own; the request handler, the two Lambdas."""
    assert _trace(local) == [
        ("on_llm_start", 2, 1, [], {}),
        ("on_llm_end", 2, 1, [], None),
        ("on_llm_start", 4, None, [], {}),
        ("on_llm_end", 4, None, [], None),
    ]
    assert [(m, i, p) for m, i, p, _, _ in _trace(rec)] == [
        ("on_chain_start", 1, None),
        ("on_llm_start", 2, 1),
        ("on_llm_end", 2, 1),
        ("on_chain_end", 1, None),
        ("on_chain_start", 3, None),
        ("on_chain_error", 3, None),
    ]


def test_S11_context_is_restored_after_a_run() -> None:
    local, rec = Recorder("local"), Recorder("request")
    llm = LLM("x", callbacks=[local])
    inside: list[dict[Any, Any]] = []

    def body(x: str) -> Any:
        inside.append(dict(contextvars.copy_context()))
        return llm.invoke(x)

    before = dict(contextvars.copy_context())
    with sequential_run_ids():
        Lambda(body, name="outer").invoke("q", {"callbacks": [rec]})
        with pytest.raises(ValueError):
            Lambda(_fail("boom"), name="failing").invoke("q", {"callbacks": [rec]})
        llm.invoke("again")  # a root again: nothing of the earlier runs leaked
    assert inside[0] != before  # the check below is not vacuous
    assert dict(contextvars.copy_context()) == before
    _assert_context_runs(local, rec)


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_S11_library_threads_copy_the_context(mode: str) -> None:
    """A branch runs in a worker thread, in a copy of the caller's context: here, the one that
    makes sequential run ids."""
    rec = Recorder()
    llm = LLM("x", name="llm")
    threads: set[int] = set()

    def branch(x: str) -> Any:
        threads.add(threading.get_ident())
        return llm.invoke(x)

    par = Parallel(a=Lambda(branch, name="a"), b=Lambda(branch, name="b"), name="par")
    with sequential_run_ids():
        _drive(par, {"callbacks": [rec], "max_concurrency": 1}, mode, "q")
    assert threading.get_ident() not in threads
    expected: list[_Row] = [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_start", 2, 1, ["map:key:a"], {}),
        ("on_llm_start", 3, 2, [], {}),
        ("on_llm_end", 3, 2, [], None),
        ("on_chain_end", 2, 1, ["map:key:a"], None),
        ("on_chain_start", 4, 1, ["map:key:b"], {}),
        ("on_llm_start", 5, 4, [], {}),
        ("on_llm_end", 5, 4, [], None),
        ("on_chain_end", 4, 1, ["map:key:b"], None),
        ("on_chain_end", 1, None, [], None),
    ]
    if mode == "stream":  # the branches' events interleave: b starts before a ends
        assert sorted(map(str, _trace(rec))) == sorted(map(str, expected))
    else:
        assert _trace(rec) == expected


@pytest.mark.parametrize("mode", ["batch", "abatch"])
def test_S11_batch_inside_a_run_makes_children(mode: str) -> None:
    """``batch`` in a body run by ``invoke``, or ``abatch`` in an async one run by ``ainvoke``:
    each input's run is a child of the body's."""
    rec = Recorder()
    leaf = Lambda(_ident, name="leaf")

    async def abatch(xs: list[str]) -> list[Any]:
        return await leaf.abatch(xs)

    config: RunnableConfig = {"callbacks": [rec], "max_concurrency": 1}
    with sequential_run_ids():
        if mode == "batch":
            out = Lambda(lambda xs: leaf.batch(xs), name="outer").invoke(["x", "y"], config)
        else:
            out = asyncio.run(Lambda(abatch, name="outer").ainvoke(["x", "y"], config))
    assert out == ["x", "y"]
    assert [(m, i, p) for m, i, p, _, _ in _trace(rec)] == [
        ("on_chain_start", 1, None),
        ("on_chain_start", 2, 1),
        ("on_chain_end", 2, 1),
        ("on_chain_start", 3, 1),
        ("on_chain_end", 3, 1),
        ("on_chain_end", 1, None),
    ]


def test_S11_raw_thread_does_not_copy_the_context() -> None:
    rec, local = Recorder("request"), Recorder("local")
    llm = LLM("x", callbacks=[local])

    def body(x: str) -> str:
        raw = threading.Thread(target=llm.invoke, args=("raw",))
        raw.start()
        raw.join()
        ctx = contextvars.copy_context()
        propagated = threading.Thread(target=ctx.run, args=(llm.invoke, "propagated"))
        propagated.start()
        propagated.join()
        return x

    with sequential_run_ids():
        Lambda(body, name="outer").invoke("q", {"callbacks": [rec]})
    # the raw thread's run is a root (and uuid4 ids: the id factory did not travel either)
    assert [r.event.method for r in local.records] == ["on_llm_start", "on_llm_end"] * 2
    raw_start, _, copied_start, _ = local.records
    assert raw_start.args[1] == ["raw"]
    assert raw_start.parent_run_id is None
    assert raw_start.run_id is not None and raw_start.run_id.version == 4
    assert copied_start.args[1] == ["propagated"]
    assert (_int(copied_start.run_id), _int(copied_start.parent_run_id)) == (2, 1)
    # the request handler sees only the run whose thread got the context
    assert [(m, i, p) for m, i, p, _, _ in _trace(rec)] == [
        ("on_chain_start", 1, None),
        ("on_llm_start", 2, 1),
        ("on_llm_end", 2, 1),
        ("on_chain_end", 1, None),
    ]


def test_R0_error_is_raised_inside_the_run_after_the_start() -> None:
    cases: list[tuple[Any, list[str]]] = [
        (LLM("a b", error=ValueError("e")), ["on_llm_start", "on_llm_error"]),
        (ChatModel("a b", error=ValueError("e")), ["on_chat_model_start", "on_llm_error"]),
        (Tool(_ident, name="t", error=ValueError("e")), ["on_tool_start", "on_tool_error"]),
        (Retriever(["a"], error=ValueError("e")), ["on_retriever_start", "on_retriever_error"]),
    ]
    for runnable, expected in cases:
        rec = Recorder()
        with pytest.raises(ValueError) as info:
            runnable.invoke("a", {"callbacks": [rec]})
        assert rec.events() == expected
        assert rec.records[-1].args[0] is info.value  # R1: the error event's is the one raised
        # a fresh copy of error= each call, so the toy keeps no traceback of any call (D8)
        assert info.value is not runnable.error and runnable.error.__traceback__ is None
        assert (type(info.value), info.value.args) == (ValueError, ("e",))
        with pytest.raises(ValueError) as again:
            runnable.invoke("a")
        assert again.value is not info.value


def test_R0_an_error_that_cannot_be_copied_is_refused() -> None:
    class NeedsTwo(Exception):
        def __init__(self, a: str, b: str) -> None:  # args holds one: a copy cannot be made
            super().__init__(a)

    with pytest.raises(
        TypeError, match=r"^error must be an exception that copy.copy\(\) can .* NeedsTwo\('a'\) "
    ):
        LLM("x", error=NeedsTwo("a", "b"))


def test_R0_streaming_models_raise_after_the_first_token() -> None:
    error = ValueError("e")
    for model, start in ((LLM, "on_llm_start"), (ChatModel, "on_chat_model_start")):
        rec = Recorder()
        with pytest.raises(ValueError):
            model("one two", streaming=True, error=error).invoke("q", {"callbacks": [rec]})
        assert rec.events() == [start, "on_llm_new_token", "on_llm_error"]
        assert rec.records[1].args == ("one ",) and rec.records[2].args[0].args == ("e",)
        rec = Recorder()
        chunks: list[Any] = []
        with pytest.raises(ValueError):
            for chunk in model("one two", error=error).stream("q", {"callbacks": [rec]}):
                chunks.append(chunk)
        assert len(chunks) == 1
        assert rec.events() == [start, "on_llm_new_token", "on_llm_error"]


def test_R1_one_end_event_with_the_output() -> None:
    rec = Recorder()
    out = Chain(Lambda(lambda x: x + "!", name="bang"), Tool(len, name="len")).invoke(
        "hi", {"callbacks": [rec]}
    )
    assert out == 3
    # payloads after ``serialized`` (checked in R5): the input on start, the output on end
    assert [(m, args[1:] if m.endswith("_start") else args) for m, args in _payloads(rec)] == [
        ("on_chain_start", ("hi",)),
        ("on_chain_start", ("hi",)),
        ("on_chain_end", ("hi!",)),
        ("on_tool_start", ("hi!",)),
        ("on_tool_end", (3,)),
        ("on_chain_end", (3,)),
    ]


def test_R1_error_is_the_same_object_with_its_traceback_ancestors_innermost_first() -> None:
    rec = Recorder()
    error = LookupError("lost")

    def deepest_frame(x: str) -> str:
        raise error

    inner = Chain(Lambda(deepest_frame, name="leaf"), name="inner")
    outer = Chain(Lambda(_ident, name="a"), inner, name="outer")
    with sequential_run_ids(), pytest.raises(LookupError) as info:
        outer.invoke("q", {"callbacks": [rec]})
    assert info.value is error
    errors = [(r.event.method, _int(r.run_id), r.args[0]) for r in rec.records[-3:]]
    assert errors == [
        ("on_chain_error", 4, error),
        ("on_chain_error", 3, error),
        ("on_chain_error", 1, error),
    ]
    assert traceback.extract_tb(error.__traceback__)[-1].name == "deepest_frame"


def test_R1_base_exception_counts() -> None:
    class Stop(BaseException):
        pass

    rec = Recorder()
    stop = Stop()

    def halt(x: str) -> str:
        raise stop

    with pytest.raises(Stop):
        Chain(Lambda(halt, name="halt"), name="c").invoke("q", {"callbacks": [rec]})
    assert _payloads(rec)[-2:] == [("on_chain_error", (stop,)), ("on_chain_error", (stop,))]


def test_R2_one_llm_run_per_prompt_run_id_for_the_first() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    with sequential_run_ids():
        runs = manager.on_llm_start({"name": "m"}, ["p1", "p2"], run_id=_U(50))
        chats = manager.on_chat_model_start(
            {"name": "c"}, [[HumanMessage("a")], [HumanMessage("b")]], run_id=_U(60)
        )
        for run in [*runs, *chats]:
            run.on_llm_end(LLMResult([[Generation("x")]]))
    assert [(r.event.method, _int(r.run_id), r.args[1:]) for r in rec.records[:4]] == [
        ("on_llm_start", 50, (["p1"],)),
        ("on_llm_start", 1, (["p2"],)),
        ("on_chat_model_start", 60, ([[HumanMessage("a")]],)),
        ("on_chat_model_start", 2, ([[HumanMessage("b")]],)),
    ]
    ends = [(r.event.method, _int(r.run_id)) for r in rec.records[4:]]
    assert ends == [("on_llm_end", 50), ("on_llm_end", 1), ("on_llm_end", 60), ("on_llm_end", 2)]


def test_R2_llm_and_chat_runs_are_leaves() -> None:
    manager = CallbackManager([Recorder()])
    llm_run = manager.on_llm_start({}, ["p"])[0]
    chat_run = manager.on_chat_model_start({}, [[HumanMessage("m")]])[0]
    for run in (llm_run, chat_run):
        with pytest.raises(TypeError):
            run.get_child()
    chain_run = manager.on_chain_start({}, {})
    assert chain_run.get_child().parent_run_id == chain_run.run_id


@pytest.mark.parametrize("mode", ["batch", "abatch"])
def test_R3_batch_makes_one_root_run_per_input_the_run_id_naming_the_first(mode: str) -> None:
    rec, checker = Recorder(), TraceChecker()

    async def double(x: int) -> int:
        return x * 2

    config: RunnableConfig = {"callbacks": [rec, checker], "max_concurrency": 1, "tags": ["b"]}
    config["run_id"] = _U(99)
    with sequential_run_ids():
        if mode == "batch":
            out = Lambda(lambda x: x * 2, name="double").batch([1, 2, 3], config)
        else:
            out = asyncio.run(Lambda(double).abatch([1, 2, 3], config))
    assert out == [2, 4, 6]
    checker.check()
    assert _trace(rec) == [
        ("on_chain_start", 99, None, ["b"], {}),
        ("on_chain_end", 99, None, ["b"], None),
        ("on_chain_start", 1, None, ["b"], {}),
        ("on_chain_end", 1, None, ["b"], None),
        ("on_chain_start", 2, None, ["b"], {}),
        ("on_chain_end", 2, None, ["b"], None),
    ]
    assert [r.args[-1] for r in rec.records] == [1, 2, 2, 4, 3, 6]


def test_R3_batch_takes_one_config_per_input() -> None:
    rec = Recorder()
    Lambda(_ident, name="g").batch(
        ["c", "d"], [{"callbacks": [rec], "tags": ["c"]}, {"callbacks": [rec], "tags": ["d"]}]
    )
    starts = sorted((r.args[1], r.tags) for r in rec.records if r.event.phase == "start")
    assert starts == [("c", ["c"]), ("d", ["d"])]
    with pytest.raises(ValueError):
        Lambda(_ident).batch([1, 2], [{}])


def test_R3_one_run_id_in_two_per_input_configs_is_refused_before_any_run() -> None:
    rec, run_id = Recorder(), uuid.uuid4()
    configs: list[RunnableConfig] = [{"callbacks": [rec], "run_id": run_id}, {}, {"run_id": run_id}]
    with pytest.raises(ValueError, match=f"^batch\\(\\) got run_id {run_id} for inputs 0 and 2; "):
        Lambda(_ident).batch([1, 2, 3], configs)
    with pytest.raises(ValueError, match="for inputs 0 and 2"):
        asyncio.run(Lambda(_ident).abatch([1, 2, 3], configs))
    assert rec.records == []


def test_R3_max_concurrency_bounds_the_worker_threads() -> None:
    peak = _Peak(meet=2)  # each branch waits for a second: fails if only one worker
    assert Lambda(peak.branch).batch(list(range(6)), {"max_concurrency": 2}) == list(range(6))
    assert peak.peak == 2


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises `KeyboardInterrupt`, whatever the test runner set (mutmut takes it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("kind", ["batch", "parallel"])
def test_D3_R3_an_interrupt_stops_a_batch_from_starting_more_inputs(kind: str) -> None:
    """Ctrl-C during a ``batch`` (or a `Parallel`) of 60 at ``max_concurrency=2`` surfaces at
    once: the inputs not started are cancelled (they have no run to close), the running ones
    finish and close their runs first (D3), then the interrupt is raised."""
    started: list[Any] = []
    lock = threading.Lock()

    def work(x: Any) -> Any:
        with lock:
            started.append(x)
            if len(started) == 3:  # a signal to the process, as Ctrl-C sends: the main thread
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        time.sleep(0.02)
        return x

    checker = TraceChecker()
    config: RunnableConfig = {"max_concurrency": 2, "callbacks": [checker]}
    with pytest.raises(KeyboardInterrupt):
        if kind == "batch":
            Lambda(work).batch(list(range(60)), config)
        else:
            Parallel({f"k{i}": Lambda(work) for i in range(60)}).invoke(0, config)
    assert len(started) < 10  # not 60
    checker.check()


def test_D3_R3_cancelling_an_abatch_stops_it_from_starting_more_inputs() -> None:
    started: list[Any] = []
    checker = TraceChecker()

    async def work(x: Any) -> Any:
        started.append(x)
        await asyncio.sleep(0.02)
        return x

    async def main() -> None:
        task = asyncio.ensure_future(
            Lambda(work).abatch(list(range(60)), {"max_concurrency": 2, "callbacks": [checker]})
        )
        await _until(lambda: len(started) >= 3, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(started) < 10
    checker.check()


@pytest.mark.parametrize("mode", ["batch", "abatch"])
def test_R3_return_exceptions_puts_exceptions_in_place(mode: str) -> None:
    rec, checker = Recorder(), TraceChecker()

    def pick(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    async def apick(x: int) -> int:
        return pick(x)

    def batch(config: RunnableConfig, **options: bool) -> list[Any]:
        if mode == "batch":
            return Lambda(pick, name="pick").batch([1, 2, 3], config, **options)
        return asyncio.run(Lambda(apick, name="pick").abatch([1, 2, 3], config, **options))

    with sequential_run_ids():
        out = batch({"callbacks": [rec, checker], "max_concurrency": 1}, return_exceptions=True)
    assert out[0] == 1 and out[2] == 3
    assert isinstance(out[1], ValueError) and str(out[1]) == "two"
    assert [(m, i) for m, i, _, _, _ in _trace(rec)] == [
        ("on_chain_start", 1),
        ("on_chain_end", 1),
        ("on_chain_start", 2),
        ("on_chain_error", 2),
        ("on_chain_start", 3),
        ("on_chain_end", 3),
    ]
    assert _errors(rec) == [out[1]]  # the very exception returned in place
    checker.check()
    rec2 = Recorder()
    with pytest.raises(ValueError, match="two"):
        batch({"callbacks": [rec2], "max_concurrency": 1})
    assert len(rec2.records) == 6  # every input finished before the failure was raised


def test_R4_default_names() -> None:
    def my_func(x: Any) -> Any:
        return x

    cases: list[tuple[Any, str]] = [
        (Lambda(my_func), "my_func"),
        (Lambda(lambda x: x), "Lambda"),
        (Lambda(my_func, name="named"), "named"),
        (Tool(my_func), "my_func"),
        (Tool(lambda x: x), "Tool"),
        (Tool(my_func, name="tool"), "tool"),
        (Chain(Lambda(my_func)), "Chain"),
        (Parallel(a=Lambda(my_func)), "Parallel"),
        (LLM("x"), "LLM"),
        (ChatModel("x"), "ChatModel"),
        (Retriever(["q"]), "Retriever"),
        (Retriever(["q"], name="docs"), "docs"),
    ]
    for runnable, expected in cases:
        rec = Recorder()
        runnable.invoke("q", {"callbacks": [rec]})
        assert (runnable.get_name(), rec.records[0].kwargs["name"]) == (expected, expected)
        assert rec.records[0].args[0]["name"] == expected


def test_R4_run_name_overrides_the_name_for_that_run() -> None:
    rec = Recorder()
    f = Lambda(_ident, name="f")
    f.invoke("q", {"callbacks": [rec], "run_name": "override"})
    f.invoke("q", {"callbacks": [rec]})
    f.with_config(run_name="bound").invoke("q", {"callbacks": [rec]})
    f.with_config(run_name="bound").invoke("q", {"callbacks": [rec], "run_name": "call"})
    assert [name for _, name in _names(rec)] == ["override", "f", "bound", "call"]


def test_R5_payloads_are_shaped_like_langchains() -> None:
    rec = Recorder()
    docs: list[Document | str] = [Document("cats purr", {"src": 1}), "dogs bark"]
    Retriever(docs, name="r").invoke("cats", {"callbacks": [rec]})
    LLM("text out", name="llm").invoke("p", {"callbacks": [rec]})
    ChatModel("chat out", name="chat").invoke([HumanMessage("hi")], {"callbacks": [rec]})
    retrieved = rec.records[1].args[0]
    assert [(d.page_content, d.metadata) for d in retrieved] == [("cats purr", {"src": 1})]
    llm_result = rec.records[3].args[0]
    assert isinstance(llm_result, LLMResult)
    assert llm_result.generations[0][0].text == "text out"
    chat_messages = rec.records[4].args[1]
    assert [(m.type, m.content) for m in chat_messages[0]] == [("human", "hi")]
    chat_gen = rec.records[5].args[0].generations[0][0]
    chat = (chat_gen.text, chat_gen.message.type, chat_gen.message.content)
    assert chat == ("chat out", "ai", "chat out")
    roles = [(m.type, m.content) for m in (SystemMessage("s"), ToolMessage("t"))]
    assert roles == [("system", "s"), ("tool", "t")]
    serialized = [r.args[0] for r in rec.records if r.event.phase == "start"]
    ids = [(s["name"], s["id"][-1]) for s in serialized]
    assert ids == [("r", "Retriever"), ("llm", "LLM"), ("chat", "ChatModel")]


class _UsageCounter(BaseCallbackHandler):
    """The usual third-party usage counter: reads attributes, never checks classes."""

    def __init__(self) -> None:
        self.from_llm_output: list[dict[str, int]] = []
        self.from_messages: list[dict[str, int]] = []

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.from_llm_output.append(response.llm_output["token_usage"])
        for candidates in response.generations:
            for generation in candidates:
                message = getattr(generation, "message", None)
                usage = getattr(message, "usage_metadata", None)
                if usage:
                    self.from_messages.append(usage)


@pytest.mark.parametrize("mode", ["invoke", "stream", "ainvoke", "astream"])
def test_R5_models_report_deterministic_usage_a_counter_reading_attributes_totals(
    mode: str,
) -> None:
    """Each model call reports its usage, as providers' models do: in ``llm_output`` (prompt,
    completion and total tokens) and, for a chat model, in the message's ``usage_metadata``
    (also the output's). A token is a word with the spaces after it."""
    counter = _UsageCounter()
    chain = Chain(
        ChatModel("two words", name="chat"),  # prompt "Human: four words here" -> 4 tokens
        LLM("one two three", name="llm"),  # prompt "AI: two words" -> 3 tokens
    )
    output = _lc_drive(chain, {"callbacks": [counter]}, mode, "four words here")
    assert counter.from_llm_output == [
        {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
        {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    ]
    assert counter.from_messages == [{"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}]
    assert output == (["one ", "two ", "three"] if "stream" in mode else "one two three")
    message = ChatModel("a b", name="m").invoke("x y z")
    assert message == AIMessage("a b")  # messages compare by class and content
    assert message.usage_metadata == {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}
    assert message.response_metadata == {"model_name": "m", "finish_reason": "stop"}


def test_R5_payloads_dump_to_plain_data_as_langchains_pydantic_ones() -> None:
    """``model_dump()`` gives the keys langchain_core's models give (its tracers store a
    model's outputs so), payloads inside dumped too, and copies: changing the dump changes
    nothing of the payload."""
    rec = Recorder()
    LLM("a b", name="llm").invoke("q", {"callbacks": [rec]})
    ChatModel("c", name="chat").invoke("q", {"callbacks": [rec]})
    llm_end, chat_end = (r.args[0] for r in rec.records if r.event is Event.LLM_END)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert llm_end.model_dump() == {
        "generations": [[{"text": "a b", "generation_info": None, "type": "Generation"}]],
        "llm_output": {"token_usage": usage, "model_name": "llm"},
        "run": None,
        "type": "LLMResult",
    }
    dumped = chat_end.model_dump()
    assert dumped["generations"][0][0] == {
        "text": "c",
        "generation_info": None,
        "type": "ChatGeneration",
        "message": {
            "content": "c",
            "id": None,
            "usage_metadata": {"input_tokens": 2, "output_tokens": 1, "total_tokens": 3},
            "response_metadata": {"model_name": "chat", "finish_reason": "stop"},
            "type": "ai",
        },
    }
    dumped["llm_output"]["token_usage"]["total_tokens"] = 0
    dumped["generations"][0][0]["message"]["usage_metadata"]["total_tokens"] = 0
    assert chat_end.llm_output["token_usage"]["total_tokens"] == 3
    assert chat_end.generations[0][0].message.usage_metadata["total_tokens"] == 3
    document = Document("text", {"k": [1]})
    as_dict = document.model_dump()
    assert as_dict == {"metadata": {"k": [1]}, "page_content": "text", "type": "Document"}
    assert HumanMessage("q", id="m1").model_dump() == {"content": "q", "id": "m1", "type": "human"}
    generation = Generation("t", generation_info={"k": [1]})
    message = AIMessage("c", response_metadata={"k": [1]})
    for payload in (generation, document, message):  # a nested value of the dump is a copy too
        next(v for v in payload.model_dump().values() if isinstance(v, dict) and v)["k"].append(2)
    nested = (generation.generation_info, document.metadata, message.response_metadata)
    assert nested == ({"k": [1]},) * 3


def test_R5_langchain_style_token_handler_runs() -> None:
    class TokenHandler(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.tokens.append(token)

    handler = TokenHandler()
    assert list(LLM("a b c").stream("q", {"callbacks": [handler]})) == ["a ", "b ", "c"]
    LLM("d e", streaming=True).invoke("q", {"callbacks": [handler]})
    LLM("f g").invoke("q", {"callbacks": [handler]})  # no tokens: not streaming
    assert handler.tokens == ["a ", "b ", "c", "d ", "e"]


def _flow(rec: Recorder) -> list[str]:
    """A recorder's events in short: ``+name`` a start, ``-name`` an end, ``!name`` an error,
    ``~name:token`` a token (names from the start events)."""
    names = {
        r.run_id: r.kwargs.get("name") or (r.args[0] or {}).get("name")  # langchain_core: None
        for r in rec.records
        if r.event.phase == "start"
    }
    marks = {"start": "+", "end": "-", "error": "!"}
    flow = []
    for r in rec.records:
        name = names[r.run_id]
        if r.event is Event.LLM_NEW_TOKEN:
            flow.append(f"~{name}:{r.args[0]}")
        elif r.event.phase in marks:
            flow.append(f"{marks[r.event.phase]}{name}")
    return flow


def _streamed(
    runnable: Runnable, config: RunnableConfig | None, mode: str, value: Any = "q"
) -> list[Any]:
    """The chunks of ``runnable.stream`` or ``astream`` (``mode``) on ``value``."""
    if mode == "stream":
        return list(runnable.stream(value, config))

    async def main() -> list[Any]:
        return [chunk async for chunk in runnable.astream(value, config)]

    return asyncio.run(main())


@pytest.mark.parametrize("shape", ["plain", "generator", "in_chain", "in_parallel"])
@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_S3_S10_a_streamed_lambdas_body_runs_in_its_runs_scope(mode: str, shape: str) -> None:
    """What a streamed `Lambda`'s body calls, a plain function's or a generator function's
    (each chunk is made in the run's scope), is a child of its run and obeys the call's
    ``max_concurrency``, also as a chain's step or a parallel's branch."""
    peak, rec = _Peak(), Recorder()
    inner = Lambda(peak.branch, name="inner")

    def plain(x: int) -> list[int]:
        return inner.batch([x] * 3)

    def chunks(x: int) -> Generator[list[int], None, None]:
        yield inner.batch([x] * 3)

    lam = Lambda(chunks if shape == "generator" else plain, name="outer")
    outer = {"in_chain": Chain(lam), "in_parallel": Parallel(p=lam)}.get(shape, lam)
    config: RunnableConfig = {"max_concurrency": 1, "callbacks": [rec]}
    assert _streamed(outer, config, mode, 7) == [{"p": [7, 7, 7]} if "par" in shape else [7, 7, 7]]
    assert peak.peak == 1
    starts = [r for r in rec.records if r.event.phase == "start"][-4:]  # the Lambda's, its calls'
    root = None if outer is lam else rec.records[0].run_id
    assert [r.parent_run_id for r in starts] == [root] + [starts[0].run_id] * 3


def _words(text: Any) -> Generator[str, None, None]:
    """A generator function for a `Lambda`: the input's words, one chunk each."""
    yield from _TOKEN_WORDS.findall(text.content if hasattr(text, "content") else str(text))


_TOKEN_WORDS = re.compile(r"\S+\s*")


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_a_model_anywhere_in_a_streamed_chain_fires_its_tokens(mode: str) -> None:
    """``prompt | model | parser``: the model is not the last step, and streams all the same;
    the chain yields the last step's chunk."""
    rec = Recorder()
    chain = Chain(
        Lambda(_ident, name="prompt"),
        ChatModel("a b c", name="model"),
        Lambda(lambda message: message.content.upper(), name="parser"),
        name="chain",
    )
    assert _streamed(chain, {"callbacks": [rec]}, mode) == ["A B C"]
    assert _flow(rec) == [
        "+chain", "+prompt", "-prompt", "+model", "~model:a ", "+parser", "~model:b ",
        "~model:c", "-model", "-parser", "-chain",
    ]  # fmt: skip


_PIPELINE_FLOW = [
    "+seq", "+lamA", "-lamA", "+llm1", "~llm1:a ", "+lamB", "~llm1:b ", "~llm1:c", "-llm1",
    "+genC", "-lamB", "-genC", "+chat2", "~chat2:x ", "+lamD", "~chat2:y", "-chat2", "-lamD",
    "-seq",
]  # fmt: skip


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_streamed_steps_form_a_pipeline_in_langchains_order(mode: str) -> None:
    """A step that pipelines (a `Lambda`, a generator `Lambda`, a `Chain`, a `Parallel`) starts
    at the first chunk of the step before, so before that step ends; a model reads its whole
    input first. The order langchain_core gives the same chain (its ``RunnableLambda`` and
    models that stream word by word, as the toys do)."""
    rec = Recorder()
    chain = Chain(
        Lambda(_ident, name="lamA"),
        LLM("a b c", name="llm1"),
        Lambda(_ident, name="lamB"),
        Lambda(_words, name="genC"),
        ChatModel("x y", name="chat2"),
        Lambda(lambda message: message.content, name="lamD"),
        name="seq",
    )
    assert _streamed(chain, {"callbacks": [rec]}, mode) == ["x y"]
    assert _flow(rec) == _PIPELINE_FLOW  # also langchain_core's: see the portability section
    starts = [r for r in rec.records if r.event.phase == "start"]
    ends = {r.run_id: r for r in rec.records if r.event.phase == "end"}
    fed = [r.kwargs["name"] for r in starts if r.args[1] == {"input": ""}]
    assert fed == ["lamB", "genC", "lamD"]  # started before their input was whole
    assert [ends[r.run_id].kwargs["inputs"] for r in starts if r.kwargs["name"] in fed] == [
        "a b c", "a b c", AIMessage("x y")
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_D3_a_step_after_a_model_failing_mid_stream_has_started_and_closes_with_the_error(
    mode: str,
) -> None:
    rec, checker = Recorder(), TraceChecker(strict=True)
    chain = Chain(
        LLM("a b c", name="llm", error=ValueError("cut")), Lambda(_ident, name="after"), name="seq"
    )
    with pytest.raises(ValueError, match="cut") as info:
        _streamed(chain, {"callbacks": [rec, checker]}, mode)
    assert _flow(rec) == ["+seq", "+llm", "~llm:a ", "+after", "!llm", "!after", "!seq"]
    assert all(error is info.value for error in _errors(rec))  # R1: the one that left
    checker.check()


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_a_parallel_yields_one_key_chunk_per_branch_chunk(mode: str) -> None:
    """One ``{key: chunk}`` per chunk of a branch, as it comes; ``max_concurrency=1`` makes
    the branches take turns in key order. Streamed into, a `Parallel` starts at the first chunk,
    and so does each branch that pipelines; the run's output is every branch's output."""
    rec = Recorder()
    fan = Parallel(a=LLM("one two", name="l"), b=ChatModel("x y", name="c"), name="fan")
    chunks = _streamed(fan, {"callbacks": [rec], "max_concurrency": 1}, mode)
    assert chunks == [{"a": "one "}, {"b": AIMessage("x ")}, {"a": "two"}, {"b": AIMessage("y")}]
    (end,) = [r for r in rec.records if r.kwargs.get("name") is None and r.event is Event.CHAIN_END]
    assert end.args[0] == {"a": "one two", "b": AIMessage("x y")}
    rec = Recorder()
    fed = Chain(
        LLM("a b", name="llm"),
        Parallel(p=Lambda(_ident, name="lamP"), q=ChatModel("z", name="chatP"), name="fan"),
        name="seq",
    )
    merged = _merged(_streamed(fed, {"callbacks": [rec], "max_concurrency": 1}, mode))
    assert merged == {"p": "a b", "q": AIMessage("z")}
    assert _flow(rec) == [
        "+seq",
        "+llm",
        "~llm:a ",
        "+fan",
        "+lamP",
        "~llm:b",
        "-llm",
        "+chatP",
        "~chatP:z",
        "-lamP",
        "-chatP",
        "-fan",
        "-seq",
    ]  # fmt: skip (the branches take turns, a chunk each: lamP ends at its second turn)


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_a_parallel_passes_a_branchs_chunk_on_as_soon_as_it_is_made(mode: str) -> None:
    """A branch's chunk is not held back until the other branches have one: here the slow
    branch makes its chunk only once the consumer has the fast one's."""
    consumed = threading.Event()

    def fast(x: Any) -> Generator[str, None, None]:
        yield "fast"

    def slow(x: Any) -> Generator[str, None, None]:
        assert consumed.wait(5), "the fast branch's chunk was held back"
        yield "slow"

    fan, chunks = Parallel(f=Lambda(fast), s=Lambda(slow)), list[Any]()

    async def consume() -> None:
        async for chunk in fan.astream(1):
            chunks.append(chunk)
            consumed.set()

    if mode == "astream":
        asyncio.run(consume())
    else:
        for chunk in fan.stream(1):
            chunks.append(chunk)
            consumed.set()
    assert chunks == [{"f": "fast"}, {"s": "slow"}]


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_D3_a_failure_of_the_step_before_a_parallel_reaches_every_branch(mode: str) -> None:
    """Each branch reads the streamed input at its own pace: a failure to read it (the model
    before fails after its first token) is every branch's, and every run closes with it."""
    rec, checker = Recorder(), TraceChecker(strict=True)
    chain = Chain(
        LLM("a b", name="llm", error=ValueError("cut")),
        Parallel(p=Lambda(_ident, name="p"), q=Lambda(_ident, name="q"), name="fan"),
        name="seq",
    )
    config: RunnableConfig = {"callbacks": [rec, checker], "max_concurrency": 1}
    with pytest.raises(ValueError, match="cut") as info:
        _streamed(chain, config, mode)
    assert _flow(rec) == ["+seq", "+llm", "~llm:a ", "+fan", "+p", "!llm", "!p", "+q", "!q",
                          "!fan", "!seq"]  # fmt: skip
    assert all(error is info.value for error in _errors(rec))
    checker.check()


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_D3_closing_a_parallel_stream_early_closes_every_branch(mode: str) -> None:
    """The consumer stops after the first chunk while the other branch is making one: that
    branch finishes its chunk (a thread cannot be stopped) or is cancelled (a task), then
    every branch's run that started closes, before the parallel's own."""
    rec, checker = Recorder(), TraceChecker(strict=True)
    fan = Parallel(a=LLM("1 2 3", name="a"), b=LLM("4 5 6", name="b"), name="fan")
    taken: list[Any] = []
    _take_then_close(fan, {"callbacks": [rec, checker]}, mode, taken)
    (first,) = taken
    assert first in ({"a": "1 "}, {"b": "4 "})
    checker.check()
    flow = _flow(rec)  # a branch whose task had not begun when cancelled never started
    started = [step[1:] for step in flow if step.startswith("+")]
    closed = sorted(flow[-len(started) : -1])
    assert flow[-1] == "!fan" and closed == sorted(f"!{name}" for name in started[1:])
    closings = (GeneratorExit, asyncio.CancelledError)
    assert all(isinstance(error, closings) for error in _errors(rec))


def test_R7_D3_a_cancellation_while_a_parallel_astream_closes_still_closes_every_branch() -> None:
    """The consumer takes one chunk and closes the stream; a handler cancels it while the first
    branch's error event is being delivered (as a timeout would): the cancellation waits until
    every branch is closed, then the parallel's run closes, then it is raised."""
    cancel: list[asyncio.Task[Any]] = []

    class CancelOnce(AsyncCallbackHandler):
        async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            if cancel:
                cancel.pop().cancel()

    rec, checker = Recorder(), TraceChecker(strict=True)
    fan = Parallel(a=LLM("1 2 3", name="a"), b=LLM("4 5 6", name="b"), name="fan")

    async def main() -> None:
        config: RunnableConfig = {"callbacks": [rec, checker, CancelOnce()], "max_concurrency": 1}
        stream: Any = fan.astream("q", config)

        async def consume() -> None:
            assert [await anext(stream), await anext(stream)] == [{"a": "1 "}, {"b": "4 "}]
            cancel.append(asyncio.current_task())  # type: ignore[arg-type]
            await stream.aclose()  # no branch is being advanced: both are closed here

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(consume())

    asyncio.run(main())
    checker.check()
    assert not cancel and _flow(rec)[-1] == "!fan"
    assert sorted(step for step in _flow(rec) if step.startswith("!")) == ["!a", "!b", "!fan"]


def _stubborn(x: Any) -> Generator[str, None, None]:
    """A generator function that fails to close: its ``finally`` raises."""
    try:
        yield "a"
        yield "b"
    finally:
        raise ValueError("will not close")


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_D3_a_branch_failing_to_close_does_not_keep_the_others_open(mode: str) -> None:
    """A generator function that raises while being closed (in its ``finally``), the first
    branch closed: its failure is raised once the other branch has closed too."""

    rec, checker = Recorder(), TraceChecker(strict=True)
    fan = Parallel(g=Lambda(_stubborn, name="g"), m=LLM("1 2 3", name="m"), name="fan")
    config: RunnableConfig = {"callbacks": [rec, checker], "max_concurrency": 1}
    taken: list[Any] = []
    with pytest.raises(ValueError, match="will not close"):
        _take_then_close(fan, config, mode, taken, 2)
    assert taken == [{"g": "a"}, {"m": "1 "}]  # both started
    checker.check()
    assert sorted(step for step in _flow(rec) if step.startswith("!")) == ["!fan", "!g", "!m"]


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_D2_a_chains_failure_stands_over_a_failure_to_close_the_step_before(mode: str) -> None:
    """A step fails at its start (a ``raise_error`` handler), its first input chunk taken;
    closing the step before, still open, fails too (a generator raising in its ``finally``):
    every run closes (D3), and the first failure leaves the call (D2)."""

    class FailsOnStart(BaseCallbackHandler):
        raise_error = True

        def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("first")

    rec, checker = Recorder(), TraceChecker(strict=True)
    late = Lambda(_ident, name="b", callbacks=[FailsOnStart()])
    with pytest.raises(RuntimeError, match="first"):
        _streamed(
            Chain(Lambda(_stubborn, name="g"), late, name="c"), {"callbacks": [rec, checker]}, mode
        )
    checker.check()
    assert _flow(rec) == ["+c", "+g", "+b", "!b", "!g", "!c"]


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_D2_an_interrupt_in_a_parallel_stream_outranks_a_branch_failing_to_close(
    mode: str,
) -> None:
    """An interrupt (Ctrl-C; under asyncio a cancellation) lands in a parallel's stream between
    two chunks, while a branch whose closing fails is open (a generator raising in its
    ``finally``): every run closes (D3), and the interrupt leaves the call (D2)."""

    body, interrupt = Parallel._stream_body, KeyboardInterrupt
    if mode == "astream":
        body, interrupt = Parallel._astream_body, asyncio.CancelledError  # type: ignore[assignment]
    rec, checker = Recorder(), TraceChecker(strict=True)
    fan = Parallel(g=Lambda(_stubborn, name="g"), m=LLM("1 2 3", name="m"), name="fan")
    config: RunnableConfig = {"callbacks": [rec, checker], "max_concurrency": 1}
    raised = _run_with_hook(_raise_at(body, interrupt, 2), fan, config, mode)
    assert type(raised) is interrupt
    checker.check()
    assert _flow(rec) == ["+fan", "+g", "!g", "!fan"]  # at the second chunk's asking


def test_R7_D3_a_branch_still_making_a_chunk_when_the_stream_closes_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C landing inside the thread pool's own code can cut a worker loose from the pool,
    whose shutdown then does not wait for it. Simulated here with a pool that never waits: the
    branch that is still making its chunk is waited for all the same, then closed (D3)."""

    class Forgetful(concurrent.futures.ThreadPoolExecutor):  # as if its workers were cut loose
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            super().shutdown(wait=False, cancel_futures=cancel_futures)

    monkeypatch.setattr(callbacks, "ThreadPoolExecutor", Forgetful)
    started = threading.Event()

    def slow(x: Any) -> Any:
        started.set()
        time.sleep(0.2)
        return x

    rec, checker = Recorder(), TraceChecker(strict=True)
    fan = Parallel(fast=LLM("1 2 3", name="fast"), slow=Lambda(slow, name="slow"), name="fan")
    stream: Any = fan.stream("q", {"callbacks": [rec, checker]})
    assert next(stream) == {"fast": "1 "}
    assert started.wait(5)
    stream.close()  # the slow branch is still making its chunk in its thread
    checker.check()
    assert _flow(rec)[-1] == "!fan" and "!slow" in _flow(rec)


def test_R7_a_generator_lambda_streams_its_chunks_and_returns_them_added_up() -> None:
    """Under ``invoke`` its output is its chunks added with ``+`` (where they do not add, the
    last one), as LangChain's; under ``stream`` each chunk is yielded as it comes. An async
    generator function is refused (a `TypeError` naming it)."""
    words, rec = Lambda(_words, name="words"), Recorder()
    assert words.invoke("a b c") == "a b c"
    assert asyncio.run(words.ainvoke("a b c")) == "a b c"
    assert list(words.stream("a b c", {"callbacks": [rec]})) == ["a ", "b ", "c"]
    assert _streamed(words, {"callbacks": [rec]}, "astream", "a b c") == ["a ", "b ", "c"]
    assert [r.args[0] for r in rec.records if r.event.phase == "end"] == ["a b c"] * 2  # added up

    def dicts(x: Any) -> Generator[dict[str, int], None, None]:
        yield {"a": 1}
        yield {"b": 2}

    assert Lambda(dicts).invoke(None) == {"b": 2}  # dicts do not add: the last one

    def empty(x: Any) -> Generator[str, None, None]:
        yield from ()

    assert Lambda(empty).invoke(1) is None and list(Lambda(empty).stream(1)) == []

    def broken(x: Any) -> Generator[str, None, None]:
        yield "a"
        raise ValueError("half")

    with pytest.raises(ValueError, match="half"):
        _streamed(Lambda(broken), {"callbacks": [rec]}, "astream", 1)

    async def agen(x: Any) -> AsyncGenerator[str, None]:
        yield x

    with pytest.raises(TypeError, match="not an async generator function: got <function"):
        Lambda(agen)


def test_R6_run_ids_are_uuids_fresh_for_children() -> None:
    rec = Recorder()
    chain = Chain(Lambda(_ident, name="a"), Lambda(_ident, name="b"), name="c")
    chain.invoke("q", {"callbacks": [rec]})
    given = uuid.uuid4()
    chain.invoke("q", {"callbacks": [rec], "run_id": given})
    starts = [r for r in rec.records if r.event.phase == "start"]
    ids = [r.run_id for r in starts]
    assert all(isinstance(i, uuid.UUID) for i in ids)
    assert len(set(ids)) == 6
    assert [i.version for i in ids if i is not None and i != given] == [4] * 5
    assert ids[3] == given
    assert [r.parent_run_id for r in starts[4:]] == [given, given]
    bad_config: Any = {"run_id": "not-a-uuid"}
    with pytest.raises(TypeError):
        chain.invoke("q", bad_config)


def _fresh_id() -> uuid.UUID:
    manager = CallbackManager([Recorder()])
    return manager.on_chain_start({}, {}).run_id


def test_R6_run_ids_are_version_4_uuids_that_behave_like_uuid4s() -> None:
    ids = [_fresh_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for run_id in ids[:100]:
        twin = uuid.UUID(str(run_id))
        assert type(run_id) is uuid.UUID and run_id.version == 4
        assert run_id.variant == uuid.RFC_4122
        assert (twin, hash(twin), run_id.is_safe) == (run_id, hash(run_id), uuid.SafeUUID.unknown)
        assert pickle.loads(pickle.dumps(run_id)) == run_id
    bits = [sum(i.int >> b & 1 for i in ids) for b in range(128)]  # the random bits vary
    fixed = {b for b, ones in enumerate(bits) if ones in (0, len(ids))}
    assert fixed == {76, 77, 78, 79, 62, 63}  # the version and variant bits only


def test_R6_run_ids_ignore_random_seed_and_differ_after_fork() -> None:
    random.seed(1)
    first = _fresh_id()
    random.seed(1)
    assert _fresh_id() != first
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about fork when threads exist
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, _fresh_id().bytes)
        os._exit(0)
    os.close(write)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.waitpid(pid, 0)
    os.close(read)
    assert child != _fresh_id()  # the child's generator was reseeded, not copied


# -- property tests: random run trees against a pure model (S1-S10, D1-D4, R0-R4) -------------
#
# A tree is made of `_Node` specs. `_build` turns a spec into real runnables; `_model` turns the
# same spec into the list of events each handler must see, without using the module at all. The
# property runs the tree once and asserts that the global, ordered event log (who got what, in
# what order) equals the model's, event by event, with run/parent structure, tags, metadata,
# token texts and error messages. Each probe handler is also a `TraceChecker`, so every
# handler's own (possibly partial) view is checked for balance and nesting too (D3, X1).

_N_PROBES = 3
_FLAGS = (
    "ignore_llm",
    "ignore_chat_model",
    "ignore_chain",
    "ignore_agent",
    "ignore_retriever",
    "ignore_custom_event",
)


@dataclass(frozen=True)
class _Call:
    """How a `Lambda` node's function invokes one of its children (S10)."""

    style: str  # implicit | explicit | new_root | detach | tags_md
    handlers: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class _Binding:
    """What ``with_config`` binds to a node (S9)."""

    handlers: tuple[int, ...]
    tags: tuple[str, ...]
    metadata: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _Node:
    kind: str  # llm | chat | tool | retriever | lambda | chain | parallel
    children: tuple[_Node, ...] = ()
    ctor: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, int], ...] = ()
    bound: _Binding | None = None
    fails: bool = False
    streaming: bool = False
    catches: bool = False
    async_body: bool = False  # a lambda whose function is a coroutine
    emits: bool = False
    plain: bool = False
    named: bool = True
    call: _Call = _Call("implicit")
    name: str = ""


_tags = st.lists(st.sampled_from(["t1", "t2", "t3"]), max_size=2).map(tuple)
_metadata = st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=2).map(tuple)
_handler_ids = st.lists(st.integers(0, _N_PROBES - 1), max_size=2).map(tuple)
_calls = st.one_of(
    st.just(_Call("implicit")),
    st.just(_Call("explicit")),
    st.just(_Call("detach")),
    st.builds(_Call, st.just("new_root"), _handler_ids),
    st.builds(_Call, st.just("tags_md"), st.just(()), _tags, _metadata),
)
_bindings = st.none() | st.builds(_Binding, _handler_ids, _tags, _metadata)
_fails = st.sampled_from([False, False, False, False, True])
# What every node draws, leaf or not: constructor handlers, tags, metadata, binding, failure.
_own = {
    "ctor": _handler_ids,
    "tags": _tags,
    "metadata": _metadata,
    "bound": _bindings,
    "fails": _fails,
}


def _leaves() -> st.SearchStrategy[_Node]:
    return st.builds(
        _Node,
        kind=st.sampled_from(["llm", "chat", "tool", "retriever", "lambda"]),
        **_own,
        streaming=st.booleans(),
        emits=st.booleans(),
        async_body=st.booleans(),
        named=st.booleans(),
        call=_calls,
    )


def _composites(children: st.SearchStrategy[_Node]) -> st.SearchStrategy[_Node]:
    kids = st.lists(children, min_size=1, max_size=3).map(tuple)
    return st.builds(
        _Node,
        kind=st.sampled_from(["chain", "parallel", "lambda"]),
        children=kids,
        **_own,
        catches=st.booleans(),
        emits=st.booleans(),
        async_body=st.booleans(),
        plain=st.booleans(),
        named=st.booleans(),
        call=_calls,
    )


def _named(node: _Node, counter: Iterator[int], parent_kind: str = "") -> _Node:
    """Give every node a unique name; only a chain directly inside a chain may stay plain."""
    plain = node.plain and node.kind == "chain" and parent_kind == "chain"
    children = tuple(_named(c, counter, node.kind) for c in node.children)
    if plain:
        return replace(
            node, children=children, plain=True, ctor=(), tags=(), metadata=(), bound=None
        )
    return replace(node, children=children, plain=False, name=f"n{next(counter)}")


_trees = st.recursive(_leaves(), _composites, max_leaves=8).map(
    lambda tree: _named(tree, itertools.count())
)


@dataclass(frozen=True)
class _Setup:
    """The probes of one test: ignore flags, which one lacks chat support, which one breaks."""

    flags: tuple[frozenset[str], ...]
    legacy: int | None = None  # this probe has no on_chat_model_start (D4)
    breaks: tuple[tuple[str, bool] | None, ...] = (None,) * 3  # (method, raise_error) (D2)
    kinds: tuple[str, ...] = ("sync",) * 3  # sync | async, optionally "-inline" (D5, D6)


class _Probe(TraceChecker):
    """A handler that logs every event to a shared list and checks its own view (X1).

    With ``breaks=(method, raise_error)`` it raises ``ValueError("handler-<index>")`` from that
    method, after logging the event.
    """

    def __init__(
        self,
        index: int,
        log: list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]],
        setup: _Setup,
    ) -> None:
        super().__init__()
        self.index = index
        self.log = log
        for flag in setup.flags[index]:
            setattr(self, flag, True)
        self.breaks = setup.breaks[index]
        self.raise_error = bool(self.breaks and self.breaks[1])
        self.run_inline = setup.kinds[index].endswith("-inline")

    def __repr__(self) -> str:
        return f"_Probe({self.index})"


def _probe_method(event: Event) -> Callable[..., None]:
    check = getattr(TraceChecker, event.method)

    def method(self: _Probe, *args: Any, **kwargs: Any) -> None:
        self.log.append((self.index, event, args, dict(kwargs)))
        check(self, *args, **kwargs)
        if self.breaks and self.breaks[0] == event.method:
            raise ValueError(f"handler-{self.index}")

    return method


for _event in Event:
    setattr(_Probe, _event.method, _probe_method(_event))


class _LegacyProbe(_Probe):
    """A probe without chat support: its chat starts arrive as ``on_llm_start`` (D4)."""

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError


class _AsyncProbe(_Probe):
    """`_Probe` whose event methods are coroutines (an `AsyncCallbackHandler` in all but name)."""


def _async_probe_method(event: Event) -> Callable[..., Any]:
    sync = _probe_method(event)

    async def method(self: _Probe, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)  # let other handlers run meanwhile (D5)
        sync(self, *args, **kwargs)

    return method


for _event in Event:
    setattr(_AsyncProbe, _event.method, _async_probe_method(_event))


class _AsyncLegacyProbe(_AsyncProbe):
    async def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError


def _tool_fn(*args: Any, **kwargs: Any) -> str:
    return "tool-out"


def _build(
    node: _Node,
    probes: Sequence[_Probe],
    faults: dict[str, tuple[BaseException, bool]] | None = None,
) -> Runnable:
    """The real runnable for a spec node; ``faults`` maps node names to an exception that node
    raises, and for a lambda whether before its children (else after them)."""
    faults = faults or {}
    kw: dict[str, Any] = {
        "name": node.name if node.named else None,
        "callbacks": [probes[i] for i in node.ctor],
        "tags": list(node.tags),
        "metadata": {**dict(node.metadata), "node": node.name},
    }
    error: BaseException | None = ValueError(f"fail-{node.name}") if node.fails else None
    if node.name in faults and node.kind != "lambda":
        error = faults[node.name][0]
    runnable: Runnable
    if node.kind in ("llm", "chat"):
        model = LLM if node.kind == "llm" else ChatModel
        runnable = model("a b", streaming=node.streaming, error=error, **kw)
    elif node.kind == "tool":
        runnable = Tool(_tool_fn, error=error, **kw)
    elif node.kind == "retriever":
        runnable = Retriever(["a b"], error=error, **kw)
    elif node.kind == "chain":
        steps = [_build(c, probes, faults) for c in node.children]
        runnable = Chain(*steps) if node.plain else Chain(*steps, **kw)
    elif node.kind == "parallel":
        kids = {f"k{i}": _build(c, probes, faults) for i, c in enumerate(node.children)}
        runnable = Parallel(kids, **kw)
    else:
        children = [_build(c, probes, faults) for c in node.children]
        runnable = Lambda(_lambda_body(node, children, probes, faults.get(node.name)), **kw)
    if node.bound is not None:
        b = node.bound
        runnable = runnable.with_config(
            callbacks=[probes[i] for i in b.handlers], tags=list(b.tags), metadata=dict(b.metadata)
        )
    return runnable


def _lambda_body(
    node: _Node,
    children: list[Runnable],
    probes: Sequence[_Probe],
    fault: tuple[BaseException, bool] | None = None,
) -> Callable[[Any, RunnableConfig], Any]:
    def inject(first: bool) -> None:
        if fault is not None and fault[1] == first:
            raise fault[0]

    def config_for(call: _Call, config: RunnableConfig) -> RunnableConfig | None:
        configs: dict[str, RunnableConfig | None] = {
            "implicit": None,
            "explicit": config,
            "new_root": {"callbacks": [probes[i] for i in call.handlers]},
            "detach": {"callbacks": []},
            "tags_md": {"tags": list(call.tags), "metadata": dict(call.metadata)},
        }
        return configs[call.style]

    calls = list(zip(node.children, children, strict=True))
    if node.async_body:

        async def abody(value: Any, config: RunnableConfig) -> Any:
            inject(True)
            for spec, child in calls:
                try:
                    await child.ainvoke(value, config_for(spec.call, config))
                except ValueError:
                    if not node.catches:
                        raise
            if node.emits:
                await adispatch_custom_event("evt", node.name)
            inject(False)
            if node.fails:
                raise ValueError(f"fail-{node.name}")
            return value

        abody.__name__ = "body"  # the default run name (R4) does not depend on the colour
        return abody

    def body(value: Any, config: RunnableConfig) -> Any:
        inject(True)
        for spec, child in calls:
            try:
                child.invoke(value, config_for(spec.call, config))
            except ValueError:
                if not node.catches:
                    raise
        if node.emits:
            dispatch_custom_event("evt", node.name)
        inject(False)
        if node.fails:
            raise ValueError(f"fail-{node.name}")
        return value

    return body


# -- the model ---------------------------------------------------------------------------------
#
# An event is ``(method, run, parent, tags, metadata, name, extra)``: runs are named by their
# node (the node's local ``node`` metadata key tells the real runs apart), ``metadata`` and
# ``name`` appear on start and custom events only, ``extra`` is the token, the error message
# or the custom event's ``(name, data)``.

_Ev = tuple[str, Any, Any, list[str], dict[str, Any] | None, str | None, Any]

_IGNORED_BY = (  # method prefix -> the flag that silences it (SPEC section 1)
    ("on_chain_", "ignore_chain"),
    ("on_llm_", "ignore_llm"),
    ("on_chat_model_", "ignore_chat_model"),
    ("on_tool_", "ignore_agent"),
    ("on_retriever_", "ignore_retriever"),
    ("on_custom_event", "ignore_custom_event"),
)
_DEFAULT_NAMES = {
    "llm": "LLM",
    "chat": "ChatModel",
    "tool": "_tool_fn",
    "retriever": "Retriever",
    "lambda": "body",
    "chain": "Chain",
    "parallel": "Parallel",
}


def _dedupe(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class _Scope:
    """What a run hands its children: inheritable handlers, tags, metadata, and itself (S4)."""

    handlers: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, int], ...] = ()
    parent: str | None = None


def _model(tree: _Node, root: _Call, setup: _Setup) -> tuple[list[tuple[int, _Ev]], str | None]:
    """The global event log the tree must produce, and the message of the error it raises.

    Written from SPEC alone. A run's handlers: inherited, then bound, then request, then
    constructor ones, each once (S1, S2, S5, S6, S9). Tags likewise, an ordered set with the
    step tag after the inherited ones (S3, S4, S7). Metadata merged, nearest writer winning
    (S8, S9). Children get only the inheritable part (S4); a nested call with a list of
    handlers or an empty list starts a new root (S10). Each handler skips what its flags
    ignore (D1); the legacy probe gets chat starts as ``on_llm_start`` (D4). Every handler
    gets every event; a failing handler only matters with ``raise_error``, and then its
    failure is the run's, raised once the event reached everyone (D2). Every run ends with
    exactly one end or error (R1, D3); failures propagate to each ancestor.
    """
    log: list[tuple[int, _Ev]] = []

    def emit(handlers: tuple[int, ...], event: _Ev) -> str | None:
        """Deliver one event; return the failure it raises, if any."""
        flag = next(f for prefix, f in _IGNORED_BY if event[0].startswith(prefix))
        raised = None
        for h in handlers:
            method = event[0]
            if flag in setup.flags[h]:
                continue
            if h == setup.legacy and method == "on_chat_model_start":
                if "ignore_llm" in setup.flags[h]:
                    continue
                method = "on_llm_start"
            log.append((h, (method, *event[1:])))
            if setup.breaks[h] == (method, True) and raised is None:
                raised = f"handler-{h}"
        return raised

    def run(node: _Node, base: _Scope, step_tag: str | None, call: _Call) -> str | None:
        call_handlers: tuple[int, ...] = ()
        if call.style in ("new_root", "detach", "root"):
            base, call_handlers = _Scope(), call.handlers
        bound = node.bound or _Binding((), (), ())
        call_tags = call.tags if call.style in ("tags_md", "root") else ()
        call_md = call.metadata if call.style in ("tags_md", "root") else ()
        inh_handlers = _dedupe(base.handlers + bound.handlers + call_handlers)
        handlers = _dedupe(inh_handlers + node.ctor)
        inh_tags = _dedupe(base.tags + bound.tags + call_tags)
        step = (step_tag,) if step_tag else ()
        tags = list(_dedupe(base.tags + step + bound.tags + call_tags + node.tags))
        inh_md = dict(base.metadata) | dict(bound.metadata) | dict(call_md)
        md = inh_md | dict(node.metadata) | {"node": node.name}
        child = _Scope(inh_handlers, inh_tags, tuple(inh_md.items()), node.name)
        me, parent = node.name, base.parent
        name = node.name if node.named else _DEFAULT_NAMES[node.kind]
        family = {"chat": "llm", "lambda": "chain", "parallel": "chain"}.get(node.kind, node.kind)

        start = {"chat": "on_chat_model_start"}.get(node.kind, f"on_{family}_start")
        failure = emit(handlers, (start, me, parent, tags, md, name, None))
        if failure is None:
            failure = body(node, child, handlers, (me, parent, tags, md))
        if failure:
            return (
                emit(handlers, (f"on_{family}_error", me, parent, tags, None, None, failure))
                or failure
            )
        return emit(handlers, (f"on_{family}_end", me, parent, tags, None, None, None))

    def body(
        node: _Node, child: _Scope, handlers: tuple[int, ...], run_: tuple[Any, ...]
    ) -> str | None:
        me, parent, tags, md = run_
        own = f"fail-{node.name}" if node.fails else None
        if node.kind in ("llm", "chat"):
            for token in (["a "] if node.fails else ["a ", "b"]) if node.streaming else []:
                raised = emit(handlers, ("on_llm_new_token", me, parent, tags, None, None, token))
                if raised:
                    return raised
            return own
        if node.kind in ("tool", "retriever"):
            return own
        if node.kind == "chain":
            for i, kid in enumerate(_splice(node.children), 1):
                failure = run(kid, child, f"seq:step:{i}", _Call("implicit"))
                if failure:
                    return failure
            return None
        if node.kind == "parallel":
            kids = enumerate(node.children)
            failures = [run(kid, child, f"map:key:k{i}", _Call("implicit")) for i, kid in kids]
            return next((f for f in failures if f), None)
        for kid in node.children:  # a lambda calling its children
            failure = run(kid, child, None, kid.call)
            if failure and not node.catches:
                return failure
        if node.emits:
            raised = emit(handlers, ("on_custom_event", me, None, tags, md, None, ("evt", me)))
            if raised:
                return raised
        return own

    return log, run(tree, _Scope(), None, root)


def _splice(children: tuple[_Node, ...]) -> list[_Node]:
    """A chain's steps after splicing plain nested chains (SPEC section 5, `Chain`)."""
    out: list[_Node] = []
    for kid in children:
        out.extend(_splice(kid.children) if kid.plain else [kid])
    return out


def _observed(
    log: list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]],
) -> list[tuple[int, _Ev]]:
    """The probes' shared log in the model's terms.

    Run ids become node names (from the ``node`` metadata of start events). A parent id that no
    probe saw start stands for a run nobody listened to (D7): it must still be the id of the
    right parent, so each such id must stand for one parent node in the expected log; the
    caller checks that through `_resolve_unseen`.
    """
    names = {kw["run_id"]: kw["metadata"]["node"] for _, e, _, kw in log if e.phase == "start"}
    out: list[tuple[int, _Ev]] = []
    for index, event, args, kw in log:
        extra: Any = None
        if event is Event.LLM_NEW_TOKEN:
            extra = args[0]
        elif event.phase == "error":
            extra = str(args[0])
        elif event is Event.CUSTOM_EVENT:
            extra = args
        parent = kw.get("parent_run_id")
        record: _Ev = (
            event.method,
            names.get(kw["run_id"], kw["run_id"]),
            names.get(parent, parent),
            kw["tags"],
            kw.get("metadata"),
            kw.get("name"),
            extra,
        )
        out.append((index, record))
    return out


def _resolve_unseen(
    observed: list[tuple[int, _Ev]], expected: list[tuple[int, _Ev]], runs_per_node: int = 1
) -> list[tuple[int, _Ev]]:
    """Replace each run id no probe saw start by the node it stands for, if consistently one.

    Such ids are parents nobody listened to (D7) or runs whose start a probe's own flags hid
    (D1); each must stand for exactly one node of the expected log, and at most
    ``runs_per_node`` ids (one per batch input) for the same node.
    """
    if len(observed) != len(expected):
        return observed
    meaning: dict[uuid.UUID, set[Any]] = {}
    for (_, ev), (_, want) in zip(observed, expected, strict=True):
        for got, wanted in ((ev[1], want[1]), (ev[2], want[2])):
            if isinstance(got, uuid.UUID):
                meaning.setdefault(got, set()).add(wanted)
    resolved = {i: next(iter(m)) for i, m in meaning.items() if len(m) == 1 and None not in m}
    per_node = collections.Counter(resolved.values())
    if any(count > runs_per_node for count in per_node.values()):
        return observed  # two ids for one node: leave them unresolved so the comparison fails
    return [
        (h, (ev[0], resolved.get(ev[1], ev[1]), resolved.get(ev[2], ev[2]), *ev[3:]))
        for h, ev in observed
    ]


_roots = st.builds(_Call, st.just("root"), _handler_ids, _tags, _metadata)
_breakable = ["on_chain_start", "on_chain_end", "on_chain_error", "on_llm_start",
              "on_chat_model_start", "on_llm_new_token", "on_llm_end", "on_tool_start",
              "on_retriever_error", "on_custom_event"]  # fmt: skip
_setups = st.builds(
    _Setup,
    st.lists(
        st.frozensets(st.sampled_from(_FLAGS), max_size=2), min_size=_N_PROBES, max_size=_N_PROBES
    ).map(tuple),
    st.sampled_from([None, *range(_N_PROBES)]),
    st.lists(
        st.none() | st.tuples(st.sampled_from(_breakable), st.booleans()),
        min_size=_N_PROBES,
        max_size=_N_PROBES,
    ).map(tuple),
    st.lists(
        st.sampled_from(["sync", "async", "sync-inline", "async-inline"]),
        min_size=_N_PROBES,
        max_size=_N_PROBES,
    ).map(tuple),
)


def _probes(
    setup: _Setup,
) -> tuple[list[_Probe], list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]]]:
    log: list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]] = []
    probes: list[_Probe] = []
    for i, kind in enumerate(setup.kinds):
        if kind.startswith("async"):
            probes.append((_AsyncLegacyProbe if i == setup.legacy else _AsyncProbe)(i, log, setup))
        else:
            probes.append((_LegacyProbe if i == setup.legacy else _Probe)(i, log, setup))
    return probes, log


def _root_config(root: _Call, probes: Sequence[_Probe]) -> RunnableConfig:
    return {
        "callbacks": [probes[i] for i in root.handlers],
        "tags": list(root.tags),
        "metadata": dict(root.metadata),
        "max_concurrency": 1,  # parallel branches in key order, so the global log is exact
    }


def _has_async_body(node: _Node) -> bool:
    return node.async_body or any(map(_has_async_body, node.children))


def _by_handler(log: list[tuple[int, _Ev]]) -> list[tuple[int, _Ev]]:
    """Each handler's events in their order, handler after handler (a stable sort)."""
    return sorted(log, key=lambda entry: entry[0])


@given(tree=_trees, root=_roots, setup=_setups)
def test_S1_to_S10_D1_to_D4_R0_to_R4_random_run_trees_match_the_model(
    tree: _Node, root: _Call, setup: _Setup
) -> None:
    probes, log = _probes(setup)
    runnable = _build(tree, probes)
    expected, failure = _model(tree, root, setup)
    try:
        runnable.invoke("x", _root_config(root, probes))
        raised = None
    except ValueError as error:  # R0, R1, D2: the failure that reaches the caller
        raised = str(error)
    assert raised == failure
    observed = _observed(log)
    if _has_async_body(tree):  # its children are dispatched under a loop (D5): no global order
        observed, expected = _by_handler(observed), _by_handler(expected)
    assert _resolve_unseen(observed, expected) == expected
    for probe in probes:
        probe.check()  # D3 and X1 on each handler's own view


@given(tree=_trees, root=_roots, setup=_setups, n=st.integers(1, 3))
def test_R3_batch_runs_one_independent_root_per_input(
    tree: _Node, root: _Call, setup: _Setup, n: int
) -> None:
    probes, log = _probes(setup)
    runnable = _build(tree, probes)
    expected, failure = _model(tree, root, setup)
    outputs = runnable.batch(["x"] * n, _root_config(root, probes), return_exceptions=True)
    assert [str(o) if isinstance(o, Exception) else None for o in outputs] == [failure] * n
    observed, expected = _observed(log), expected * n
    if _has_async_body(tree):
        observed, expected = _by_handler(observed), _by_handler(expected)
    assert _resolve_unseen(observed, expected, runs_per_node=n) == expected
    for probe in probes:
        probe.check()


@given(tree=_trees, root=_roots, setup=_setups)
def test_D5_D6_parity_ainvoke_gives_each_handler_the_events_invoke_gives(
    tree: _Node, root: _Call, setup: _Setup
) -> None:
    """Same trees, same model: under ``ainvoke`` (async dispatch, D5) every handler gets the
    very list ``invoke`` gives it (sync dispatch, async handlers run to completion, D6). Only
    the interleaving across concurrent non-inline handlers may differ."""
    expected, failure = _model(tree, root, setup)
    per_handler = _by_handler(expected)
    views: list[list[tuple[int, _Ev]]] = []
    for mode in ("invoke", "ainvoke"):
        probes, log = _probes(setup)
        runnable, config = _build(tree, probes), _root_config(root, probes)
        try:
            if mode == "invoke":
                runnable.invoke("x", config)
            else:
                asyncio.run(runnable.ainvoke("x", config))
            raised = None
        except ValueError as error:
            raised = str(error)
        assert raised == failure, mode
        views.append(_resolve_unseen(_by_handler(_observed(log)), per_handler))
        for probe in probes:
            probe.check()
    assert views[0] == views[1] == per_handler


def test_R4_constructor_arguments_are_checked() -> None:
    three: Any = 3
    cases: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (
            lambda: Lambda(_ident, name=three),
            TypeError,
            "name must be a non-empty string or None, got 3 (int)",
        ),
        (
            lambda: Lambda(_ident, name=""),
            TypeError,
            "name must be a non-empty string or None, got '' (str)",
        ),
        (lambda: Lambda(3), TypeError, "Lambda expects a function, got 3 (int)"),  # type: ignore[arg-type]
        (lambda: Tool(3), TypeError, "Tool expects a function, got 3 (int)"),  # type: ignore[arg-type]
        (lambda: Chain(), ValueError, "a Chain needs at least one step"),
        (lambda: Parallel(), ValueError, "a Parallel needs at least one step"),
        # keys that would silently drop a branch: 1 and "1", or one key given twice
        (
            lambda: Parallel({three: _ident, "3": _ident}),
            TypeError,
            "Parallel step keys must be strings, got 3 (int)",
        ),
        (lambda: Parallel({"a": _ident}, a=_ident), ValueError, "Parallel got the step 'a' twice"),
    ]
    for make, kind, message in cases:
        with pytest.raises(kind, match=f"^{re.escape(message)}$"):
            make()


def test_R4_steps_are_coerced_and_builtins_without_signatures_work() -> None:
    rec = Recorder()
    chain = Chain(lambda x: [x, 2], {"biggest": Lambda(max), "n": len})
    assert chain.invoke(1, {"callbacks": [rec], "max_concurrency": 1}) == {"biggest": 2, "n": 2}
    piped = (lambda x: x + 1) | Lambda(lambda x: x * 10, name="g")  # Runnable.__ror__
    assert isinstance(piped, Chain) and piped.invoke(1) == 20
    names = [r.kwargs["name"] for r in rec.records if r.event.phase == "start"]
    assert names == ["Chain", "Lambda", "Parallel", "max", "len"]
    with pytest.raises(NotImplementedError):
        Runnable(name="abstract").invoke(1)


def test_R1_streams_without_handlers_and_async_tools_run_plainly() -> None:
    async def ashout(text: str) -> str:
        return text.upper()

    chain = Lambda(_ident) | Tool(ashout)
    assert list(chain.stream("a")) == ["A"]
    assert asyncio.run(chain.ainvoke("b")) == "B"
    assert _streamed(chain, None, "astream", "c") == ["C"]


def test_R1_a_retriever_streams_its_documents_as_one_chunk() -> None:
    retriever = Retriever(["a b", "c"], name="docs")
    rec = Recorder()
    assert list(retriever.stream("a", {"callbacks": [rec]})) == [[Document("a b")]]
    assert _streamed(retriever, {"callbacks": [rec]}, "astream", "c") == [[Document("c")]]
    assert rec.events() == ["on_retriever_start", "on_retriever_end"] * 2


def test_S10_a_streamed_lambdas_implicit_children_stay_in_the_tree() -> None:
    child = Lambda(_ident, name="child")
    for mode in ("stream", "astream"):
        rec = Recorder()
        body = Lambda(lambda x: child.invoke(x), name="body")
        assert _drive(body, {"callbacks": [rec]}, mode) is None
        starts = [r for r in rec.records if r.event.phase == "start"]
        assert [r.kwargs["name"] for r in starts] == ["body", "child"]
        assert starts[1].parent_run_id == starts[0].run_id, mode


def test_S11_an_async_body_run_by_invoke_inside_a_loop_keeps_the_context() -> None:
    """``invoke`` inside a running loop runs an async body on a worker thread's own loop (D6);
    the context goes with it, so the body's implicit children stay in the tree (S10, S11) and
    it sees the caller's context variables."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    child, seen = Lambda(_ident, name="child"), []

    async def body(x: Any) -> Any:
        seen.append(var.get())
        return await child.ainvoke(x)

    async def main() -> Any:
        var.set("caller")
        return Lambda(body, name="body").invoke(1, {"callbacks": [rec]})

    rec = Recorder()
    assert asyncio.run(main()) == 1
    starts = [r for r in rec.records if r.event.phase == "start"]
    assert [r.kwargs["name"] for r in starts] == ["body", "child"]
    assert starts[1].parent_run_id == starts[0].run_id and seen == ["caller"]


def test_S10_adispatch_custom_event_needs_a_string_name() -> None:
    async def body(x: Any) -> Any:
        await adispatch_custom_event(3, x)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="custom event name must be a string, got 3"):
        asyncio.run(Lambda(body).ainvoke(1))


def test_R2_only_llm_runs_are_leaves_and_say_so() -> None:
    [run] = CallbackManager([Recorder()]).on_llm_start({}, ["p"])
    with pytest.raises(TypeError, match=r"^a llm run is a leaf and has no child runs$"):
        run.get_child()


def test_R3_batch_of_one_failing_input_returns_the_exception_in_place() -> None:
    error = ValueError("only one")
    assert Lambda(_fail("only one")).batch([1], return_exceptions=True)[0].args == error.args
    with pytest.raises(ValueError, match=r"^batch\(\) got 2 configs for 1 inputs; pass one"):
        Lambda(_ident).batch([1], [{}, {}])


def test_S10_a_call_with_only_tags_or_only_metadata_adds_them_to_the_inherited_manager() -> None:
    rec = Recorder()
    inner = Lambda(_ident, name="inner")

    def body(x: Any) -> Any:
        inner.invoke(x, {"tags": ["only-tags"]})
        inner.invoke(x, {"metadata": {"only": "metadata"}})
        return x

    Lambda(body, name="outer").invoke(1, {"callbacks": [rec]})
    starts = [r for r in rec.records if r.event.phase == "start"]
    assert [(r.tags, r.metadata) for r in starts] == [
        ([], {}), (["only-tags"], {}), ([], {"only": "metadata"}),
    ]  # fmt: skip
    assert starts[1].parent_run_id == starts[0].run_id == starts[2].parent_run_id


def test_S10_R1_streams_carry_the_input_the_output_and_the_enclosing_run() -> None:
    """``stream`` and ``astream`` report the input on start and the whole output on end, run
    every step of a chain before streaming the last, and keep implicit children in the tree."""
    rec = Recorder()
    child = Lambda(_ident, name="child")

    def body(x: int) -> int:
        return int(child.invoke(x)) * 10

    chain = Chain(Lambda(lambda x: x + 1, name="a"), Lambda(body, name="b"), Lambda(str, name="c"))
    assert list(chain.stream(1, {"callbacks": [rec]})) == ["20"]
    assert _streamed(chain, {"callbacks": [rec]}, "astream", 1) == ["20"]
    for records in (rec.records[: len(rec.records) // 2], rec.records[len(rec.records) // 2 :]):
        starts = {r.kwargs["name"]: r for r in records if r.event.phase == "start"}
        ends = [r for r in records if r.event.phase == "end"]
        assert starts["Chain"].args[1] == 1 and ends[-1].args[0] == "20"
        assert starts["child"].parent_run_id == starts["b"].run_id


def test_R4_R5_names_serialized_ids_and_tool_payloads() -> None:
    def shout(text: str) -> str:
        """Shout the text."""
        return text.upper()

    def add(a: int, b: int) -> int:
        return a + b

    rec = Recorder()
    Tool(shout).invoke("hi", {"callbacks": [rec]})
    Tool(add, description="adds").invoke({"a": 1, "b": 2}, {"callbacks": [rec]})
    Lambda(functools.partial(_ident)).invoke(1, {"callbacks": [rec]})
    starts = [r for r in rec.records if r.event.phase == "start"]
    assert [r.args[0] for r in starts] == [
        {"name": "shout", "id": ["callbacks", "Tool"], "description": "Shout the text."},
        {"name": "add", "id": ["callbacks", "Tool"], "description": "adds"},
        {"name": "Lambda", "id": ["callbacks", "Lambda"]},
    ]
    assert [r.kwargs.get("inputs") for r in starts[:2]] == [None, {"a": 1, "b": 2}]
    assert [r.args[0] for r in rec.records if r.event.phase == "end"] == ["HI", 3, 1]
    assert Tool(lambda x: x).description == ""
    assert asyncio.run(Tool(shout).ainvoke("yo")) == "YO"


def test_R0_R2_R5_models_take_any_input_cycle_responses_and_stream_chunks() -> None:
    rec = Recorder()
    llm = LLM(["a b", "c"], streaming=True)
    assert [llm.invoke(5, {"callbacks": [rec]}) for _ in range(3)] == ["a b", "c", "a b"]
    assert rec.records[0].args[1] == ["Human: 5"]
    critic = types.SimpleNamespace(type="critic", content="fine")
    only_content = types.SimpleNamespace(content="no type")
    chat, chat_rec = ChatModel("ok", streaming=True), Recorder()
    chat.invoke(critic, {"callbacks": [chat_rec]})
    chat.invoke(only_content, {"callbacks": [chat_rec]})
    starts = [r.args[1] for r in chat_rec.records if r.event.phase == "start"]
    assert starts == [[[critic]], [[HumanMessage(str(only_content))]]]
    [token] = [r for r in chat_rec.records if r.event is Event.LLM_NEW_TOKEN][:1]
    assert token.kwargs["chunk"] == Generation("ok", AIMessage("ok"))
    fallback = _LLMStartOnly()
    chat.invoke([critic], {"callbacks": [fallback]})
    assert fallback.seen[0][1] == ["critic: fine"]  # an unknown role is shown as it is (D4)
    failing, frec = LLM("x y z", streaming=True, error=ValueError("down")), Recorder()
    assert isinstance(_drive(failing, {"callbacks": [frec]}, "ainvoke"), ValueError)
    assert frec.events() == ["on_llm_start", "on_llm_new_token", "on_llm_error"]


def test_R1_async_retriever_and_sync_tool_get_their_input() -> None:
    retriever = Retriever(["apple pie", "banana"])
    assert asyncio.run(retriever.ainvoke("apple")) == [Document("apple pie")]
    assert asyncio.run(Tool(str.upper).ainvoke("x")) == "X"


def test_S10_custom_event_with_another_runs_config_belongs_to_that_run() -> None:
    rec = Recorder()
    saved: list[RunnableConfig] = []

    def outer(x: Any, config: RunnableConfig) -> Any:
        saved.append(config)
        return inner.invoke(x)

    def inner_body(x: Any) -> Any:
        dispatch_custom_event("evt", x, config=saved[0])  # the outer run's config
        return x

    inner = Lambda(inner_body, name="inner")
    Lambda(outer, name="outer").invoke(1, {"callbacks": [rec]})
    [custom] = [r for r in rec.records if r.event is Event.CUSTOM_EVENT]
    assert custom.run_id == rec.records[0].run_id  # the outer run, not the inner one


def test_R1_D3_a_body_that_cancels_its_own_task_gives_that_very_error() -> None:
    """In `abatch` and in an async `Parallel`, each item or branch is a task of its own. A body
    that cancels that task raises a `asyncio.CancelledError`: the call raises that same object
    (R1; `return_exceptions` keeps only `Exception`), after the other runs closed (D3)."""
    rec, checker = Recorder(), TraceChecker()
    raised: list[BaseException] = []

    async def pick(x: int) -> int:
        if x == 1:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError as error:
                raised.append(error)
                raise
        for _ in range(3):
            await asyncio.sleep(0.001)
        return x

    async def main() -> None:
        config: RunnableConfig = {"callbacks": [rec, checker]}
        with pytest.raises(asyncio.CancelledError) as info:
            await Lambda(pick, name="pick").abatch([1, 2], config, return_exceptions=True)
        assert info.value is raised[0]
        assert len(rec.records) == 4  # the other item's run closed before abatch raised
        fan = Parallel(a=Lambda(pick, name="pick"), b=Lambda(_ident, name="b"))
        with pytest.raises(asyncio.CancelledError) as info:
            await fan.ainvoke(1, config)
        assert info.value is raised[1]
        assert len(rec.records) == 10

    asyncio.run(main())
    checker.check()
    errors = [r.args[0] for r in rec.records if r.event.phase == "error"]
    assert errors == [raised[0], raised[1], raised[1]]  # the item; the branch, then the Parallel


def test_S10_adispatch_custom_event_with_another_runs_config_belongs_to_that_run() -> None:
    rec = Recorder()
    saved: list[RunnableConfig] = []

    async def outer(x: Any, config: RunnableConfig) -> Any:
        saved.append(config)
        return await inner.ainvoke(x)

    async def inner_body(x: Any) -> Any:
        await adispatch_custom_event("evt", x, config=saved[0])  # the outer run's config
        await adispatch_custom_event("own", x)
        return x

    inner = Lambda(inner_body, name="inner")
    assert asyncio.run(Lambda(outer, name="outer").ainvoke(1, {"callbacks": [rec]})) == 1
    outer_id, inner_id = rec.records[0].run_id, rec.records[1].run_id
    custom = [(r.args[0], r.run_id) for r in rec.records if r.event is Event.CUSTOM_EVENT]
    assert custom == [("evt", outer_id), ("own", inner_id)]


# ===============================================================================================
# Async: dispatch under a loop (D5), async handlers under sync dispatch (D6), async runs
# ===============================================================================================


# --- async helpers -------------------------------------------------------------------------------

_Log = list[tuple[Any, ...]]
_Delay = Callable[[str, int | None], float]


def _no_delay(method: str, run: int | None) -> float:
    return 0.0


def _every(seconds: float) -> _Delay:
    """Sleep ``seconds`` in every event."""
    return lambda method, run: seconds


def _only(method: str, run: int, seconds: float) -> _Delay:
    """Sleep ``seconds`` in one event of one run only."""
    return lambda m, r: seconds if (m, r) == (method, run) else 0.0


class _LogProbeState:
    """What `_SyncLogProbe` and `_AsyncLogProbe` share.

    For every event the probe appends ``(label, "got", event method, run id)`` to the shared
    ``log``, feeds its own `Recorder` (``recorder``) and `TraceChecker` (``checker``), notes its
    thread in ``threads``, sleeps ``delay(method, run id)`` seconds (``time.sleep`` or
    ``asyncio.sleep``), then appends ``(label, "done", event method, run id)``. With
    ``fail=(method, error)`` it raises ``error`` from that method after logging "done".
    """

    def __init__(
        self,
        label: str,
        log: _Log,
        *,
        run_inline: bool = False,
        delay: _Delay = _no_delay,
        fail: tuple[str, BaseException] | None = None,
        raise_error: bool = False,
    ) -> None:
        self.label = label
        self.log = log
        self.run_inline = run_inline
        self.raise_error = raise_error
        self.delay = delay
        self.fail = fail
        self.threads: set[int] = set()
        self.recorder = Recorder(label)
        self.checker = TraceChecker()
        self.entered: asyncio.Event | None = None  # set when a delayed event arrives (async)

    def _got(self, event: Event, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        run = _int(kwargs.get("run_id"))
        self.threads.add(threading.get_ident())
        self.log.append((self.label, "got", event.method, run))
        getattr(self.recorder, event.method)(*args, **kwargs)
        getattr(self.checker, event.method)(*args, **kwargs)
        return self.delay(event.method, run)

    def _done(self, event: Event, kwargs: dict[str, Any]) -> None:
        self.log.append((self.label, "done", event.method, _int(kwargs.get("run_id"))))
        if self.fail is not None and self.fail[0] == event.method:
            raise self.fail[1]


class _SyncLogProbe(_LogProbeState, BaseCallbackHandler):
    """A sync handler that logs, records and checks every event (see `_LogProbeState`)."""


class _AsyncLogProbe(_LogProbeState, AsyncCallbackHandler):
    """An async handler that logs, records and checks every event (see `_LogProbeState`)."""


def _sync_log_probe_method(event: Event) -> Callable[..., None]:
    def method(self: _SyncLogProbe, *args: Any, **kwargs: Any) -> None:
        delay = self._got(event, args, kwargs)
        if delay:
            time.sleep(delay)
        self._done(event, kwargs)

    return method


def _async_log_probe_method(event: Event) -> Callable[..., Coroutine[Any, Any, None]]:
    async def method(self: _AsyncLogProbe, *args: Any, **kwargs: Any) -> None:
        delay = self._got(event, args, kwargs)
        if delay and self.entered is not None:
            self.entered.set()
        await asyncio.sleep(delay)  # always yields to the loop, even for 0
        self._done(event, kwargs)

    return method


for _e in Event:
    setattr(_SyncLogProbe, _e.method, _sync_log_probe_method(_e))
    setattr(_AsyncLogProbe, _e.method, _async_log_probe_method(_e))
del _e


def _entries(labels: Sequence[str], method: str, run: int) -> list[tuple[Any, ...]]:
    """What probes ``labels`` log for one event, one after another: got, done, got, done..."""
    return [(label, stage, method, run) for label in labels for stage in ("got", "done")]


def _blocks(log: _Log) -> list[tuple[tuple[Any, ...], ...]]:
    """The log cut into blocks: consecutive probe entries of one event (run id and method) form
    one block, sorted (handlers of one event may interleave); any other entry is a block alone.
    An event that overlaps anything else splits into several blocks."""

    def key(entry: tuple[Any, ...]) -> tuple[Any, ...]:
        return entry[2:] if len(entry) == 4 else (id(entry),)

    return [tuple(sorted(group)) for _, group in itertools.groupby(log, key)]


def _errors(rec: Recorder) -> list[BaseException]:
    return [r.args[0] for r in rec.records if r.event.phase == "error"]


def _mixed_probes(log: _Log) -> list[_LogProbeState]:
    """One probe of each kind: sync, async, inline sync, inline async."""
    return [
        _SyncLogProbe("sync", log),
        _AsyncLogProbe("async", log),
        _SyncLogProbe("inline_sync", log, run_inline=True),
        _AsyncLogProbe("inline_async", log, run_inline=True),
    ]


# ===============================================================================================
# D5: async dispatch
# ===============================================================================================


@pytest.mark.parametrize("inline", [False, True])
def test_D5_each_handler_is_delivered_in_a_task_of_its_own(inline: bool) -> None:
    """A handler's delivery runs in a task of its own, never in the run's task, whether it
    starts on the next turn of the loop (Python 3.11) or eagerly (3.12+): what it opens there
    (a timeout, a task group) is its own. A handler that does not suspend is done by the time
    the run goes on."""
    tasks: dict[str, list[Any]] = {"handler": [], "body": []}

    class Seen(AsyncCallbackHandler):
        run_inline = inline

        async def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            tasks["handler"].append(asyncio.current_task())

    async def body(x: Any) -> Any:
        tasks["body"].append(asyncio.current_task())
        assert all(task.done() for task in tasks["handler"])
        return x

    async def main() -> Any:
        tasks["caller"] = [asyncio.current_task()]
        return await Lambda(body, name="b").ainvoke(1, {"callbacks": [Seen()]})

    assert asyncio.run(main()) == 1
    (handler,), (body_task,), (caller,) = tasks["handler"], tasks["body"], tasks["caller"]
    assert handler is not None and handler is not body_task and handler is not caller


def test_D5_inline_handlers_run_first_in_order_on_the_loop_then_the_others() -> None:
    log: _Log = []
    n_sync = _SyncLogProbe("n_sync", log, delay=_every(0.02))
    i_async1 = _AsyncLogProbe("i_async1", log, run_inline=True, delay=_every(0.03))
    n_async = _AsyncLogProbe("n_async", log, delay=_every(0.01))
    i_sync = _SyncLogProbe("i_sync", log, run_inline=True, delay=_every(0.01))
    i_async2 = _AsyncLogProbe("i_async2", log, run_inline=True)
    handlers = [n_sync, i_async1, n_async, i_sync, i_async2]

    async def main() -> int:
        assert await Lambda(_ident, name="f").ainvoke("q", {"callbacks": handlers}) == "q"
        return threading.get_ident()

    with sequential_run_ids():
        loop_thread = asyncio.run(main())
    inline, others = ("i_async1", "i_sync", "i_async2"), ("n_sync", "n_async")
    for block, method in zip((log[:10], log[10:]), ("on_chain_start", "on_chain_end"), strict=True):
        assert block[:6] == _entries(inline, method, 1)  # in order, one after another
        assert sorted(block[6:]) == sorted(_entries(others, method, 1))  # all after the inline
    assert len(log) == 20
    assert i_sync.threads == {loop_thread}  # inline sync: on the loop
    assert i_async1.threads == i_async2.threads == n_async.threads == {loop_thread}
    assert n_sync.threads and loop_thread not in n_sync.threads  # worker threads, off the loop


def test_D5_non_inline_handlers_are_awaited_concurrently() -> None:
    # Three non-inline handlers (one sync, two async) meet at a barrier in every event: they
    # can only all pass it if they run at the same time (else it breaks after 5 s).
    barriers = {m: threading.Barrier(3, timeout=5) for m in ("on_chain_start", "on_chain_end")}
    met: list[tuple[str, str, bool]] = []

    def meet(label: str, method: str) -> None:
        try:
            barriers[method].wait()
            met.append((label, method, True))
        except threading.BrokenBarrierError:
            met.append((label, method, False))

    class SyncMeet(BaseCallbackHandler):
        def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            meet("sync", "on_chain_start")

        def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
            meet("sync", "on_chain_end")

    class AsyncMeet(AsyncCallbackHandler):
        def __init__(self, label: str) -> None:
            self.label = label

        async def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            await asyncio.to_thread(meet, self.label, "on_chain_start")

        async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
            await asyncio.to_thread(meet, self.label, "on_chain_end")

    handlers = [SyncMeet(), AsyncMeet("async1"), AsyncMeet("async2")]
    assert asyncio.run(Lambda(_ident).ainvoke("q", {"callbacks": handlers})) == "q"
    assert sorted(met) == sorted(
        (label, method, True)
        for label in ("sync", "async1", "async2")
        for method in ("on_chain_start", "on_chain_end")
    )


def test_D5_a_loop_whose_futures_and_tasks_are_its_own_kind_is_served_alike() -> None:
    """A loop may make its futures and tasks of another class than asyncio's C ones (here
    asyncio's own pure-Python ones): each event still reaches every handler, a sync one in a
    worker thread, before the run goes on, and a sync body under ``ainvoke`` still returns."""
    log: list[str] = []

    class Slow(BaseCallbackHandler):
        def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.01)
            log.append("start")

        def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.01)
            log.append("end")

    class OwnFutures(asyncio.SelectorEventLoop):
        def create_future(self) -> asyncio.Future[Any]:
            return asyncio.futures._PyFuture(loop=self)  # type: ignore[attr-defined,no-any-return]

    async def body(x: int) -> int:
        log.append("body")
        return x

    loop = OwnFutures()
    loop.set_task_factory(lambda lp, coro, **kw: asyncio.tasks._PyTask(coro, loop=lp, **kw))  # type: ignore[attr-defined]
    try:
        assert loop.run_until_complete(Lambda(body).ainvoke(1, {"callbacks": [Slow()]})) == 1
        assert log == ["start", "body", "end"]
        assert loop.run_until_complete(Lambda(lambda x: x + 1).ainvoke(1)) == 2
    finally:
        loop.close()


def test_D5_every_handler_finishes_before_the_run_goes_on() -> None:
    log: _Log = []
    delays = {"h1": 0.05, "h2": 0.01, "h3": 0.04, "h4": 0.02, "h5": 0.03}
    handlers: list[_LogProbeState] = [
        _AsyncLogProbe(k, log, delay=_every(v)) for k, v in delays.items()
    ]
    handlers.append(_SyncLogProbe("s", log, delay=_every(0.02)))
    labels = [h.label for h in handlers]

    def a(x: str) -> str:
        log.append(("body", "a"))
        return x

    async def b(x: str) -> str:
        log.append(("body", "b"))
        return x

    chain = Chain(Lambda(a), Lambda(b), name="outer")

    async def main() -> None:
        assert await chain.ainvoke("q", {"callbacks": handlers}) == "q"
        log.append(("returned",))

    with sequential_run_ids():
        asyncio.run(main())

    def block(method: str, run: int) -> tuple[tuple[Any, ...], ...]:
        return tuple(sorted(_entries(labels, method, run)))

    assert _blocks(log) == [
        block("on_chain_start", 1),
        block("on_chain_start", 2),
        (("body", "a"),),
        block("on_chain_end", 2),
        block("on_chain_start", 3),
        (("body", "b"),),
        block("on_chain_end", 3),
        block("on_chain_end", 1),
        (("returned",),),
    ]
    for h in handlers:
        h.checker.check()


def test_D5_no_handler_is_dropped_from_llm_start() -> None:
    log: _Log = []
    probes = _mixed_probes(log)

    class AsyncLLMStartOnly(AsyncCallbackHandler):
        """Implements on_llm_start, not on_chat_model_start: gets the D4 fallback."""

        def __init__(self) -> None:
            self.prompts: list[list[str]] = []

        async def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
            self.prompts.append(prompts)

    fallback = AsyncLLMStartOnly()
    handlers: list[Any] = [*probes, fallback]

    async def main() -> None:
        await LLM("out", name="llm").ainvoke("p", {"callbacks": handlers})
        await ChatModel("out", name="chat").ainvoke("m", {"callbacks": handlers})
        runs = await AsyncCallbackManager.configure(handlers).on_llm_start({}, ["p1", "p2"])
        for run in runs:
            await run.on_llm_end(LLMResult([[Generation("x")]]))

    with sequential_run_ids():
        asyncio.run(main())
    for probe in probes:
        assert _trace(probe.recorder) == [
            ("on_llm_start", 1, None, [], {}),
            ("on_llm_end", 1, None, [], None),
            ("on_chat_model_start", 2, None, [], {}),
            ("on_llm_end", 2, None, [], None),
            ("on_llm_start", 3, None, [], {}),
            ("on_llm_start", 4, None, [], {}),
            ("on_llm_end", 3, None, [], None),
            ("on_llm_end", 4, None, [], None),
        ], probe.label
        probe.checker.check()
    assert fallback.prompts == [["p"], ["Human: m"], ["p1"], ["p2"]]


_REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="unset")


def test_D5_async_handlers_are_awaited_on_the_loop_and_only_sync_ones_use_worker_threads() -> None:
    """An async handler's method is called and awaited on the loop: nothing of it goes through
    the loop's executor. A sync handler that is not ``run_inline`` does, once per event."""

    class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            type(self).submitted += 1
            return super().submit(fn, *args, **kwargs)

    class AsyncOnly(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.seen: list[str] = []

        async def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            self.seen.append("on_chain_start")

        async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
            self.seen.append("on_chain_end")

    async def body(x: int) -> int:
        return x

    async def main(handler: object) -> int:
        executor = CountingExecutor(max_workers=2)
        asyncio.get_running_loop().set_default_executor(executor)
        CountingExecutor.submitted = 0
        assert await Lambda(body).ainvoke(1, {"callbacks": [handler]}) == 1
        return CountingExecutor.submitted

    handler = AsyncOnly()
    assert asyncio.run(main(handler)) == 0
    assert handler.seen == ["on_chain_start", "on_chain_end"]
    assert asyncio.run(main(Recorder())) == 2  # the count is real: a sync handler's two events


def test_D5_sync_handlers_run_in_a_worker_thread_with_the_context_copied() -> None:
    seen: list[tuple[str, str]] = []
    threads: set[int] = set()

    class ContextProbe(BaseCallbackHandler):
        def _see(self, method: str) -> None:
            seen.append((method, _REQUEST.get()))
            threads.add(threading.get_ident())

        def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            self._see("on_chain_start")

        def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
            self._see("on_chain_end")

        def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
            self._see("on_llm_start")

        def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
            self._see("on_llm_end")

    chain = Chain(Lambda(_ident, name="a"), LLM("x", name="llm"), name="outer")

    async def main() -> int:
        for request in ("req-1", "req-2"):  # a stale copy would show req-1 twice
            _REQUEST.set(request)
            await chain.ainvoke("q", {"callbacks": [ContextProbe()]})
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    methods = ["on_chain_start", "on_chain_start", "on_chain_end"]
    methods += ["on_llm_start", "on_llm_end", "on_chain_end"]
    assert seen == [(m, r) for r in ("req-1", "req-2") for m in methods]
    assert threads and loop_thread not in threads


class _ContextSetter(AsyncCallbackHandler):
    """Sets `_REQUEST` to the event's name in each start event, from a sync or async method,
    inline or not, and notes what it read there first."""

    def __init__(self, *, run_inline: bool, sync: bool = False) -> None:
        self.run_inline = run_inline
        self.read: list[str] = []
        for method in ("on_chain_start", "on_llm_start"):
            setattr(self, method, functools.partial(self._sync if sync else self._async, method))

    def _sync(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.read.append(_REQUEST.get())
        _REQUEST.set(method)

    async def _async(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._sync(method)


@pytest.mark.parametrize("sync", [False, True], ids=["async_method", "sync_method"])
def test_D5_a_variable_an_inline_handler_sets_is_seen_by_the_body_and_the_caller(
    sync: bool,
) -> None:
    """Inline handlers run in the caller's context, as langchain_core's do (its
    ``test_inline_handlers_share_parent_context``): what one sets in a start event, the run's
    body, the handlers after it and the caller of a manager's start see. A handler that is not
    inline runs in a copy: the same code changes nothing outside it."""
    seen: list[str] = []

    def sync_body(x: Any) -> Any:
        seen.append(_REQUEST.get())
        return x

    async def async_body(x: Any) -> Any:
        return sync_body(x)

    async def main(inline: bool) -> list[str]:
        setter = _ContextSetter(run_inline=inline, sync=sync)
        after = _ContextSetter(run_inline=False)  # not inline: starts after the inline ones
        _REQUEST.set("unset")
        await AsyncCallbackManager([setter, after]).on_llm_start({}, ["p"])
        seen.append(_REQUEST.get())  # the caller of the manager's start
        for body in (sync_body, async_body):
            _REQUEST.set("unset")
            await Lambda(body).ainvoke(1, {"callbacks": [setter, after]})
        return after.read

    after_read = asyncio.run(main(inline=True))
    assert seen == ["on_llm_start", "on_chain_start", "on_chain_start"]
    assert after_read == ["on_llm_start", "on_chain_start", "on_chain_start"]
    seen.clear()
    assert asyncio.run(main(inline=False)) == ["unset"] * 3
    assert seen == ["unset"] * 3


def test_D5_inline_handlers_share_the_callers_context_one_prompt_after_another() -> None:
    """langchain_core's ``test_inline_handlers_share_parent_context_multiple``: with three
    prompts, an inline handler that counts in a variable and an inline one that reads it see
    1, 1, 2, 2, 3, 3; one that is not inline reads the value the inline ones left."""
    counter: contextvars.ContextVar[int] = contextvars.ContextVar("counter", default=0)
    states: list[tuple[str, int]] = []

    class Stateful(AsyncCallbackHandler):
        def __init__(self, name: str, *, run_inline: bool) -> None:
            self.name, self.run_inline = name, run_inline

        async def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
            if self.name == "modifier":
                counter.set(counter.get() + 1)
            states.append((self.name, counter.get()))

    handlers = [
        Stateful("modifier", run_inline=True),
        Stateful("reader", run_inline=True),
        Stateful("not_inline", run_inline=False),
    ]

    async def main() -> int:
        await AsyncCallbackManager(handlers).on_llm_start({}, ["p1", "p2", "p3"])
        return counter.get()

    assert asyncio.run(main()) == 3
    assert states == [(name, n) for n in (1, 2, 3) for name in ("modifier", "reader", "not_inline")]


def test_D5_a_handler_not_inline_reads_the_callers_context_in_every_event() -> None:
    """langchain_core's ``test_shielded_callback_context_preservation``: an end event is
    delivered in a copy of the caller's context, not an empty one."""
    read: list[str] = []

    class Reader(AsyncCallbackHandler):
        async def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
            read.append(_REQUEST.get())

        async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
            read.append(_REQUEST.get())

    async def main() -> None:
        _REQUEST.set("request-7")
        manager = AsyncCallbackManager([Reader()])
        (llm,) = await manager.on_llm_start({}, ["p"])
        chain = await manager.on_chain_start({}, {"q": 1})
        await llm.on_llm_end(LLMResult([[Generation("x")]]))
        await chain.on_chain_end({"a": 1})

    asyncio.run(main())
    assert read == ["request-7", "request-7"]


def test_D5_a_handler_without_run_inline_is_called_after_the_inline_ones() -> None:
    """Under async dispatch the ``run_inline`` handlers go first, in order; a duck-typed
    handler with no ``run_inline`` at all counts as not inline, so it comes after them even
    when listed first."""
    log: list[str] = []

    class Duck:
        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            log.append("duck")

    class Inline(BaseCallbackHandler):
        run_inline = True

        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            log.append("inline")

    asyncio.run(Lambda(_ident).ainvoke(1, {"callbacks": [Duck(), Inline()]}))
    assert log == ["inline", "duck"]


# ===============================================================================================
# D6: async handlers under sync dispatch
# ===============================================================================================


def _d6_handlers(log: _Log) -> tuple[_SyncLogProbe, _AsyncLogProbe, _SyncLogProbe]:
    """An async handler that takes its time, listed between two sync ones."""
    return (
        _SyncLogProbe("s1", log),
        _AsyncLogProbe("a", log, delay=_every(0.02)),
        _SyncLogProbe("s2", log),
    )


def _d6_expected() -> list[tuple[Any, ...]]:
    return [
        *_entries(("s1", "a", "s2"), "on_chain_start", 1),
        *_entries(("s1", "a", "s2"), "on_chain_end", 1),
    ]


def _invoke_sync(runnable: Runnable, config: RunnableConfig, in_loop: bool) -> Any:
    """``runnable.invoke`` (sync) with ids from 1: from plain code, or inside a running loop."""
    with sequential_run_ids():
        if not in_loop:
            return runnable.invoke("q", config)

        async def main() -> Any:
            return runnable.invoke("q", config)

        return asyncio.run(main())


def test_D6_async_handler_under_sync_invoke_without_a_loop_runs_in_handler_order() -> None:
    log: _Log = []
    handlers = _d6_handlers(log)
    assert _invoke_sync(Lambda(_ident, name="f"), {"callbacks": list(handlers)}, False) == "q"
    assert log == _d6_expected()
    # the same from a plain thread (no loop there either)
    thread_log: _Log = []
    outputs: list[Any] = []
    thread_handlers = _d6_handlers(thread_log)

    def target() -> None:
        config: RunnableConfig = {"callbacks": list(thread_handlers)}
        outputs.append(_invoke_sync(Lambda(_ident, name="f"), config, False))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    assert outputs == ["q"]
    assert thread_log == _d6_expected()
    for h in (*handlers, *thread_handlers):
        h.checker.check()


def test_D6_async_handler_under_sync_invoke_inside_a_running_loop() -> None:
    log: _Log = []
    s1, a, s2 = _d6_handlers(log)
    loop_threads: list[int] = []

    async def main() -> Any:
        loop_threads.append(threading.get_ident())
        return Lambda(_ident, name="f").invoke("q", {"callbacks": [s1, a, s2]})

    with sequential_run_ids():
        assert asyncio.run(main()) == "q"
    assert log == _d6_expected()
    assert s1.threads == s2.threads == set(loop_threads)  # sync dispatch: the caller's thread
    assert a.threads and loop_threads[0] not in a.threads  # a worker thread with its own loop
    for h in (s1, a, s2):
        h.checker.check()


@pytest.mark.parametrize("in_loop", [False, True], ids=["no_loop", "in_loop"])
def test_D6_async_handler_raise_error_propagates_from_sync_invoke(in_loop: bool) -> None:
    log: _Log = []
    error = ValueError("strict")
    strict = _AsyncLogProbe("strict", log, fail=("on_chain_start", error), raise_error=True)
    after = _SyncLogProbe("after", log)
    with pytest.raises(ValueError) as info:
        _invoke_sync(Lambda(_ident, name="f"), {"callbacks": [strict, after]}, in_loop)
    assert info.value is error  # langchain_core swallows it: deviation
    assert log == [
        *_entries(("strict", "after"), "on_chain_start", 1),
        *_entries(("strict", "after"), "on_chain_error", 1),  # D3: the run is closed
    ]
    assert _errors(strict.recorder) == [error]
    strict.checker.check()
    after.checker.check()


@pytest.mark.parametrize("in_loop", [False, True], ids=["no_loop", "in_loop"])
def test_D6_async_handler_without_raise_error_only_logs(
    in_loop: bool, caplog: pytest.LogCaptureFixture
) -> None:
    log: _Log = []
    quiet = _AsyncLogProbe("quiet", log, fail=("on_chain_start", ValueError("boom")))
    after = _SyncLogProbe("after", log)
    with caplog.at_level(logging.WARNING, logger="callbacks"):
        assert _invoke_sync(Lambda(_ident, name="f"), {"callbacks": [quiet, after]}, in_loop) == "q"
    assert log == [
        *_entries(("quiet", "after"), "on_chain_start", 1),
        *_entries(("quiet", "after"), "on_chain_end", 1),
    ]
    assert caplog.record_tuples == [
        (
            "callbacks",
            logging.WARNING,
            f"error in _AsyncLogProbe.on_chain_start callback for run {_U(1)}: ValueError('boom')",
        )
    ]


@pytest.mark.parametrize("in_loop", [False, True], ids=["no_loop", "in_loop"])
def test_D6_tasks_an_async_handler_starts_under_invoke_go_on_as_under_ainvoke(
    in_loop: bool,
) -> None:
    """An async handler under sync dispatch runs on the library's handler loop, which outlives
    the event: a consumer task it starts on the first event goes on serving the next ones, and
    a flush it starts on the last one finishes (a throwaway loop would cancel both)."""
    served: list[str] = []
    flushed = threading.Event()

    class Consumer(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            self.queue: asyncio.Queue[str] = asyncio.Queue()

            async def consume() -> None:
                while True:
                    served.append(await self.queue.get())

            self.consumer = asyncio.get_running_loop().create_task(consume())
            await self.queue.put("start")

        async def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
            await self.queue.put("end")

            async def flush() -> None:
                await asyncio.sleep(0.01)
                flushed.set()

            self.flush = asyncio.get_running_loop().create_task(flush())

    consumer = Consumer()
    assert _drive_sync_maybe_in_loop(Lambda(_ident), {"callbacks": [consumer]}, in_loop) is None
    assert flushed.wait(10)
    assert served == ["start", "end"]
    loop = callbacks._handler_loop()[0]
    asyncio.run_coroutine_threadsafe(_cancelled(consumer.consumer), loop).result(10)


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.wait([task])


class _Awaitable:
    """Not a coroutine: an object with ``__await__`` (as a future is), counting its awaits."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __await__(self) -> Generator[Any, None, None]:
        yield from asyncio.sleep(0).__await__()
        self.log.append("awaited")


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_D6_an_awaitable_that_is_not_a_coroutine_is_awaited_in_every_mode(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []

    class ReturnsAwaitable(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> Any:
            return _Awaitable(log)

    assert _in_mode(Lambda(_ident), "x", {"callbacks": [ReturnsAwaitable()]}, mode) == ("x", None)
    assert log == ["awaited"]
    assert [r for r in caplog.records if r.name == "callbacks"] == []


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_D6_a_plain_value_a_handler_returns_is_ignored_in_every_mode(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    class ReturnsValue(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> Any:
            return 42

    assert _in_mode(Lambda(_ident), "x", {"callbacks": [ReturnsValue()]}, mode) == ("x", None)
    assert [r for r in caplog.records if r.name == "callbacks"] == []


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
@pytest.mark.usefixtures("ctrl_c")
def test_D3_D6_an_interrupt_while_an_async_handler_runs_under_invoke_waits_for_it() -> None:
    """Ctrl-C while ``invoke`` waits for an async handler (on the handler loop): the handler
    finishes its event first, the run closes, then the interrupt leaves the call (D3)."""
    log: list[str] = []
    main = threading.main_thread().ident or 0

    class Slow(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            signal.pthread_kill(main, signal.SIGINT)  # the caller is blocked, waiting for us
            await asyncio.sleep(0.05)
            log.append("start done")

        async def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
            log.append(f"error {type(error).__name__}")

    with pytest.raises(KeyboardInterrupt):
        Lambda(_ident).invoke(1, {"callbacks": [Slow()]})
    assert log == ["start done", "error KeyboardInterrupt"]


@pytest.mark.parametrize("returns", ["a coroutine", "a failing coroutine", "a plain value"])
def test_D3_D6_an_interrupt_just_after_a_handler_returned_lets_what_it_returned_run(
    returns: str,
) -> None:
    """The interrupt lands after the handler's method returned, before what it returned was
    run: a coroutine runs all the same (D6), then the interrupt is raised (D3)."""
    log: list[str] = []

    class Returns(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> Any:
            async def start() -> None:
                log.append("start")
                if returns == "a failing coroutine":
                    raise ValueError("start broke")

            return "a value" if returns == "a plain value" else start()

        def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
            log.append(f"error {type(error).__name__}")

    def interrupt(frame: types.FrameType, event: str, arg: Any) -> None:
        caller = frame.f_back
        if event == "call" and frame.f_code is inspect.isawaitable.__code__ and caller:
            if _is_code_of(caller.f_code, callbacks._dispatch) and "sent" not in log:
                log.append("sent")
                raise KeyboardInterrupt("after the call")

    raised = _run_with_hook(interrupt, Lambda(_ident), {"callbacks": [Returns()]}, "invoke")
    assert isinstance(raised, KeyboardInterrupt) and "after the call" in str(raised)
    started = [] if returns == "a plain value" else ["start"]
    assert log == ["sent", *started, "error KeyboardInterrupt"]


def test_D6_an_async_handler_on_the_handler_loop_may_dispatch_to_async_handlers_itself() -> None:
    """An async handler that invokes a runnable with async handlers of its own, under sync
    dispatch, runs on the handler loop: that loop cannot wait for itself, so the inner ones
    run on a loop of their own (in a worker thread) and the call completes."""
    inner_rec = Recorder()

    class Inner(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            inner_rec.on_chain_start(serialized, inputs, **kwargs)

    class Outer(AsyncCallbackHandler):
        async def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
            Lambda(_ident, name="from_handler").invoke(outputs, {"callbacks": [Inner()]})

    assert Lambda(_ident).invoke(7, {"callbacks": [Outer()]}) == 7
    assert [(r.event.method, r.args[1], r.kwargs["name"]) for r in inner_rec.records] == [
        ("on_chain_start", 7, "from_handler")
    ]


def test_D6_two_threads_needing_the_handler_loop_at_once_share_one() -> None:
    """The handler loop is looked up without the lock, which only guards starting it: a thread
    that finds none and waits for the lock while another starts it takes that one."""
    Lambda(_ident).invoke(1, {"callbacks": [AsyncCallbackHandler()]})  # it runs now
    running = callbacks._HANDLER_LOOP[:]
    found: list[Any] = []
    with callbacks._HANDLER_LOOP_LOCK:  # as if another thread were starting it
        callbacks._HANDLER_LOOP.clear()
        waiting = threading.Thread(target=lambda: found.append(callbacks._handler_loop()))
        waiting.start()
        waiting.join(0.2)  # it waits for the lock
        assert waiting.is_alive() and not found
        callbacks._HANDLER_LOOP[:] = running  # started meanwhile
    waiting.join()
    assert found == [tuple(running)]


def test_D6_at_exit_the_handler_loop_cancels_the_tasks_left_and_stops() -> None:
    """What ``asyncio.run`` does when its main coroutine returns: the tasks still running are
    cancelled (given a moment to finish), the loop stops; the next use starts a new one."""
    cancelled = threading.Event()

    class Forever(AsyncCallbackHandler):
        async def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            async def serve() -> None:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

            self.task = asyncio.get_running_loop().create_task(serve())

    Lambda(_ident).invoke(1, {"callbacks": [Forever()]})
    loop, thread = callbacks._handler_loop()
    assert (thread.name, thread.daemon) == ("callbacks-handler-loop", True)  # never blocks exit
    callbacks._stop_handler_loop()  # as at exit
    assert cancelled.is_set() and not thread.is_alive() and not loop.is_running()
    callbacks._stop_handler_loop()  # a second time: nothing left to stop
    assert Lambda(_ident).invoke(2, {"callbacks": [AsyncCallbackHandler()]}) == 2  # a new loop
    assert callbacks._handler_loop()[1] is not thread
    callbacks._stop_handler_loop()  # no task left this time


@pytest.mark.parametrize(
    ("in_frame", "on_close"),
    [(KeyboardInterrupt, ValueError), (ValueError, KeyboardInterrupt)],
    ids=["interrupt_then_failure", "failure_then_interrupt"],
)
def test_D3_an_interrupt_outranks_a_failure_of_closing_the_inner_runs(
    in_frame: type[BaseException], on_close: type[BaseException]
) -> None:
    """Something raised in a stream's own frame (not in the step it is streaming) leaves the
    step open: the stream closes it first (D3). If a ``raise_error`` handler then fails on that
    closing, the run still ends; and of the two, an interrupt leaves the call (D2)."""

    class FailsOnLLMError(BaseCallbackHandler):
        raise_error = True

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            raise on_close("on close")

    resumed: list[str] = []

    def interrupt(frame: types.FrameType, event: str, arg: Any) -> None:
        # the third resumption of the outer stream's frame: between two of its chunks
        code, runnable = frame.f_code, frame.f_locals.get("self")
        if event == "call" and _is_code_of(code, Runnable._stream) and runnable is chain:
            resumed.append(event)
            if len(resumed) == 3:
                raise in_frame("in the frame")

    rec, checker = Recorder(), TraceChecker()
    chain = Chain(Lambda(_ident, name="a"), LLM("a b c"), name="outer")
    config: RunnableConfig = {"callbacks": [rec, checker, FailsOnLLMError()]}
    assert isinstance(_run_with_hook(interrupt, chain, config, "stream"), KeyboardInterrupt)
    checker.check()
    assert rec.events()[-2:] == ["on_llm_error", "on_chain_error"]
    assert [type(e) for e in _errors(rec)] == [GeneratorExit, KeyboardInterrupt]


# ===============================================================================================
# D3: balance under cancellation and interrupts
# ===============================================================================================


# What every handler hears when the step of `_nested` fails: each run closes with an error.
_NESTED_FAILED: list[_Row] = [
    ("on_chain_start", 1, None, [], {}),
    ("on_chain_start", 2, 1, ["seq:step:1"], {}),
    ("on_chain_end", 2, 1, ["seq:step:1"], None),
    ("on_chain_start", 3, 1, ["seq:step:2"], {}),
    ("on_chain_start", 4, 3, ["seq:step:1"], {}),
    ("on_chain_end", 4, 3, ["seq:step:1"], None),
    ("on_chain_start", 5, 3, ["seq:step:2"], {}),
    ("on_chain_error", 5, 3, ["seq:step:2"], None),  # innermost first
    ("on_chain_error", 3, 1, ["seq:step:2"], None),
    ("on_chain_error", 1, None, [], None),
]


def test_D3_cancelling_a_nested_async_run_keeps_every_trace_balanced() -> None:
    log: _Log = []
    probes = _mixed_probes(log)
    checker = TraceChecker()
    started: list[asyncio.Event] = []

    async def slow(x: str) -> str:
        started[0].set()
        await asyncio.sleep(10)
        return x

    chain = _nested(Lambda(slow))

    async def main() -> None:
        started.append(asyncio.Event())
        task = asyncio.create_task(chain.ainvoke("q", {"callbacks": [*probes, checker]}))
        await started[0].wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # the cancellation reaches the caller
        assert task.cancelled()

    with sequential_run_ids():
        asyncio.run(main())
    for probe in probes:
        assert _trace(probe.recorder) == _NESTED_FAILED, probe.label
        errors = _errors(probe.recorder)
        assert len(errors) == 3
        assert all(isinstance(e, asyncio.CancelledError) for e in errors)
        probe.checker.check()
    checker.check()


def _cancel_while_delivering(method: str, slow_inline: bool) -> tuple[_Log, list[_LogProbeState]]:
    """Cancel ``outer`` while a slow async handler is still handling ``method`` of run 2 (the
    first step); return the log and the handlers (the slow one first)."""
    log: _Log = []
    slow = _AsyncLogProbe("slow", log, run_inline=slow_inline, delay=_only(method, 2, 0.2))
    handlers: list[_LogProbeState] = [slow, *_mixed_probes(log)]
    chain = Chain(Lambda(_ident, name="a"), Lambda(_ident, name="b"), name="outer")

    async def main() -> None:
        slow.entered = asyncio.Event()
        task = asyncio.create_task(chain.ainvoke("q", {"callbacks": handlers}))
        await slow.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with sequential_run_ids():
        asyncio.run(main())
    return log, handlers


@pytest.mark.parametrize(
    "slow_inline", [False, True], ids=["slow_handler_not_inline", "slow_handler_inline"]
)
def test_D3_end_event_is_not_lost_when_the_awaiting_task_is_cancelled(slow_inline: bool) -> None:
    log, handlers = _cancel_while_delivering("on_chain_end", slow_inline)
    assert ("slow", "done", "on_chain_end", 2) in log  # the slow handler was not cut short
    for h in handlers:
        assert _trace(h.recorder) == [
            ("on_chain_start", 1, None, [], {}),
            ("on_chain_start", 2, 1, ["seq:step:1"], {}),
            ("on_chain_end", 2, 1, ["seq:step:1"], None),  # every handler got the end
            ("on_chain_error", 1, None, [], None),  # then the parent fails: cancelled
        ], h.label
        assert [type(e) for e in _errors(h.recorder)] == [asyncio.CancelledError]
        h.checker.check()


@pytest.mark.parametrize(
    "slow_inline", [False, True], ids=["slow_handler_not_inline", "slow_handler_inline"]
)
def test_D3_start_event_is_not_lost_when_the_awaiting_task_is_cancelled(slow_inline: bool) -> None:
    log, handlers = _cancel_while_delivering("on_chain_start", slow_inline)
    assert ("slow", "done", "on_chain_start", 2) in log
    for h in handlers:
        assert _trace(h.recorder) == [
            ("on_chain_start", 1, None, [], {}),
            ("on_chain_start", 2, 1, ["seq:step:1"], {}),  # every handler got the start
            ("on_chain_error", 2, 1, ["seq:step:1"], None),  # then its error, innermost first
            ("on_chain_error", 1, None, [], None),
        ], h.label
        assert [type(e) for e in _errors(h.recorder)] == [asyncio.CancelledError] * 2
        h.checker.check()


def _interrupt_sync(x: Any) -> Any:
    raise KeyboardInterrupt


async def _interrupt_async(x: Any) -> Any:
    raise KeyboardInterrupt


@pytest.mark.parametrize("func", [_interrupt_sync, _interrupt_async], ids=["sync", "async"])
def test_D3_keyboard_interrupt_inside_an_async_run_closes_every_run(
    func: Callable[[Any], Any],
) -> None:
    log: _Log = []
    probes = _mixed_probes(log)
    chain = _nested(Lambda(func, name="boom"))
    with sequential_run_ids(), pytest.raises(KeyboardInterrupt) as info:
        asyncio.run(chain.ainvoke("q", {"callbacks": probes}))
    for probe in probes:
        assert _trace(probe.recorder) == _NESTED_FAILED, probe.label
        assert _errors(probe.recorder) == [info.value] * 3  # the same object, re-raised
        probe.checker.check()


def test_D3_cancelling_an_abatch_closes_the_run_of_every_item() -> None:
    rec, checker = Recorder(), TraceChecker()

    async def slow(x: int) -> int:
        await asyncio.sleep(30)
        return x

    async def main() -> None:
        batch = asyncio.ensure_future(
            Lambda(slow, name="slow").abatch([1, 2], {"callbacks": [rec, checker]})
        )
        await _until(lambda: len(rec.records) >= 2, batch)  # both items started
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    asyncio.run(main())
    checker.check()
    assert sorted(rec.events()) == ["on_chain_error"] * 2 + ["on_chain_start"] * 2
    assert all(isinstance(r.args[0], asyncio.CancelledError) for r in rec.records[2:])


def test_D3_a_run_its_body_already_ended_is_not_closed_twice() -> None:
    """A body that ends its own run through the config's manager (a private reach, but
    possible) and then raises: the runnable does not fire a second closing event."""
    for mode in ("invoke", "ainvoke"):
        rec = Recorder()

        def body(x: Any, config: RunnableConfig) -> Any:
            manager = config["callbacks"]
            assert isinstance(manager, CallbackManager)
            run = manager._parent
            assert isinstance(run, RunManager)
            run.on_chain_end("early")
            raise ValueError("after the end")

        async def abody(x: Any, config: RunnableConfig) -> Any:
            manager: Any = config["callbacks"]  # an AsyncCallbackManager under ainvoke
            assert isinstance(manager, AsyncCallbackManager)
            run = manager._parent
            assert isinstance(run, AsyncRunManager)
            await run.on_chain_end("early")
            raise ValueError("after the end")

        runnable = Lambda(body) if mode == "invoke" else Lambda(abody)
        raised = _drive(runnable, {"callbacks": [rec]}, mode)
        assert isinstance(raised, ValueError)
        assert rec.events() == ["on_chain_start", "on_chain_end"], mode


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_D3_stream_whose_start_fails_closes_that_run_and_raises_the_failure(mode: str) -> None:
    strict = _Shared("strict", [], fail=("on_chain_start", "f", ValueError("no")), raise_error=True)
    rec = Recorder()
    with pytest.raises(ValueError, match=r"^no$"):
        _streamed(Lambda(_ident, name="f"), {"callbacks": [strict, rec]}, mode, 1)
    assert rec.events() == ["on_chain_start", "on_chain_error"]


@pytest.mark.parametrize("nested", [False, True], ids=["lambda", "in_chain"])
def test_D3_a_cancellation_thrown_in_at_a_bare_yield_reaches_the_body(nested: bool) -> None:
    """A task cancelled while its body yields bare (``await asyncio.sleep(0)``) waits on no
    future: the loop throws the cancellation in at the top, and each run's frame must pass it
    down to the body, not drop it. The body then stops at that await and every run closes."""
    rec, checker = Recorder(), TraceChecker()
    spins = [0]
    seen: list[BaseException] = []

    async def spin(x: str) -> str:
        try:
            while spins[0] < 10_000:  # bounded: a lost cancellation fails the test, not hangs it
                spins[0] += 1
                await asyncio.sleep(0)
        except asyncio.CancelledError as error:
            seen.append(error)
            raise
        return "never cancelled"

    body = Lambda(spin, name="spin")
    runnable = Chain(Lambda(_ident, name="a"), body, name="outer") if nested else body

    async def main() -> None:
        task = asyncio.create_task(runnable.ainvoke("q", {"callbacks": [rec, checker]}))
        await _until(lambda: spins[0] >= 3, task, pause=0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert len(seen) == 1 and spins[0] < 10
    checker.check()
    ends = [r for r in rec.records if r.event.phase != "start"]
    cancelled = 2 if nested else 1  # spin, and the chain around it
    assert [r.event.method for r in ends][-cancelled:] == ["on_chain_error"] * cancelled
    assert all(r.args[0] is seen[0] for r in ends if r.event.phase == "error")


def test_D3_R3_an_item_cancelled_while_waiting_for_its_turn_lets_the_running_ones_finish() -> None:
    """Shutdown code often cancels every task (``for t in asyncio.all_tasks(): t.cancel()``),
    our own included. An `abatch` item cancelled while it waits for its turn never starts a
    run; the item already running still finishes and closes its run before `abatch` raises
    the cancellation (D3)."""
    rec, checker = Recorder(), TraceChecker()
    tasks: list[asyncio.Task[Any] | None] = []  # the test's own task, spared

    async def first(x: int) -> int:
        if x == 1:
            me, main_task = asyncio.current_task(), tasks[0]
            for task in asyncio.all_tasks():
                if task is not me and task is not main_task:
                    task.cancel()  # the items waiting for the semaphore
            for _ in range(3):
                await asyncio.sleep(0.001)
        return x

    async def main() -> None:
        tasks.append(asyncio.current_task())
        config: RunnableConfig = {"callbacks": [rec, checker], "max_concurrency": 1}
        with pytest.raises(asyncio.CancelledError):
            await Lambda(first, name="first").abatch([1, 2, 3], config, return_exceptions=True)
        assert rec.events() == ["on_chain_start", "on_chain_end"]  # at once: item 1 is done

    asyncio.run(main())
    checker.check()
    assert rec.records[1].args[0] == 1


# ===============================================================================================
# S10, S11 under asyncio
# ===============================================================================================


def test_S10_1000_concurrent_ainvokes_stay_parented_to_their_own_roots() -> None:
    n = 1000
    llm = LLM("ans", name="llm")

    def pre(x: int) -> int:  # sync: runs in a worker thread under ainvoke
        return x

    async def ask(x: int) -> str:
        await asyncio.sleep(0)  # the other calls' bodies run meanwhile
        return f"{x}:{await llm.ainvoke(f'q{x}')}"  # an implicit child (S10)

    async def branch(x: str) -> str:
        await asyncio.sleep(0)
        return x

    tree = Chain(
        Lambda(pre),
        Lambda(ask),
        Parallel(a=Lambda(branch, name="a"), b=Retriever([f"doc{i}" for i in range(3)], name="b")),
        name="tree",
    )
    rec = Recorder()  # inline, for speed: 14,000 events
    rec.run_inline = True
    checker = TraceChecker()
    checker.run_inline = True
    config: RunnableConfig = {"callbacks": [rec, checker]}

    async def main() -> list[Any]:
        return await asyncio.gather(*(tree.ainvoke(i, config) for i in range(n)))

    outputs = asyncio.run(main())
    assert outputs == [{"a": f"{i}:ans", "b": []} for i in range(n)]
    checker.check()  # every run balanced, children closed before parents
    starts = {r.run_id: r for r in rec.records if r.event.phase == "start"}
    assert len(starts) == 7 * n
    closes = [r.run_id for r in rec.records if r.event.phase in ("end", "error")]
    assert sorted(map(str, closes)) == sorted(map(str, starts))
    assert not [r for r in rec.records if r.event.phase == "error"]
    children: dict[uuid.UUID | None, list[uuid.UUID]] = {}
    for run_id, r in starts.items():
        assert run_id is not None
        children.setdefault(r.parent_run_id, []).append(run_id)
        parent, depth = r.parent_run_id, 0  # every parent chain leads to a root
        while parent is not None:
            parent, depth = starts[parent].parent_run_id, depth + 1
            assert depth <= 3

    def shape(run_id: uuid.UUID) -> tuple[Any, ...]:
        r = starts[run_id]
        kids = sorted((shape(k) for k in children.get(run_id, [])), key=lambda s: str(s[0]))
        return (r.kwargs["name"], tuple(r.tags or ()), r.args[1], tuple(kids))

    def expected(i: int) -> tuple[Any, ...]:
        answer = f"{i}:ans"
        return (
            "tree",
            (),
            i,
            (  # children sorted by name
                (
                    "Parallel",
                    ("seq:step:3",),
                    answer,
                    (("a", ("map:key:a",), answer, ()), ("b", ("map:key:b",), answer, ())),
                ),
                ("ask", ("seq:step:2",), i, (("llm", (), [f"q{i}"], ()),)),
                ("pre", ("seq:step:1",), i, ()),
            ),
        )

    roots = children[None]
    assert len(roots) == n
    assert sorted((shape(root) for root in roots), key=lambda s: int(s[2])) == [
        expected(i) for i in range(n)
    ]


def test_S10_async_implicit_children_across_create_task_and_gather() -> None:
    rec, checker = Recorder(), TraceChecker()
    llm = LLM("by-task", name="llm")
    leaf = Lambda(_ident, name="leaf")

    async def fan(x: str) -> list[Any]:
        task = asyncio.create_task(llm.ainvoke("t"))
        gathered = await asyncio.gather(leaf.ainvoke("g1"), leaf.ainvoke("g2"))
        return [await task, *gathered]

    chain = Chain(Lambda(_ident, name="pre"), Lambda(fan), name="outer")
    config: RunnableConfig = {"callbacks": [rec, checker], "tags": ["t0"], "metadata": {"k": 1}}
    with sequential_run_ids():
        assert asyncio.run(chain.ainvoke("q", config)) == ["by-task", "g1", "g2"]
    checker.check()
    starts = {
        r.kwargs["name"] + ":" + str(r.args[1]): r for r in rec.records if r.event.phase == "start"
    }
    fan_run = starts["fan:q"].run_id
    assert fan_run is not None
    for key in ("llm:['t']", "leaf:g1", "leaf:g2"):
        r = starts[key]
        assert (r.parent_run_id, r.tags, r.metadata) == (fan_run, ["t0"], {"k": 1}), key
    assert len(starts) == 6 and len(rec.records) == 12


def test_S10_sync_invoke_inside_an_async_run_is_a_child() -> None:
    rec, checker = Recorder(), TraceChecker()
    llm = LLM("out", name="llm")

    async def async_body(x: str) -> str:
        return str(llm.invoke(x + "-from-async"))  # sync call inside an async body

    def sync_body(x: str) -> str:  # under ainvoke this runs in a worker thread
        return str(llm.invoke(x + "-from-thread"))

    chain = Chain(Lambda(async_body), Lambda(sync_body), name="outer")
    with sequential_run_ids():
        assert asyncio.run(chain.ainvoke("q", {"callbacks": [rec, checker]})) == "out"
    checker.check()
    assert [(m, i, p) for m, i, p, _, _ in _trace(rec)] == [
        ("on_chain_start", 1, None),
        ("on_chain_start", 2, 1),
        ("on_llm_start", 3, 2),
        ("on_llm_end", 3, 2),
        ("on_chain_end", 2, 1),
        ("on_chain_start", 4, 1),
        ("on_llm_start", 5, 4),
        ("on_llm_end", 5, 4),
        ("on_chain_end", 4, 1),
        ("on_chain_end", 1, None),
    ]
    prompts = [r.args[1] for r in rec.records if r.event is Event.LLM_START]
    assert prompts == [["q-from-async"], ["out-from-thread"]]


@pytest.mark.parametrize("outer_async", [False, True], ids=["invoke", "ainvoke"])
def test_S10_async_run_inside_a_sync_run_is_a_child(outer_async: bool) -> None:
    rec, checker = Recorder(), TraceChecker()
    inner = Chain(Lambda(_ident, name="a"), LLM("out", name="llm"), name="inner")

    def body(x: str) -> Any:  # a sync body starting its own loop
        return asyncio.run(inner.ainvoke(x))

    outer = Lambda(body, name="outer")
    config: RunnableConfig = {"callbacks": [rec, checker]}
    with sequential_run_ids():
        if outer_async:
            assert asyncio.run(outer.ainvoke("q", config)) == "out"
        else:
            assert outer.invoke("q", config) == "out"
    checker.check()
    assert [(m, i, p, t) for m, i, p, t, _ in _trace(rec)] == [
        ("on_chain_start", 1, None, []),
        ("on_chain_start", 2, 1, []),
        ("on_chain_start", 3, 2, ["seq:step:1"]),
        ("on_chain_end", 3, 2, ["seq:step:1"]),
        ("on_llm_start", 4, 2, ["seq:step:2"]),
        ("on_llm_end", 4, 2, ["seq:step:2"]),
        ("on_chain_end", 2, 1, []),
        ("on_chain_end", 1, None, []),
    ]


def test_S11_ainvoke_leaves_the_callers_context_unchanged() -> None:
    local, rec = Recorder("local"), Recorder("request")
    llm = LLM("x", callbacks=[local])
    inside: list[dict[Any, Any]] = []

    async def body(x: str) -> Any:
        inside.append(dict(contextvars.copy_context()))
        return await llm.ainvoke(x)

    async def failing(x: str) -> Any:
        raise ValueError("boom")

    async def main() -> None:
        before = dict(contextvars.copy_context())
        config: RunnableConfig = {"callbacks": [rec], "max_concurrency": 2}
        await Lambda(body, name="outer").ainvoke("q", config)
        assert dict(contextvars.copy_context()) == before
        with pytest.raises(ValueError):
            await Lambda(failing, name="failing").ainvoke("q", config)
        assert dict(contextvars.copy_context()) == before
        await llm.ainvoke("again")  # a root again: nothing of the earlier runs leaked
        assert inside[0] != before  # the checks above are not vacuous

    with sequential_run_ids():
        asyncio.run(main())
    _assert_context_runs(local, rec)


_USER_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("user_var", default="caller")


def _set_user_var_sync(x: Any) -> Any:
    _USER_VAR.set("body")
    return x


async def _set_user_var_async(x: Any) -> Any:
    _USER_VAR.set("body")
    return x


@pytest.mark.parametrize("func", [_set_user_var_sync, _set_user_var_async], ids=["sync", "async"])
def test_S11_a_context_variable_set_in_a_body_does_not_leak_to_the_caller(
    func: Callable[[Any], Any],
) -> None:
    """Neither to the step after it, nor out of ``invoke`` or ``ainvoke``."""
    chain = Lambda(func) | Lambda(lambda x: _USER_VAR.get(), name="read")
    assert chain.invoke("q") == "caller"  # each step's body has its own copy of the context
    assert Lambda(func).invoke("q", {"callbacks": [Recorder()]}) == "q"
    assert _USER_VAR.get() == "caller"

    async def main() -> str:
        await Lambda(func).ainvoke("q", {"callbacks": [Recorder()]})
        return _USER_VAR.get()

    assert asyncio.run(main()) == "caller"


def test_D3_keyboard_interrupt_in_an_async_parallel_branch_closes_every_run() -> None:
    for _ in range(10):  # an interrupt escaping a task would leave runs open, now and then
        rec, checker = Recorder(), TraceChecker()

        async def late(x: Any) -> Any:
            await asyncio.sleep(0)
            return x

        parallel = Parallel(a=Lambda(_interrupt_sync, name="stop"), b=Lambda(late, name="late"))
        with sequential_run_ids(), pytest.raises(KeyboardInterrupt):
            asyncio.run(parallel.ainvoke("q", {"callbacks": [rec, checker]}))
        checker.check()
        assert [type(e).__name__ for e in _errors(rec)] == ["KeyboardInterrupt"] * 2
        assert rec.events()[0] == "on_chain_start" and rec.events()[-1] == "on_chain_error"


# ===============================================================================================
# R3 under asyncio: abatch
# ===============================================================================================


@pytest.mark.parametrize("limit", [1, 3, None])
def test_R3_abatch_max_concurrency_bounds_the_tasks(limit: int | None) -> None:
    peak = _Peak()
    config: RunnableConfig = {"callbacks": [Recorder()]}
    if limit is not None:
        config["max_concurrency"] = limit
    assert asyncio.run(Lambda(peak.abranch).abatch(list(range(7)), config)) == list(range(7))
    assert peak.peak == (limit or 7)  # all seven at once without a limit: the count is real


# ===============================================================================================
# D3, D5 under asyncio: astream
# ===============================================================================================


def test_D5_astream_fires_each_token_before_its_chunk() -> None:
    log: _Log = []
    rec, checker = Recorder(), TraceChecker()

    class SlowTokens(AsyncCallbackHandler):
        async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            await asyncio.sleep(0.01)  # a token handler that takes its time
            log.append(("token", token, kwargs["chunk"].text))

    chain = Chain(Lambda(_ident, name="a"), LLM("one two three", name="llm"), name="outer")

    async def main() -> None:
        async for chunk in chain.astream("q", {"callbacks": [SlowTokens(), rec, checker]}):
            log.append(("chunk", chunk))

    with sequential_run_ids():
        asyncio.run(main())
    assert log == [
        ("token", "one ", "one "),
        ("chunk", "one "),
        ("token", "two ", "two "),
        ("chunk", "two "),
        ("token", "three", "three"),
        ("chunk", "three"),
    ]
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_chain_start", 2, 1, ["seq:step:1"], {}),
        ("on_chain_end", 2, 1, ["seq:step:1"], None),
        ("on_llm_start", 3, 1, ["seq:step:2"], {}),
        ("on_llm_new_token", 3, 1, ["seq:step:2"], None),
        ("on_llm_new_token", 3, 1, ["seq:step:2"], None),
        ("on_llm_new_token", 3, 1, ["seq:step:2"], None),
        ("on_llm_end", 3, 1, ["seq:step:2"], None),
        ("on_chain_end", 1, None, [], None),
    ]
    assert rec.records[-2].args[0].generations[0][0].text == "one two three"
    assert rec.records[-1].args[0] == "one two three"
    checker.check()


# ===============================================================================================
# The async manager API (S4, D3) and adispatch_custom_event
# ===============================================================================================


def test_S4_D3_async_manager_api_starts_runs_and_children() -> None:
    rec = Recorder()

    async def main() -> None:
        manager = AsyncCallbackManager.configure([rec], inheritable_tags=["t0"])
        run = await manager.on_chain_start({"name": "outer"}, {"q": 1})
        assert isinstance(run, AsyncRunManager)
        child = run.get_child("t")
        assert isinstance(child, AsyncCallbackManager)
        assert child.parent_run_id == run.run_id
        assert (child.tags, child.inheritable_tags) == (["t0", "t"], ["t0"])
        llm_runs = await child.on_llm_start({"name": "llm"}, ["p1", "p2"])
        assert all(isinstance(r, AsyncRunManager) for r in llm_runs)
        with pytest.raises(TypeError):
            llm_runs[0].get_child()  # LLM runs are leaves (R2)
        await llm_runs[0].on_llm_new_token("tok")
        for r in llm_runs:
            await r.on_llm_end(LLMResult([[Generation("x")]]))
        await run.on_text("note")
        await run.on_chain_end({"out": 1})
        with pytest.raises(RuntimeError):
            await run.on_chain_error(ValueError("late"))  # D3: a run ends exactly once
        tool = await manager.on_tool_start({"name": "t"}, "in")
        with pytest.raises(TypeError):
            await tool.on_chain_end({})  # an event of another run type
        await tool.on_tool_end("out")

    with sequential_run_ids():
        asyncio.run(main())
    assert _trace(rec) == [
        ("on_chain_start", 1, None, ["t0"], {}),
        ("on_llm_start", 2, 1, ["t0", "t"], {}),
        ("on_llm_start", 3, 1, ["t0", "t"], {}),
        ("on_llm_new_token", 2, 1, ["t0", "t"], None),
        ("on_llm_end", 2, 1, ["t0", "t"], None),
        ("on_llm_end", 3, 1, ["t0", "t"], None),
        ("on_text", 1, None, ["t0"], None),
        ("on_chain_end", 1, None, ["t0"], None),
        ("on_tool_start", 4, None, ["t0"], {}),
        ("on_tool_end", 4, None, ["t0"], None),
    ]


def test_S10_adispatch_custom_event_belongs_to_the_enclosing_run() -> None:
    seen: list[tuple[str, str, Any, dict[str, Any]]] = []
    threads: set[int] = set()

    class CustomSync(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            seen.append(("sync", name, data, kwargs))

    class CustomAsync(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            threads.add(threading.get_ident())
            await asyncio.sleep(0.01)
            seen.append(("async", name, data, kwargs))

    async def body(x: str) -> str:
        await adispatch_custom_event("progress", {"x": x})
        seen.append(("body", "after", None, {}))  # the event was delivered before this
        return x

    async def with_config(x: str, config: RunnableConfig) -> str:
        await adispatch_custom_event("explicit", x, config=config)
        return x

    chain = Chain(
        Lambda(_ident, name="a"), Lambda(body), Lambda(with_config), name="outer", tags=["local"]
    )
    config: RunnableConfig = {
        "callbacks": [CustomSync(), CustomAsync()],
        "tags": ["t0"],
        "metadata": {"k": 1},
    }

    async def main() -> int:
        assert await chain.ainvoke("q", config) == "q"
        with pytest.raises(RuntimeError):
            await adispatch_custom_event("outside", None)
        return threading.get_ident()

    with sequential_run_ids():
        loop_thread = asyncio.run(main())
    assert threads == {loop_thread}  # awaited on the loop (D5), not run aside in a thread
    where = {"run_id": _U(3), "tags": ["t0", "seq:step:2"], "metadata": {"k": 1}}
    where_explicit = {"run_id": _U(4), "tags": ["t0", "seq:step:3"], "metadata": {"k": 1}}
    assert sorted(seen[:2], key=str) == [
        ("async", "progress", {"x": "q"}, where),  # no parent_run_id
        ("sync", "progress", {"x": "q"}, where),
    ]
    assert seen[2] == ("body", "after", None, {})
    assert sorted(seen[3:], key=str) == [
        ("async", "explicit", "q", where_explicit),
        ("sync", "explicit", "q", where_explicit),
    ]


def test_D3_astream_closed_early_stays_balanced_when_closing_an_inner_run_fails() -> None:
    class FailsOnLLMError(BaseCallbackHandler):
        raise_error = True

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            raise ValueError("handler broke")

    for mode in ("stream", "astream"):  # the sync stream, for comparison: the same trace
        rec, checker = Recorder(), TraceChecker()
        taken: list[Any] = []
        chain = Chain(Lambda(_ident, name="a"), LLM("a b c"), name="outer")
        config: RunnableConfig = {"callbacks": [rec, checker, FailsOnLLMError()]}
        with pytest.raises(ValueError, match="handler broke"):
            _take_then_close(chain, config, mode, taken)
        assert len(taken) == 1  # the closing raised, not the first chunk
        checker.check()
        assert rec.events()[-2:] == ["on_llm_error", "on_chain_error"], mode
        assert [type(e).__name__ for e in _errors(rec)] == ["GeneratorExit", "ValueError"]


def test_D3_cancelled_ainvoke_waits_for_a_sync_body_so_its_children_close_first() -> None:
    class SlowStart(BaseCallbackHandler):
        def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.2)

    started = threading.Event()

    def body(x: Any) -> Any:
        started.set()
        return LLM("z", name="inner").invoke(x)

    async def main(rec: Recorder, checker: TraceChecker) -> None:
        task = asyncio.create_task(
            Lambda(body, name="outer").ainvoke("q", {"callbacks": [rec, checker, SlowStart()]})
        )
        await _until(started.is_set, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    rec, checker = Recorder(), TraceChecker()
    with sequential_run_ids():
        asyncio.run(main(rec, checker))
    checker.check()
    assert _trace(rec) == [
        ("on_chain_start", 1, None, [], {}),
        ("on_llm_start", 2, 1, [], {}),
        ("on_llm_end", 2, 1, [], None),  # the thread cannot be stopped: its run ends first
        ("on_chain_error", 1, None, [], None),
    ]
    assert isinstance(_errors(rec)[0], asyncio.CancelledError)


def test_R3_batch_of_no_inputs_is_empty() -> None:
    rec = Recorder()
    assert Lambda(_ident).batch([], {"callbacks": [rec]}) == []
    assert asyncio.run(Lambda(_ident).abatch([], {"callbacks": [rec]})) == []
    assert rec.records == []


def test_S10_custom_event_with_a_config_without_a_manager_uses_the_enclosing_run() -> None:
    rec = Recorder()

    def body(x: Any, config: RunnableConfig) -> Any:
        dispatch_custom_event("tags_only", 1, config={"tags": ["x"]})
        dispatch_custom_event("given", 2, config=config)
        return x

    with sequential_run_ids():
        Lambda(body, name="f").invoke("q", {"callbacks": [rec]})
    assert rec.events()[0] == "on_chain_start"
    assert [(r.event.method, r.run_id, r.args) for r in rec.records[1:]] == [
        ("on_custom_event", _U(1), ("tags_only", 1)),
        ("on_custom_event", _U(1), ("given", 2)),
        ("on_chain_end", _U(1), ("q",)),
    ]


# ===============================================================================================
# Robustness: faults, load from threads, bad input, nothing retained, depth (D2, D3, R1)
# ===============================================================================================


class _FaultError(Exception):
    """An ordinary failure that no catching lambda catches (they catch `ValueError`)."""


@dataclass(frozen=True)
class _Fault:
    """One fault injected into a run tree."""

    target: int  # which lambda or leaf raises, counted modulo their number in preorder
    kind: str  # exception | interrupt | cancel (async modes only; an interrupt otherwise)
    first: bool  # a lambda raises before calling its children, else after them


_FAULT_TYPES: dict[str, type[BaseException]] = {
    "exception": _FaultError,
    "interrupt": KeyboardInterrupt,
    "cancel": asyncio.CancelledError,
}
_faults = st.builds(
    _Fault, st.integers(0, 50), st.sampled_from(sorted(_FAULT_TYPES)), st.booleans()
)
_MODES = ("invoke", "stream", "ainvoke", "astream")


def _preorder(node: _Node) -> list[_Node]:
    return [node, *(n for kid in node.children for n in _preorder(kid))]


def _without_failures(node: _Node) -> _Node:
    """The tree with no node failing on its own: the injected fault is the only one."""
    return replace(node, fails=False, children=tuple(map(_without_failures, node.children)))


def _drive(
    runnable: Runnable, config: RunnableConfig, mode: str, value: Any = "x"
) -> BaseException | None:
    """Run ``runnable`` on ``value`` to the end in ``mode``; return what it raised, if any."""

    async def arun() -> None:
        if mode == "ainvoke":
            await runnable.ainvoke(value, config)
            return
        stream: Any = runnable.astream(value, config)
        async with contextlib.aclosing(stream):
            async for _ in stream:
                pass

    async def main() -> BaseException | None:
        try:
            await arun()
        except BaseException as error:  # a CancelledError raised by a body, too
            return error
        return None

    try:
        if mode == "invoke":
            runnable.invoke(value, config)
        elif mode == "stream":
            for _ in runnable.stream(value, config):
                pass
        else:
            return asyncio.run(main())
    except BaseException as error:
        return error
    return None


class _Warnings(logging.Handler):
    """Collects the messages logged on the ``callbacks`` logger while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _Warnings:
        logging.getLogger("callbacks").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("callbacks").removeHandler(self)


def _canonical(log: list[tuple[int, _Ev]]) -> list[tuple[int, _Ev]]:
    """Run ids no probe saw start renamed by order of appearance, so two runs compare."""
    names: dict[uuid.UUID, str] = {}

    def name(x: Any) -> Any:
        return names.setdefault(x, f"id{len(names)}") if isinstance(x, uuid.UUID) else x

    return [(h, (ev[0], name(ev[1]), name(ev[2]), *ev[3:])) for h, ev in log]


def _faulty_run(
    tree: _Node, root: _Call, setup: _Setup, fault: _Fault, mode: str
) -> tuple[BaseException, BaseException | None, list[tuple[int, _Ev]], list[str], list[str]]:
    """One run with the fault injected: the fault object, what the run raised, each handler's
    view, the warnings logged and the warnings the handlers' failures should have logged.

    A lambda raises the fault object itself; a leaf given it as ``error=`` raises a fresh copy
    (R0). Either way every error event of the run carries the object that left the call (R1).
    """
    targets = [
        n for n in _preorder(tree) if n.kind in ("llm", "chat", "tool", "retriever", "lambda")
    ]
    target = targets[fault.target % len(targets)]
    kind = "interrupt" if fault.kind == "cancel" and not mode.startswith("a") else fault.kind
    error = _FAULT_TYPES[kind](f"fault-{target.name}")
    probes, log = _probes(setup)
    runnable = _build(tree, probes, {target.name: (error, fault.first)})
    with _Warnings() as warnings:
        raised = _drive(runnable, _root_config(root, probes), mode)
    for probe in probes:
        probe.check()  # D3: one end or error per start, children closed before their parent
    expected_warnings = [
        f"error in {type(probes[i]).__name__}.{event.method} callback for run {kw['run_id']}: "
        f"ValueError('handler-{i}')"
        for i, event, _, kw in log
        if (setup.breaks[i] or ("", False))[0] == event.method
    ]
    view = _canonical(_by_handler(_observed(log)))
    assert all(args[0] is raised for _, event, args, _ in log if event.phase == "error")
    if target.kind == "lambda":
        assert raised is error  # R1: the same object
    else:  # R0: a copy of it
        assert raised is not error and raised is not None and error.__traceback__ is None
        assert (type(raised), raised.args) == (type(error), error.args)
    return error, raised, view, sorted(warnings.messages), sorted(expected_warnings)


@given(tree=_trees, root=_roots, setup=_setups, fault=_faults, mode=st.sampled_from(_MODES))
def test_D2_D3_R1_injected_faults_keep_traces_balanced_and_errors_intact(
    tree: _Node, root: _Call, setup: _Setup, fault: _Fault, mode: str
) -> None:
    """A random tree with one fault (an `Exception`, a `KeyboardInterrupt` or, under asyncio, a
    `asyncio.CancelledError`) raised by a lambda or a leaf, a streaming model between two
    tokens included, in all four call modes, with handlers failing without ``raise_error``.

    For every handler: each start it saw has exactly one end or error, children close before
    their parent (D3). What leaves the call is the very object the fault raised, with a
    traceback that reaches the raising frame (R1). Handlers that fail without ``raise_error``
    change nothing: every handler's view and the outcome are those of the same run without
    those failures, and each failure is logged once, naming the handler class, the event
    and the run (D2).
    """
    tree = _without_failures(tree)
    quiet = replace(setup, breaks=tuple(b and (b[0], False) for b in setup.breaks))
    clean = replace(setup, breaks=(None,) * _N_PROBES)
    _, raised, view, warnings, expected_warnings = _faulty_run(tree, root, quiet, fault, mode)
    assert raised is not None and raised.__traceback__ is not None
    last = traceback.extract_tb(raised.__traceback__)[-1].name
    assert _source_name(last) in ("inject", "_raise")
    assert warnings == expected_warnings  # D2: one warning per handler failure
    _, clean_raised, clean_view, clean_warnings, _ = _faulty_run(tree, root, clean, fault, mode)
    assert clean_warnings == []
    assert (type(raised), str(raised)) == (type(clean_raised), str(clean_raised))
    assert view == clean_view  # D2: a quiet handler failure changes no one's view


@pytest.mark.parametrize("in_loop", [False, True], ids=["no_loop", "in_loop"])
def test_R1_D6_what_an_async_body_raises_under_invoke_is_the_same_object(in_loop: bool) -> None:
    """Even through `asyncio.run` (D6's loop for an async body), the caller gets the very
    object the body raised, a `asyncio.CancelledError` or an interrupt included."""
    for error in (asyncio.CancelledError("body"), KeyboardInterrupt("body"), ValueError("body")):

        async def body(x: Any, error: BaseException = error) -> Any:
            raise error

        rec = Recorder()
        raised = _drive_sync_maybe_in_loop(Lambda(body), {"callbacks": [rec]}, in_loop)
        assert raised is error
        assert rec.events() == ["on_chain_start", "on_chain_error"]
        assert rec.records[1].args[0] is error


def _drive_sync_maybe_in_loop(
    runnable: Runnable, config: RunnableConfig, in_loop: bool
) -> BaseException | None:
    if not in_loop:
        return _drive(runnable, config, "invoke")

    async def main() -> BaseException | None:
        return _drive(runnable, config, "invoke")

    return asyncio.run(main())


# -- load from threads -----------------------------------------------------------------------------


class _Tally(BaseCallbackHandler):
    """Keeps ``(event, run id, parent id, the invocation's id)`` for every event; thread-safe
    because ``list.append`` is atomic."""

    def __init__(self) -> None:
        self.rows: list[tuple[Event, uuid.UUID, uuid.UUID | None, str | None]] = []


def _tally_method(event: Event) -> Callable[..., None]:
    def method(self: _Tally, *args: Any, **kwargs: Any) -> None:
        key = None
        if event.phase == "start":
            key = str(args[1][0] if isinstance(args[1], list) else args[1]).split(":")[0]
        self.rows.append((event, kwargs["run_id"], kwargs.get("parent_run_id"), key))

    return method


for _event in Event:
    setattr(_Tally, _event.method, _tally_method(_event))

_LOAD_THREADS, _LOAD_RUNS = 8, 2000
# Per invocation: the root lambda and its chain of a lambda, a tool and a streaming model: 5
# runs, each with its input carrying the invocation's key, and 2 tokens: 12 events.
_LOAD_EVENTS = 12


def _load_tree() -> Runnable:
    chain = Chain(Lambda(lambda x: f"{x}: q", name="prep"), Tool(str), LLM("a b", streaming=True))
    return Lambda(lambda x: chain.invoke(x), name="root")


def _check_load(tally: _Tally, checker: TraceChecker, keys: set[str]) -> None:
    """No event lost or duplicated; each run's chain of parents ends at the root run of the
    same invocation; every trace balanced."""
    checker.check()
    assert len(tally.rows) == len(keys) * _LOAD_EVENTS
    starts = {
        run: (parent, key) for event, run, parent, key in tally.rows if event.phase == "start"
    }
    assert len(starts) == len(keys) * 5  # run ids unique: no start lost or duplicated
    ends = collections.Counter(run for event, run, _, _ in tally.rows if event.phase == "end")
    assert set(ends) == set(starts) and set(ends.values()) == {1}
    roots = {key: run for run, (parent, key) in starts.items() if parent is None}
    assert set(roots) == keys  # one root per invocation
    for run, (parent, key) in starts.items():
        top, above = run, parent
        while above is not None:
            top, above = above, starts[above][0]
        assert top == roots[key]  # the run belongs to its own invocation's tree


@pytest.mark.slow
def test_D3_S10_8_threads_x_2000_nested_invokes_share_one_handler_without_loss() -> None:
    tally, checker, tree = _Tally(), TraceChecker(), _load_tree()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(_LOAD_RUNS):
                tree.invoke(f"{t}-{i}", {"callbacks": [tally, checker]})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(_LOAD_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []  # no exception in any thread
    keys = {f"{t}-{i}" for t in range(_LOAD_THREADS) for i in range(_LOAD_RUNS)}
    _check_load(tally, checker, keys)


@pytest.mark.slow
def test_R3_S11_batch_of_16000_with_max_concurrency_8_shares_one_handler_without_loss() -> None:
    tally, checker, tree = _Tally(), TraceChecker(), _load_tree()
    keys = [f"b-{i}" for i in range(_LOAD_THREADS * _LOAD_RUNS)]
    outputs = tree.batch(keys, {"callbacks": [tally, checker], "max_concurrency": 8})
    assert outputs == ["a b"] * len(keys)
    _check_load(tally, checker, set(keys))


# -- bad input ---------------------------------------------------------------------------------


class _NotAHandler:
    def __repr__(self) -> str:
        return "<not a handler>"


_BAD_CONFIGS: list[tuple[Any, type[Exception], str]] = [
    ({"callback": []}, TypeError, "unknown config key 'callback'"),
    ({"callbacks": "h"}, TypeError, "got 'h' (str)"),
    ({"callbacks": 42}, TypeError, "got 42 (int)"),
    ({"callbacks": _NotAHandler()}, TypeError, "got <not a handler> (_NotAHandler)"),
    ({"callbacks": [_NotAHandler()]}, TypeError, "[0]: expected a callback handler"),
    ({"tags": "t1"}, TypeError, "got 't1' (str)"),
    ({"tags": ["ok", 3]}, TypeError, "['tags'][1] must be a string, got 3 (int)"),
    ({"metadata": ["a"]}, TypeError, "got a list"),
    ({"metadata": {1: "x"}}, TypeError, "keys must be strings, got 1 (int)"),
    ({"run_id": "abc"}, TypeError, "got 'abc' (str)"),
    ({"run_name": 7}, TypeError, "got 7 (int)"),
    ({"max_concurrency": 0}, ValueError, "got 0 (int)"),
    ({"max_concurrency": -3}, ValueError, "got -3 (int)"),
    ({"max_concurrency": "8"}, TypeError, "got '8' (str)"),
    (["callbacks"], TypeError, "config must be a dict, got a list"),
]


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_config_errors_name_the_element_never_the_whole_value() -> None:
    """An error message shows the offending element, bounded, and never a container whole (it
    may hold secrets); a repr that raises does not replace the error."""
    secret = "sk-" + "0123456789" * 3
    cases: list[tuple[Any, str]] = [
        ({"metadata": {"api_key": secret, 1: "x"}}, "config['metadata'] keys must be strings, got 1 (int)"),
        ({"callbacks": [{"api_key": secret}]}, "config['callbacks'][0]: expected a callback handler (an object with on_* event methods), got a dict"),
        ({"tags": [secret * 3]}, "config['tags'] must be a list of strings, got"),  # a string: allowed
        ({"run_name": secret * 3}, ""),  # a long name is fine
        ({"tags": ["ok", _BadRepr()]}, "config['tags'][1] must be a string, got <_BadRepr instance at 0x"),
        ({"run_id": secret * 3}, "config['run_id'] must be a uuid.UUID, got 'sk-01234567890123...234567890123456789' (str)"),
    ]  # fmt: skip
    for config, message in cases:
        if not message or message.endswith("got"):
            assert Lambda(_ident).invoke(1, config) == 1
            continue
        with pytest.raises(TypeError) as info:
            Lambda(_ident).invoke(1, config)
        assert str(info.value).startswith(message)
        assert secret not in str(info.value)
    shared = (t for t in ["a", "b"])  # one generator for every input would tag the first only
    with pytest.raises(
        TypeError, match=r"^config\['tags'\] must be a list of strings, got a generator$"
    ):
        Lambda(_ident).batch([1, 2], [{"tags": shared}, {"tags": shared}])  # type: ignore[typeddict-item]
    assert list(shared) == ["a", "b"]  # refused before anything read it


@pytest.mark.parametrize(("config", "kind", "names"), _BAD_CONFIGS, ids=repr)
def test_config_bad_input_is_rejected_before_any_event_naming_the_value(
    config: Any, kind: type[Exception], names: str
) -> None:
    """Bad config is a clear error naming the offending value, raised before the run starts:
    a handler watching the enclosing run sees that run fail, and no start of the bad one."""
    inner = Lambda(_ident, name="inner")
    for call in (
        lambda: inner.invoke(1, config),
        lambda: inner.stream(1, config),
        lambda: inner.batch([1, 2], [{}, config]),  # the good first input does not start either
        lambda: asyncio.run(inner.ainvoke(1, config)),
        lambda: asyncio.run(inner.abatch([1, 2], [{}, config])),
    ):
        rec = Recorder()
        outer = Lambda(lambda x, call=call: call(), name="outer")
        with pytest.raises(kind) as info:
            outer.invoke(1, {"callbacks": [rec]})
        assert names in str(info.value)
        assert str(info.value)[0].islower()
        assert rec.events() == ["on_chain_start", "on_chain_error"]  # the outer run only
        assert rec.records[1].args[0] is info.value


def test_config_bad_manager_input_is_rejected_before_any_event() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    with pytest.raises(TypeError, match=r"run_id must be a uuid\.UUID or None, got 'abc'"):
        manager.on_chain_start({}, {}, run_id="abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got <not a handler>"):
        manager.add_handler(_NotAHandler())
    with pytest.raises(TypeError, match="got <not a handler>"):
        CallbackManager([_NotAHandler()])
    with pytest.raises(TypeError, match="tags must be a list of strings, got 'abc'"):
        manager.add_tags("abc")
    with pytest.raises(TypeError, match="got 5"):
        Lambda(_ident, callbacks=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got 5"):
        Lambda(_ident).with_config(callbacks=5)
    run = manager.on_chain_start({}, {})
    with pytest.raises(
        TypeError, match="on_chain_end\\(\\) missing 1 required positional argument: 'outputs'"
    ):
        run.on_chain_end()  # type: ignore[call-arg]
    assert rec.events() == ["on_chain_start"]  # only the good start


def test_D2_handler_with_a_wrong_signature_is_a_handler_error_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Narrow(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any) -> None:  # type: ignore[override]
            pass  # takes neither the inputs nor the keywords

    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="callbacks"), sequential_run_ids():
        assert Lambda(_ident, name="f").invoke(1, {"callbacks": [Narrow(), rec]}) == 1
    assert rec.events() == ["on_chain_start", "on_chain_end"]
    [message] = [m for _, _, m in caplog.record_tuples]
    assert message.startswith(
        f"error in Narrow.on_chain_start callback for run {_U(1)}: TypeError("
    )
    strict = Narrow()
    strict.raise_error = True
    rec = Recorder()
    with pytest.raises(TypeError, match="on_chain_start"):
        Lambda(_ident, name="f").invoke(1, {"callbacks": [strict, rec]})
    assert rec.events() == ["on_chain_start", "on_chain_error"]  # D3: closed all the same


def test_S10_custom_event_outside_a_run_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError) as info:
        dispatch_custom_event("evt", {})
    assert str(info.value) == (
        "dispatching a custom event needs an enclosing run: call it from inside a "
        "runnable, or pass the config that runnable received"
    )
    with pytest.raises(RuntimeError, match="needs an enclosing run"):
        asyncio.run(adispatch_custom_event("evt", {}))
    with pytest.raises(TypeError, match="custom event name must be a string, got 3"):
        Lambda(lambda x: dispatch_custom_event(3, x)).invoke(1)  # type: ignore[arg-type]


# -- nothing retained --------------------------------------------------------------------------


class _Big:
    """An input or output that can be watched with a weak reference."""


def test_D7_D8_R1_a_finished_run_leaves_no_reference_to_its_values_managers_or_handlers() -> None:
    """After a call returns, or raises and its exception is dropped, nothing the library keeps
    refers to the input, the outputs, the run managers or the handlers, in all four modes."""
    refs: list[weakref.ref[Any]] = []

    def body(x: Any) -> _Big:
        out = _Big()
        refs.append(weakref.ref(out))
        return out

    def managers() -> int:  # they have no __weakref__ slot: count the live ones instead
        return sum(isinstance(o, (CallbackManager, AsyncCallbackManager, callbacks._Run))
                   for o in gc.get_objects())  # fmt: skip

    gc.collect()
    baseline = managers()

    for mode in _MODES:
        for fails in (False, True):
            refs.clear()
            handler, value = Recorder(), _Big()  # the recorder keeps every payload
            refs.extend([weakref.ref(handler), weakref.ref(value)])
            error = ValueError("model down") if fails else None
            model = LLM("ok", streaming=True, error=error)
            tree = Lambda(body, name="a") | Parallel(b=Lambda(body, name="b"), c=model)
            config: RunnableConfig = {"callbacks": [handler], "max_concurrency": 1}
            raised = _drive(tree, config, mode, value)
            assert raised is None if error is None else type(raised) is ValueError
            assert len(handler.records) == 11  # 5 starts, 1 token, 5 ends or errors
            del handler, value, tree, config, raised  # the model and its error= live on (D8)
            gc.collect()
            assert len(refs) == 4
            assert [r() for r in refs] == [None] * 4, (mode, fails)
            assert managers() == baseline, (mode, fails)


@pytest.mark.slow
def test_D7_100000_nested_runs_grow_traced_memory_by_less_than_64_kib() -> None:
    class NoOp(BaseCallbackHandler):
        pass

    inner = Lambda(_ident, name="inner")
    outer = Lambda(lambda x: inner.invoke(x), name="outer")
    config: RunnableConfig = {"callbacks": [NoOp()]}

    def runs(n: int) -> None:
        for i in range(n):
            outer.invoke(i, config)

    tracemalloc.start()
    try:
        runs(1000)  # warm up: caches, interned strings, free lists
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        runs(100_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes retained"


# -- depth -------------------------------------------------------------------------------------

_DEPTH = 200
# Under a trace function (coverage.py, a debugger) Python 3.11 counts each call twice against
# the recursion limit, so depth is measured untraced only; CI runs these without coverage.
_untraced = pytest.mark.skipif(
    sys.gettrace() is not None, reason="a trace function halves the usable recursion depth"
)


@_untraced
@pytest.mark.parametrize("mode", _MODES)
def test_D3_a_chain_nested_200_deep_runs_and_reports_under_the_default_recursion_limit(
    mode: str,
) -> None:
    assert sys.getrecursionlimit() == 1000  # Python's default
    tree: Runnable = Lambda(_ident, name="leaf")
    for i in range(_DEPTH):
        tree = Chain(tree, name=f"c{i}")
    rec, checker = Recorder(), TraceChecker()
    assert _drive(tree, {"callbacks": [rec, checker]}, mode) is None
    checker.check()
    names = {r.run_id: r.kwargs["name"] for r in rec.records if r.event.phase == "start"}
    parents = [
        (r.kwargs["name"], names.get(r.parent_run_id))
        for r in rec.records
        if r.event.phase == "start"
    ]
    chain = [f"c{i}" for i in reversed(range(_DEPTH))]
    assert parents == list(zip([*chain, "leaf"], [None, *chain], strict=True))
    assert rec.events() == ["on_chain_start"] * (_DEPTH + 1) + ["on_chain_end"] * (_DEPTH + 1)


@_untraced
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_S10_lambdas_invoking_lambdas_nest_deep_under_the_default_recursion_limit(
    mode: str,
) -> None:
    """A function that calls ``invoke`` (``ainvoke``) on the next: 200 (150) levels."""
    depth = 200 if mode == "invoke" else 150
    tree: Runnable = Lambda(_ident, name="leaf")
    for i in range(depth):
        if mode == "invoke":
            tree = Lambda(lambda x, inner=tree: inner.invoke(x), name=f"l{i}")
        else:

            async def call(x: Any, inner: Runnable = tree) -> Any:
                return await inner.ainvoke(x)

            tree = Lambda(call, name=f"l{i}")
    checker = TraceChecker()
    assert _drive(tree, {"callbacks": [checker]}, mode) is None
    checker.check()
    assert len(checker._runs) == depth + 1


# At the limit, Python cannot start every coroutine it was handed: some are never awaited. Under
# a trace function (coverage.py), a `RecursionError` can strike at any line, not only at a call:
# the promise is for untraced code (`_Unreachable` below stands in for it under coverage).
@_untraced
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
@pytest.mark.parametrize("mode", _MODES)
def test_D3_a_run_too_deep_to_hear_its_error_is_closed_by_its_nearest_ancestor(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nested lambdas run until Python's recursion limit: somewhere down the tree there is no
    stack left to deliver a run's start or closing event. Whoever did not hear a start event
    hears nothing more of that run; a run whose closing event did not reach every handler is
    not marked closed, and its parent, higher up, delivers it before its own (innermost
    first): every start a handler heard gets one end or error, children before parents."""

    def nested(depth: int) -> Runnable:
        async def leaf(x: Any) -> Any:
            return x

        tree = Lambda(leaf if mode.startswith("a") else _ident, name="leaf")
        for i in range(depth):

            async def call(x: Any, inner: Runnable = tree) -> Any:
                return await inner.ainvoke(x)

            def call_sync(x: Any, inner: Runnable = tree) -> Any:
                return inner.invoke(x)

            tree = Lambda(call if mode.startswith("a") else call_sync, name=f"l{i}")
        return tree

    async def stream(tree: Runnable, config: RunnableConfig) -> list[Any]:
        return [chunk async for chunk in tree.astream("x", config)]

    def beneath(frames: int, call: Callable[[], Any]) -> Any:
        """``call()`` with ``frames`` more frames of stack beneath it."""
        return beneath(frames - 1, call) if frames else call()

    # What is collected at the stack's edge (a task left half-built, below) is reported there,
    # where pytest's own hook cannot format it (its RecursionError fails the test on 3.12 now
    # and then): such reports are expected here, and dropped.
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    # A tree deeper than the stack allows runs out at the same point of the same level of
    # nesting, whatever its depth: what moves that point through the library's code is how
    # much stack lies beneath the call. One level of these trees takes four frames (six for a
    # stream), so 24 offsets in a row make the stack run out at each line of a level's code,
    # four times or more. (Where the depth only grew, a broken case could pass every time.)
    tree = nested(sys.getrecursionlimit() // 2)  # each level takes two frames or more
    for offset in range(24):
        first, last = TraceChecker(), TraceChecker()
        checkers = [first, Recorder(), last]
        config: RunnableConfig = {"callbacks": checkers}
        with pytest.raises(RecursionError):  # under ``a*``: it leaves `asyncio.run`, which
            if mode == "invoke":  # then cancels what is left
                beneath(offset, functools.partial(tree.invoke, "x", config))
            elif mode == "stream":
                beneath(offset, functools.partial(list, tree.stream("x", config)))
            else:
                run = tree.ainvoke("x", config) if mode == "ainvoke" else stream(tree, config)
                beneath(offset, functools.partial(asyncio.run, run))
        first.check()  # the first handler and the last alike
        last.check()
    # A task whose creation ran out of stack is left half-built: asyncio reports it as
    # destroyed while pending once it is collected (its handler heard the event through the
    # parent all the same). The recorded errors' tracebacks hold it: let it go here, under
    # this test's log capture and warning filters, not at the interpreter's exit.
    del checkers, tree, config
    gc.collect()


class _Unreachable:
    """A handler that Python "cannot call" for its first ``refusals[method]`` events of that
    method: its methods are `functools.partial` objects (with no frame of their own, like a
    method written in C), which raise `RecursionError` as a call with no stack left does;
    then it hears events, and keeps them as a `Recorder` does."""

    run_inline = False  # True: under async dispatch, called on the loop, not in a thread (D5)

    def __init__(self, **refusals: int) -> None:
        self.refusals, self.recorder = refusals, Recorder("unreachable")
        for event in Event:
            setattr(self, event.method, functools.partial(self._hear, event.method))

    def _hear(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.refusals.get(method, 0) > 0:
            self.refusals[method] -= 1
            raise RecursionError("no stack left")
        getattr(self.recorder, method)(*args, **kwargs)


def _outer_inner(mode: str) -> Runnable:
    """``outer`` whose body calls ``inner`` (the identity) in ``mode``: ``invoke`` or ``ainvoke``."""
    inner = Lambda(_ident, name="inner")

    async def call_async(x: Any) -> Any:
        return await inner.ainvoke(x)

    return Lambda(call_async if mode == "ainvoke" else inner.invoke, name="outer")


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "ainvoke-inline"])
@pytest.mark.parametrize("refusals", [1, 3], ids=["once", "thrice"])
def test_D3_a_handler_python_could_not_call_hears_the_closing_event_from_the_parent_run(
    refusals: int, mode: str
) -> None:
    """The inner run's end cannot reach the second handler: the run is not closed for it. The
    error that follows closes it on the way up, the end it did not hear first; if that fails
    too (``thrice``: the end, the error, the last try on the way out), the parent run delivers
    it, before its own error (D3). A third handler that Python cannot call once hears it
    later as well. Under async dispatch, each handler's own task says whether it heard it,
    whether it calls it in a worker thread or on the loop."""
    before, after = Recorder("before"), Recorder("after")
    unreachable, other = _Unreachable(on_chain_end=refusals), _Unreachable(on_chain_end=1)
    unreachable.run_inline = other.run_inline = mode == "ainvoke-inline"
    handlers: list[object] = [before, unreachable, other, after]
    with sequential_run_ids(), pytest.raises(RecursionError):
        _drive_raising(_outer_inner(mode[:7]), {"callbacks": handlers}, mode[:7])
    for rec in (before, unreachable.recorder, other.recorder, after):  # each, the inner end
        assert [(m, i) for m, i, *_ in _trace(rec)] == [
            ("on_chain_start", 1), ("on_chain_start", 2), ("on_chain_end", 2),
            ("on_chain_error", 1),
        ], rec  # fmt: skip


def test_D3_D5_an_async_dispatcher_cut_short_counts_a_handler_its_task_could_not_call_as_unheard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under async dispatch, the second handler's task could not call it with the inner run's
    end, and then the dispatcher itself has no stack left to go on: the handlers whose tasks
    called them heard the end; the second hears it later, from the error on the way up; nobody
    hears it twice (D3)."""
    complete, unreachable = callbacks._complete, _Unreachable(on_chain_end=1)
    cut_short: list[Any] = []

    async def then_no_stack(tasks: Any) -> Any:
        cancelled = await complete(tasks)
        if len(tasks) == 3 and unreachable.refusals["on_chain_end"] == 0 and not cut_short:
            cut_short.append(tasks)  # once: the inner end's dispatcher, its three tasks done
            raise RecursionError("no stack left")
        return cancelled

    monkeypatch.setattr(callbacks, "_complete", then_no_stack)
    before, after = Recorder("before"), Recorder("after")
    with sequential_run_ids(), pytest.raises(RecursionError):
        _drive_raising(
            _outer_inner("ainvoke"), {"callbacks": [before, unreachable, after]}, "ainvoke"
        )
    for rec in (before, unreachable.recorder, after):
        assert [(m, i) for m, i, *_ in _trace(rec)] == [
            ("on_chain_start", 1), ("on_chain_start", 2), ("on_chain_end", 2),
            ("on_chain_error", 1),
        ], rec  # fmt: skip


def test_D3_a_root_run_whose_end_could_not_be_delivered_delivers_it_once_it_can() -> None:
    rec, unreachable = Recorder(), _Unreachable(on_chain_end=1)
    with pytest.raises(RecursionError):
        Lambda(_ident).invoke(1, {"callbacks": [rec, unreachable]})
    assert rec.events() == unreachable.recorder.events() == ["on_chain_start", "on_chain_end"]


def test_D3_a_run_managers_end_python_could_not_deliver_comes_from_its_parent() -> None:
    """Through the manager API: a child's end that could not reach a handler (no stack left)
    is delivered by the parent run, before the parent's own end; meanwhile the child refuses
    another closing event."""
    rec, unreachable = Recorder(), _Unreachable(on_chain_end=1)
    with sequential_run_ids():
        parent = CallbackManager.configure([rec, unreachable]).on_chain_start({"name": "p"}, 1)
        child = parent.get_child().on_chain_start({"name": "c"}, 1)
        with pytest.raises(RecursionError):
            child.on_chain_end(2)
        with pytest.raises(RuntimeError, match="after the end"):
            child.on_chain_error(ValueError("again"))
        parent.on_chain_end(3)
    for r in (rec, unreachable.recorder):
        assert [(m, i) for m, i, *_ in _trace(r)] == [
            ("on_chain_start", 1), ("on_chain_start", 2), ("on_chain_end", 2),
            ("on_chain_end", 1),
        ], r  # fmt: skip


def test_D2_D3_a_run_managers_end_that_a_raise_error_handler_fails_still_reaches_everyone() -> None:
    """Through the manager API: the failure is raised once every handler heard the end, and
    the run is over (D2, D3)."""

    class Failing(BaseCallbackHandler):
        raise_error = True

        def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
            raise ValueError("boom")

    before, after = Recorder("before"), Recorder("after")
    run = CallbackManager.configure([before, Failing(), after]).on_chain_start({"name": "x"}, 1)
    with pytest.raises(ValueError, match=r"^boom$"):
        run.on_chain_end(2)
    with pytest.raises(RuntimeError, match="after the end"):
        run.on_chain_end(2)
    assert before.events() == after.events() == ["on_chain_start", "on_chain_end"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_D3_a_start_python_could_not_deliver_to_a_handler_is_the_last_it_hears(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start reached the first handler, not the second: the run fails with the error, and
    only the first hears that error; the second hears nothing of the run."""
    first, second = Recorder("first"), _Unreachable(on_chain_start=1)
    if mode == "ainvoke":  # async dispatch runs each handler as a task: the library could not
        first.run_inline = True  # start the second's (the inline one's task comes first)
        task, started = callbacks._task, []

        def no_stack_for_the_second(loop: Any, coroutine: Any, *args: Any, **kw: Any) -> Any:
            started.append(coroutine)
            if len(started) == 2:
                coroutine.close()
                raise RecursionError("no stack left")
            return task(loop, coroutine, *args, **kw)

        monkeypatch.setattr(callbacks, "_task", no_stack_for_the_second)
    with pytest.raises(RecursionError):
        _drive_raising(Lambda(_ident), {"callbacks": [first, second]}, mode)
    assert first.events() == ["on_chain_start", "on_chain_error"]
    assert second.recorder.events() == []


def _drive_raising(runnable: Runnable, config: RunnableConfig, mode: str) -> Any:
    if mode == "invoke":
        return runnable.invoke("q", config)
    return asyncio.run(runnable.ainvoke("q", config))


def _raise_at(func: Any, error: Callable[[], BaseException], nth: int = 1) -> Any:
    """A profile hook that raises ``error()`` at the ``nth`` call of ``func`` (`_is_code_of`),
    as a signal (or a stack with no room left) lands at its entry."""
    calls = itertools.count(1)

    def hook(frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call" and _is_code_of(frame.f_code, func) and next(calls) == nth:
            raise error()

    return hook


def _run_with_hook(hook: Any, runnable: Runnable, config: RunnableConfig, mode: str) -> Any:
    """``_drive``, with ``hook`` as the profile function while the call runs (in this thread;
    under asyncio, in the loop's)."""
    sys.setprofile(hook)
    try:
        return _drive(runnable, config, mode)
    finally:
        sys.setprofile(None)


def _failing_body(x: Any) -> Any:
    raise ValueError("body broke")


async def _failing_async_body(x: Any) -> Any:
    raise ValueError("body broke")


@pytest.mark.parametrize("mode", _MODES)
def test_D3_an_interrupt_at_the_entry_of_the_error_closing_still_closes_the_run(mode: str) -> None:
    """The one point of a call's error path that cannot hold an interrupt is the entry of the
    closing itself (`_Run._fail`): the call tries once more on its way out, so the run still
    ends, with the interrupt as its error (R1: the object that leaves the call)."""
    fail = callbacks._Run._fail if mode in ("invoke", "stream") else AsyncRunManager._afail
    body = _failing_async_body if mode.startswith("a") else _failing_body
    rec, checker = Recorder(), TraceChecker()
    hook = _raise_at(fail, lambda: KeyboardInterrupt("at the closing"))
    raised = _run_with_hook(hook, Lambda(body), {"callbacks": [rec, checker]}, mode)
    assert isinstance(raised, KeyboardInterrupt)
    checker.check()
    assert rec.events() == ["on_chain_start", "on_chain_error"]
    assert rec.records[-1].args[0] is raised


@pytest.mark.parametrize("strict", [False, True], ids=["quiet", "strict"])
@pytest.mark.parametrize("mode", _MODES)
def test_D2_D3_an_interrupt_held_while_closing_outranks_a_handler_failing_on_the_error(
    mode: str, strict: bool
) -> None:
    """An interrupt that lands as the error is being delivered is held; the delivery goes on,
    then it leaves the call; a ``raise_error`` handler that fails on that error does not
    replace the interrupt (D2)."""

    class Strict(BaseCallbackHandler):
        raise_error = True

        def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
            raise RuntimeError("handler broke")

    finish = callbacks._Run._finish if mode in ("invoke", "stream") else AsyncRunManager._afinish
    body = _failing_async_body if mode.startswith("a") else _failing_body
    rec, checker = Recorder(), TraceChecker()
    hook = _raise_at(finish, lambda: KeyboardInterrupt("while closing"))
    handlers = [rec, checker, *([Strict()] if strict else [])]
    raised = _run_with_hook(hook, Lambda(body), {"callbacks": handlers}, mode)
    assert isinstance(raised, KeyboardInterrupt)
    checker.check()
    assert rec.events() == ["on_chain_start", "on_chain_error"]
    assert type(rec.records[-1].args[0]) is ValueError  # the run's own error


@contextlib.contextmanager
def _no_stack_to_log(times: int = -1) -> Iterator[None]:
    """Logging a handler's failure runs out of stack, as deep in a recursion (``times`` times;
    -1: always): a filter on the library's logger raises `RecursionError`."""
    left = [times]

    def refuse(record: logging.LogRecord) -> bool:
        if left[0]:
            left[0] -= 1
            raise RecursionError("no stack left")
        return True

    logging.getLogger("callbacks").addFilter(refuse)
    try:
        yield
    finally:
        logging.getLogger("callbacks").removeFilter(refuse)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_D3_the_handlers_after_one_whose_failure_could_not_be_logged_hear_it_later(
    mode: str,
) -> None:
    """Logging a handler's failure needs stack too: if that fails, the handlers after it have
    not heard the event; they hear it from the parent run, before its own (D3). (Under async
    dispatch each handler has its own task: the others heard it, and nobody hears it twice.)"""

    class Breaks(BaseCallbackHandler):
        def on_chain_end(self, outputs: Any, **kwargs: Any) -> None:
            raise ValueError("handler broke")

    before, after = Recorder("before"), Recorder("after")
    with _no_stack_to_log(1), sequential_run_ids(), pytest.raises(RecursionError):
        _drive_raising(_outer_inner(mode), {"callbacks": [before, Breaks(), after]}, mode)
    for rec in (before, after):
        assert [(m, i) for m, i, *_ in _trace(rec)] == [
            ("on_chain_start", 1), ("on_chain_start", 2), ("on_chain_end", 2),
            ("on_chain_error", 1),
        ], rec  # fmt: skip


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "ainvoke-inline"])
def test_D2_a_handlers_own_recursion_error_is_its_failure(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a `RecursionError` raised before Python entered the handler means it did not hear
    the event (D3); one raised inside it is its failure, logged, the run goes on (D2). Under
    async dispatch, in its worker thread or on the loop (``run_inline``) alike."""

    class Deep(BaseCallbackHandler):
        run_inline = mode == "ainvoke-inline"

        def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
            raise RecursionError("its own")

    rec = Recorder()
    assert _drive_raising(Lambda(_ident), {"callbacks": [Deep(), rec]}, mode[:7]) == "q"
    assert rec.events() == ["on_chain_start", "on_chain_end"]
    assert "Deep.on_chain_start callback for run" in caplog.text


@pytest.mark.parametrize("made", [False, True], ids=["not-made", "made-not-entered"])
@pytest.mark.parametrize("refusals", [1, 3], ids=["once", "thrice"])
def test_D3_a_handler_whose_task_could_not_start_hears_the_closing_event_later(
    refusals: int, made: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Async dispatch starts a task per handler; if the library has no stack left to start the
    second handler's task for the inner run's end (``not-made``), or the task has none left to
    enter the library's delivery (``made-not-entered``: it fails at once, started eagerly at
    the dispatcher's depth), that handler hears it later: when the error on the way up closes
    the run, or from the parent run (``thrice``)."""
    make_task = callbacks._handler_task  # what starts a handler's delivery task
    left = [refusals]

    async def no_stack_to_enter() -> None:  # as the delivery fails at its entry
        raise RecursionError("no stack left")

    def no_stack_for_the_second(coroutine: Any, **kwargs: Any) -> Any:
        handler = coroutine.cr_frame.f_locals.get("handler") if coroutine.cr_frame else None
        event = coroutine.cr_frame.f_locals.get("event") if coroutine.cr_frame else None
        if handler is after and event is Event.CHAIN_END and left[0]:
            left[0] -= 1
            if made:
                coroutine.close()
                return make_task(no_stack_to_enter(), **kwargs)
            raise RecursionError("no stack left")
        return make_task(coroutine, **kwargs)

    monkeypatch.setattr(callbacks, "_handler_task", no_stack_for_the_second)
    before, after = Recorder("before"), Recorder("after")
    with sequential_run_ids(), pytest.raises(RecursionError):
        _drive_raising(_outer_inner("ainvoke"), {"callbacks": [before, after]}, "ainvoke")
    for rec in (before, after):
        assert [(m, i) for m, i, *_ in _trace(rec)] == [
            ("on_chain_start", 1), ("on_chain_start", 2), ("on_chain_end", 2),
            ("on_chain_error", 1),
        ], rec  # fmt: skip


def test_D3_an_interrupt_while_a_handlers_failure_is_handled_lets_the_rest_hear_the_event() -> None:
    """The interrupt lands in the library's own code between two handlers (as it deals with
    the first one's failure): the second still hears the event, then the interrupt leaves."""

    class Breaks(BaseCallbackHandler):
        def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("handler broke")

    rec, checker = Recorder(), TraceChecker()
    hook = _raise_at(callbacks._keep, lambda: KeyboardInterrupt("between handlers"))
    raised = _run_with_hook(hook, Lambda(_ident), {"callbacks": [Breaks(), rec, checker]}, "invoke")
    assert isinstance(raised, KeyboardInterrupt)
    assert rec.events() == ["on_chain_start", "on_chain_error"]
    checker.check()


@_untraced
@pytest.mark.parametrize("troubled", [True, False], ids=["a-failure-and-a-coroutine", "plain"])
def test_D3_an_interrupt_at_any_line_of_a_runs_fast_path_leaves_every_handler_hearing_once(
    troubled: bool,
) -> None:
    """A note fired again goes through the run manager's fast path, which hands over to the
    careful dispatch at a failure, a coroutine handed back or an interrupt. A `KeyboardInterrupt`
    at each line the library runs for that note, in turn: it leaves the call, and once the
    first handler heard the note, each heard it exactly once, in order (the one that failed
    and the async one included); one that lands before the first heard it stops the note.
    Plain handlers keep the fast path to the end; the others make it hand over midway."""
    k, held = 1, 0
    while True:
        log: list[tuple[str, str]] = []
        handlers = _hearing(log) if troubled else [_Hears("a", log), _Hears("b", log)]
        run = CallbackManager(handlers).on_chain_start({}, {})
        run.on_text("x")  # resolves the listeners' methods: the next note takes the fast path
        log.clear()
        fired = _AtLine(k).run(functools.partial(run.on_text, "y"))
        heard = _HEARD if troubled else ("a", "b")
        assert log in ([], [(name, "y") for name in heard]), f"interrupted at point {k}"
        if not fired:
            break
        held += bool(log)
        k += 1
    assert held > (30 if troubled else 5), held  # the points where delivery had begun


@pytest.mark.parametrize("fast", [False, True], ids=["first-note", "fast-path"])
def test_R1_D3_a_note_that_runs_out_of_stack_raises_recursion_error(fast: bool) -> None:
    """When the stack runs out in the library's own code while a note is delivered (here:
    logging a handler's failure), the note's call raises that `RecursionError`, never the
    library's internal signal; the handlers before heard it, those after did not."""
    log: list[tuple[str, str]] = []
    before, broken, after = _Hears("a", log), _Hears("bad", log, ValueError("x")), _Hears("b", log)
    run = CallbackManager([before, broken, after]).on_chain_start({}, {})
    if fast:
        run.on_text("resolves")  # its failure logged
    log.clear()
    with _no_stack_to_log(), pytest.raises(RecursionError, match="no stack left"):
        run.on_text("x")
    assert log == [("a", "x"), ("bad", "x")]


def test_R1_D3_D5_an_async_note_that_runs_out_of_stack_raises_recursion_error() -> None:
    """The same under async dispatch (`AsyncRunManager`): the note raises `RecursionError`."""

    class Broken(AsyncCallbackHandler):
        @property
        def run_inline(self) -> bool:  # type: ignore[override]
            raise ValueError("x")  # logged, where the stack runs out

    rec = Recorder()

    async def main() -> None:
        run = await AsyncCallbackManager([Broken(), rec]).on_chain_start({}, {})
        with _no_stack_to_log():
            await run.on_text("x")

    with pytest.raises(RecursionError, match="no stack left"):
        asyncio.run(main())
    assert rec.events() == ["on_chain_start"]  # the note's tasks were not made


def test_D3_a_fast_path_interrupted_past_its_last_handler_hands_over_only_the_interrupt() -> None:
    """`_dispatch`'s ``resume``: a run manager's fast path that was interrupted once its last
    handler had returned hands over the interrupt alone: nobody hears the event again, and the
    interrupt leaves. (A real signal lands there at the loop's jump back; a test can only
    place it by hand.)"""
    log: list[tuple[str, str]] = []
    run = CallbackManager([_Hears("a", log), _Hears("b", log)]).on_chain_start({}, {})
    run.on_text("x")
    interrupt = KeyboardInterrupt()
    resume: list[Any] = [2, None, callbacks._UNCALLED, interrupt]
    keywords: dict[str, Any] = {"run_id": run.run_id, "parent_run_id": None, "tags": []}
    with pytest.raises(KeyboardInterrupt) as info:
        callbacks._dispatch(run, run._listeners, Event.TEXT, ("y",), keywords, resume)
    assert info.value is interrupt and resume == [] and log == [("a", "x"), ("b", "x")]


def test_D3_an_interrupt_cutting_a_roots_end_short_leaves_it_to_be_finished_by_firing_again() -> (
    None
):
    """An interrupt that lands as a run's end is being delivered (here: at the dispatcher's
    entry, where nothing holds it) leaves the end chosen but unheard. Firing an end or error
    event again finishes that delivery, each handler hearing the first end once; then the run
    is over."""
    recs = [Recorder("a"), Recorder("b")]
    run = CallbackManager(recs).on_chain_start({}, {})
    fired: list[bool] = []

    def hook(frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call" and _is_code_of(frame.f_code, callbacks._dispatch) and not fired:
            fired.append(True)
            raise KeyboardInterrupt("as the end is delivered")

    sys.setprofile(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.on_chain_end({"out": 1})
    finally:
        sys.setprofile(None)
    assert [rec.events() for rec in recs] == [["on_chain_start"]] * 2
    run.on_chain_error(ValueError("the caller's finally"))  # finishes the chosen end instead
    assert [rec.events() for rec in recs] == [["on_chain_start", "on_chain_end"]] * 2
    assert recs[0].records[-1].args == ({"out": 1},)
    with pytest.raises(RuntimeError, match=r"^on_chain_end after the end"):
        run.on_chain_end({})


@_untraced
def test_D3_an_interrupt_at_any_line_of_a_childs_end_leaves_it_heard_once_before_its_parents() -> (
    None
):
    """A child run's usual end, fired through its run manager, is delivered from the event
    method's own frame. A `KeyboardInterrupt` at each point the library runs for it, in turn;
    then, as a caller's ``finally`` would, the end fired again (refused once it was chosen: the
    parent delivers it) and the parent's end. Each handler hears the child's end exactly once,
    before the parent's."""
    k = 1
    while True:
        recs = [Recorder("a"), Recorder("b")]
        parent = CallbackManager(recs, recs).on_chain_start({}, {})
        child = parent.get_child().on_chain_start({}, {})
        fired = _AtLine(k).run(functools.partial(child.on_chain_end, {"out": 1}))
        with contextlib.suppress(RuntimeError):  # refused when its end was chosen already
            child.on_chain_end({"out": 1})
        parent.on_chain_end({})
        for rec in recs:
            ends = [(r.event.method, r.run_id) for r in rec.records[2:]]
            assert ends == [("on_chain_end", child.run_id), ("on_chain_end", parent.run_id)], k
        if not fired:
            break
        k += 1
    assert k > 10, k


def test_D3_D4_a_chat_start_an_interrupt_kept_from_a_handler_falls_back_for_it() -> None:
    """Delivered after an interrupt (held), a chat start still falls back to ``on_llm_start``
    for a handler without chat support (D4)."""
    legacy, rec = _LLMStartOnly(), Recorder()
    hook = _raise_c_call(getattr, lambda: KeyboardInterrupt("before the call"))
    raised = _run_with_hook(hook, ChatModel("ok"), {"callbacks": [legacy, rec]}, "invoke")
    assert isinstance(raised, KeyboardInterrupt)
    assert [s[:2] for s in legacy.seen] == [("on_llm_start", ["Human: x"])]  # its error: a no-op
    assert rec.events() == ["on_chat_model_start", "on_llm_error"]


def _source_name(qualname: str) -> str:
    """A function's qualified name in callbacks.py, also for a copy that mutation testing
    (mutmut) renamed and runs behind a wrapper: ``xǁ_Runǁ_fail__mutmut_3`` is
    ``_Run._fail``, ``x__checker_method__mutmut_orig.<locals>.m`` is ``_checker_method...``."""
    head, renamed, rest = qualname.partition("__mutmut_")
    name, inner = head.rpartition(".")[2], rest.partition(".")[2]  # inner: ``<locals>.m``
    name = name.removeprefix("xǁ").replace("ǁ", ".") if "ǁ" in name else name.removeprefix("x_")
    return qualname if not renamed else f"{name}.{inner}" if inner else name


def _is_code_of(code: types.CodeType, func: Any) -> bool:
    """Whether ``code`` runs ``func``, a function of callbacks.py: its own, or a renamed copy
    of it (`_source_name`; the wrapper's code is shared by every wrapped function)."""
    if code.co_filename != callbacks.__file__:
        return False
    return _source_name(code.co_qualname) == str(func.__qualname__)


def _raise_c_call(builtin: Any, error: Callable[[], BaseException]) -> Any:
    """A profile hook that raises ``error()`` just before the library first calls ``builtin``
    (a signal landing there), once."""
    fired: list[bool] = []

    def hook(frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and arg is builtin and not fired:
            if _is_code_of(frame.f_code, callbacks._dispatch):
                fired.append(True)
                raise error()

    return hook


class _AtLine:
    """Acts at the ``k``-th point the library's own code reaches in this thread (not its
    handlers': `Recorder`, `TraceChecker`): it raises `KeyboardInterrupt` there, as a signal
    does, or calls ``act`` (to cancel a task, as `asyncio.run` does on Ctrl-C).

    Installed with `sys.settrace`, the points are the calls and the lines the library starts
    (a bare ``try:`` skipped: Python checks for signals elsewhere); with `sys.setprofile`,
    every call the library makes or receives and every return, which works beside a coverage
    tracer. A generator's return at a ``yield`` is skipped: a signal is raised where the
    consumer resumes, and the generator stays suspended (closed later, D3).
    """

    HANDLERS = ("Recorder", "TraceChecker", "_checker_method", "_recorder_method", "_counts")
    NOP = dis.opmap["NOP"]
    SUSPENDS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR

    def __init__(self, k: int, act: Callable[[], object] | None = None) -> None:
        self.k, self.act, self.seen, self.fired = k, act, 0, False

    def _ours(self, frame: types.FrameType) -> bool:
        code = frame.f_code
        return code.co_filename == callbacks.__file__ and not _source_name(
            code.co_qualname
        ).startswith(self.HANDLERS)

    def __call__(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "return" and frame.f_code.co_flags & self.SUSPENDS:
            return None
        if event in ("call", "return", "c_call", "c_return") and self._ours(frame):
            self.point(frame)
        return self.line if event == "call" and self._ours(frame) else None

    def line(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_code.co_code[frame.f_lasti] != self.NOP:
            self.point(frame)
        return self.line

    def run(self, call: Callable[[], object]) -> bool:
        """``call()`` with this tracer installed (`sys.settrace`); whether it fired: then the
        `KeyboardInterrupt` left the call."""
        sys.settrace(self)
        try:
            call()
        except KeyboardInterrupt:
            assert self.fired
        else:
            assert not self.fired
        finally:
            sys.settrace(None)
        return self.fired

    def point(self, frame: types.FrameType) -> None:
        if self.fired:
            return
        self.seen += 1
        if self.seen == self.k:
            self.fired = True
            if self.act is None:
                raise KeyboardInterrupt(f"at {frame.f_code.co_qualname}:{frame.f_lineno}")
            self.act()


def _interrupted_tree(failing: bool = False) -> Runnable:
    """A chain of every kind of step; with ``failing``, its tool raises, so the interrupt may
    also land while the library closes runs after that failure."""
    return (
        Lambda(_ident, name="a")
        | LLM("x y", streaming=True)
        | Tool(_ident, name="t", error=ValueError("tool down") if failing else None)
        | Parallel(p=Lambda(_ident, name="p"), q=Retriever(["x"]))
    )


def _interrupt_each_point(mode: str, lines: bool, failing: bool) -> int:
    """Run the tree once per point of the library's code, with a `KeyboardInterrupt` there;
    check that it left the call and that every trace is balanced. Return the points seen."""
    config: RunnableConfig = {"max_concurrency": 1}
    k = 1
    while True:
        checkers = [TraceChecker(), TraceChecker()]
        tree, at = _interrupted_tree(failing), _AtLine(k)
        install = sys.settrace if lines else sys.setprofile
        install(at if lines else at.__call__)
        try:
            if mode == "batch":
                tree.batch(["q", "r"], {**config, "callbacks": checkers})
            else:
                raised = _drive(tree, {**config, "callbacks": checkers}, mode)
                if at.fired:
                    assert isinstance(raised, KeyboardInterrupt), f"the interrupt at {k} was lost"
                else:
                    assert isinstance(raised, ValueError) if failing else raised is None
        except (KeyboardInterrupt, ValueError) as raised:
            assert at.fired or isinstance(raised, ValueError)
        finally:
            install(None)
        if not at.fired:
            return k - 1
        for checker in checkers:
            checker.check()
        k += 1


_INTERRUPTED = [("invoke", 400), ("stream", 400), ("batch", 50)]  # modes, and their points


@pytest.mark.parametrize("failing", [False, True], ids=["ok", "failing"])
@pytest.mark.parametrize(("mode", "points"), _INTERRUPTED)
def test_D3_an_interrupt_at_any_call_in_the_library_keeps_every_trace_balanced(
    mode: str, points: int, failing: bool
) -> None:
    """A `KeyboardInterrupt` raised, one per call, at each call and return the library makes
    in turn, as a signal lands (Python checks for signals there): the call raises it, and each
    of two handlers heard one end or error for every start, children before parents. With a
    failing step, the interrupt also lands while runs close after that failure."""
    assert _interrupt_each_point(mode, lines=False, failing=failing) > points


@_untraced
@pytest.mark.parametrize("failing", [False, True], ids=["ok", "failing"])
@pytest.mark.parametrize(("mode", "points"), _INTERRUPTED)
def test_D3_an_interrupt_between_any_two_lines_of_the_library_keeps_every_trace_balanced(
    mode: str, points: int, failing: bool
) -> None:
    """The same, at each line the library starts (a signal lands between two statements)."""
    assert _interrupt_each_point(mode, lines=True, failing=failing) > points


@pytest.mark.slow
@_untraced
@pytest.mark.parametrize("failing", [False, True], ids=["ok", "failing"])
@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
def test_D3_a_cancellation_at_any_line_of_the_library_keeps_every_trace_balanced(
    mode: str, failing: bool
) -> None:
    """Under asyncio, Ctrl-C reaches a run as a cancellation of the main task (what
    `asyncio.run` does with SIGINT): made at each line the library runs in turn, it leaves the
    call as `asyncio.CancelledError`, and every trace balanced."""

    async def main(tree: Runnable, config: RunnableConfig, at: _AtLine) -> None:
        task = asyncio.current_task()
        assert task is not None
        at.act = task.cancel
        sys.settrace(at)
        try:
            if mode == "ainvoke":
                await tree.ainvoke("q", config)
            else:
                [chunk async for chunk in tree.astream("q", config)]
        finally:
            sys.settrace(None)

    k = 1
    while True:
        checkers, at = [TraceChecker(), TraceChecker()], _AtLine(k, print)
        config: RunnableConfig = {"max_concurrency": 1, "callbacks": checkers}
        try:
            asyncio.run(main(_interrupted_tree(failing), config, at))
        except asyncio.CancelledError:
            assert at.fired
        except ValueError:  # the failing tool's, with no cancellation before it raised
            assert failing
            if not at.fired:
                break
        else:
            assert not at.fired, f"the cancellation at point {k} was lost"
            break
        for checker in checkers:
            checker.check()
        k += 3  # every third point: each takes a new event loop
    assert k > 1000


# ===============================================================================================
# Extras: trace checker, recorder, deterministic ids (X1-X3)
# ===============================================================================================


def test_X1_trace_checker_accepts_real_runs_and_partial_views() -> None:
    full, local, no_chain = TraceChecker(), TraceChecker(), TraceChecker()
    no_llm, no_chat = TraceChecker(), TraceChecker()
    no_chain.ignore_chain = True
    no_llm.ignore_llm = True  # receives chat starts, never their ends
    no_chat.ignore_chat_model = True  # receives chat ends, never their starts

    def body(x: str) -> str:
        dispatch_custom_event("c", 1)
        return x

    chain = Chain(
        Lambda(body, name="a"),
        Parallel(x=LLM("p q", streaming=True, callbacks=[local]), y=Tool(_ident, name="t")),
        Lambda(lambda d: d["x"], name="pick"),
        ChatModel("r s", streaming=True),
    )
    checkers = [full, no_chain, no_llm, no_chat]
    chain.invoke("q", {"callbacks": checkers})
    list(chain.stream("q", {"callbacks": checkers}))
    for checker in (full, local, no_chain, no_llm, no_chat):
        assert checker.violations == []
        checker.check()


_A, _B = _U(1), _U(2)


_Step = tuple[str, Any, tuple[Any, ...], dict[str, Any]]  # method, run id, payload, keywords


def _start(run: Any, parent: uuid.UUID | None = None, **kw: Any) -> _Step:
    return (
        "on_chain_start",
        run,
        ({}, {}),
        {"parent_run_id": parent, "tags": [], "metadata": {}, **kw},
    )


def _end(run: Any) -> _Step:
    return ("on_chain_end", run, ({},), {"parent_run_id": None, "tags": []})


def _feed(checker: TraceChecker, steps: list[_Step]) -> None:
    for method, run, args, kw in steps:
        getattr(checker, method)(*args, run_id=run, **kw)


_LLM_START: _Step = ("on_llm_start", _A, ({}, ["p"]), {"tags": [], "metadata": {}})
_LLM_END: _Step = ("on_llm_end", _A, (LLMResult([]),), {"tags": []})
_TOKEN: _Step = ("on_llm_new_token", _A, ("tok",), {"tags": []})

# Each kind of violation, as a hand-written broken stream: (the events, the violations found).
_BROKEN_STREAMS: dict[str, tuple[list[_Step], list[Violation]]] = {
    "end_without_start": (
        [_end(_A)],
        [Violation("D3", _A, "on_chain_end", "no run with this id has started")],
    ),
    "two_ends": (
        [_start(_A), _end(_A), _end(_A)],
        [Violation("D3", _A, "on_chain_end", "after the run's end or error")],
    ),
    "token_after_end": (
        [_LLM_START, _LLM_END, _TOKEN],
        [Violation("D3", _A, "on_llm_new_token", "after the run's end or error")],
    ),
    "parent_closed_before_child": (
        [_start(_A), _start(_B, _A), _end(_A), _end(_B)],
        [Violation("D3", _A, "on_chain_end", f"closed before its children ['{_B}']")],
    ),
    "child_started_after_parent_closed": (
        [_start(_A), _end(_A), _start(_B, _A), _end(_B)],
        [Violation("D3", _B, "on_chain_start", f"started after its parent {_A} closed")],
    ),
    "parent_started_after_child": (
        [_start(_B, _A), _start(_A), _end(_B), _end(_A)],
        [Violation("D3", _A, "on_chain_start", "started after a child that names it as parent")],
    ),
    "run_id_reused": (
        [_start(_A), _end(_A), _start(_A)],
        [Violation("R6", _A, "on_chain_start", "run id used twice")],
    ),
    "run_id_not_a_uuid": (
        [_start("nope")],
        [Violation("R6", "nope", "on_chain_start", "run_id is not a UUID")],
    ),
    "token_outside_an_llm_run": (
        [_start(_A), _TOKEN, _end(_A)],
        [Violation("X1", _A, "on_llm_new_token", "an event of llm runs on a chain run")],
    ),
    "end_of_another_kind": (
        [_start(_A), ("on_tool_end", _A, ("out",), {"tags": []})],
        [Violation("X1", _A, "on_tool_end", "an event of tool runs on a chain run")],
    ),
    "tags_not_strings": (
        [_start(_A, tags="t"), _end(_A)],
        [Violation("X1", _A, "on_chain_start", "tags must be a list of strings, got 't' (str)")],
    ),
    "metadata_not_a_dict": (
        [_start(_A, tags=None, metadata=[1]), _end(_A)],  # tags may be absent
        [
            Violation(
                "X1", _A, "on_chain_start", "metadata must be a dict with string keys, got a list"
            )
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(_BROKEN_STREAMS))
def test_X1_trace_checker_finds_each_kind_of_violation(kind: str) -> None:
    steps, expected = _BROKEN_STREAMS[kind]
    checker = TraceChecker()
    _feed(checker, steps)
    assert checker.violations == expected
    with pytest.raises(AssertionError) as info:
        checker.check()
    assert str(info.value) == "trace breaks the rules:\n" + "\n".join(map(str, expected))
    strict = TraceChecker(strict=True)  # the same stream raises at the event that breaks it
    with pytest.raises(
        AssertionError, match="trace breaks the rules: " + re.escape(str(expected[0]))
    ):
        _feed(strict, steps)


def test_X1_trace_checker_check_reports_runs_never_closed() -> None:
    checker = TraceChecker()
    _feed(checker, [_start(_A)])
    assert checker.violations == []  # not yet: the run may still close
    with pytest.raises(AssertionError, match=f"D3 on_chain_start\\(run_id={_A}\\): never closed"):
        checker.check()
    _feed(checker, [_end(_A)])
    checker.check()
    partial = TraceChecker()  # a parent never seen at all is a legitimate partial view
    _feed(partial, [_start(_B, _A), _end(_B)])
    partial.check()


def test_X1_strict_trace_checker_raises_out_of_the_run_after_every_handler_heard() -> None:
    """A caller that reuses a run id breaks R6: a strict checker fails that very start event,
    which (as ``raise_error`` does, D2, D3) closes the run and leaves ``invoke``."""
    strict, rec = TraceChecker(strict=True), Recorder()
    runnable = Lambda(_ident, name="f")
    runnable.invoke(1, {"callbacks": [strict, rec], "run_id": _A})
    with pytest.raises(AssertionError) as info:
        runnable.invoke(1, {"callbacks": [strict, rec], "run_id": _A})
    assert rec.events() == ["on_chain_start", "on_chain_end", "on_chain_start", "on_chain_error"]
    assert strict.violations == [
        Violation("R6", _A, "on_chain_start", "run id used twice"),
        Violation("D3", _A, "on_chain_error", "after the run's end or error"),
    ]
    assert str(info.value) == f"trace breaks the rules: {strict.violations[-1]}"


def test_X2_recorder_keeps_payload_positional_even_when_passed_by_keyword() -> None:
    """langchain_core's sync runs pass ``token=`` by keyword, its async ones by position."""
    rec = Recorder()
    rec.on_llm_new_token(token="a", run_id=_A, parent_run_id=None, tags=[], chunk=None)
    rec.on_llm_new_token("b", run_id=_A, parent_run_id=None, tags=[], chunk=None)
    rec.on_chain_start({}, inputs={"q": 1}, run_id=_B, tags=[], name="n")
    assert [r.args for r in rec.records] == [("a",), ("b",), ({}, {"q": 1})]
    assert [r.kwargs for r in rec.records] == [{"chunk": None}, {"chunk": None}, {"name": "n"}]


def test_X2_recorder_tree_renders_names_types_tags_and_outcomes() -> None:
    rec = Recorder()
    docs = Retriever(["a b", "c"], name="docs", tags=["r"])
    fmt = Lambda(lambda d: " ".join(x.page_content for x in d), name="fmt")
    chain = Chain(docs, fmt, LLM("x y", streaming=True), tags=["ctor"])
    failing = Chain(Lambda(_ident, name="ok"), Tool(_ident, name="t", error=ValueError("nope")))
    with sequential_run_ids():
        chain.invoke("a", {"callbacks": [rec], "tags": ["demo"]})
        with pytest.raises(ValueError):
            failing.invoke(1, {"callbacks": [rec]})
    assert rec.tree() == "\n".join(
        [
            "Chain (chain) tags=['demo', 'ctor'] -> ok",
            "    docs (retriever) tags=['demo', 'seq:step:1', 'r'] -> ok",
            "    fmt (chain) tags=['demo', 'seq:step:2'] -> ok",
            "    LLM (llm) tags=['demo', 'seq:step:3'] [on_llm_new_token x2] -> ok",
            "Chain (chain) -> error ValueError('nope')",
            "    ok (chain) tags=['seq:step:1'] -> ok",
            "    t (tool) tags=['seq:step:2'] -> error ValueError('nope')",
        ]
    )
    assert all(isinstance(r, tuple) for r in rec.records)


def test_X2_tree_shows_runs_with_unseen_parents_as_roots_and_open_runs() -> None:
    local = Recorder()
    chain = Chain(Lambda(_ident, name="a"), LLM("x", name="llm", callbacks=[local]))
    chain.invoke("q")
    run = CallbackManager([local]).on_chain_start({"name": "pending"}, {})
    assert run.run_id is not None
    assert local.tree() == "\n".join(
        ["llm (llm) tags=['seq:step:2'] -> ok", "pending (chain) -> open"]
    )


def test_X3_sequential_run_ids_count_up_in_order_of_need_and_reset() -> None:
    rec = Recorder()
    chain = Chain(Lambda(_ident, name="a"), Lambda(_ident, name="b"))
    with sequential_run_ids(start=10):
        chain.invoke("q", {"callbacks": [rec]})
        Lambda(_ident).batch(["x", "y"], {"callbacks": [rec], "max_concurrency": 2})
    chain.invoke("q", {"callbacks": [rec]})
    ids = [_int(r.run_id) for r in rec.records if r.event.phase == "start"]
    assert ids[:3] == [10, 11, 12]
    assert sorted(i for i in ids[3:5] if i is not None) == [13, 14]  # library threads use it
    outside = [r.run_id for r in rec.records if r.event.phase == "start"][5:]
    assert len(outside) == 3
    assert all(i is not None and i.version == 4 for i in outside)
    with sequential_run_ids():
        rec2 = Recorder()
        chain.invoke("q", {"callbacks": [rec2]})
    assert [_int(r.run_id) for r in rec2.records] == [1, 2, 2, 3, 3, 1]


def test_X2_tree_ignores_events_of_runs_it_never_saw_start() -> None:
    rec = Recorder()
    rec.on_chain_end({}, run_id=_A, tags=[])
    rec.on_chain_start({}, {}, run_id=_B, tags=[], name="b")
    assert rec.tree() == "b (chain) -> open"


def test_X1_X2_recorder_defaults_and_checker_messages() -> None:
    rec = Recorder()
    assert repr(rec) == "Recorder('recorder')"
    rec.on_text("note")  # type: ignore[call-arg]  # no keywords at all
    assert rec.records[0][:6] == (Event.TEXT, ("note",), None, None, None, None)
    rec.on_chain_start({}, {}, run_id=_A)
    rec.on_text("t", run_id=_A)
    rec.on_retry("r", run_id=_A)
    assert rec.tree() == "? (chain) [on_text x1, on_retry x1] -> open"
    checker = TraceChecker()
    _feed(checker, [_end(_A), _end(_B)])
    with pytest.raises(AssertionError) as info:
        checker.check()
    assert str(info.value) == "trace breaks the rules:\n" + "\n".join(map(str, checker.violations))
    assert len(checker.violations) == 2
    hidden = TraceChecker()
    hidden.ignore_llm = True  # so an orphan LLM end is fine, an orphan chain end is not
    _feed(hidden, [_LLM_END, _end(_B)])
    assert hidden.violations == [
        Violation("D3", _B, "on_chain_end", "no run with this id has started")
    ]
    typed = TraceChecker()
    _feed(typed, [_start(_A, metadata={1: "x"}), _end(_A)])
    assert typed.violations == [
        Violation(
            "X1",
            _A,
            "on_chain_start",
            "metadata must be a dict with string keys, got 1 (int) in it",
        )
    ]


# ===============================================================================================
# Portability (X1, X2): the checker and the recorder watch real langchain_core runnables
# ===============================================================================================
#
# These run only where langchain_core is installed (``pytest.importorskip`` in ``_lc_app``). The
# app is a ``RunnableLambda`` named "agent" whose function takes ``config`` and passes it on: it
# asks langchain_core's ``FakeListChatModel`` (which streams one chunk per character), then hands
# the reply to a ``StructuredTool`` "shout" that upper-cases it and rejects the text "boom".


def _lc_import(name: str) -> Any:
    """langchain_core's module ``name``. Without langchain_core the test is skipped, unless
    ``CALLBACKS_REQUIRE_LANGCHAIN`` is set (CI's portability run), where that is a failure."""
    if os.environ.get("CALLBACKS_REQUIRE_LANGCHAIN"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _lc_app(reply: str, *, stream_model: bool = False, **model_options: Any) -> tuple[Any, Any]:
    """The agent and its chat model, which always answers ``reply``; skips without langchain_core.

    With ``stream_model`` the agent reads the model through ``stream`` (``astream``), so the model
    emits ``on_llm_new_token``; otherwise through ``invoke`` (``ainvoke``), which does not.
    """
    _lc_import("langchain_core")
    fake = _lc_import("langchain_core.language_models.fake_chat_models")
    runnables = _lc_import("langchain_core.runnables")
    tools = _lc_import("langchain_core.tools")
    model = fake.FakeListChatModel(responses=[reply], **model_options)

    def shout(text: str) -> str:
        """Upper-case the text."""
        if text == "boom":
            raise ValueError("no shouting")
        return text.upper()

    tool = tools.StructuredTool.from_function(shout)

    def agent(question: str, config: Any) -> Any:
        if stream_model:
            text = "".join(str(chunk.content) for chunk in model.stream(question, config))
        else:
            text = model.invoke(question, config).content
        return tool.invoke({"text": text}, config)

    async def aagent(question: str, config: Any) -> Any:
        if stream_model:
            text = "".join([str(chunk.content) async for chunk in model.astream(question, config)])
        else:
            text = (await model.ainvoke(question, config)).content
        return await tool.ainvoke({"text": text}, config)

    return runnables.RunnableLambda(agent, afunc=aagent, name="agent"), model


def _lc_handlers() -> tuple[Recorder, TraceChecker]:
    """A recorder and a strict checker that both raise out of the run if they fail or object:
    langchain_core only logs a handler's error unless its ``raise_error`` is set."""
    recorder = Recorder()
    recorder.raise_error = True
    return recorder, TraceChecker(strict=True)


def _lc_drive(app: Any, config: dict[str, Any], mode: str, value: Any = "q") -> Any:
    """Run a langchain_core runnable to the end in ``mode``; return its output (stream: chunks)."""

    async def arun() -> Any:
        if mode == "ainvoke":
            return await app.ainvoke(value, config)
        return [chunk async for chunk in app.astream(value, config)]

    if mode == "invoke":
        return app.invoke(value, config)
    if mode == "stream":
        return list(app.stream(value, config))
    return asyncio.run(arun())


async def _lc_drive_async(runnable: Any, config: dict[str, Any], mode: str) -> Any:
    """`_lc_drive` inside a running loop: ``ainvoke``, or ``astream`` to the end."""
    if mode == "ainvoke":
        return await runnable.ainvoke("q", config)
    return [chunk async for chunk in runnable.astream("q", config)]


def _lc_tokens(recorder: Recorder) -> list[Any]:
    """The ``token`` of each ``on_llm_new_token`` the recorder saw. langchain_core passes it by
    keyword from sync runs and by position from async ones; a `Record` has it in ``args``."""
    return [r.args[0] for r in recorder.records if r.event is Event.LLM_NEW_TOKEN]


_LC_MODES = ["invoke", "stream", "ainvoke", "astream"]


@pytest.mark.parametrize("mode", _LC_MODES)
def test_X1_X2_langchain_core_app_nests_model_and_tool_under_the_lambda(mode: str) -> None:
    """Request handlers on a real langchain_core app: no violation, and the recorded tree has the
    lambda at the root with the chat model and the tool under it, request tags on every run, and
    the events in order, whichever way the app is driven."""
    app, _ = _lc_app("hi")
    recorder, checker = _lc_handlers()
    out = _lc_drive(app, {"callbacks": [recorder, checker], "tags": ["demo"]}, mode)
    assert out == ("HI" if mode in ("invoke", "ainvoke") else ["HI"])
    assert checker.violations == []
    checker.check()
    assert recorder.tree() == "\n".join(
        [
            "agent (chain) tags=['demo'] -> ok",
            "    FakeListChatModel (chat_model) tags=['demo'] -> ok",
            "    shout (tool) tags=['demo'] -> ok",
        ]
    )
    assert recorder.events() == [
        "on_chain_start",
        "on_chat_model_start",
        "on_llm_end",
        "on_tool_start",
        "on_tool_end",
        "on_chain_end",
    ]
    root = recorder.records[0].run_id
    assert [r.parent_run_id for r in recorder.records] == [None, root, root, root, root, None]


@pytest.mark.parametrize("mode", _LC_MODES)
def test_X1_X2_langchain_core_tokens_arrive_inside_the_open_chat_model_run(mode: str) -> None:
    """The agent streams the model: each character is an ``on_llm_new_token`` between the chat
    model's start and end, which the checker accepts and the tree counts."""
    app, _ = _lc_app("hi", stream_model=True)
    recorder, checker = _lc_handlers()
    _lc_drive(app, {"callbacks": [recorder, checker]}, mode)
    assert checker.violations == []
    checker.check()
    assert recorder.tree() == "\n".join(
        [
            "agent (chain) -> ok",
            "    FakeListChatModel (chat_model) [on_llm_new_token x2] -> ok",
            "    shout (tool) -> ok",
        ]
    )
    assert recorder.events() == [
        "on_chain_start",
        "on_chat_model_start",
        "on_llm_new_token",
        "on_llm_new_token",
        "on_llm_end",
        "on_tool_start",
        "on_tool_end",
        "on_chain_end",
    ]
    assert _lc_tokens(recorder) == ["h", "i"]


def test_X1_X2_langchain_core_constructor_handlers_see_a_partial_view() -> None:
    """Handlers given to the chat model's constructor see only its run, whose parent (the agent's
    run, seen by the request handlers) they never see: a root for the tree, no violation.

    The constructor's pydantic field accepts a list only of langchain_core's own handler class,
    so plain handlers go in through a ``CallbackManager``, whose handlers are local, as a list's.
    """
    lc_callbacks = _lc_import("langchain_core.callbacks")
    recorder, checker = _lc_handlers()
    local, local_checker = _lc_handlers()
    manager = lc_callbacks.CallbackManager(handlers=[local, local_checker])
    app, _ = _lc_app("hi", stream_model=True, callbacks=manager)
    assert app.invoke("q", {"callbacks": [recorder, checker], "tags": ["demo"]}) == "HI"
    for c in (checker, local_checker):
        assert c.violations == []
        c.check()
    assert (
        local.tree() == "FakeListChatModel (chat_model) tags=['demo'] [on_llm_new_token x2] -> ok"
    )
    assert local.events() == ["on_chat_model_start"] + ["on_llm_new_token"] * 2 + ["on_llm_end"]
    assert local.records[0].parent_run_id == recorder.records[0].run_id
    assert local.records[0].run_id == recorder.records[1].run_id
    assert len(recorder.tree().splitlines()) == 3  # the request handlers see all three runs


@pytest.mark.parametrize(
    ("flag", "tree"),
    [
        (
            "ignore_chain",
            ["FakeListChatModel (chat_model) [on_llm_new_token x2] -> ok", "shout (tool) -> ok"],
        ),
        (
            "ignore_llm",  # langchain_core gates chat starts on ignore_chat_model only (D1)
            [
                "agent (chain) -> ok",
                "    FakeListChatModel (chat_model) -> open",
                "    shout (tool) -> ok",
            ],
        ),
        ("ignore_chat_model", ["agent (chain) -> ok", "    shout (tool) -> ok"]),
        (
            "ignore_agent",
            [
                "agent (chain) -> ok",
                "    FakeListChatModel (chat_model) [on_llm_new_token x2] -> ok",
            ],
        ),
    ],
)
def test_X1_X2_langchain_core_ignore_flags_give_views_the_checker_accepts(
    flag: str, tree: list[str]
) -> None:
    """A handler's ``ignore_*`` flag, honoured by langchain_core's dispatcher, hides some events:
    the checker with the same flag finds no violation, and the tree shows what got through."""
    app, _ = _lc_app("hi", stream_model=True)
    recorder, checker = _lc_handlers()
    setattr(recorder, flag, True)
    setattr(checker, flag, True)
    assert app.invoke("q", {"callbacks": [recorder, checker]}) == "HI"
    assert checker.violations == []
    checker.check()
    assert recorder.tree() == "\n".join(tree)


@pytest.mark.parametrize("mode", _LC_MODES)
def test_X1_X2_langchain_core_errors_close_each_run_once(mode: str) -> None:
    """The tool raises, then the chat model fails after one token: each failing run and the
    agent end with an error event, each run closes once, and the checker finds no violation."""
    recorder, checker = _lc_handlers()
    config: dict[str, Any] = {"callbacks": [recorder, checker]}
    failing_tool, _ = _lc_app("boom", stream_model=True)
    failing_model, _ = _lc_app("hi", stream_model=True, error_on_chunk_number=1)
    with pytest.raises(ValueError, match="no shouting"):
        _lc_drive(failing_tool, config, mode)
    errors = _lc_import("langchain_core.language_models.fake_chat_models")
    with pytest.raises(errors.FakeListChatModelError):
        _lc_drive(failing_model, config, mode)
    assert checker.violations == []
    checker.check()
    assert recorder.tree() == "\n".join(
        [
            "agent (chain) -> error ValueError('no shouting')",
            "    FakeListChatModel (chat_model) [on_llm_new_token x4] -> ok",
            "    shout (tool) -> error ValueError('no shouting')",
            "agent (chain) -> error FakeListChatModelError()",
            "    FakeListChatModel (chat_model) [on_llm_new_token x1] -> error "
            "FakeListChatModelError()",
        ]
    )
    assert recorder.events() == [
        "on_chain_start",
        "on_chat_model_start",
        *["on_llm_new_token"] * 4,
        "on_llm_end",
        "on_tool_start",
        "on_tool_error",
        "on_chain_error",
        "on_chain_start",
        "on_chat_model_start",
        "on_llm_new_token",
        "on_llm_error",
        "on_chain_error",
    ]


def _manager_deviations(manager_class: Any, handler_class: type) -> dict[str, Any]:
    """The manager behaviours that deliberately differ from langchain_core's (README, S12)."""

    class Named(handler_class):  # type: ignore[misc]
        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

        def __eq__(self, other: object) -> bool:  # every Named equals every other
            return isinstance(other, Named)

        __hash__ = object.__hash__

    a, b, c = Named("a"), Named("b"), Named("c")
    out: dict[str, Any] = {}
    m = manager_class([a], [b], tags=["t"], inheritable_tags=["i"])
    out["constructor"] = (
        [h.label for h in m.handlers],
        [h.label for h in m.inheritable_handlers],
        m.tags,
        m.inheritable_tags,
    )
    m = manager_class.configure(inheritable_tags=["x", "y"])
    m.add_tags(["x"], False)
    out["add_tags again"] = (m.tags, m.inheritable_tags)
    merged = manager_class([a, b], tags=["p", "q"]).merge(manager_class([c, a], tags=["r", "p"]))
    out["merge"] = ([h.label for h in merged.handlers], merged.tags)
    m = manager_class.configure([a])
    m.add_handler(b)
    out["equal handlers"] = [h.label for h in m.handlers]
    return out


def test_S12_langchain_core_managers_run_the_script_alike_and_differ_only_as_documented() -> None:
    """The S12 script leaves langchain_core's managers exactly as ours; each difference the
    README lists shows here, on both libraries: the raw constructor (ours adds inheritable
    values to the current ones), a tag added again (LangChain moves it, and takes away its
    inheritance), merge (LangChain's order is a set's), equal handlers (LangChain compares
    with ``==``, S6 with identity)."""
    lc = _lc_import("langchain_core.callbacks")
    theirs = dict(_manager_api_script(lc.CallbackManager, lc.BaseCallbackHandler))
    assert theirs == _MANAGER_API_EXPECTED
    assert _manager_deviations(CallbackManager, BaseCallbackHandler) == {
        "constructor": (["a", "b"], ["b"], ["t", "i"], ["i"]),
        "add_tags again": (["x", "y"], ["x", "y"]),
        "merge": (["a", "b", "c"], ["p", "q", "r"]),
        "equal handlers": ["a", "b"],
    }
    theirs = _manager_deviations(lc.CallbackManager, lc.BaseCallbackHandler)
    handlers, tags = theirs.pop("merge")
    assert (sorted(handlers), sorted(tags)) == (["a", "b", "c"], ["p", "q", "r"])
    assert theirs == {
        "constructor": (["a"], ["b"], ["t"], ["i"]),
        "add_tags again": (["y", "x"], ["y"]),
        "equal handlers": ["a"],
    }


def test_R5_R8_langchain_core_astream_log_records_a_toys_runs_but_a_chat_models_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``astream_log`` (deprecated in langchain_core 1.7, still shipped) on a LangChain runnable
    that calls a toy chain: every toy run is in the log, ended, but the chat model's, whose
    end its handler cannot re-load (the limit documented under R5), logged as its failure."""
    runnables = _lc_import("langchain_core.runnables")
    deprecation = _lc_import("langchain_core._api.deprecation")

    async def call(x: Any, config: Any) -> Any:
        toy = Chain(
            Lambda(_ident, name="first"),
            LLM("hi you", name="llm"),
            ChatModel("ok", name="chat"),
            name="toy",
        )
        return await toy.ainvoke(x, config)

    async def main() -> Any:
        app = runnables.RunnableLambda(call, name="app")
        with deprecation.suppress_langchain_deprecation_warning():  # astream_log is deprecated
            patches = [patch async for patch in app.astream_log("q", diff=False)]
        return patches[-1].state  # without diffs, each patch holds the whole state so far

    with caplog.at_level(logging.WARNING, logger="callbacks"):
        state = asyncio.run(main())
    ended = {key: log["end_time"] is not None for key, log in state["logs"].items()}
    assert ended == {"toy": True, "first": True, "llm": True, "chat": False}
    assert state["final_output"] == AIMessage("ok")
    (failure,) = caplog.records
    assert failure.getMessage().startswith("error in LogStreamCallbackHandler.on_llm_end callback")


# langchain_core's shipped handlers and tracers on the toys (R5): attached as request handlers to a
# chain of every toy kind, they record complete runs in every call mode, and log no error.


def _every_toy() -> Runnable:
    return Chain(
        Lambda(_ident, name="first"),
        Parallel(llm=LLM("hello there", name="llm"), chat=ChatModel("hi you", name="chat")),
        Lambda(lambda both: both["llm"], name="pick"),
        Tool(str.upper, name="shout"),
        Retriever([Document("doc one")], name="docs"),
        name="outer",
    )


def _lc_drive_all(runnable: Any, config: dict[str, Any], mode: str) -> Any:
    """`_lc_drive`, and the batch modes (two inputs)."""
    if mode == "batch":
        return runnable.batch(["q", "r"], config)
    if mode == "abatch":
        return asyncio.run(runnable.abatch(["q", "r"], config))
    return _lc_drive(runnable, config, mode)


def _lc_run_tree(run: Any) -> tuple[Any, ...]:
    """A langchain_core tracer's ``Run`` as ``(run_type, name, complete, children)``: complete
    means it ended, without error, with outputs; children sorted (parallel branches race)."""
    complete = run.end_time is not None and run.error is None and bool(run.outputs)
    children = tuple(sorted(_lc_run_tree(child) for child in run.child_runs))
    return (run.run_type, run.name, complete, children)


_EVERY_TOY_TREE = (
    "chain",
    "outer",
    True,
    (
        ("chain", "Parallel", True, (("llm", "chat", True, ()), ("llm", "llm", True, ()))),
        ("chain", "first", True, ()),
        ("chain", "pick", True, ()),
        ("retriever", "docs", True, ()),
        ("tool", "shout", True, ()),
    ),
)


@pytest.mark.parametrize("mode", ["invoke", "stream", "batch", "ainvoke", "astream", "abatch"])
def test_R5_langchain_core_tracers_and_handlers_record_complete_runs_of_every_toy(
    mode: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """langchain_core's ``RunCollectorCallbackHandler``, ``ConsoleCallbackHandler``,
    ``StdOutCallbackHandler`` and ``StreamingStdOutCallbackHandler`` on a chain of every toy:
    no handler error, and the collector holds every run, ended, with its outputs (a model's
    with its usage). A chat model is an ``llm`` run there, as on langchain_core: these tracers
    do not implement ``on_chat_model_start`` and get ``on_llm_start`` instead (D4)."""
    run_collector = _lc_import("langchain_core.tracers.run_collector")
    stdout = _lc_import("langchain_core.tracers.stdout")
    lc_callbacks = _lc_import("langchain_core.callbacks")
    collector = run_collector.RunCollectorCallbackHandler()
    handlers = [
        collector,
        stdout.ConsoleCallbackHandler(),
        lc_callbacks.StdOutCallbackHandler(),
        lc_callbacks.StreamingStdOutCallbackHandler(),
    ]
    with caplog.at_level(logging.WARNING, logger="callbacks"):
        _lc_drive_all(_every_toy(), {"callbacks": handlers}, mode)
    assert caplog.record_tuples == []
    inputs = 2 if "batch" in mode else 1
    assert [_lc_run_tree(run) for run in collector.traced_runs] == [_EVERY_TOY_TREE] * inputs
    models = {}
    for run in collector.traced_runs[0].child_runs[1].child_runs:
        (generation,) = run.outputs["generations"][0]
        models[run.name] = (generation["text"], run.outputs["llm_output"]["token_usage"])
    assert models == {
        "llm": ("hello there", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        "chat": ("hi you", {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}),
    }
    printed = capsys.readouterr().out
    assert printed.count("[llm/end]") == printed.count("[llm/start]") == 2 * inputs
    assert printed.count("> Finished chain.") == 4 * inputs  # StdOut: the four chain runs
    assert "error" not in printed


@pytest.mark.parametrize("schema", ["original", "streaming_events"])
@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
def test_R5_langchain_core_log_stream_records_every_toy_but_a_chat_models_end(
    mode: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler behind ``astream_log`` and ``astream_events`` re-loads each finished model
    run's outputs through langchain's serializer, which refuses any message class but its own
    (it tests the class): the chat run's end is logged as that handler's failure (D2) and the
    run stays without end in the log; everything else is recorded. Under the
    ``streaming_events`` schema the serializer refuses the chat run's start as well, with
    ``NotImplementedError``, so the fallback to ``on_llm_start`` (D4) registers the run a
    second time, as ``chat:2``. Documented in the README (Where this differs)."""
    log_stream = _lc_import("langchain_core.tracers.log_stream")
    ops: list[dict[str, Any]] = []

    async def main() -> None:
        handler = log_stream.LogStreamCallbackHandler(auto_close=False, _schema_format=schema)
        runnable = Chain(
            Lambda(_ident, name="first"), LLM("a", name="llm"), ChatModel("b", name="chat")
        )
        await _lc_drive_async(runnable, {"callbacks": [handler]}, mode)
        handler.send_stream.close()
        async for patch in handler:
            ops.extend(patch.ops)

    with caplog.at_level(logging.WARNING, logger="callbacks"):
        asyncio.run(main())
    runs = [o["path"] for o in ops if o["op"] == "add" and re.fullmatch(r"/logs/[^/]+", o["path"])]
    ended = [o["path"] for o in ops if o["path"].endswith("/end_time")]
    chat = "/logs/chat:2" if schema == "streaming_events" else "/logs/chat"
    assert runs == ["/logs/first", "/logs/llm", chat]
    assert ended == ["/logs/first/end_time", "/logs/llm/end_time"]
    (failure,) = caplog.records
    assert failure.getMessage().startswith("error in LogStreamCallbackHandler.on_llm_end callback")
    assert "NotImplementedError" in failure.getMessage()


def test_R5_langchain_core_usage_handler_counts_only_its_own_classes() -> None:
    """langchain_core's ``UsageMetadataCallbackHandler`` counts a generation only if it is its
    own ``ChatGeneration`` holding its own ``AIMessage`` (it tests the classes): on the toys it
    counts nothing, while a counter that reads the same attributes totals every call."""
    lc_callbacks = _lc_import("langchain_core.callbacks")
    theirs, ours = lc_callbacks.UsageMetadataCallbackHandler(), _UsageCounter()
    ChatModel("hi you", name="chat").invoke("q", {"callbacks": [theirs, ours]})
    assert theirs.usage_metadata == {}
    assert ours.from_messages == [{"input_tokens": 2, "output_tokens": 2, "total_tokens": 4}]


@pytest.mark.parametrize("mode", _LC_MODES)
def test_R8_langchain_core_runnable_calling_a_toy_with_its_config_gets_one_tree(mode: str) -> None:
    """A ``RunnableLambda`` that calls a toy chain with the config it was given (langchain_core's
    child manager as ``callbacks``, its ``recursion_limit`` and ``configurable``): its tracer
    sees the toy's runs as children of the lambda's, with the request tags, all complete."""
    runnables = _lc_import("langchain_core.runnables")
    run_collector = _lc_import("langchain_core.tracers.run_collector")

    def toy() -> Runnable:
        return Chain(Lambda(_ident, name="first"), ChatModel("hi you", name="chat"), name="toy")

    def call(x: Any, config: Any) -> Any:
        return toy().invoke(x, config)

    async def acall(x: Any, config: Any) -> Any:
        return await toy().ainvoke(x, config)

    app = runnables.RunnableLambda(call, afunc=acall, name="app")
    collector = run_collector.RunCollectorCallbackHandler()
    config = runnables.ensure_config({"callbacks": [collector], "tags": ["t"]})
    assert set(config) >= {"recursion_limit", "configurable"}
    _lc_drive(app, config, mode)

    def tree(run: Any) -> tuple[Any, ...]:
        kids = tuple(tree(child) for child in run.child_runs)
        return (run.name, sorted(run.tags), run.end_time is not None and run.error is None, kids)

    assert [tree(run) for run in collector.traced_runs] == [
        ("app", ["t"], True, (
            ("toy", ["t"], True, (
                ("first", ["seq:step:1", "t"], True, ()),
                ("chat", ["seq:step:2", "t"], True, ()),
            )),
        )),
    ]  # fmt: skip


def test_R8_langchain_core_astream_events_reports_a_toys_runs() -> None:
    """``astream_events`` on a LangChain runnable that calls a toy with its config: the toy's
    runs are among the events, nested, in order, the chat model as a chat model."""
    runnables = _lc_import("langchain_core.runnables")

    async def call(x: Any, config: Any) -> Any:
        toy = Chain(Lambda(_ident, name="first"), ChatModel("hi you", name="chat"), name="toy")
        return await toy.ainvoke(x, config)

    async def main() -> list[tuple[str, str, int]]:
        app = runnables.RunnableLambda(call, name="app")
        events = [e async for e in app.astream_events("q", version="v2")]
        return [(e["event"], e["name"], len(e["parent_ids"])) for e in events]

    assert asyncio.run(main()) == [
        ("on_chain_start", "app", 0),
        ("on_chain_start", "toy", 1),
        ("on_chain_start", "first", 2),
        ("on_chain_end", "first", 2),
        ("on_chat_model_start", "chat", 2),
        ("on_chat_model_end", "chat", 2),
        ("on_chain_end", "toy", 1),
        ("on_chain_stream", "app", 0),
        ("on_chain_end", "app", 0),
    ]


def _lc_word_models() -> tuple[Any, Any]:
    """langchain_core models that stream as the toys do, word by word, firing a token for
    each: an ``LLM`` (which must fire its own tokens) and a chat model (whose base class does,
    and adds a last empty token)."""
    llms = _lc_import("langchain_core.language_models.llms")
    chat_models = _lc_import("langchain_core.language_models.chat_models")
    messages = _lc_import("langchain_core.messages")
    outputs = _lc_import("langchain_core.outputs")

    class WordLLM(llms.LLM):  # type: ignore[misc,name-defined]
        text: str
        fail: bool = False  # as the toys' error=: after the first token

        @property
        def _llm_type(self) -> str:
            return "words"

        def _convert_input(self, model_input: Any) -> Any:  # a message, as the toy LLM takes
            return super()._convert_input(
                [model_input] if hasattr(model_input, "content") else model_input
            )

        def _call(self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any) -> str:
            return self.text

        def _stream(self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            for word in _TOKEN_WORDS.findall(self.text):
                run_manager.on_llm_new_token(word, chunk=outputs.GenerationChunk(text=word))
                yield outputs.GenerationChunk(text=word)
                if self.fail:
                    raise ValueError("cut")

        async def _astream(
            self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            for word in _TOKEN_WORDS.findall(self.text):
                await run_manager.on_llm_new_token(word, chunk=outputs.GenerationChunk(text=word))
                yield outputs.GenerationChunk(text=word)
                if self.fail:
                    raise ValueError("cut")

    class WordChat(chat_models.BaseChatModel):  # type: ignore[misc,name-defined]
        text: str

        @property
        def _llm_type(self) -> str:
            return "words"

        def _convert_input(self, model_input: Any) -> Any:  # a message, as the toy takes
            message = hasattr(model_input, "content")
            return super()._convert_input([model_input] if message else model_input)

        def _generate(
            self, messages_: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            message = messages.AIMessage(self.text)
            return outputs.ChatResult(generations=[outputs.ChatGeneration(message=message)])

        def _stream(
            self, messages_: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            for word in _TOKEN_WORDS.findall(self.text):
                yield outputs.ChatGenerationChunk(message=messages.AIMessageChunk(content=word))

    return WordLLM, WordChat


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_R7_langchain_core_streams_the_same_pipeline_in_the_same_order(mode: str) -> None:
    """The chain of `test_R7_streamed_steps_form_a_pipeline_in_langchains_order`, built of
    langchain_core's runnables, streamed with the same `Recorder`: the same events in the same
    order (but for the empty token langchain_core's chat models add at the end)."""
    runnables = _lc_import("langchain_core.runnables")
    word_llm, word_chat = _lc_word_models()

    async def awords(text: Any) -> AsyncGenerator[str, None]:
        for word in _words(text):  # langchain_core astreams no sync generator function
            yield word

    chain = (
        runnables.RunnableLambda(_ident, name="lamA")
        | word_llm(text="a b c", name="llm1")
        | runnables.RunnableLambda(_ident, name="lamB")
        | runnables.RunnableLambda(_words, afunc=awords, name="genC")
        | word_chat(text="x y", name="chat2")
        | runnables.RunnableLambda(lambda message: message.content, name="lamD")
    ).with_config(run_name="seq")
    rec = Recorder()
    assert _streamed(chain, {"callbacks": [rec]}, mode) == ["x y"]
    assert [step for step in _flow(rec) if step != "~chat2:"] == _PIPELINE_FLOW


def test_R3_R4_langchain_core_names_tags_tokens_and_batch_differ_as_documented(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The differences "Where this differs" lists for names, tag order, the token keyword and
    ``Chain.batch``, each shown on langchain_core beside the toys."""
    lc_callbacks = _lc_import("langchain_core.callbacks")
    fake = _lc_import("langchain_core.language_models.fake")
    runnables = _lc_import("langchain_core.runnables")
    (code,) = _readme_blocks("python")  # the README's Printer example, on langchain_core
    lc_code = code.replace("from callbacks import LLM, BaseCallbackHandler, Lambda", "")
    lc_code = lc_code.replace('LLM("Bonjour, Ada!"', 'FakeListLLM(responses=["Bonjour, Ada!"]')
    names = {
        "BaseCallbackHandler": lc_callbacks.BaseCallbackHandler,
        "FakeListLLM": fake.FakeListLLM,
        "Lambda": runnables.RunnableLambda,
    }
    exec(compile(lc_code, "README.md", "exec"), {"__name__": "readme_on_langchain", **names})
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:3] == [
        "    request: chain 'prompt' starts, tags=['seq:step:1', 'demo']",
        "    request: llm None gets 'Greet Ada in French.', tags=['seq:step:2', 'demo']",
    ]  # here: 'french', and ['demo', 'seq:step:N']
    calls: list[tuple[tuple[Any, ...], bool]] = []

    class Loose(BaseCallbackHandler):  # flags for langchain_core, which reads them directly
        def on_llm_new_token(self, *args: Any, **kwargs: Any) -> None:
            calls.append((args, "token" in kwargs))

    (lc_run,) = lc_callbacks.CallbackManager([Loose()]).on_llm_start({}, ["p"])
    lc_run.on_llm_new_token("x")
    (run,) = CallbackManager([Loose()]).on_llm_start({}, ["p"])
    run.on_llm_new_token("x")
    assert calls == [((), True), (("x",), False)]

    def step1(x: int) -> int:
        if x == 2:
            raise ValueError("step 1 fails on 2")
        return x

    def step2(x: int) -> int:
        if x == 1:
            raise ValueError("step 2 fails on 1")
        return x

    lc_chain = runnables.RunnableLambda(step1) | runnables.RunnableLambda(step2)
    with pytest.raises(ValueError, match="step 1 fails on 2"):
        lc_chain.batch([1, 2])
    with pytest.raises(ValueError, match="step 2 fails on 1"):
        Chain(step1, step2).batch([1, 2])


# Random streamed chains, built twice: of the toys and of langchain_core's runnables. A node is
# ``("llm" | "chat" | "lam" | "gen", text, fails)`` (``fails``: a completion model's error after
# its first token) or ``("chain", children)``; names are given in preorder (n0, n1, ...), and a
# nested chain keeps its name in both (not spliced).
_stream_leaves = st.tuples(
    st.sampled_from(["llm", "chat", "lam", "gen"]),
    st.sampled_from(["a", "a b", "a b c"]),
    st.booleans(),
)
_stream_trees = st.recursive(
    _stream_leaves,
    lambda kids: st.tuples(st.just("chain"), st.lists(kids, min_size=2, max_size=3)),
    max_leaves=6,
).filter(lambda node: node[0] == "chain")


def _text_of(value: Any) -> Any:
    return value.content if hasattr(value, "content") else value


def _build_streamed(node: Any, lc: dict[str, Any] | None, counter: Iterator[int]) -> Any:
    """The toy tree (``lc`` None) or langchain_core's (``lc``: its classes) for ``node``."""
    name = f"n{next(counter)}"
    if node[0] == "chain":
        steps = [_build_streamed(child, lc, counter) for child in node[1]]
        if lc is None:
            return Chain(*steps, name=name)
        return lc["sequence"](*steps).with_config(run_name=name)
    kind, text, fails = node
    error = ValueError("cut") if fails else None
    if lc is None:
        if kind == "lam":
            return Lambda(_text_of, name=name)
        if kind == "gen":
            return Lambda(_words, name=name)
        if kind == "llm":
            return LLM(text, name=name, error=error)
        return ChatModel(text, name=name)
    if kind == "lam":
        return lc["lambda"](_text_of, name=name)

    async def awords(x: Any) -> AsyncGenerator[str, None]:
        for word in _words(x):
            yield word

    if kind == "gen":
        return lc["lambda"](_words, afunc=awords, name=name)
    if kind == "llm":
        return lc["llm"](text=text, fail=fails, name=name)
    return lc["chat"](text=text, name=name)


@settings(max_examples=60, deadline=None)
@given(tree=_stream_trees, mode=st.sampled_from(["stream", "astream"]))
def test_R7_langchain_core_streams_random_chains_alike(tree: Any, mode: str) -> None:
    """Random nested chains of models (a completion model may fail after its first token),
    lambdas and generator lambdas, streamed through both libraries: the same events in the same
    order, the same chunks, the same failure."""
    runnables = _lc_import("langchain_core.runnables")
    word_llm, word_chat = _lc_word_models()
    lc = {
        "sequence": runnables.RunnableSequence,
        "lambda": runnables.RunnableLambda,
        "llm": word_llm,
        "chat": word_chat,
    }
    outcomes = []
    for classes in (None, lc):
        rec = Recorder()
        runnable = _build_streamed(tree, classes, itertools.count())
        try:
            chunks = [_text_of(c) for c in _streamed(runnable, {"callbacks": [rec]}, mode)]
            chunks = [chunk for chunk in chunks if chunk != ""]  # langchain_core's last, empty
        except ValueError as error:
            chunks = [f"raised {error}"]
        flow = [step for step in _flow(rec) if not re.fullmatch(r"~n\d+:", step)]
        outcomes.append((flow, chunks))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("mode", _LC_MODES)
def test_X5_langchain_core_trace_passes_check_and_fails_once_broken(
    mode: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trace of a real langchain_core app (a lambda, a chat model streaming or not, a tool),
    written by a `Recorder` as JSON lines, keeps the rules under ``check``. Without its last
    end event, the root run is reported never closed; with a token repeated after every run
    closed (streamed modes), that token is after its run's end; with an end for a run id that
    never started, that end names no run (D3 each, exit status 1)."""
    app, _ = _lc_app("hi", stream_model=mode.endswith("stream"))
    recorder, checker = _lc_handlers()
    _lc_drive(app, {"callbacks": [recorder, checker]}, mode)
    lines = recorder.jsonl().splitlines()
    status, out = _check(lines, tmp_path, capsys)
    assert (status, out[-1]) == (0, f"T: {len(lines)} events, 3 runs: keeps the rules")
    status, out = _check(lines[:-1], tmp_path, capsys)
    assert status == 1 and out[0].startswith("T:1: D3 on_chain_start(")
    assert out[0].endswith("never closed by an end or error event")
    tokens = [line for line in lines if json.loads(line)["event"] == "on_llm_new_token"]
    assert bool(tokens) == mode.endswith("stream")
    for token in tokens[:1]:
        status, out = _check([*lines, token], tmp_path, capsys)
        assert status == 1 and out[0].startswith(f"T:{len(lines) + 1}: D3 on_llm_new_token(")
        assert out[0].endswith("after the run's end or error")
    stray = json.dumps({"event": "on_tool_end", "run_id": str(uuid.uuid4()), "parent_run_id": None})
    status, out = _check([*lines, stray], tmp_path, capsys)
    assert status == 1 and out[0].startswith(f"T:{len(lines) + 1}: D3 on_tool_end(")
    assert out[0].endswith("no run with this id has started")


def test_X1_langchain_core_a_reused_run_id_is_caught() -> None:
    """The checker is not blind to real streams: a caller that gives langchain_core the same
    ``run_id`` twice gets a second start of a run id already used (R6) and an end after the run
    closed (D3)."""
    _, model = _lc_app("hi")
    checker = TraceChecker()
    run_id = uuid.uuid4()
    for _ in range(2):
        model.invoke("q", {"callbacks": [checker], "run_id": run_id})
    assert [str(v) for v in checker.violations] == [
        f"R6 on_chat_model_start(run_id={run_id}): run id used twice",
        f"D3 on_llm_end(run_id={run_id}): after the run's end or error",
    ]


# ===============================================================================================
# X5: traces as JSON lines, and the check command
# ===============================================================================================


def _sample_trace() -> list[str]:
    """The lines of a small trace: a chain (a lambda, a streaming model), then a failing lambda."""
    rec = Recorder()
    chain = Chain(Lambda(_ident, name="a"), LLM("x y", name="llm", streaming=True), name="c")
    with sequential_run_ids():
        chain.invoke("q", {"callbacks": [rec], "tags": ["t"], "metadata": {"k": 1}})
        with pytest.raises(ZeroDivisionError):
            Lambda(lambda x: 1 / x, name="bad").invoke(0, {"callbacks": [rec]})
    return rec.jsonl().splitlines()


def _check(lines: list[str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """``check`` run on ``lines`` written to a file: (exit status, standard output lines)."""
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    status = callbacks._main(["check", str(path)])
    out = capsys.readouterr().out.replace(str(path), "T")
    return status, out.splitlines()


def test_X5_a_recorder_writes_one_json_object_per_event_from_the_event_table() -> None:
    lines = [json.loads(line) for line in _sample_trace()]
    assert [line["event"] for line in lines] == [
        "on_chain_start", "on_chain_start", "on_chain_end", "on_llm_start", "on_llm_new_token",
        "on_llm_new_token", "on_llm_end", "on_chain_end", "on_chain_start", "on_chain_error",
    ]  # fmt: skip
    one = str(_U(1))
    assert lines[0] == {"event": "on_chain_start", "run_id": one, "parent_run_id": None,
                        "tags": ["t"], "metadata": {"k": 1}, "name": "c"}  # fmt: skip
    assert lines[4]["token"] == "x " and lines[4]["parent_run_id"] == one
    assert lines[2]["metadata"] is None and "name" not in lines[2]
    assert lines[9]["error"] == {"type": "ZeroDivisionError", "message": "division by zero"}
    assert all("inputs" not in line and "outputs" not in line for line in lines)
    (rec := Recorder()).on_chain_error(ValueError("e" * 300), run_id=None)  # type: ignore[arg-type]
    line = json.loads(rec.jsonl())  # no run id: null; a long message: its first 200 characters
    assert (line["run_id"], line["error"]["message"]) == (None, "e" * 200)


def test_X5_check_accepts_a_trace_that_keeps_the_rules_in_either_spelling(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check`` reads the Python names of the events or the JavaScript ones (the `Event`
    table's): a trace written by @langchain/core's handlers reads alike."""
    lines = _sample_trace()
    assert _check(lines, tmp_path, capsys) == (0, ["T: 10 events, 4 runs: keeps the rules"])
    spaced = [*lines[:3], "", "  ", *lines[3:]]  # blank lines are skipped
    assert _check(spaced, tmp_path, capsys) == (0, ["T: 10 events, 4 runs: keeps the rules"])
    js = [line.replace('"on_chain_start"', '"handleChainStart"') for line in lines]
    js = [line.replace('"on_llm_new_token"', '"handleLLMNewToken"') for line in js]
    assert _check(js, tmp_path, capsys) == (0, ["T: 10 events, 4 runs: keeps the rules"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert callbacks._main(["check", "-"]) == 0  # "-": standard input
    assert capsys.readouterr().out == "-: 10 events, 4 runs: keeps the rules\n"


def test_X5_check_names_the_rule_and_the_line_a_trace_breaks(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One end removed, a token after its run's end, an end for a run that never started, run
    ids that are not UUIDs: each is reported with its rule id and line; the exit status is 1."""
    lines = _sample_trace()
    llm, root = _U(3), _U(1)
    assert _check(lines[:6] + lines[7:], tmp_path, capsys) == (1, [
        f"T:4: D3 on_llm_start(run_id={llm}): never closed by an end or error event",
        f"T:7: D3 on_chain_end(run_id={root}): closed before its children ['{llm}']",
        "T: 9 events, 4 runs: 2 broken rule(s)",
    ])  # fmt: skip
    assert _check([*lines[:8], lines[5], *lines[8:]], tmp_path, capsys) == (1, [
        f"T:9: D3 on_llm_new_token(run_id={llm}): after the run's end or error",
        "T: 11 events, 4 runs: 1 broken rule(s)",
    ])  # fmt: skip
    stray = json.dumps({"event": "on_chain_end", "run_id": str(_U(99)), "parent_run_id": None})
    assert _check([*lines, stray], tmp_path, capsys) == (1, [
        f"T:11: D3 on_chain_end(run_id={_U(99)}): no run with this id has started",
        "T: 11 events, 4 runs: 1 broken rule(s)",
    ])  # fmt: skip
    bad = {"event": "on_chain_start", "run_id": str(_U(9)), "tags": "t", "metadata": [1]}
    assert _check([json.dumps(bad)], tmp_path, capsys) == (1, [  # in the order found, line by line
        f"T:1: X1 on_chain_start(run_id={_U(9)}): tags must be a list of strings, got 't' (str)",
        f"T:1: X1 on_chain_start(run_id={_U(9)}): metadata must be a dict with string keys, got a list",
        f"T:1: D3 on_chain_start(run_id={_U(9)}): never closed by an end or error event",
        "T: 1 events, 1 runs: 3 broken rule(s)",
    ])  # fmt: skip
    odd: list[Any] = ["abc", 5, [1]]  # not UUIDs: each is reported, none stops the check
    notes = [json.dumps({"event": "on_text", "run_id": rid}) for rid in odd]
    assert _check(notes, tmp_path, capsys) == (1, [
        *[f"T:{n}: R6 on_text(run_id={rid}): run_id is not a UUID" for n, rid in enumerate(odd, 1)],
        "T: 3 events, 0 runs: 3 broken rule(s)",
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", "line 2 is not JSON: Expecting property name enclosed in double quotes"),
        ('{"event": "on_nothing"}\n', """line 2 names no known event: '{"event": "on_nothing"}'"""),
        ('["on_chain_start"]\n', """line 2 names no known event: '["on_chain_start"]'"""),
    ],
)
def test_X5_check_exits_2_naming_the_line_it_cannot_read(
    content: str, message: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(_sample_trace()[0] + "\n" + content, encoding="utf-8")
    assert callbacks._main(["check", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: cannot read the trace: {message}\n"
    assert callbacks._main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read the trace: [Errno 2]" in capsys.readouterr().err
    assert callbacks._main(["check"]) == callbacks._main(["lint", "x"]) == 2
    assert capsys.readouterr().err.count("usage: python -m callbacks [check TRACE.jsonl") == 2


def test_X5_python_m_callbacks_check_reads_a_file_or_standard_input(tmp_path: pathlib.Path) -> None:
    """The command itself, as a user runs it, in a fresh interpreter (the stdlib alone)."""
    path = tmp_path / "trace.jsonl"
    trace = "".join(line + "\n" for line in _sample_trace()).replace('"t"', '"t\u00e9"')
    path.write_text(trace, encoding="utf-8")  # read as UTF-8 whatever the locale
    here = pathlib.Path(__file__).parent
    c_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    for cmd, stdin, env in (
        ([sys.executable, "-m", "callbacks", "check", str(path)], None, c_locale),
        ([sys.executable, str(here / "callbacks.py"), "check", "-"], trace, None),
    ):
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=here, env=env)
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.endswith("10 events, 4 runs: keeps the rules\n")
    broken = subprocess.run(
        [sys.executable, "-m", "callbacks", "check", "-"],
        input=trace.replace('"on_chain_end"', '"on_chain_start"', 1),
        capture_output=True,
        text=True,
        cwd=here,
    )
    assert broken.returncode == 1 and "broken rule(s)" in broken.stdout


# X5: the scenario corpus, replayed here and on langchain_core


def _corpus_json(capsys: pytest.CaptureFixture[str]) -> Any:
    """What ``python -m callbacks scenarios`` prints (indented by one space), read back; the
    command leaves the ``callbacks`` logger's handlers as they were."""
    handlers = list(logging.getLogger("callbacks").handlers)
    assert callbacks._main(["scenarios"]) == 0
    assert logging.getLogger("callbacks").handlers == handlers
    out = capsys.readouterr().out
    assert out.startswith('{\n "format": "callbacks-scenarios",\n')
    return json.loads(out)


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["-h"], 0),
        (["--help"], 0),
        (["scenario"], 2),
        (["check"], 2),
        (["check", "a", "b"], 2),
        (["scenarios", "x"], 2),
    ],
)
def test_X5_help_prints_the_usage_and_anything_but_a_command_exits_2_with_it(
    argv: list[str], status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callbacks._main(argv) == status
    usage = "usage: python -m callbacks [check TRACE.jsonl | check - | scenarios]\n"
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ((usage, "") if status == 0 else ("", usage))


def test_X5_a_start_without_a_name_keyword_is_named_by_its_serialized() -> None:
    """langchain_core's models send ``name=None``: the trace line takes the name from
    ``serialized``; a ``name`` keyword, as a run name gives, wins over it."""
    rec = Recorder()
    manager = CallbackManager([rec])
    manager.on_chain_start({"name": "from-serialized"}, {})
    manager.on_chain_start({"name": "from-serialized"}, {}, name="from-keyword")
    manager.on_chain_start(None, {}, metadata={"key": object})
    lines = [json.loads(line) for line in rec.jsonl().splitlines()]
    assert [line["name"] for line in lines] == ["from-serialized", "from-keyword", None]
    assert lines[-1]["metadata"] == {"key": "<class 'object'> (type)"}  # JSON cannot hold it


def _bare(entry: dict[str, Any]) -> dict[str, Any]:
    """A corpus entry as an implementation receives it: without what playing it gave."""
    return {
        key: value for key, value in entry.items() if key not in ("ordered", "outcome", "trace")
    }


def _per_handler(trace: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    heard: dict[str, list[dict[str, Any]]] = {}
    for line in trace:
        heard.setdefault(line["handler"], []).append(line)
    return heard


def _same_play(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    """The same outcome, the same trace for each handler and, where the scenario says the
    order between handlers counts, the same order."""
    if expected["ordered"] and [line["handler"] for line in expected["trace"]] != [
        line["handler"] for line in got["trace"]
    ]:
        return False
    return bool(
        expected["outcome"] == got["outcome"]
        and _per_handler(expected["trace"]) == _per_handler(got["trace"])
    )


def test_X5_the_scenario_corpus_replays_from_its_json_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every scenario of ``python -m callbacks scenarios``, rebuilt from its JSON description
    alone and played again, gives the outcome and traces the corpus holds: the corpus cannot
    drift from the module that wrote it."""
    corpus = _corpus_json(capsys)
    assert (corpus["format"], corpus["version"]) == ("callbacks-scenarios", callbacks.__version__)
    entries = corpus["scenarios"]
    assert len(entries) == len({entry["id"] for entry in entries}) == 81
    for entry in entries:
        assert _same_play(entry, callbacks._played(_bare(entry))), entry["id"]


def test_X5_the_corpus_covers_every_S_and_D_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """Each S and D rule is shown by at least one scenario; a rule a scenario differs on is one
    of the rules it shows; the README's list of differences names every scenario that differs
    under langchain_core."""
    entries = _corpus_json(capsys)["scenarios"]
    shown = {rule for entry in entries for rule in entry["rules"]}
    readme = _README.read_text(encoding="utf-8")
    stated = set(re.findall(r"^- \*\*([SD]\d+)\*\*", readme, re.M))
    assert len(stated) == 20 and sorted(stated - shown) == []
    differences = readme.split("## Where this differs from LangChain", 1)[1].split("\n## ")[0]
    for entry in entries:
        assert set(entry["differs"]) <= set(entry["rules"]), entry["id"]
        if entry["differs"]:
            assert f"`{entry['id'].split('/')[0]}`" in differences, entry["id"]


def test_X5_every_key_a_scenario_gives_reaches_its_corpus_entries() -> None:
    """What a scenario says is written out in each of its entries, none dropped (``modes`` as
    one entry per mode, ``differs`` as the rules of that mode); what it leaves out is
    `_USUAL`'s."""
    entries = {e["id"]: e for e in callbacks._corpus()["scenarios"]}
    for written in callbacks._SCENARIOS:
        scenario = {**callbacks._USUAL, **written}
        for mode in scenario["modes"]:
            entry = entries[f"{written['id']}/{mode}"]
            config = entry["call"]["config"]
            if mode.endswith("batch"):  # one input after the other
                assert config == {**(scenario["config"] or {}), "max_concurrency": 1}
                config = scenario["config"]
            kept = {**entry, **entry["call"], "id": written["id"], "modes": scenario["modes"]}
            kept["config"] = config
            differs = written.get("differs", {})
            assert entry["differs"] == [rule for rule in differs if mode in differs[rule]]
            kept["differs"] = differs
            assert {key: kept.get(key) for key in scenario} == scenario, entry["id"]


def test_X5_every_handlers_expected_trace_keeps_the_rules(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """Each handler's expected trace in the corpus, as JSON lines, passes ``check`` (X1): a
    partial view, a failing handler's and an interrupted call's included."""
    checked = 0
    for entry in _corpus_json(capsys)["scenarios"]:
        for label, lines in _per_handler(entry["trace"]).items():
            status, out = _check([json.dumps(line) for line in lines], tmp_path, capsys)
            assert status == 0, (entry["id"], label, out)
            checked += 1
    assert checked > 81


def _compact(line: dict[str, Any]) -> str:
    """A corpus trace line in short: handler, event, run<parent (by number, - for none), tags
    (- for none), then a start's name and metadata, a token, or an error's type."""

    def number(run_id: str | None) -> str:
        return "-" if run_id is None else str(uuid.UUID(run_id).int)

    parts = [line["handler"], line["event"], f"{number(line['run_id'])}<"]
    parts[-1] += number(line["parent_run_id"])
    parts.append(",".join(line["tags"]) or "-")
    if line["event"].endswith("start"):
        parts.append(line["name"])
        if line["metadata"]:
            parts.append(json.dumps(line["metadata"], separators=(",", ":")))
    elif "token" in line or "error" in line:
        parts.append(line.get("token") or line["error"]["type"])
    return " ".join(parts)


# Traces two entries share (the same in a sync mode and an async one).
_WRITTEN_MD = [
    'h on_chain_start 1<- - outer {"k":"req","r":1}',
    'h on_llm_start 2<1 - model {"k":"model","r":1,"n":2}',
    "h on_llm_end 2<1 -",
    'h on_retriever_start 3<1 - docs {"k":"req","r":1}',
    "h on_retriever_end 3<1 -",
    "h on_chain_end 1<- -",
]
_WRITTEN_LATE = [
    "h on_chain_start 1<- - outer",
    "h on_llm_start 2<1 - model",
    "late on_llm_start 2<1 - model",
    "h on_llm_end 2<1 -",
    "late on_llm_end 2<1 -",
    "h on_chain_end 1<- -",
]
_WRITTEN_CLOSED = [
    "h on_chain_start 1<- - outer",
    "h on_chain_start 2<1 seq:step:1 prompt",
    "h on_chain_end 2<1 seq:step:1",
    "h on_llm_start 3<1 seq:step:2 model",
    "h on_llm_new_token 3<1 seq:step:2 a ",
    "h on_llm_error 3<1 seq:step:2 GeneratorExit",
    "h on_chain_error 1<- - GeneratorExit",
]


# Entries of the corpus written out by hand from the rules, to pin the interpreter itself (a
# replay by the same interpreter cannot catch its own mistakes): ids numbered in order of first
# appearance, handler after handler.
_WRITTEN_OUT: dict[str, tuple[bool, dict[str, Any], list[str]]] = {
    "constructor-handlers-hear-their-own-runs/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 1<- - outer",
            "g on_chain_start 1<- - outer",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "g on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_end 2<1 seq:step:1",
            "g on_chain_end 2<1 seq:step:1",
            "h on_llm_start 3<1 seq:step:2 model",
            "g on_llm_start 3<1 seq:step:2 model",
            "c on_llm_start 3<1 seq:step:2 model",
            "h on_llm_end 3<1 seq:step:2",
            "g on_llm_end 3<1 seq:step:2",
            "c on_llm_end 3<1 seq:step:2",
            "h on_chain_end 1<- -",
            "g on_chain_end 1<- -",
        ],
    ),
    "tags-are-an-ordered-set/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_tool_start 1<- x,y,t lookup",
            "h on_llm_start 2<1 x,y model",
            "h on_llm_end 2<1 x,y",
            "h on_tool_end 1<- x,y,t",
        ],
    ),
    "metadata-merges-key-by-key/invoke": (
        True,
        {"returns": [{"page_content": "a b"}]},
        _WRITTEN_MD,
    ),
    "metadata-merges-key-by-key/ainvoke": (
        False,
        {"returns": [{"page_content": "a b"}]},
        _WRITTEN_MD,
    ),
    "bound-handlers-are-inherited/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 1<- - outer",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_end 2<1 seq:step:1",
            "h on_chain_start 3<1 seq:step:2,bound user",
            "b on_chain_start 3<1 seq:step:2,bound user",
            "h on_llm_start 4<3 bound model",
            "b on_llm_start 4<3 bound model",
            "h on_llm_end 4<3 bound",
            "b on_llm_end 4<3 bound",
            "h on_chain_end 3<1 seq:step:2,bound",
            "b on_chain_end 3<1 seq:step:2,bound",
            "h on_chain_end 1<- -",
        ],
    ),
    "nested-calls-without-a-config-are-children/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 1<- - agent",
            "h on_chat_model_start 2<1 - chat",
            "h on_llm_end 2<1 -",
            "h on_tool_start 3<1 - lookup",
            "h on_tool_end 3<1 -",
            "h on_chain_end 1<- -",
        ],
    ),
    "nested-calls-without-a-config-are-children/abatch": (
        False,
        {"returns": ["a b", "b"]},
        [
            "h on_chain_start 1<- - agent",
            "h on_chat_model_start 2<1 - chat",
            "h on_llm_end 2<1 -",
            "h on_tool_start 3<1 - lookup",
            "h on_tool_end 3<1 -",
            "h on_chain_end 1<- -",
            "h on_chain_start 4<- - agent",
            "h on_chat_model_start 5<4 - chat",
            "h on_llm_end 5<4 -",
            "h on_tool_start 6<4 - lookup",
            "h on_tool_end 6<4 -",
            "h on_chain_end 4<- -",
        ],
    ),
    "a-nested-call-with-its-own-callbacks-starts-a-new-root/invoke": (
        True,
        {"returns": "a b"},
        [
            'h on_chain_start 1<- req outer {"r":1}',
            "g on_llm_start 2<- - model",
            "g on_llm_end 2<- -",
            "h on_chain_end 1<- req",
        ],
    ),
    "empty-callbacks-hide-a-subtree/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 1<- - outer",
            "c on_llm_start 2<3 - model",
            "c on_llm_end 2<3 -",
            "h on_chain_end 1<- -",
        ],
    ),
    "a-handler-added-to-a-lambdas-manager-hears-what-it-passes-on/ainvoke": (
        False,
        {"returns": "a b"},
        _WRITTEN_LATE,
    ),
    "a-chain-batches-input-by-input/batch": (
        True,
        {"returns": ["a b", "a b"]},
        [
            "h on_chain_start 1<- - outer",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_end 2<1 seq:step:1",
            "h on_llm_start 3<1 seq:step:2 model",
            "h on_llm_end 3<1 seq:step:2",
            "h on_chain_end 1<- -",
            "h on_chain_start 4<- - outer",
            "h on_chain_start 5<4 seq:step:1 prompt",
            "h on_chain_end 5<4 seq:step:1",
            "h on_llm_start 6<4 seq:step:2 model",
            "h on_llm_end 6<4 seq:step:2",
            "h on_chain_end 4<- -",
        ],
    ),
    "a-failing-tool-inside-a-lambda-closes-both/ainvoke": (
        False,
        {"raises": {"type": "LookupError", "message": "none"}},
        [
            "h on_chain_start 1<- - agent",
            "h on_tool_start 2<1 - lookup",
            "h on_tool_error 2<1 - LookupError",
            "h on_chain_error 1<- - LookupError",
        ],
    ),
    "a-raise-error-handler-failing-at-a-start-still-closes-the-run/invoke": (
        True,
        {"raises": {"type": "RuntimeError", "message": "f"}},
        ["f on_chain_start 1<- - outer", "f on_chain_error 1<- - RuntimeError"],
    ),
    "a-stream-closed-early-fails-its-runs-innermost-first/astream": (
        False,
        {"returns": ["a "]},
        _WRITTEN_CLOSED,
    ),
    "a-handler-without-chat-start-gets-llm-start/invoke": (
        True,
        {"returns": {"type": "ai", "content": "hi there"}},
        [
            "n on_chain_start 1<- - outer",
            "m on_chain_start 1<- - outer",
            "n on_chain_start 2<1 seq:step:1 prompt",
            "m on_chain_start 2<1 seq:step:1 prompt",
            "n on_chain_end 2<1 seq:step:1",
            "m on_chain_end 2<1 seq:step:1",
            "n on_llm_start 3<1 seq:step:2 chat",
            "n on_llm_end 3<1 seq:step:2",
            "n on_chain_end 1<- -",
            "m on_chain_end 1<- -",
        ],
    ),
    "inline-handlers-go-first-under-async-dispatch/ainvoke": (
        True,
        {"returns": [{"page_content": "a b"}]},
        [
            "i on_chain_start 1<- - outer",
            "a on_chain_start 1<- - outer",
            "i on_chain_start 2<1 seq:step:1 prompt",
            "a on_chain_start 2<1 seq:step:1 prompt",
            "i on_chain_end 2<1 seq:step:1",
            "a on_chain_end 2<1 seq:step:1",
            "i on_retriever_start 3<1 seq:step:2 docs",
            "a on_retriever_start 3<1 seq:step:2 docs",
            "i on_retriever_end 3<1 seq:step:2",
            "a on_retriever_end 3<1 seq:step:2",
            "i on_chain_end 1<- -",
            "a on_chain_end 1<- -",
        ],
    ),
    "a-flag-that-raises-is-its-handlers-failure/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 2<- - outer",
            "h on_chain_start 3<2 seq:step:1 prompt",
            "h on_chain_end 3<2 seq:step:1",
            "b on_llm_start 1<2 seq:step:2 model",
            "h on_llm_start 1<2 seq:step:2 model",
            "b on_llm_end 1<2 seq:step:2",
            "h on_llm_end 1<2 seq:step:2",
            "h on_chain_end 2<- -",
        ],
    ),
    "run-name-names-the-receiving-run-only/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 1<- - renamed",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_end 2<1 seq:step:1",
            "h on_llm_start 3<1 seq:step:2 model",
            "h on_llm_end 3<1 seq:step:2",
            "h on_chain_end 1<- -",
        ],
    ),
    "a-stream-closed-early-fails-its-runs-innermost-first/stream": (
        True,
        {"returns": ["a "]},
        _WRITTEN_CLOSED,
    ),
    "async-handlers-run-in-their-turn-under-sync-dispatch/invoke": (
        True,
        {"returns": "a b"},
        [
            "a on_chain_start 1<- - outer",
            "h on_chain_start 1<- - outer",
            "a on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "a on_chain_end 2<1 seq:step:1",
            "h on_chain_end 2<1 seq:step:1",
            "a on_llm_start 3<1 seq:step:2 model",
            "h on_llm_start 3<1 seq:step:2 model",
            "a on_llm_end 3<1 seq:step:2",
            "h on_llm_end 3<1 seq:step:2",
            "a on_chain_end 1<- -",
            "h on_chain_end 1<- -",
        ],
    ),
    "a-handler-added-to-a-lambdas-manager-hears-what-it-passes-on/invoke": (
        True,
        {"returns": "a b"},
        _WRITTEN_LATE,
    ),
    "ignore-flags-silence-their-events/invoke": (
        True,
        {"returns": "a b"},
        [
            "h on_chain_start 1<- - outer",
            "q on_chain_start 1<- - outer",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "q on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_end 2<1 seq:step:1",
            "q on_chain_end 2<1 seq:step:1",
            "h on_llm_start 3<1 seq:step:2 model",
            "r on_llm_start 3<1 seq:step:2 model",
            "h on_llm_new_token 3<1 seq:step:2 a ",
            "r on_llm_new_token 3<1 seq:step:2 a ",
            "h on_llm_new_token 3<1 seq:step:2 b",
            "r on_llm_new_token 3<1 seq:step:2 b",
            "h on_llm_end 3<1 seq:step:2",
            "r on_llm_end 3<1 seq:step:2",
            "h on_chain_end 1<- -",
            "q on_chain_end 1<- -",
        ],
    ),
    "an-interrupt-from-a-body-closes-every-run/invoke": (
        True,
        {"raises": {"type": "KeyboardInterrupt", "message": ""}},
        [
            "h on_chain_start 1<- - outer",
            "h on_chain_start 2<1 seq:step:1 prompt",
            "h on_chain_end 2<1 seq:step:1",
            "h on_chain_start 3<1 seq:step:2 stop",
            "h on_chain_error 3<1 seq:step:2 KeyboardInterrupt",
            "h on_chain_error 1<- - KeyboardInterrupt",
        ],
    ),
}


def test_X5_corpus_entries_are_the_rules_written_out(capsys: pytest.CaptureFixture[str]) -> None:
    """Twenty-three entries of the corpus, in every call mode, checked against traces written
    from the rules (S1-S12, D2-D8): whether the order between handlers counts, the outcome
    and every line, in order. And the shape of an entry: its keys, its call (a batch's inputs
    one at a time), the rules it differs on for its mode only."""
    corpus = _corpus_json(capsys)
    entries = {entry["id"]: entry for entry in corpus["scenarios"]}
    for key, (ordered, outcome, lines) in _WRITTEN_OUT.items():
        assert (entries[key]["ordered"], entries[key]["outcome"]) == (ordered, outcome), key
        got = [_compact(line) for line in entries[key]["trace"]]
        if not ordered:  # only each handler's own order counts: compare handler by handler
            got, lines = (sorted(x, key=lambda line: line.split()[0]) for x in (got, lines))
        assert got == lines, key
    assert set(corpus) == {"format", "version", "about", "scenarios"}
    assert corpus["about"] == "see callbacks.py, section Scenarios, and its README"
    batch = entries["a-chain-batches-input-by-input/batch"]
    assert list(batch) == [
        "id", "rules", "differs", "about", "handlers", "runnable", "call", "ordered", "outcome",
        "trace",
    ]  # fmt: skip
    assert batch["call"] == {
        "mode": "batch",
        "input": ["a b", "b"],
        "config": {"callbacks": ["h"], "max_concurrency": 1},
    }
    astream = entries["a-stream-closed-early-fails-its-runs-innermost-first/astream"]
    assert set(astream) == set(batch)  # the stream's "take" is in its call only
    call = {"mode": "astream", "input": "a b", "config": {"callbacks": ["h"]}, "take": 1}
    assert astream["call"] == call
    differs = {key: entries[key]["differs"] for key in entries if key.startswith("an-interrupt")}
    assert differs == {
        "an-interrupt-from-a-body-closes-every-run/invoke": [],
        "an-interrupt-from-a-body-closes-every-run/ainvoke": ["D3"],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"runnable": {"kind": "agent"}}, "a node's kind must be one of .* got 'agent'"),
        (
            {"runnable": {"kind": "llm", "text": "x", "callback": ["h"]}},
            r"a llm node has unknown keys \['callback'\]",
        ),
        ({"runnable": {"kind": "lambda"}}, "a lambda node needs a name: a dict"),
        (
            {"runnable": {"kind": "llm", "text": "x", "callbacks": ["g"]}},
            "no handler is labelled 'g'",
        ),
        (
            {"handlers": {"h": {"ignore_llms": True}}},
            r"handler 'h' has unknown keys \['ignore_llms'\]",
        ),
        ({"call": {"mode": "run"}}, "a call's mode must be one of .*, got a dict"),
        (
            {"runnable": {"kind": "llm", "text": "x", "error": {"type": "open"}}},
            "an error's type must name a builtin exception, got 'open'",
        ),
        ({"runnable": {"kind": "llm", "text": "x", "error": {"type": "No"}}}, "got 'No' \\("),
    ],
)
def test_X5_a_scenario_description_that_is_not_well_formed_is_refused(
    change: dict[str, Any], message: str
) -> None:
    scenario = {
        "handlers": {"h": {}},
        "runnable": {"kind": "llm", "text": "x"},
        "call": {"mode": "invoke", "input": "q"},
        **change,
    }
    with pytest.raises(ValueError, match=message):
        callbacks._Play(scenario)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_X5_async_modes_play_with_async_handlers_and_functions(mode: str) -> None:
    """A handler marked ``async`` has coroutine methods in every mode; under the async modes a
    lambda's or a tool's function is a coroutine function (its nested calls ``ainvoke``)."""
    for kind in ("lambda", "tool"):
        play = callbacks._Play(
            {
                "handlers": {"a": {"async": True}, "s": {}},
                "runnable": {"kind": kind, "name": "f"},
                "call": {"mode": mode},
            }
        )
        assert inspect.iscoroutinefunction(play.handlers["a"].on_chain_start)
        assert not inspect.iscoroutinefunction(play.handlers["s"].on_chain_start)
        assert inspect.iscoroutinefunction(play.runnable.func) == (mode == "ainvoke")


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_X5_a_scenario_streams_its_input_built_with_the_kit_given(mode: str) -> None:
    """``handlers`` may be left out; the kit builds every node, the corpus's too."""
    scenario = {"runnable": {"kind": "lambda", "name": "f"}, "call": {"mode": mode, "input": "q"}}
    assert callbacks._played(scenario)["outcome"] == {"returns": ["q"]}
    kit = {**callbacks._TOY_KIT, "lambda": lambda f, **o: Lambda(str.upper, **o)}
    assert callbacks._played({**scenario, "handlers": {}}, kit)["outcome"] == {"returns": ["Q"]}
    with pytest.raises(ZeroDivisionError):
        callbacks._corpus({**callbacks._TOY_KIT, "lambda": lambda *a, **o: 1 / 0})


def test_X5_playing_a_scenario_lets_an_interrupt_it_did_not_raise_through() -> None:
    """A ``KeyboardInterrupt`` a scenario's function raises is its outcome; one from elsewhere
    (here a handler's, which D2 lets out whatever the flags) leaves the play."""
    scenario = {
        "handlers": {
            "h": {"fails_on": ["on_llm_start"], "fails_with": {"type": "KeyboardInterrupt"}}
        },
        "runnable": {"kind": "llm", "text": "x"},
        "call": {"mode": "invoke", "input": "q", "config": {"callbacks": ["h"]}},
    }
    with pytest.raises(KeyboardInterrupt):
        callbacks._Play(scenario).outcome()


def test_X5_outcomes_are_plain_json_data() -> None:
    value = {"m": (AIMessage("x"), Document("d")), "n": 2.5, "o": None, "p": [object]}
    assert callbacks._plain(value) == {
        "m": [{"type": "ai", "content": "x"}, {"page_content": "d"}],
        "n": 2.5,
        "o": None,
        "p": ["<class 'object'> (type)"],
    }


def _lc_kit() -> dict[str, Callable[..., Any]]:
    """langchain_core's runnables as a kit for `callbacks._Play`: its sequence, parallel,
    lambda and structured tool, and a completion model, a chat model and a retriever that behave
    as the toys do (replies streamed a word at a time, errors raised inside the run, after the
    first token when streaming; documents holding every word of the query)."""
    runnables = _lc_import("langchain_core.runnables")
    tools = _lc_import("langchain_core.tools")
    retrievers = _lc_import("langchain_core.retrievers")
    documents = _lc_import("langchain_core.documents")
    llms = _lc_import("langchain_core.language_models.llms")
    chat_models = _lc_import("langchain_core.language_models.chat_models")
    messages = _lc_import("langchain_core.messages")
    outputs = _lc_import("langchain_core.outputs")

    def fail(error: BaseException | None) -> None:
        if error is not None:
            raise copy.copy(error)

    class KitLLM(llms.LLM):  # type: ignore[misc,name-defined]
        text: str
        streaming: bool = False
        error: Any = None

        @property
        def _llm_type(self) -> str:
            return "kit"

        def _call(self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any) -> str:
            if self.streaming:  # a completion model fires its own tokens
                return "".join(c.text for c in self._stream(prompt, stop, run_manager))
            fail(self.error)
            return self.text

        async def _acall(
            self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> str:
            if self.streaming:
                return "".join([c.text async for c in self._astream(prompt, stop, run_manager)])
            fail(self.error)
            return self.text

        def _stream(self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            for word in _TOKEN_WORDS.findall(self.text):
                run_manager.on_llm_new_token(word, chunk=outputs.GenerationChunk(text=word))
                yield outputs.GenerationChunk(text=word)
                fail(self.error)

        async def _astream(
            self, prompt: str, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            for word in _TOKEN_WORDS.findall(self.text):
                await run_manager.on_llm_new_token(word, chunk=outputs.GenerationChunk(text=word))
                yield outputs.GenerationChunk(text=word)
                fail(self.error)

    class KitChat(chat_models.BaseChatModel):  # type: ignore[misc,name-defined]
        text: str
        streaming: bool = False
        error: Any = None

        @property
        def _llm_type(self) -> str:
            return "kit"

        def _generate(
            self, messages_: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Any:
            fail(self.error)
            message = messages.AIMessage(self.text)
            return outputs.ChatResult(generations=[outputs.ChatGeneration(message=message)])

    class KitRetriever(retrievers.BaseRetriever):  # type: ignore[misc,name-defined]
        documents: list[str]
        error: Any = None

        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> Any:
            fail(self.error)
            words = query.lower().split()
            return [
                documents.Document(page_content=text)
                for text in self.documents
                if all(word in text.lower() for word in words)
            ]

    def given(runnable: Any, callbacks: Any) -> Any:
        if callbacks is not None:  # its constructors take its own handler class alone
            runnable.callbacks = list(callbacks)
        return runnable

    def chain(steps: list[Any], name: str | None = None) -> Any:
        sequence = runnables.RunnableSequence(*steps)  # bound, so that it is not spliced
        return sequence.with_config(run_name=name) if name else sequence

    def parallel(steps: dict[str, Any], name: str | None = None) -> Any:
        fan = runnables.RunnableParallel(steps)
        fan.name = name
        return fan

    def tool(func: Any, name: str, callbacks: Any = None, **options: Any) -> Any:
        how = {"coroutine" if inspect.iscoroutinefunction(func) else "func": func}
        made = tools.StructuredTool.from_function(name=name, description=name, **how, **options)
        return given(made, callbacks)

    return {
        "chain": chain,
        "parallel": parallel,
        "lambda": lambda func, name: runnables.RunnableLambda(func, name=name),
        "tool": tool,
        "llm": lambda text, callbacks=None, **o: given(KitLLM(text=text, **o), callbacks),
        "chat_model": lambda text, callbacks=None, **o: given(KitChat(text=text, **o), callbacks),
        "retriever": lambda documents, callbacks=None, **o: given(
            KitRetriever(documents=documents, **o), callbacks
        ),
    }


def _lc_seen(line: dict[str, Any]) -> dict[str, Any]:
    """A trace line with what the rules leave open set aside: the order of a run's tags (the
    README: "The `name` keyword and tag order") and the metadata langchain_core adds for its
    tracing service (``ls_*`` keys, ``lc_versions``)."""
    seen = dict(line)
    if seen["tags"] is not None:
        seen["tags"] = sorted(seen["tags"])
    if seen["metadata"] is not None:
        seen["metadata"] = {
            k: v
            for k, v in seen["metadata"].items()
            if not k.startswith("ls_") and k != "lc_versions"
        }
    return seen


def test_X5_langchain_core_differs_on_exactly_the_scenarios_marked_differs(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Every scenario of the corpus, built by the same interpreter of langchain_core's own
    runnables and played there: the scenarios whose outcome or traces differ are exactly those
    marked ``differs``, the README's differences (a scenario that hangs there is cancelled
    after 10 s and differs by its `TimeoutError`)."""
    kit = _lc_kit()
    differing, marked = [], []
    for entry in _corpus_json(capsys)["scenarios"]:
        got = callbacks._played(_bare(entry), kit, timeout=10)
        seen = {**got, "trace": [_lc_seen(line) for line in got["trace"]]}
        if not _same_play({**entry, "trace": [_lc_seen(line) for line in entry["trace"]]}, seen):
            differing.append(entry["id"])
        if entry["differs"]:
            marked.append(entry["id"])
    assert differing == marked and len(marked) == 23


# ===============================================================================================
# Documentation (X4): the README's rules and event table match SPEC and the code
# ===============================================================================================


_README = pathlib.Path(__file__).with_name("README.md")


def _spec_text() -> str | None:
    """SPEC.md, which sits beside the repository in the project's workspace (not shipped)."""
    spec = pathlib.Path(__file__).resolve().parent.parent / "shared" / "SPEC.md"
    return spec.read_text(encoding="utf-8") if spec.is_file() else None


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _README.read_text(encoding="utf-8"), re.M | re.S)


def test_X4_readme_lists_every_rule_of_spec_once() -> None:
    readme_ids = re.findall(r"^- \*\*([SDRX]\d+)\*\*", _README.read_text(encoding="utf-8"), re.M)
    assert len(readme_ids) == len(set(readme_ids))
    spec = _spec_text()
    if spec is not None:
        assert set(readme_ids) == set(re.findall(r"^- ([SDRX]\d+) ", spec, re.M))
    assert {"S1", "S11", "D1", "D7", "R0", "R6", "X1", "X4"} <= set(readme_ids)


def test_X4_every_rule_names_a_test() -> None:
    text = _README.read_text(encoding="utf-8")
    tested = " ".join(name for name in globals() if name.startswith("test_"))
    for rule_id in re.findall(r"^- \*\*([SDRX]\d+)\*\*", text, re.M):
        if f"**{rule_id}** (planned)" in text:  # stated, not built yet: no test to name
            continue
        ranges = re.findall(r"test_\w*?([SDRX])(\d+)_to_[SDRX](\d+)", tested)
        in_range = any(
            p == rule_id[0] and int(a) <= int(rule_id[1:]) <= int(b) for p, a, b in ranges
        )
        found = re.search(rf"test_(\w*_)?{rule_id}_", tested)
        assert found or in_range, f"no test named for {rule_id}"


def test_X4_every_rule_test_has_a_readme_entry() -> None:
    """The other half of `test_X4_every_rule_names_a_test`: no test checks a rule the README
    does not state."""
    text = _README.read_text(encoding="utf-8")
    listed = set(re.findall(r"^- \*\*([SDRX]\d+)\*\*", text, re.M))
    named = {
        rule
        for name in globals()
        if name.startswith("test_")
        for rule in re.findall(r"(?<=_)([SDRX]\d+)(?=_)", name)
    }
    assert named and sorted(named - listed) == []


def test_X4_the_api_reference_shows_every_public_name_with_its_signature(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's API reference has one entry per name of ``__all__``; each signature it shows
    (``Lambda(func, **options)``, ``.invoke(input, config=None)``) is `_shown_signature`'s; what
    it names exists; every public method and attribute of a public class (and of its private
    bases) is named in it, event methods aside; the command line's entries name each command."""
    text = _README.read_text(encoding="utf-8")
    section = text.split("\n## API reference\n", 1)[1].split("\n## ", 1)[0]
    section, commands = section.split("\n### Command line\n")
    assert callbacks._main(["--help"]) == 0
    usage = re.search(r"usage: python -m callbacks \[(.*)\]", capsys.readouterr().out)
    assert usage and all(
        f"`python -m callbacks {command}`" in commands for command in usage[1].split(" | ")
    )
    entries = re.findall(r"^- `(\w+)(.*?)(?=^- |^#|\Z)", section, re.M | re.S)
    assert sorted(name for name, _ in entries) == sorted(callbacks.__all__)
    named = set(re.findall(r"`\.(\w+)", section))
    for name, entry in entries:
        owner = getattr(callbacks, name)
        shown = [(owner, entry[: entry.index("`")])]  # the entry's own, if any
        for method, signature in re.findall(r"`\.(\w+)(\([^`]*\))?`", entry):
            assert hasattr(owner, method) or f"self.{method}" in inspect.getsource(owner), method
            shown.append((getattr(owner, method, None), signature))
        for target, signature in shown:
            if signature:
                assert signature == _shown_signature(target), (name, signature)
        if shown[0][1] and inspect.isclass(owner):  # a constructor's parameters name fields
            named |= set(inspect.signature(owner).parameters)
        if typing.is_typeddict(owner):  # a config's keys, as `key`
            named |= set(owner.__annotations__) & set(re.findall(r"`(\w+)`", entry))
    missing = {}
    for name in callbacks.__all__:
        owner = getattr(callbacks, name)
        if not inspect.isclass(owner) or owner.__module__ != "callbacks":
            continue
        bases = [c for c in owner.__mro__ if c is owner or c.__name__.startswith("_")]
        public = {
            attribute
            for base in bases
            if base.__module__ == "callbacks"
            for attribute in [*vars(base), *vars(base).get("__annotations__", {})]
            if not attribute.startswith(("_", "on_"))
            and "__mutmut_" not in attribute  # copies mutation testing adds (`.ci/mutation`)
            and not isinstance(vars(base).get(attribute), enum.Enum)
        }
        if public - named:
            missing[name] = sorted(public - named)
    assert missing == {}, missing


def _shown_signature(target: Any) -> str:
    """``target``'s signature without annotations or ``self``, a dataclass field's default
    factory shown by what it makes (``metadata={}``)."""
    fields = dataclasses.fields(target) if dataclasses.is_dataclass(target) else ()
    made = {f.name: f.default_factory() for f in fields if callable(f.default_factory)}
    parameters = [p for p in _untyped(target).parameters.values() if p.name != "self"]
    shown = str(inspect.Signature(parameters))
    for name, value in made.items():
        shown = shown.replace(f"{name}=<factory>", f"{name}={value!r}")
    return shown


def test_X4_readme_doctests_pass() -> None:
    """The README's ``>>>`` examples run as written (doctest)."""
    result = doctest.testfile(str(_README), module_relative=False, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


def test_X4_every_test_the_readme_names_exists() -> None:
    named = set(re.findall(r"`(test_\w+)`", _README.read_text(encoding="utf-8")))
    assert named, "the README names no test"
    assert sorted(n for n in named if n not in globals()) == []


def test_X4_readme_event_table_is_the_enum() -> None:
    rows = re.findall(r"^\| ([A-Z_]+) \| (.*) \|$", _README.read_text(encoding="utf-8"), re.M)
    assert [(name, rest.split(" | ")) for name, rest in rows] == [
        (e.name, [e.method, e.js_name or "—", e.run_type, e.phase, e.ignore_flag or "—"])
        for e in Event
    ]


def test_X4_readme_example_prints_what_the_readme_shows(capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = _readme_blocks("python")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    shown = _README.read_text(encoding="utf-8").split(code + "```\n\n```\n", 1)[1].split("```")[0]
    assert capsys.readouterr().out == shown


def test_X2_X4_readme_demo_output_is_what_python_callbacks_py_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = next(b for b in _readme_blocks("console") if b.startswith("$ python callbacks.py"))
    callbacks._demo()
    assert capsys.readouterr().out == demo.split("\n", 1)[1]
    monkeypatch.setattr(sys, "argv", ["callbacks.py"])  # the script, with no argument
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(_README.with_name("callbacks.py")), run_name="__main__")
    assert exit_status.value.code == 0
    assert capsys.readouterr().out == demo.split("\n", 1)[1]


def test_X4_readme_test_command_is_what_ci_runs() -> None:
    (command,) = _readme_blocks("sh")
    ci = _README.with_name(".ci").joinpath("run").read_text(encoding="utf-8")
    install, run = command.strip().split(" && ")
    assert install.replace("python -m pip install", "python -m pip install --quiet") in ci
    assert f"\n{run}\n" in ci


# ===============================================================================================
# Packaging: what an installed copy gives its users
# ===============================================================================================


def test_packaging_an_installed_wheel_gives_type_checkers_the_types(tmp_path: pathlib.Path) -> None:
    """Installed from the wheel, the module comes with its stub-only package (PEP 561; made at
    build time by ``.ci/hatch_build.py``): ``stubtest`` finds it true to the module, and a
    user's ``mypy --strict`` away from any checkout sees the types. Run by CI's packaging
    section (``CALLBACKS_REQUIRE_INSTALLED``); skipped where the module is not installed."""
    module = pathlib.Path(callbacks.__file__).resolve()
    if not (module.parent / "callbacks-stubs" / "__init__.pyi").is_file():
        if os.environ.get("CALLBACKS_REQUIRE_INSTALLED"):
            pytest.fail(f"callbacks is imported from {module}, with no stub package beside it")
        pytest.skip("callbacks is not installed from a wheel here")
    assert module.parent != pathlib.Path(__file__).resolve().parent
    _check_user_types(tmp_path, cwd=tmp_path)
    allowlist = pathlib.Path(__file__).with_name(".ci") / "stubtest-allowlist"
    command = [sys.executable, "-m", "mypy.stubtest", "callbacks", "--allowlist", str(allowlist)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_packaging_the_classifiers_name_this_python() -> None:
    """The classifiers name this interpreter's version, and ``requires-python`` admits it: CI
    runs the suite on each CPython it finds, so every version it passes on is claimed."""
    project = tomllib.loads(pathlib.Path(__file__).with_name("pyproject.toml").read_text())
    version = "{}.{}".format(*sys.version_info[:2])
    assert f"Programming Language :: Python :: {version}" in project["project"]["classifiers"]
    assert project["project"]["requires-python"] == ">=3.11" and sys.version_info >= (3, 11)
