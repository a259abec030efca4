"""Tests for callbacks.py, in the module's own sections; each test name carries its rule id."""

from __future__ import annotations

import collections
import itertools
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from callbacks import (
    LLM,
    CallbackManager,
    Chain,
    ChatModel,
    Event,
    Lambda,
    Parallel,
    Recorder,
    Retriever,
    Runnable,
    RunnableConfig,
    Tool,
    TraceChecker,
    dispatch_custom_event,
)

# The ci profile (loaded by Hypothesis itself when CI is set) is deterministic; it and the
# default run 200 examples per property, dev runs 2,000 (HYPOTHESIS_PROFILE=dev).
settings.register_profile("ci", settings.get_profile("ci"), max_examples=200)
settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=2000, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

# ================================================================================================
# Property tests: random run trees against a pure model (S1-S10, D1-D4, R0-R4)
# ================================================================================================
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


def _leaves() -> st.SearchStrategy[_Node]:
    return st.builds(
        _Node,
        kind=st.sampled_from(["llm", "chat", "tool", "retriever", "lambda"]),
        ctor=_handler_ids,
        tags=_tags,
        metadata=_metadata,
        bound=_bindings,
        fails=_fails,
        streaming=st.booleans(),
        emits=st.booleans(),
        named=st.booleans(),
        call=_calls,
    )


def _composites(children: st.SearchStrategy[_Node]) -> st.SearchStrategy[_Node]:
    kids = st.lists(children, min_size=1, max_size=3).map(tuple)
    return st.builds(
        _Node,
        kind=st.sampled_from(["chain", "parallel", "lambda"]),
        children=kids,
        ctor=_handler_ids,
        tags=_tags,
        metadata=_metadata,
        bound=_bindings,
        fails=_fails,
        catches=st.booleans(),
        emits=st.booleans(),
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


class _Probe(TraceChecker):
    """A handler that logs every event to a shared list and checks its own view (X1)."""

    def __init__(
        self,
        index: int,
        log: list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]],
        flags: frozenset[str],
    ) -> None:
        super().__init__()
        self.index = index
        self.log = log
        for flag in flags:
            setattr(self, flag, True)

    def __repr__(self) -> str:
        return f"_Probe({self.index})"


def _probe_method(event: Event) -> Callable[..., None]:
    check = getattr(TraceChecker, event.method)

    def method(self: _Probe, *args: Any, **kwargs: Any) -> None:
        self.log.append((self.index, event, args, dict(kwargs)))
        check(self, *args, **kwargs)

    return method


for _event in Event:
    setattr(_Probe, _event.method, _probe_method(_event))


class _LegacyProbe(_Probe):
    """A probe without chat support: its chat starts arrive as ``on_llm_start`` (D4)."""

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError


def _tool_fn(*args: Any, **kwargs: Any) -> str:
    return "tool-out"


def _build(node: _Node, probes: Sequence[_Probe]) -> Runnable:
    """The real runnable for a spec node."""
    kw: dict[str, Any] = {
        "name": node.name if node.named else None,
        "callbacks": [probes[i] for i in node.ctor],
        "tags": list(node.tags),
        "metadata": {**dict(node.metadata), "node": node.name},
    }
    error = ValueError(f"fail-{node.name}") if node.fails else None
    runnable: Runnable
    if node.kind in ("llm", "chat"):
        model = LLM if node.kind == "llm" else ChatModel
        runnable = model("a b", streaming=node.streaming, error=error, **kw)
    elif node.kind == "tool":
        runnable = Tool(_tool_fn, error=error, **kw)
    elif node.kind == "retriever":
        runnable = Retriever(["a b"], error=error, **kw)
    elif node.kind == "chain":
        steps = [_build(c, probes) for c in node.children]
        runnable = Chain(*steps) if node.plain else Chain(*steps, **kw)
    elif node.kind == "parallel":
        runnable = Parallel({f"k{i}": _build(c, probes) for i, c in enumerate(node.children)}, **kw)
    else:
        runnable = Lambda(
            _lambda_body(node, [_build(c, probes) for c in node.children], probes), **kw
        )
    if node.bound is not None:
        b = node.bound
        runnable = runnable.with_config(
            callbacks=[probes[i] for i in b.handlers], tags=list(b.tags), metadata=dict(b.metadata)
        )
    return runnable


def _lambda_body(
    node: _Node, children: list[Runnable], probes: Sequence[_Probe]
) -> Callable[[Any, RunnableConfig], Any]:
    def body(value: Any, config: RunnableConfig) -> Any:
        for spec, child in zip(node.children, children, strict=True):
            call = spec.call
            configs: dict[str, RunnableConfig | None] = {
                "implicit": None,
                "explicit": config,
                "new_root": {"callbacks": [probes[i] for i in call.handlers]},
                "detach": {"callbacks": []},
                "tags_md": {"tags": list(call.tags), "metadata": dict(call.metadata)},
            }
            try:
                child.invoke(value, configs[call.style])
            except ValueError:
                if not node.catches:
                    raise
        if node.emits:
            dispatch_custom_event("evt", node.name)
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


def _model(
    tree: _Node, root: _Call, flags: Sequence[frozenset[str]], legacy: int | None
) -> tuple[list[tuple[int, _Ev]], str | None]:
    """The global event log the tree must produce, and the message of the error it raises.

    Written from SPEC alone. A run's handlers: inherited, then bound, then request, then
    constructor ones, each once (S1, S2, S5, S6, S9). Tags likewise, an ordered set with the
    step tag after the inherited ones (S3, S4, S7). Metadata merged, nearest writer winning
    (S8, S9). Children get only the inheritable part (S4); a nested call with a list of
    handlers or an empty list starts a new root (S10). Each handler skips what its flags
    ignore (D1), and the legacy probe gets chat starts as ``on_llm_start`` (D4). Every run
    ends with exactly one end or error (R1, D3); failures propagate to each ancestor.
    """
    log: list[tuple[int, _Ev]] = []

    def emit(handlers: tuple[int, ...], event: _Ev) -> None:
        method = event[0]
        flag = next(f for prefix, f in _IGNORED_BY if method.startswith(prefix))
        for h in handlers:
            if flag in flags[h]:
                continue
            if h == legacy and method == "on_chat_model_start":
                if "ignore_llm" in flags[h]:
                    continue
                log.append((h, ("on_llm_start", *event[1:])))
            else:
                log.append((h, event))

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
        emit(handlers, (start, me, parent, tags, md, name, None))
        failure: str | None = None
        own = f"fail-{node.name}" if node.fails else None
        if node.kind in ("llm", "chat"):
            tokens = (["a "] if node.fails else ["a ", "b"]) if node.streaming else []
            for token in tokens:
                emit(handlers, ("on_llm_new_token", me, parent, tags, None, None, token))
            failure = own
        elif node.kind in ("tool", "retriever"):
            failure = own
        elif node.kind == "chain":
            for i, kid in enumerate(_splice(node.children), 1):
                failure = run(kid, child, f"seq:step:{i}", _Call("implicit"))
                if failure:
                    break
        elif node.kind == "parallel":
            failures = [
                run(kid, child, f"map:key:k{i}", _Call("implicit"))
                for i, kid in enumerate(node.children)
            ]
            failure = next((f for f in failures if f), None)
        else:
            for kid in node.children:
                failure = run(kid, child, None, kid.call)
                if failure and not node.catches:
                    break
                failure = None
            if failure is None:
                if node.emits:
                    emit(handlers, ("on_custom_event", me, None, tags, md, None, ("evt", me)))
                failure = own
        if failure:
            emit(handlers, (f"on_{family}_error", me, parent, tags, None, None, failure))
        else:
            emit(handlers, (f"on_{family}_end", me, parent, tags, None, None, None))
        return failure

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
_flag_sets = st.lists(
    st.frozensets(st.sampled_from(_FLAGS), max_size=2), min_size=_N_PROBES, max_size=_N_PROBES
)
_legacy = st.sampled_from([None, *range(_N_PROBES)])


def _probes(
    flags: Sequence[frozenset[str]], legacy: int | None
) -> tuple[list[_Probe], list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]]]:
    log: list[tuple[int, Event, tuple[Any, ...], dict[str, Any]]] = []
    return [
        (_LegacyProbe if i == legacy else _Probe)(i, log, flags[i]) for i in range(_N_PROBES)
    ], log


def _root_config(root: _Call, probes: Sequence[_Probe]) -> RunnableConfig:
    return {
        "callbacks": [probes[i] for i in root.handlers],
        "tags": list(root.tags),
        "metadata": dict(root.metadata),
        "max_concurrency": 1,  # parallel branches in key order, so the global log is exact
    }


@given(tree=_trees, root=_roots, flags=_flag_sets, legacy=_legacy)
def test_S1_to_S10_D1_to_D4_R0_to_R4_random_run_trees_match_the_model(
    tree: _Node, root: _Call, flags: list[frozenset[str]], legacy: int | None
) -> None:
    probes, log = _probes(flags, legacy)
    runnable = _build(tree, probes)
    expected, failure = _model(tree, root, flags, legacy)
    try:
        runnable.invoke("x", _root_config(root, probes))
        raised = None
    except ValueError as error:  # R0, R1: the innermost failure reaches the caller
        raised = str(error)
    assert raised == failure
    assert _resolve_unseen(_observed(log), expected) == expected
    for probe in probes:
        probe.verify()  # D3 and X1 on each handler's own view


@given(tree=_trees, root=_roots, flags=_flag_sets, n=st.integers(1, 3))
def test_R3_batch_runs_one_independent_root_per_input(
    tree: _Node, root: _Call, flags: list[frozenset[str]], n: int
) -> None:
    probes, log = _probes(flags, None)
    runnable = _build(tree, probes)
    expected, failure = _model(tree, root, flags, None)
    outputs = runnable.batch(["x"] * n, _root_config(root, probes), return_exceptions=True)
    assert [str(o) if isinstance(o, Exception) else None for o in outputs] == [failure] * n
    assert _resolve_unseen(_observed(log), expected * n, runs_per_node=n) == expected * n
    for probe in probes:
        probe.verify()


# ================================================================================================
# Stateful test of the manager API against a list-based model (S4-S8)
# ================================================================================================


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
        if h in self.handlers:
            self.manager.remove_handler(h)
            self.handlers.remove(h)
            if h in self.inh_handlers:
                self.inh_handlers.remove(h)
        else:
            with pytest.raises(ValueError, match="not registered"):
                self.manager.remove_handler(h)

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
        assert list(m.handlers) == self.handlers
        assert list(m.inheritable_handlers) == self.inh_handlers
        assert list(m.tags) == self.tags
        assert list(m.inheritable_tags) == self.inh_tags
        assert m.metadata == self.md
        assert m.inheritable_metadata == self.inh_md
        assert m.parent_run_id == self.parent
        assert set(map(id, m.inheritable_handlers)) <= set(map(id, m.handlers))
        assert set(m.inheritable_tags) <= set(m.tags)


TestManagerMachine = ManagerMachine.TestCase
