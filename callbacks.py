# callbacks.py: a reference implementation of LangChain's callback system.
# Version 0.1.0. https://pypi.org/project/callbacks-reference/
#
# MIT License
#
# Copyright (c) 2026 The callbacks-reference authors
#
# Permission is hereby granted, free of charge, to any person obtaining a copy of this software
# and associated documentation files (the "Software"), to deal in the Software without
# restriction, including without limitation the rights to use, copy, modify, merge, publish,
# distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
# Software is furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all copies or
# substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
# BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
# NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
# DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

"""The callback rules of LLM frameworks such as LangChain, in one readable file.

Theory of operation
-------------------
A *run* is one execution of one runnable: a chain, an LLM call, a tool call, a retrieval. Runs
nest: a chain's steps are its child runs. A *handler* is any object with ``on_*`` methods; it
receives *events* (``on_chain_start``, ``on_llm_new_token``, ...), each tagged with the run's
``run_id`` and its parent's ``parent_run_id``, so a handler can rebuild the tree of runs.

Which handlers see which run is decided by *managers*. A `CallbackManager` holds three pairs of
fields: ``handlers`` / ``inheritable_handlers``, ``tags`` / ``inheritable_tags`` and ``metadata``
/ ``inheritable_metadata``, plus the parent run. The plain field is what the run about to start
uses; the inheritable one is what its children get. Everything else follows from two rules:

1. Values given at *request time* (``runnable.invoke(x, {"callbacks": [h]})``) or bound with
   ``with_config`` are inheritable: they reach the run and every run below it.
2. Values given to a *constructor* (``LLM(callbacks=[h])``) are local: that object's runs only.

Starting a run turns a `CallbackManager` into a `RunManager`, which fires the start event and
later exactly one end or error event. ``RunManager.get_child(tag)`` builds the manager of a
child run from the inheritable half alone, with the run as parent. A runnable invoked inside a
run without a config finds its parent through a `contextvars.ContextVar`, so user code does not
have to thread the config through by hand (it may, by passing ``{"callbacks": child_manager}``).

Dispatch calls each handler in order, skips handlers whose ``ignore_*`` flag covers the event,
and never lets a handler's exception break the run unless that handler sets ``raise_error``.
An event a run fires many times (a token, a note) is resolved once per run: the run keeps its
handlers' methods, and its run manager's method calls them in turn, handing anything out of
the ordinary (a failure, an awaitable, an interrupt) to the dispatcher. The `Event` enum is the
one table of events: method names, run types, phases and ignore flags are read from it by the
run managers, the dispatcher and the checker; the handler base classes and the run managers
spell its rows out as typed methods, for type checkers, and tests hold them to it.

Async is the same system called differently. ``ainvoke`` starts runs through an
`AsyncCallbackManager`, whose dispatcher runs ``run_inline`` handlers first and in order, then
the others concurrently; an async handler met by the sync dispatcher is run to completion in
its turn. Who is called, with what and what a failure means is decided in one place for both.
Every event reaches every handler before the run goes on, even when the awaiting task is being
cancelled, so that each handler always sees one end or error for each start: the Dispatch
section tells, case by case, how that holds whatever cuts a call short.

Streaming is a pipeline. Under ``stream()`` each step of a chain is a generator reading the
step before as it streams: a model anywhere in the chain fires its tokens as it makes them; a
step that pipelines (a lambda, a chain, a parallel) starts its run at the first chunk it reads,
any other once its input is whole; a parallel hands on each branch's chunks as they come.
Closing a stream early closes every run it left open, children before parents.

The file reads top to bottom: events, payloads, handlers, dispatch, managers, runnables, extras
(recorder, trace checker, deterministic ids) and a demo (``python callbacks.py``). Rule ids in
comments (``S2``, ``D3``, ``R1``...) refer to the project's SPEC; the README lists them all,
each with the tests that check it (X4).
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import builtins
import concurrent.futures
import contextlib
import contextvars
import copy
import enum
import functools
import inspect
import itertools
import json
import linecache
import logging
import operator
import os
import random
import re
import reprlib
import sys
import textwrap
import threading
import time
import types
import uuid
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    NamedTuple,
    NoReturn,
    Self,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    final,
    overload,
)

__version__ = "0.1.0"
__license__ = "MIT"

__all__ = [
    "LLM",
    "AIMessage",
    "AsyncCallbackHandler",
    "AsyncCallbackManager",
    "AsyncRunManager",
    "BaseCallbackHandler",
    "BaseMessage",
    "CallbackManager",
    "Chain",
    "ChatModel",
    "Document",
    "Event",
    "Generation",
    "HumanMessage",
    "LLMResult",
    "Lambda",
    "Parallel",
    "Record",
    "Recorder",
    "Retriever",
    "RunManager",
    "Runnable",
    "RunnableConfig",
    "SystemMessage",
    "Tool",
    "ToolMessage",
    "TraceChecker",
    "Violation",
    "adispatch_custom_event",
    "dispatch_custom_event",
    "sequential_run_ids",
]

# Handler failures are logged here, under this fixed name even when the file is vendored (D2).
_LOGGER: Final = logging.getLogger("callbacks")

# =================================================================================================
# Events
# =================================================================================================

_KEYWORDS: Final = {
    # Keyword arguments each kind of event carries besides its payload; start events also get
    # ``name`` and whatever the emitter adds, through ``**kwargs``.
    "start": ("run_id", "parent_run_id", "tags", "metadata"),
    "custom": ("run_id", "tags", "metadata"),
    "other": ("run_id", "parent_run_id", "tags"),
}


class Event(enum.Enum):
    """Every callback event, with the facts that the rest of the module reads from it.

    Each member carries ``method`` (the handler method, LangChain Python's name), ``js_name``
    (LangChain JS's, or None), ``run_type`` (the kind of run it belongs to, ``"any"`` for notes
    that any run may emit), ``phase`` (``start``, ``stream``, ``end``, ``error`` or ``note``),
    ``ignore_flag`` (the handler attribute that silences it, or None: ``on_text`` cannot be
    silenced), ``payload`` (its positional parameters) and ``keywords`` (the keyword arguments the
    handler receives). ``signature`` renders the handler method's signature.
    """

    # fmt: off
    #                   handler method          JS name                 run type      phase     ignore flag            payload
    CHAT_MODEL_START = ("on_chat_model_start", "handleChatModelStart", "chat_model", "start",  "ignore_chat_model",   "serialized, messages")
    LLM_START        = ("on_llm_start",        "handleLLMStart",       "llm",        "start",  "ignore_llm",          "serialized, prompts")
    LLM_NEW_TOKEN    = ("on_llm_new_token",    "handleLLMNewToken",    "llm",        "stream", "ignore_llm",          "token, *, chunk=None")
    LLM_END          = ("on_llm_end",          "handleLLMEnd",         "llm",        "end",    "ignore_llm",          "response")
    LLM_ERROR        = ("on_llm_error",        "handleLLMError",       "llm",        "error",  "ignore_llm",          "error")
    CHAIN_START      = ("on_chain_start",      "handleChainStart",     "chain",      "start",  "ignore_chain",        "serialized, inputs")
    CHAIN_END        = ("on_chain_end",        "handleChainEnd",       "chain",      "end",    "ignore_chain",        "outputs")
    CHAIN_ERROR      = ("on_chain_error",      "handleChainError",     "chain",      "error",  "ignore_chain",        "error")
    TOOL_START       = ("on_tool_start",       "handleToolStart",      "tool",       "start",  "ignore_agent",        "serialized, input_str, *, inputs=None")
    TOOL_END         = ("on_tool_end",         "handleToolEnd",        "tool",       "end",    "ignore_agent",        "output")
    TOOL_ERROR       = ("on_tool_error",       "handleToolError",      "tool",       "error",  "ignore_agent",        "error")
    RETRIEVER_START  = ("on_retriever_start",  "handleRetrieverStart", "retriever",  "start",  "ignore_retriever",    "serialized, query")
    RETRIEVER_END    = ("on_retriever_end",    "handleRetrieverEnd",   "retriever",  "end",    "ignore_retriever",    "documents")
    RETRIEVER_ERROR  = ("on_retriever_error",  "handleRetrieverError", "retriever",  "error",  "ignore_retriever",    "error")
    TEXT             = ("on_text",             "handleText",           "any",        "note",   None,                  "text")
    AGENT_ACTION     = ("on_agent_action",     "handleAgentAction",    "chain",      "note",   "ignore_agent",        "action")
    AGENT_FINISH     = ("on_agent_finish",     "handleAgentEnd",       "chain",      "note",   "ignore_agent",        "finish")
    RETRY            = ("on_retry",            None,                   "any",        "note",   "ignore_retry",        "retry_state")
    CUSTOM_EVENT     = ("on_custom_event",     "handleCustomEvent",    "any",        "note",   "ignore_custom_event", "name, data")
    # fmt: on

    method: str
    js_name: str | None
    run_type: str
    phase: str
    ignore_flag: str | None
    payload: tuple[str, ...]
    keyword_payload: tuple[str, ...]
    keywords: tuple[str, ...]
    closes: bool  # an end or error event: the run's last
    index: int  # its row in the table: where a run keeps the methods it resolved for it
    dispatch: tuple[str | None, str, bool, bool, bool, int, bool]  # what `_dispatch` reads

    def __init__(
        self,
        method: str,
        js_name: str | None,
        run_type: str,
        phase: str,
        ignore_flag: str | None,
        payload: str,
    ) -> None:
        self.method = method
        self.js_name = js_name
        self.run_type = run_type
        self.phase = phase
        self.ignore_flag = ignore_flag
        positional, _, keyword = payload.partition(", *, ")
        self.payload = tuple(positional.split(", "))
        self.keyword_payload = tuple(k.partition("=")[0] for k in keyword.split(", ") if k)
        kind = "start" if phase == "start" else "custom" if method == "on_custom_event" else "other"
        self.keywords = _KEYWORDS[kind]
        self.closes = phase in ("end", "error")
        usual = self.keywords is _KEYWORDS["other"] and len(self.payload) == 1
        self.index = len(type(self).__members__)
        repeats = phase in ("stream", "note")  # may come many times in one run
        self.dispatch = (
            ignore_flag,
            method,
            phase == "start",
            self.closes,
            usual,
            self.index,
            repeats,
        )

    @property
    def signature(self) -> inspect.Signature:
        """The handler method's signature: payload positional, everything else keyword-only."""
        p = inspect.Parameter
        params = [p("self", p.POSITIONAL_OR_KEYWORD)]
        params += [p(name, p.POSITIONAL_OR_KEYWORD) for name in self.payload]
        params += [p(name, p.KEYWORD_ONLY, default=None) for name in self.keyword_payload]
        for name in self.keywords:
            params.append(
                p(name, p.KEYWORD_ONLY, **({} if name == "run_id" else {"default": None}))
            )
        params.append(p("kwargs", p.VAR_KEYWORD))
        return inspect.Signature(params)


# Lookups derived from the table, for the hot paths.
_START: Final = {e.run_type: e for e in Event if e.phase == "start"}
_END: Final = {e.run_type: e for e in Event if e.phase == "end"}
_ERROR: Final = {e.run_type: e for e in Event if e.phase == "error"}
# The run family of each run type: a chat run streams, ends and fails as an LLM run.
_FAMILY: Final = {
    "chain": "chain",
    "llm": "llm",
    "chat_model": "llm",
    "tool": "tool",
    "retriever": "retriever",
}
_START_KEYWORDS: Final = _KEYWORDS["start"]
_OTHER_KEYWORDS: Final = _KEYWORDS["other"]
_START_VALUES: Final = operator.itemgetter(*_START_KEYWORDS)  # for `_dispatch`
_NAMED_VALUES: Final = operator.itemgetter(*_START_KEYWORDS, "name")
_METHODS: Final = frozenset(e.method for e in Event)
_NO_EXTRA: Final[dict[str, Any]] = {}  # no keywords beyond an event's own (never written to)
_EVENTS: Final = tuple(Event)


# =================================================================================================
# Payloads (R5): small classes shaped like LangChain's, so handlers port both ways
# =================================================================================================


# Each payload has ``model_dump()``, as langchain_core's pydantic payloads do: its fields as plain
# data (dicts, lists, strings, numbers), payloads inside it dumped too, and the ``type`` key
# langchain_core writes. langchain_core's tracers store a model's outputs that way. Messages
# compare by class and content alone: ids and metadata are what a model reported, not what it said.


@dataclass(frozen=True, slots=True)
class BaseMessage:
    """A chat message: ``type`` says who speaks, ``content`` what is said; ``id`` is optional."""

    content: str
    id: str | None = field(default=None, kw_only=True, compare=False)
    type: ClassVar[str] = "base"

    def model_dump(self) -> dict[str, Any]:
        """This message as plain data (see above)."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        return {**data, "type": self.type}


@final
@dataclass(frozen=True, slots=True)
class HumanMessage(BaseMessage):
    """A message from the user."""

    type: ClassVar[str] = "human"


@final
@dataclass(frozen=True, slots=True)
class AIMessage(BaseMessage):
    """A message from the model, with what the model reported of the call: ``usage_metadata``
    (``input_tokens``, ``output_tokens``, ``total_tokens``) and ``response_metadata``."""

    usage_metadata: dict[str, int] | None = field(default=None, kw_only=True, compare=False)
    response_metadata: dict[str, Any] = field(default_factory=dict, kw_only=True, compare=False)
    type: ClassVar[str] = "ai"


@final
@dataclass(frozen=True, slots=True)
class SystemMessage(BaseMessage):
    """Instructions for the model."""

    type: ClassVar[str] = "system"


@final
@dataclass(frozen=True, slots=True)
class ToolMessage(BaseMessage):
    """A tool's answer, handed back to the model."""

    type: ClassVar[str] = "tool"


@final
@dataclass(frozen=True, slots=True)
class Generation:
    """One completion; a chat completion also carries the ``message`` (langchain_core's
    ``ChatGeneration``). ``generation_info`` is what the model said of it, if anything."""

    text: str
    message: BaseMessage | None = None
    generation_info: dict[str, Any] | None = None

    def model_dump(self) -> dict[str, Any]:
        """This generation as plain data (see above); ``message`` only for a chat one."""
        info = copy.deepcopy(self.generation_info)
        if self.message is None:
            return {"text": self.text, "generation_info": info, "type": "Generation"}
        message = self.message.model_dump()
        return {
            "text": self.text,
            "generation_info": info,
            "type": "ChatGeneration",
            "message": message,
        }


@final
@dataclass(frozen=True, slots=True)
class LLMResult:
    """What ``on_llm_end`` receives: ``generations[prompt_index][candidate_index]``, and what
    the model reported of the whole call in ``llm_output`` (the toys: ``token_usage`` and
    ``model_name``)."""

    generations: list[list[Generation]]
    llm_output: dict[str, Any] | None = None

    def model_dump(self) -> dict[str, Any]:
        """This result as plain data (see above)."""
        generations = [[g.model_dump() for g in candidates] for candidates in self.generations]
        output = copy.deepcopy(self.llm_output)
        return {"generations": generations, "llm_output": output, "run": None, "type": "LLMResult"}


@final
@dataclass(frozen=True, slots=True)
class Document:
    """A retrieved document."""

    page_content: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def model_dump(self) -> dict[str, Any]:
        """This document as plain data (see above)."""
        return {
            "metadata": copy.deepcopy(self.metadata),
            "page_content": self.page_content,
            "type": "Document",
        }


_ROLES: Final = {"system": "System", "human": "Human", "ai": "AI", "tool": "Tool"}


def _buffer_string(messages: Sequence[Any]) -> str:
    """Render a message list the way the chat fallback (D4) hands it to ``on_llm_start``."""
    return "\n".join(f"{_ROLES.get(m.type, m.type)}: {m.content}" for m in messages)


# =================================================================================================
# Handlers
# =================================================================================================


def _install_event_methods(cls: type, make: Callable[[Event], Callable[..., Any]]) -> None:
    """Give ``cls`` one method per event, named and documented from the table."""
    for event in Event:
        method = make(event)
        method.__name__ = method.__qualname__ = event.method
        method.__signature__ = event.signature  # type: ignore[attr-defined]
        method.__doc__ = (
            method.__doc__ or f"Called on {event.name} ({event.phase} of a {event.run_type} run)."
        )
        setattr(cls, event.method, method)


class BaseCallbackHandler:
    """Base for handlers: every event method is a no-op you may override.

    The one exception is ``on_chat_model_start``: its default raises `NotImplementedError`, and
    the dispatcher then calls ``on_llm_start`` with the messages rendered as strings (D4).
    Subclassing is optional: the dispatcher accepts any object with the ``on_*`` methods it
    cares about and reads the flags below with a default of False (so a handler written for
    langchain_core runs here unchanged).

    Flags (class or instance attributes):
      ``raise_error``: a failure in this handler propagates out of the run (D2).
      ``run_inline``: under async dispatch, run on the event loop in order (D5).
      ``ignore_llm``, ``ignore_chat_model``, ``ignore_chain``, ``ignore_agent`` (agent *and*
      tool events), ``ignore_retriever``, ``ignore_retry``, ``ignore_custom_event``: skip those
      events (D1). ``on_text`` cannot be ignored.

    Method signatures follow `Event.signature`: payload positional, then keyword-only ``run_id``,
    ``parent_run_id``, ``tags`` and (start and custom events) ``metadata``, then ``**kwargs``
    (start events get ``name`` there).
    """

    raise_error: bool = False
    run_inline: bool = False
    ignore_llm: bool = False
    ignore_chat_model: bool = False
    ignore_chain: bool = False
    ignore_agent: bool = False
    ignore_retriever: bool = False
    ignore_retry: bool = False
    ignore_custom_event: bool = False

    # One method per row of the `Event` table, in its order, each with its real signature
    # (`Event.signature`, typed), so that type checkers see what a subclass overrides; a test
    # holds the two together.

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A chat model run starts. Not implemented here: on_llm_start gets its prompts (D4)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement on_chat_model_start")

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """An LLM run starts, one prompt per run (R2)."""

    def on_llm_new_token(
        self,
        token: str,
        *,
        chunk: Any = None,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A streaming LLM or chat model run made a token."""

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """An LLM or chat model run ends with its result."""

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """An LLM or chat model run fails."""

    def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A chain run (a Lambda, Chain or Parallel) starts."""

    def on_chain_end(
        self,
        outputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A chain run ends with its output."""

    def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A chain run fails."""

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        inputs: dict[str, Any] | None = None,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A tool run starts; ``input_str`` is its input as text."""

    def on_tool_end(
        self,
        output: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A tool run ends with its output."""

    def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A tool run fails."""

    def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A retriever run starts with its query."""

    def on_retriever_end(
        self,
        documents: Sequence[Document],
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A retriever run ends with the documents found."""

    def on_retriever_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A retriever run fails."""

    def on_text(
        self,
        text: str,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Any run reports a text (never ignored)."""

    def on_agent_action(
        self,
        action: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """An agent (a chain run) takes an action."""

    def on_agent_finish(
        self,
        finish: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """An agent (a chain run) finishes."""

    def on_retry(
        self,
        retry_state: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Any run retries."""

    def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: uuid.UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A custom event from the enclosing run (`dispatch_custom_event`)."""


class AsyncCallbackHandler(BaseCallbackHandler):
    """`BaseCallbackHandler` with every event method a coroutine (same no-op defaults and flags).

    Under an async manager its methods are awaited on the event loop (D5); under a sync manager
    each is run to completion before the next handler is called (D6).
    """

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A chat model run starts. Not implemented here: on_llm_start gets its prompts (D4)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement on_chat_model_start")

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """An LLM run starts, one prompt per run (R2)."""

    async def on_llm_new_token(
        self,
        token: str,
        *,
        chunk: Any = None,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A streaming LLM or chat model run made a token."""

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """An LLM or chat model run ends with its result."""

    async def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """An LLM or chat model run fails."""

    async def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A chain run (a Lambda, Chain or Parallel) starts."""

    async def on_chain_end(
        self,
        outputs: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A chain run ends with its output."""

    async def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A chain run fails."""

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        inputs: dict[str, Any] | None = None,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A tool run starts; ``input_str`` is its input as text."""

    async def on_tool_end(
        self,
        output: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A tool run ends with its output."""

    async def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A tool run fails."""

    async def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A retriever run starts with its query."""

    async def on_retriever_end(
        self,
        documents: Sequence[Document],
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A retriever run ends with the documents found."""

    async def on_retriever_error(
        self,
        error: BaseException,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A retriever run fails."""

    async def on_text(
        self,
        text: str,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Any run reports a text (never ignored)."""

    async def on_agent_action(
        self,
        action: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """An agent (a chain run) takes an action."""

    async def on_agent_finish(
        self,
        finish: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """An agent (a chain run) finishes."""

    async def on_retry(
        self,
        retry_state: Any,
        *,
        run_id: uuid.UUID,
        parent_run_id: uuid.UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Any run retries."""

    async def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: uuid.UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A custom event from the enclosing run (`dispatch_custom_event`)."""


_DUCK_HANDLERS: Final[weakref.WeakSet[type]] = weakref.WeakSet()  # classes seen to qualify


def _check_handler(obj: object, what: str = "handler") -> None:
    """Raise `TypeError` unless ``obj`` plausibly is a handler (has an event method)."""
    cls = type(obj)
    if isinstance(obj, BaseCallbackHandler) or cls in _DUCK_HANDLERS:
        return
    if isinstance(obj, type) or not any(hasattr(obj, m) for m in _METHODS):
        raise TypeError(
            f"{what}: expected a callback handler (an object with on_* event methods), "
            f"got {_brief(obj)}"
        )
    if any(hasattr(cls, m) for m in _METHODS):  # then every instance of the class qualifies
        _DUCK_HANDLERS.add(cls)


# =================================================================================================
# Dispatch
# =================================================================================================
#
# Who gets called, and what a failure means, is decided once (`_method_for`, `_after_failure`,
# `_keep`); the sync and async dispatchers differ only in how they call (blinker's
# ``receivers_for``).
#
# What a dispatcher promises (D2, D8): every handler hears the event, whatever the handlers
# before it did. A handler's flags are part of the handler: they are read under the guard that
# catches its method's exceptions, so a flag that raises is that handler's failure.
#
# Interrupts, cancellations and a stack that runs out, the story told once (D3). The promise:
# each handler hears each event of a run it listens to once, and every start it heard gets one
# end or error, whatever cuts the work short: an interrupt (a signal handler's
# `KeyboardInterrupt`, anything not an `Exception`: at any line), a cancellation of the awaiting
# task (at an ``await``), the stack running out (a `RecursionError`, as Python enters a
# function). Which exception leaves at the end is decided in one place, `_keep`: the first,
# unless an interrupt comes after an ordinary failure. The cases, where each arises and where it
# is handled:
#
# 1. Inside an event's delivery (``run.on_chain_end(out)  # <- Ctrl-C in handler 2 of 3``): the
#    interrupt is held, the handlers not served yet hear the event, then it is raised. So that
#    the dispatcher knows who was served wherever it lands, the line that calls a handler also
#    notes that it did (`_dispatch`: ``i``, ``called``, ``result``; the run managers' fast path
#    hands the same note over, `_RUN_EVENT_FAST`), and `_settle` judges it.
# 2. While handlers run under a loop (``task.cancel()  # during on_chain_end``): each handler's
#    delivery is a task of its own, which cancelling the caller does not cancel; the dispatcher
#    waits until every one is done (`_complete`), then raises the cancellation (`_adispatch`).
# 3. In a run's body (``chain.invoke(x)  # <- Ctrl-C in a step``): the run closes with an error
#    event carrying it, then it is re-raised (R1). One that lands during that closing is held
#    and the closing goes on (`_Run._fail`); one at the entry of `_fail`, before anything can
#    hold it, leaves the closing to the call's ``finally`` (`_fail_again`).
# 4. Before every listener heard a run's end (any case above, at its closing event): the run
#    keeps its one closing event (``_end``, chosen by `_Run._closing`) until all heard it. At a
#    root, an end or error fired again finishes that delivery; a child's goes to its parent,
#    which delivers it, innermost first, before its own (``_orphans``, `_Run._cut_short`).
# 5. When the stack runs out at a handler's call (runs nested too deep): a `RecursionError`
#    raised before Python entered the method (`_never_entered`) means the handler did not hear
#    the event. Delivery stops there and the caller learns who did not (`_Undelivered`); they
#    hear it later, as in case 4, and the run fails with that `RecursionError` (R1). One raised
#    inside the method is the handler's own failure (D2). Under a loop, a handler's task raises
#    if and only if it could not call its handler (`_acall_handler`), and its dispatcher counts
#    those without calling anything that calls a function (`_adispatch`).
# 6. While work runs in another thread, which nothing can stop: a sync body or handler under
#    ``ainvoke`` (`_in_thread`), an async handler under ``invoke`` (`_await_handler`), an async
#    body under ``invoke`` inside a running loop (`_run_coroutine`), a batch's inputs
#    (`_map_in_threads`). The work is waited for (`_wait_for`, `_complete`, the pool's exit),
#    so that the runs it started close before the runs around them; then the interrupt is
#    raised. Work handed to a thread or a task returns an outcome and never raises across
#    (`_attempt`, `_outcome`): an interrupt there is a result, raised later.
# 7. While a stream closes early (``stream.close()``, ``await stream.aclose()``): every run left
#    open inside it closes, innermost first; a failure to close one, or an interrupt meanwhile,
#    is held until all are closed (`_close_all`, `_aclose_all`).
# 8. In a coroutine body (``await outer.ainvoke(x)  # <- Ctrl-C inside``): the body runs in the
#    caller's own task, each step in its run's context (`_run_in`), so an interrupt stays in
#    frames of ours and the runs around it close; a cancellation is passed on to the body.
#
# Where the promise ends (a second interrupt at the entry of case 3, a raw `KeyboardInterrupt`
# inside an asyncio task, threads that never return): the README, "Where these promises end".


class _Undelivered(Exception):
    """Internal: delivery stopped before ``remaining`` (handlers, in order) heard the event, on
    ``error`` raised by the library's own code (a `RecursionError` at the call of a handler),
    not by a handler."""

    def __init__(self, remaining: Sequence[object], error: BaseException) -> None:
        self.remaining, self.error = tuple(remaining), error


def _as_prompts(args: tuple[Any, ...]) -> tuple[Any, ...]:
    serialized, messages = args
    return serialized, [_buffer_string(m) for m in messages]


# D4: an event whose handler method is not implemented falls back to another event.
_FALLBACK: Final = {Event.CHAT_MODEL_START: (Event.LLM_START, _as_prompts)}


def _not_implemented(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError


def _method_for(handler: object, event: Event) -> Callable[..., Any] | None:
    """The handler's method for ``event``, or None when it ignores the event (D1). Reading its
    flag may raise: callers hold the handler's guard (D8)."""
    flag = event.ignore_flag
    if flag is not None and getattr(handler, flag, False):
        return None
    method = getattr(handler, event.method, None)
    if method is None and event in _FALLBACK:  # a duck-typed handler without it (D4)
        return _not_implemented
    return method


def _fallback(
    event: Event, args: tuple[Any, ...], error: BaseException
) -> tuple[Event, tuple[Any, ...]] | None:
    """The event to deliver instead, when a handler does not implement ``event`` (D4)."""
    if isinstance(error, NotImplementedError) and event in _FALLBACK:
        other, convert = _FALLBACK[event]
        return other, convert(args)
    return None


def _raisable(error: BaseException, source: str) -> BaseException:
    """``error`` as it can leave a call in every mode. A `StopIteration` (or
    `StopAsyncIteration`) cannot cross a generator or a coroutine (Python turns it into a
    `RuntimeError` there, PEP 479), nor be set on an asyncio future: it becomes a `RuntimeError`
    from it here, at its source, so that every call mode raises the same object (D8)."""
    if isinstance(error, (StopIteration, StopAsyncIteration)):
        wrapped = RuntimeError(f"{source} raised {type(error).__name__}")
        wrapped.__cause__ = error
        return wrapped
    return error


def _after_failure(
    handler: object, event: Event, kwargs: dict[str, Any], error: BaseException
) -> BaseException | None:
    """What a handler's failure means: the error the run must raise, or None.

    An `Exception` is logged as one warning on the ``"callbacks"`` logger, naming the handler
    class, the event, the run id and the error, and raised only with ``raise_error`` (D2) (a
    ``raise_error`` flag that itself raises is logged too, and counts as False); anything else
    (`KeyboardInterrupt`...) is always raised, and not logged.
    """
    if not isinstance(error, Exception):
        return error
    _LOGGER.warning(
        "error in %s.%s callback for run %s: %r",
        type(handler).__name__,
        event.method,
        kwargs.get("run_id"),
        error,
    )
    try:
        if not getattr(handler, "raise_error", False):
            return None
    except Exception as flag_error:
        _LOGGER.warning("error in %s.raise_error: %r", type(handler).__name__, flag_error)
        return None
    return _raisable(error, f"{type(handler).__name__}.{event.method}")


def _keep(kept: BaseException | None, error: BaseException | None) -> BaseException | None:
    """Of the failure kept to raise once the event reached everyone and a new one, the one to
    raise: the first, unless an interrupt (not an `Exception`) comes after an ordinary one."""
    if kept is None:
        return error
    if error is not None and isinstance(kept, Exception) and not isinstance(error, Exception):
        return error
    return kept


def _never_entered(error: BaseException, method: Any) -> bool:
    """Whether ``error`` is a `RecursionError` raised before Python entered ``method`` (no
    stack left for its frame), rather than one of the handler's own: its frame is not in the
    traceback. (A method written in C has none: its `RecursionError` counts as not entered.)"""
    if not isinstance(error, RecursionError):
        return False
    func = method.__func__ if isinstance(method, types.MethodType) else method
    code = func.__code__ if isinstance(func, types.FunctionType) else None
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code is code:
            return False
        traceback = traceback.tb_next
    return True


async def _outcome(awaitable: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    """``await awaitable`` as an outcome: ``(result, None)`` or ``(None, the very exception)``.

    Every exception is an outcome, a `asyncio.CancelledError` included. Cancelling the gather
    that awaits these tasks still raises out of it whatever they return, and a cancellation that
    a body brings on its own task leaves the call as the same object (R1).
    """
    try:
        return await awaitable, None
    except BaseException as error:
        return None, error


def _attempt(func: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
    """``func(*args)`` as an outcome: ``(output, None)`` or ``(None, failure)``. Work handed to
    another thread returns this, so that no exception has to cross a future (an asyncio future
    refuses a `StopIteration`, and would never complete)."""
    try:
        return func(*args), None
    except BaseException as error:
        return None, error


def _run_coroutine(awaitable: Any) -> Any:
    """Run a body's coroutine to completion from sync code: here, or on a worker thread's own
    loop when a loop already runs here (it cannot be re-entered).

    What it raises is re-raised, the same object (R1), even an interrupt or a cancellation.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(awaitable)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(contextvars.copy_context().run, _attempt, asyncio.run, awaitable)
        output, error = _wait_for(future)
    if error is not None:
        raise error
    return output


def _wait_for(future: concurrent.futures.Future[Any], start: Callable[[], Any] = int) -> Any:
    """``start()``, then ``future.result()``, from sync code that must not leave before the work
    is done: an interrupt that arrives meanwhile is held until then, and raised instead of the
    result (D3). ``start`` may be called again if an interrupt lands just after it."""
    held: BaseException | None = None
    while True:
        try:
            start()
            result = future.result()
            break
        except BaseException as error:  # only an interrupt: the work returns an outcome
            held = held or error
    if held is not None:
        raise held
    return result


# The handler loop (D6): an async handler's awaitable met under sync dispatch runs here, on one
# event loop of the library's in a daemon thread, started on first need. So the tasks that a
# handler starts (a queue consumer, a flush) go on after the event, as they would under
# ``ainvoke``, instead of being cancelled with a throwaway loop. At exit, like ``asyncio.run``,
# the tasks still running are cancelled and given a moment to finish.
_HANDLER_LOOP: Final[list[Any]] = []  # [loop, thread] once started
_HANDLER_LOOP_LOCK: Final = threading.Lock()
if hasattr(os, "register_at_fork"):  # pragma: no branch (no fork to guard on Windows)
    os.register_at_fork(after_in_child=_HANDLER_LOOP.clear)  # the thread is not in the child


def _handler_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    running = _HANDLER_LOOP[:]  # one read, no lock: the lock is for starting it
    if running and running[1].is_alive():
        return running[0], running[1]
    with _HANDLER_LOOP_LOCK:
        if not _HANDLER_LOOP or not _HANDLER_LOOP[1].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_serve, args=(loop,), name="callbacks-handler-loop", daemon=True
            )
            thread.start()
            _HANDLER_LOOP[:] = [loop, thread]
        return _HANDLER_LOOP[0], _HANDLER_LOOP[1]


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


@atexit.register
def _stop_handler_loop() -> None:
    """Stop the handler loop, as `asyncio.run` ends: cancel the tasks left, give them a moment
    to finish, stop and close the loop. Run at exit; the next need starts a new loop."""
    with _HANDLER_LOOP_LOCK:
        if not _HANDLER_LOOP:
            return
        loop, thread = _HANDLER_LOOP
        _HANDLER_LOOP.clear()

    async def stop() -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1)
        loop.stop()

    asyncio.run_coroutine_threadsafe(stop(), loop)
    thread.join(timeout=2)  # then the thread closes the loop


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _await_handler(awaitable: Awaitable[Any]) -> Any:
    """Run an async handler's awaitable (a coroutine, a future, any object with ``__await__``)
    to completion under sync dispatch, on the handler loop, in a copy of the caller's context;
    return its result or raise what it raised (D6)."""
    loop, thread = _handler_loop()
    if threading.current_thread() is thread:  # a handler on that loop dispatching: it cannot
        return _run_coroutine(_awaited(awaitable))  # wait for its own loop: a loop of its own
    done: concurrent.futures.Future[tuple[Any, BaseException | None]] = concurrent.futures.Future()
    context, started = contextvars.copy_context(), list[asyncio.Task[Any]]()

    def run() -> None:  # on the loop, once: `_wait_for` may ask twice
        if not started:
            started.append(loop.create_task(_outcome(awaitable), context=context))
            started[0].add_done_callback(lambda task: done.set_result(task.result()))

    output, error = _wait_for(done, functools.partial(loop.call_soon_threadsafe, run))
    if error is not None:
        raise error
    return output


def _call_handler(
    handler: object, event: Event, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> BaseException | None:
    """Deliver one event to one handler; return the exception the run must raise, if any.

    A coroutine method (an async handler under sync dispatch) runs to completion first (D6).
    `_dispatch` inlines this, and falls back on it (for a handler's fallback event, D4, and
    for a handler that an interrupt kept it from calling).
    """
    try:
        method = _method_for(handler, event)
        if method is None:
            return None
        result = method(*args, **kwargs)
        if result is not None and inspect.isawaitable(result):
            _await_handler(result)
    except BaseException as error:
        fallback = _fallback(event, args, error)
        if fallback is not None:  # D4, and the fallback obeys its own ignore flag
            return _call_handler(handler, *fallback, kwargs)
        return _after_failure(handler, event, kwargs, error)
    return None


_UNCALLED: Final = object()  # `_dispatch`'s ``result`` until the handler's method is called


def _settle(
    handlers: Sequence[object],
    i: int,
    event: Event,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    called: Any,
    result: Any,
    error: BaseException,
    raised: BaseException | None,
) -> BaseException | None:
    """For `_dispatch`: what ``error``, met while delivering the event to ``handlers[i]``,
    means. Of it and ``raised`` (the failure kept so far), return the one to raise last.

    ``called`` is the handler's method if it was called (None if not yet), and ``result``
    what it returned (`_UNCALLED` if it did not return). An `Exception` is the handler's
    failure (D2), or its fallback event's (D4); a `RecursionError` before its method could be
    entered means Python cannot deliver it (`_Undelivered`). An interrupt is held: the handler
    hears the event first if it had not (D3), and what it returned is run (D6).
    """
    handler = handlers[i] if i < len(handlers) else None  # None: past the last one
    if isinstance(error, Exception):
        if result is _UNCALLED and _never_entered(error, called):
            raise _Undelivered(handlers[i:], error) from None  # not heard
        fallback = _fallback(event, args, error)
        if fallback is not None:  # D4: its fallback obeys its own ignore flag
            return _keep(raised, _call_handler(handler, *fallback, kwargs))
        return _keep(raised, _after_failure(handler, event, kwargs, error))
    if called is None and handler is not None:  # came before it was called: deliver now
        raised = _keep(raised, _call_handler(handler, event, args, kwargs))
    elif called is not None:  # after: run what it returned, if it returned an awaitable (D6)
        raised = _keep(raised, _call_awaitable(handler, event, kwargs, result))
    return _keep(raised, error)


def _dispatch(
    run: _Run,
    handlers: Sequence[object],
    event: Event,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    resume: list[Any] | None = None,
) -> None:
    """Deliver ``run``'s ``event`` to each handler in order (D1), then raise the first failure
    to raise.

    ``resume`` takes over from a run manager's fast path (`_RUN_EVENT_FAST`), which calls the
    handlers' methods resolved for the run and hands over at the first thing out of the
    ordinary: ``[i, called, result, error]`` says that the handlers before ``i`` heard the
    event, and that handler ``i``'s method, if ``called`` is not None, returned ``result`` (an
    awaitable, D6) or raised ``error``; if not called, ``error`` came before it was. The list
    is emptied once taken over: until then, the fast path may hand it over again.

    Every handler receives the event even when an earlier one failed or an interrupt arrived
    meanwhile (cases 1 and 5 of the story above). Then the first non-`Exception` is raised,
    else the first failure of a ``raise_error`` handler; other failures are only logged
    (`_settle`). `_Undelivered` if Python cannot call a handler. The run's state moves with the
    delivery: a start event makes ``handlers`` the run's listeners as delivery begins, and a
    closing event marks the run done once the last has heard it.
    """
    raised: BaseException | None = None
    flag, name, opens, closes, usual, index, repeats = event.dispatch
    # How the handlers are called, chosen once per event: a call with explicit keywords costs
    # half of a ``**kwargs`` one, so each usual shape of call has its own line below. 1: the
    # usual event (one payload argument, the run's own three keywords, unpacked once in
    # `_Run._kwargs`); 2: a start event (two payload arguments, the four keywords of a start);
    # 3: the same and the runnable's ``name``; 0: any other (more keywords).
    shape = 0
    if usual and kwargs is run._kw:
        shape, data, (rid, pid, tags) = 1, args[0], run._usual
    elif opens and len(kwargs) == 4:  # a start's four keywords
        shape, (data, more), (rid, pid, tags, meta) = 2, args, _START_VALUES(kwargs)
    elif opens and len(kwargs) == 5 and "name" in kwargs:  # and the runnable's name
        shape, (data, more), (rid, pid, tags, meta, run_name) = 3, args, _NAMED_VALUES(kwargs)
    uncalled, start, i = _UNCALLED, 0, -1
    # An event a run may fire many times (a token, a note) goes to the methods resolved the
    # first time, for the run's listeners: their flags are read once per run (D1).
    known = fresh = pending = None
    if repeats and handlers is run._listeners:
        cache: list[Any] = run._methods or [None] * len(_EVENTS)
        run._methods, known = cache, cache[index]
        if known is None:
            fresh = [None] * len(handlers)
    while True:
        # A signal may land between any two statements below. ``i`` is the handler at hand:
        # one that lands in this loop's own code, outside a handler's guard, leaves handlers
        # up to ``i`` served, and the loop goes on after it. The interrupt is held, raised last.
        try:
            if resume:  # take over where the fast path stood (emptied: it knows we did)
                i, pending, resume[:] = resume[0] - 1, resume[1:], ()
            if opens:
                run._listeners = handlers  # from here on, each of them hears it
            if pending is not None:  # the fast path's handler: what became of it, settled
                (called, result, failure), pending, i = pending, None, i + 1
                try:
                    if failure is not None:
                        raise failure
                    if inspect.isawaitable(result):  # (it hands over any value returned)
                        _await_handler(result)
                except BaseException as error:
                    raised = _settle(
                        handlers, i, event, args, kwargs, called, result, error, raised
                    )
                start = i + 1
            for handler in handlers[start:] if start else handlers:
                # The last line before the handler's guard: ``i`` is its index there.
                called, result, i = None, uncalled, i + 1
                try:  # `_call_handler`, inlined: the hot path
                    if known is not None:
                        method = known[i]
                        if method is None:
                            continue
                    else:
                        if flag is not None and getattr(handler, flag, False):  # its guard (D8)
                            continue
                        method = getattr(handler, name, None)
                        if method is None:
                            if event not in _FALLBACK:
                                continue
                            method = _not_implemented
                        if fresh is not None:
                            fresh[i] = method
                    # ``called`` is set on the very line that calls the handler, with no line
                    # between (a call split over lines would make one: hence the long lines)
                    if shape == 1:
                        result = (called := method)(data, run_id=rid, parent_run_id=pid, tags=tags)
                    elif shape == 0:
                        result = (called := method)(*args, **kwargs)
                    elif shape == 2:
                        result = (called := method)(data, more, run_id=rid, parent_run_id=pid, tags=tags, metadata=meta)  # fmt: skip
                    else:
                        result = (called := method)(data, more, run_id=rid, parent_run_id=pid, tags=tags, metadata=meta, name=run_name)  # fmt: skip
                    if result is not None and inspect.isawaitable(result):
                        _await_handler(result)
                except BaseException as error:
                    if called is None:  # its flags failed, or will be read again: no cache
                        fresh = None
                    raised = _settle(
                        handlers, i, event, args, kwargs, called, result, error, raised
                    )
            if closes:
                run._end = _DONE
            elif fresh is not None:
                cache[index], fresh = fresh, None
            break
        except _Undelivered:
            raise
        except BaseException as error:  # in this loop's own code, after handler ``i``
            if isinstance(error, Exception):  # it cannot go on (too deep): say how far it got
                raise _Undelivered(handlers[i + 1 :], error) from None
            raised, start = _keep(raised, error), i + 1  # and ``i`` is ``start - 1``
    if raised is not None:
        raise raised


def _call_awaitable(
    handler: object, event: Event, kwargs: dict[str, Any], awaitable: Any
) -> BaseException | None:
    """Run an awaitable a handler returned (D6), as `_call_handler` runs the handler, unless
    it is a coroutine that has run already (an interrupt came after it was awaited)."""
    try:
        if (
            inspect.iscoroutine(awaitable)
            and inspect.getcoroutinestate(awaitable) != "CORO_CREATED"
        ):
            return None
        if inspect.isawaitable(awaitable):
            _await_handler(awaitable)
    except BaseException as error:
        return _after_failure(handler, event, kwargs, error)
    return None


async def _acall_handler(
    handler: object, event: Event, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> BaseException | None:
    """`_call_handler` under an event loop: coroutines are awaited; sync methods run here if
    the handler is ``run_inline``, else in a worker thread with a copy of the context (D5).

    It returns once the handler heard the event: what the run must raise, if anything (a
    failure of the library's own meanwhile, no stack left to log the handler's, included). It
    raises if and only if the handler did not hear it: Python could not enter its method, or
    this very frame (a `RecursionError`: the task starts eagerly, at its dispatcher's depth).
    Its dispatcher then knows who did not, with no call of its own (`_adispatch`)."""
    method: Any = None
    result: Any = _UNCALLED  # until the method returns (a coroutine's: until awaited)
    try:
        method = _method_for(handler, event)
        if method is None:
            return None
        if inspect.iscoroutinefunction(method):
            result = await method(*args, **kwargs)  # entered at this await, not at the call
            return None
        if getattr(handler, "run_inline", False):
            result = method(*args, **kwargs)
        else:  # in a worker thread, handed over from a turn of the event loop: this task may
            # have started eagerly, at its dispatcher's depth, where a hand-off cut short
            # halfway (no stack left) would leave nobody knowing whether the handler is served
            await asyncio.sleep(0)
            result = None  # from here on, the handler hears the event
            output, error = await _in_thread(method, *args, **kwargs)
            if error is not None:  # what its call raised there: judged as if raised here
                result = _UNCALLED
                raise error  # not out of this frame: handled just below
            result = output
        if result is not None and inspect.isawaitable(result):
            await result
    except BaseException as error:
        if result is _UNCALLED and _never_entered(error, method):
            raise  # not heard (D3), as in `_settle`
        try:
            fallback = _fallback(event, args, error)
            if fallback is None:
                return _after_failure(handler, event, kwargs, error)
        except Exception as lost:  # heard, but no stack left to deal with its failure (R1)
            return lost
        return await _acall_handler(handler, *fallback, kwargs)  # D4, heard or not as its own
    return None


_IS_DONE: Final = operator.methodcaller("done")  # any future's, a loop's own kind included


async def _complete(tasks: Sequence[asyncio.Future[Any]]) -> BaseException | None:
    """Wait until every task is done, even if the waiting task is cancelled meanwhile; return
    that cancellation, for the caller to raise once the event has reached everyone (D3). Tasks
    done already (started eagerly, `_task`) cost no turn of the event loop."""
    cancelled: BaseException | None = None
    while not all(map(_IS_DONE, tasks)):  # (a map: no generator frame per event)
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as error:
            cancelled = error
    return cancelled


async def _in_thread(
    func: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, BaseException | None]:
    """``func(*args, **kwargs)`` in a worker thread with a copy of the context, under an event
    loop, as an outcome (`_attempt`): ``(output, None)`` or ``(None, failure)``.

    A cancellation of the awaiting task meanwhile is raised once the thread is done (case 6).
    """
    loop = asyncio.get_running_loop()
    call = functools.partial(func, *args, **kwargs)
    future = loop.run_in_executor(None, contextvars.copy_context().run, _attempt, call)
    cancelled = await _complete([future])
    if cancelled is not None:
        raise cancelled
    outcome: tuple[Any, BaseException | None] = future.result()
    return outcome


async def _body_in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """A body's sync function under ``ainvoke``: in a worker thread (`_in_thread`), its output
    returned or its exception raised."""
    output, error = await _in_thread(func, *args)
    if error is not None:
        raise error
    return output


# A handler's delivery task starts eagerly where Python can (3.12+): its first step runs at
# once, inside the new task (``asyncio.current_task()``, a timeout or a task group opened there
# are the handler's own), so a handler that does not suspend is done before the dispatcher's
# next line, with no turn of the event loop (D5); one that suspends goes on as a task, and
# cancelling the caller still cannot cut it short (D3). Python 3.11 starts it on the next turn.
_EAGER: Final[dict[str, Any]] = {"eager_start": True} if sys.version_info >= (3, 12) else {}
_handler_task: Final[Callable[..., asyncio.Task[Any]]] = functools.partial(asyncio.Task, **_EAGER)


def _task(
    loop: asyncio.AbstractEventLoop,
    coroutine: Coroutine[Any, Any, Any],
    context: contextvars.Context | None = None,
    *,
    handler: bool = False,
) -> asyncio.Future[Any]:
    """``loop.create_task(coroutine, context=context)``, or for a ``handler``'s delivery a task
    started eagerly (`_handler_task`); if that fails (too deep a stack), the coroutine is
    closed, never to be reported as not awaited."""
    try:
        if handler:
            return _handler_task(coroutine, loop=loop, context=context)
        return loop.create_task(coroutine, context=context)
    except BaseException:
        coroutine.close()
        raise


def _adopt(context: contextvars.Context) -> None:
    """Set in the current context each variable whose value in ``context`` differs: what the
    inline handlers changed in their copy of the caller's context, the caller now sees (D5).
    (A variable a handler reset to no value at all keeps its value: Python cannot unset one.)"""
    current = contextvars.copy_context()
    for variable, value in context.items():
        if variable not in current or current[variable] is not value:
            variable.set(value)


async def _adispatch(
    run: _Run,
    handlers: Sequence[object],
    event: Event,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Deliver ``run``'s ``event`` under an event loop (D5), then raise as `_dispatch` does.

    ``run_inline`` handlers go first, one after another, in order, on the loop; the others are
    then awaited concurrently (sync ones in worker threads). The event reaches every handler
    before this returns, even if the caller is cancelled meanwhile. The failure to raise is
    chosen in handler order. `_Undelivered` if the library's own code fails (too deep a stack)
    before every handler was started.
    """
    loop = asyncio.get_running_loop()
    outcomes: dict[int, asyncio.Future[BaseException | None] | BaseException | None] = {}
    held: list[BaseException | None] = []  # a cancellation of this task meanwhile (D3)
    try:
        if event.phase == "start":
            run._listeners = handlers
        others = []
        # Inline handlers run one after another, each done before the next, in the caller's
        # context (D5). Each runs as a task, so that cancelling the caller cannot cancel it
        # (D3), in one shared copy of the caller's context (never two tasks in it at once),
        # and whatever they set there is then set in the caller's context (`_adopt`).
        context = None
        for i, handler in enumerate(handlers):
            try:  # the flag is the handler's: under its guard (D8)
                inline = getattr(handler, "run_inline", False)
            except BaseException as error:
                outcomes[i] = _after_failure(handler, event, kwargs, error)
                continue
            if inline:
                if context is None:
                    context = contextvars.copy_context()
                coroutine = _acall_handler(handler, event, args, kwargs)
                outcomes[i] = task = _task(loop, coroutine, context, handler=True)
                held.append(await _complete([task]))
            else:
                others.append(i)
        if context is not None:
            _adopt(context)  # before the others start: they see it too, as in LangChain
        tasks = []
        for i in others:  # then the others, at once
            call = _acall_handler(handlers[i], event, args, kwargs)
            outcomes[i] = task = _task(loop, call, handler=True)
            tasks.append(task)
        if tasks:
            held.append(await _complete(tasks))
    except Exception as error:  # too deep to go on: the handlers whose task was not made, or
        # could not call them, did not hear it; the others did, or will (a task not done yet)
        remaining = [
            h for i, h in enumerate(handlers) if i not in outcomes or _unheard(outcomes[i])
        ]
        raise _Undelivered(remaining, error) from None
    # Past this point the stack may have no room for more than one call (the handlers' tasks,
    # started eagerly, ran one frame deeper, and may have found none): nothing here calls a
    # function that calls another.
    first: BaseException | None = None
    unheard: list[object] = []
    lost: BaseException | None = None
    for i in sorted(outcomes):  # the failure to raise, chosen in handler order (D2)
        outcome = outcomes[i]
        if isinstance(outcome, asyncio.Future):
            if _unheard(outcome):  # its task could not call the handler
                unheard.append(handlers[i])
                lost = lost or outcome.exception()
                continue
            outcome = outcome.result()
        if outcome is not None:
            first = _keep(first, outcome)
    if lost is not None:  # they hear it later (`_Run._finish`): the run is not closed for them
        raise _Undelivered(unheard, lost)
    if event.closes:
        run._end = _DONE
    for cancelled in held:  # then a cancellation of this task meanwhile (D3)
        first = _keep(first, cancelled)
    if first is not None:
        raise first


def _unheard(outcome: asyncio.Future[BaseException | None] | BaseException | None) -> bool:
    """For `_adispatch`: whether a handler whose task was made did not hear the event: its
    task failed (`_acall_handler`). It calls nothing that calls another function."""
    return (
        isinstance(outcome, asyncio.Future)
        and outcome.done()
        and not outcome.cancelled()
        and outcome.exception() is not None
    )


# =================================================================================================
# Managers: scoping and inheritance (S1-S9)
# =================================================================================================


# Checks of user values. A message names the offending element and its type with a bounded repr
# (`_brief`), never a whole container: a config or its metadata may hold secrets.
_REPR: Final = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlevel = 1  # a container inside an element shows as its type only


def _brief(value: object) -> str:
    """``value`` for an error message: a short repr and its type, or for a container its type
    alone (`reprlib` shows an object whose repr raises as ``<Class instance at 0x...>``)."""
    kind = type(value).__name__
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return f"a {kind}"
    return f"{_REPR.repr(value)} ({kind})"


def _check_tags(tags: object, what: str = "tags") -> tuple[str, ...]:
    """Tags as a tuple: a list or tuple of strings, anything else a `TypeError` (a string, a
    set, a generator: one-shot, unordered or a likely mistake)."""
    if not isinstance(tags, (list, tuple)):
        raise TypeError(f"{what} must be a list of strings, got {_brief(tags)}")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise TypeError(f"{what}[{i}] must be a string, got {_brief(tag)}")
    return tuple(tags)


def _check_metadata(metadata: object, what: str = "metadata") -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{what} must be a dict with string keys, got {_brief(metadata)}")
    for key in metadata:
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings, got {_brief(key)}")
    return dict(metadata)


def _check_handlers(handlers: object, what: str = "callbacks") -> tuple[object, ...]:
    if not isinstance(handlers, (list, tuple)):
        raise TypeError(f"{what} must be a list of handlers, got {_brief(handlers)}")
    for i, handler in enumerate(handlers):
        _check_handler(handler, f"{what}[{i}]")
    return tuple(handlers)


def _add_unique(items: Sequence[Any], new: Iterable[Any], *, by_identity: bool) -> Sequence[Any]:
    """Append the new items not yet present: an ordered set (S6 by identity, S7 by equality)."""
    out = list(items)
    seen = {id(x) for x in items} if by_identity else set(items)  # tags are strings
    for item in new:
        key = id(item) if by_identity else item
        if key not in seen:
            seen.add(key)
            out.append(item)
    return tuple(out) if len(out) != len(items) else items


_F = TypeVar("_F")


class _Field(Generic[_F]):
    """A public list or dict of a manager or run (``handlers``, ``tags``, ``metadata``... S12).

    Until a field is read from outside, a manager or run shares its six values with those it
    was made from (tuples, and dicts nobody writes to), so that making a child costs no copy
    (D7). The first read gives the object its own lists and dicts, which it then changes in
    place, as LangChain's managers do; no other manager or run sees those changes (D8).
    """

    __slots__ = ("kind", "private")
    kind: type  # list or dict
    private: str  # the attribute holding the value: ``_handlers`` for ``handlers``

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __set_name__(self, owner: type, name: str) -> None:
        self.private = f"_{name}"

    @overload
    def __get__(self, obj: None, owner: type) -> Self: ...
    @overload
    def __get__(self, obj: _Scope, owner: type) -> _F: ...
    def __get__(self, obj: _Scope | None, owner: type) -> Self | _F:
        if obj is None:
            return self
        if not obj._owned:
            obj._own()
        value: _F = getattr(obj, self.private)
        return value

    def __set__(self, obj: _Scope, value: _F) -> None:
        if not obj._owned:
            obj._own()
        name = self.private[1:]
        checked: Any
        if self.kind is list:
            checked = list(
                _check_tags(value, name) if "tags" in name else _check_handlers(value, name)
            )
        else:
            checked = _check_metadata(value, name)
        setattr(obj, self.private, checked)


class _Scope:
    """What a manager and a run hold (S1-S4): handlers, tags and metadata, each current and
    inheritable, and the parent run. Inheritable values are always also current."""

    __slots__ = (
        "_handlers",
        "_inheritable_handlers",
        "_inheritable_metadata",
        "_inheritable_tags",
        "_metadata",
        "_owned",
        "_parent",
        "_tags",
    )

    handlers: _Field[list[Any]] = _Field(list)
    inheritable_handlers: _Field[list[Any]] = _Field(list)
    tags: _Field[list[str]] = _Field(list)
    inheritable_tags: _Field[list[str]] = _Field(list)
    metadata: _Field[dict[str, Any]] = _Field(dict)
    inheritable_metadata: _Field[dict[str, Any]] = _Field(dict)

    _handlers: Sequence[Any]
    _inheritable_handlers: Sequence[Any]
    _tags: Sequence[str]
    _inheritable_tags: Sequence[str]
    _metadata: dict[str, Any]
    _inheritable_metadata: dict[str, Any]
    _owned: bool  # its six values are its own lists and dicts (a `_Field` was read)
    _parent: _Run | uuid.UUID | None

    def _own(self) -> None:
        self._handlers, self._inheritable_handlers = (
            list(self._handlers),
            list(self._inheritable_handlers),
        )
        self._tags, self._inheritable_tags = list(self._tags), list(self._inheritable_tags)
        self._metadata = dict(self._metadata)
        self._inheritable_metadata = dict(self._inheritable_metadata)
        self._owned = True

    def _take(self, source: _Scope, inheritable_only: bool) -> None:
        """Share ``source``'s values: its inheritable half as both halves, or all six. (An
        object that owns its values changes them in place: then copies of them.)"""
        ih, it, im = (
            source._inheritable_handlers,
            source._inheritable_tags,
            source._inheritable_metadata,
        )
        h, t, m = source._handlers, source._tags, source._metadata
        if source._owned:  # lists its owner may have written to: checked, each item once again
            ih = _add_unique((), _check_handlers(ih, "inheritable_handlers"), by_identity=True)
            h = _add_unique((), _check_handlers(h, "handlers"), by_identity=True)
            it = _add_unique((), _check_tags(it, "inheritable_tags"), by_identity=False)
            t = _add_unique((), _check_tags(t), by_identity=False)
            im, m = _check_metadata(im, "inheritable_metadata"), _check_metadata(m)
        if inheritable_only:
            h, t, m = ih, it, im
        self._inheritable_handlers, self._inheritable_tags, self._inheritable_metadata = ih, it, im
        self._handlers, self._tags, self._metadata = h, t, m
        self._owned = False


def _extend(target: list[Any], items: Iterable[Any], by_identity: bool) -> None:
    """Append, in place, the items not in ``target`` yet: an ordered set (S6 by identity, S7
    by equality)."""
    for item in items:
        if not (any(x is item for x in target) if by_identity else item in target):
            target.append(item)


class _Manager(_Scope):
    """LangChain's ``BaseCallbackManager`` (S12): the state and mutators shared by
    `CallbackManager` and `AsyncCallbackManager`.

    The fields read as LangChain's lists and dicts and change as there, except that handler
    and tag lists stay ordered sets (S6, S7): adding a handler or tag that is there already
    changes nothing (LangChain moves a re-added tag to the end, and lets a local tag drop an
    inheritable one), and `merge` keeps the order of both (LangChain's goes through sets).
    """

    __slots__ = ()

    def __init__(
        self,
        handlers: Sequence[Any] = (),
        inheritable_handlers: Sequence[Any] | None = None,
        parent_run_id: uuid.UUID | None = None,
        *,
        tags: Sequence[str] | None = None,
        inheritable_tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        inheritable_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Hold the values given, handlers and tags once each; an inheritable value is added to
        the current ones too (where LangChain's constructor keeps the lists as given)."""
        if parent_run_id is not None and not isinstance(parent_run_id, uuid.UUID):
            raise TypeError(
                f"parent_run_id must be a uuid.UUID or None, got {_brief(parent_run_id)}"
            )
        self._parent, self._owned = parent_run_id, False
        self._handlers = self._inheritable_handlers = self._tags = self._inheritable_tags = ()
        self._metadata, self._inheritable_metadata = {}, {}
        handlers, tags = _check_handlers(handlers, "handlers"), _check_tags(tags or (), "tags")
        self._merge(handlers, tags, {}, False)  # in the order given
        self._merge(
            _check_handlers(inheritable_handlers or (), "inheritable_handlers"),
            _check_tags(inheritable_tags or (), "inheritable_tags"),
            _check_metadata(inheritable_metadata or {}, "inheritable_metadata"),
            True,
        )
        self._merge((), (), _check_metadata(metadata or {}, "metadata"), False)  # it wins (S8)

    @classmethod
    def configure(
        cls,
        inheritable_callbacks: Any = None,
        local_callbacks: Any = None,
        verbose: bool = False,
        inheritable_tags: Sequence[str] | None = None,
        local_tags: Sequence[str] | None = None,
        inheritable_metadata: Mapping[str, Any] | None = None,
        local_metadata: Mapping[str, Any] | None = None,
    ) -> Self:
        """Build a run's manager from request-time (inheritable) and constructor (local) values.

        A manager as ``inheritable_callbacks`` is copied whole, parent run included: that is
        how a child manager from `RunManager.get_child` continues the tree. A manager of
        langchain_core's counts as one of this module's (R8). A manager as
        ``local_callbacks`` contributes its ``handlers``. Inheritable values come first, then
        local ones (S5); a local value never removes an inheritable one (S6, S7), and a local
        metadata key overrides an inheritable one for this run only (S8). ``verbose`` is
        accepted for LangChain's signature and ignored: this module ships no stdout handler.
        """
        inheritable_callbacks = _foreign_manager(inheritable_callbacks) or inheritable_callbacks
        local_callbacks = _foreign_manager(local_callbacks) or local_callbacks
        if isinstance(inheritable_callbacks, _Manager):  # its handlers are the clone's own
            manager, inheritable_callbacks = cls._clone(inheritable_callbacks), ()
        else:
            manager = cls()
        if isinstance(local_callbacks, _Manager):
            local_callbacks = tuple(local_callbacks._handlers)
        for callbacks, tags, metadata, inherit in (
            (inheritable_callbacks, inheritable_tags, inheritable_metadata, True),  # S1, S3
            (local_callbacks, local_tags, local_metadata, False),  # then local ones (S5)
        ):
            manager._merge(
                _check_handlers(callbacks or ()),
                _check_tags(tags or ()),
                _check_metadata(metadata or {}),
                inherit,
            )
        return manager

    @classmethod
    def _make(cls, source: _Scope, parent: _Run | uuid.UUID | None) -> Self:
        """A manager holding ``source``'s inheritable values, current and inheritable alike."""
        self = cls.__new__(cls)
        if source._owned:
            self._take(source, inheritable_only=True)
        else:  # `_take`, inlined: a child manager is made at every step of a chain
            self._handlers = self._inheritable_handlers = source._inheritable_handlers
            self._tags = self._inheritable_tags = source._inheritable_tags
            self._metadata = self._inheritable_metadata = source._inheritable_metadata
            self._owned = False
        self._parent = parent
        return self

    @classmethod
    def _clone(cls, source: _Manager) -> Self:
        self = cls.__new__(cls)
        self._take(source, inheritable_only=False)
        self._parent = source._parent
        return self

    def _merge(
        self,
        handlers: Sequence[Any] | None,
        tags: Sequence[str] | None,
        metadata: Mapping[str, Any] | None,
        inherit: bool,
    ) -> None:
        """Add checked values to a manager that does not own its values (new ones replace
        them): handlers and tags as ordered sets (S6, S7), metadata merged (S8). None adds
        nothing. Where the inheritable half is the current one (a fresh manager's, a child's),
        it gets the current half's result: the same values, merged once."""
        if handlers:
            same = self._inheritable_handlers is self._handlers
            self._handlers = _add_unique(self._handlers, handlers, by_identity=True)
            if inherit:
                self._inheritable_handlers = (
                    self._handlers
                    if same
                    else _add_unique(self._inheritable_handlers, handlers, by_identity=True)
                )
        if tags:
            same = self._inheritable_tags is self._tags
            self._tags = _add_unique(self._tags, tags, by_identity=False)
            if inherit:
                self._inheritable_tags = (
                    self._tags
                    if same
                    else _add_unique(self._inheritable_tags, tags, by_identity=False)
                )
        if metadata:
            same = self._inheritable_metadata is self._metadata
            self._metadata = {**self._metadata, **metadata}
            if inherit:
                self._inheritable_metadata = (
                    self._metadata if same else {**self._inheritable_metadata, **metadata}
                )

    @property
    def parent_run_id(self) -> uuid.UUID | None:
        """The id of the run that the next run will be a child of, or None for a root."""
        parent = self._parent
        return parent.run_id if isinstance(parent, _Run) else parent

    @parent_run_id.setter
    def parent_run_id(self, value: uuid.UUID | None) -> None:
        if value is not None and not isinstance(value, uuid.UUID):
            raise TypeError(f"parent_run_id must be a uuid.UUID or None, got {_brief(value)}")
        self._parent = value

    @property
    def is_async(self) -> bool:
        """Whether the manager's start methods are coroutines."""
        return isinstance(self, AsyncCallbackManager)

    def copy(self) -> Self:
        """An independent manager with the same values and parent."""
        return type(self)._clone(self)

    def merge(self, other: _Manager) -> Self:
        """A new manager with this one's values, then ``other``'s: handlers and tags in order,
        each once (S6, S7), metadata key by key with ``other``'s winning; this one's parent,
        else ``other``'s. (LangChain's merge goes through sets, so its order is arbitrary.)"""
        if not isinstance(other, _Manager):
            raise TypeError(f"merge() takes a callback manager, got {_brief(other)}")
        merged = type(self)._clone(self)
        merged._merge(tuple(other._handlers), tuple(other._tags), other._metadata, False)
        merged._merge(
            tuple(other._inheritable_handlers),
            tuple(other._inheritable_tags),
            other._inheritable_metadata,
            True,
        )
        if merged._parent is None:
            merged._parent = other._parent
        return merged

    def add_handler(self, handler: Any, inherit: bool = True) -> None:
        """Add ``handler`` after the others, unless it is there already (S6, by identity).

        With ``inherit`` it is (or becomes) inheritable too. `TypeError` if it is no handler.
        """
        self.add_handlers([handler], inherit)

    def add_handlers(self, handlers: Sequence[Any], inherit: bool = True) -> None:
        """`add_handler` for each of ``handlers``, in order."""
        checked = _check_handlers(handlers, "handlers")
        _extend(self.handlers, checked, by_identity=True)
        if inherit:
            _extend(self.inheritable_handlers, checked, by_identity=True)

    def set_handlers(self, handlers: Sequence[Any], inherit: bool = True) -> None:
        """Make ``handlers`` the manager's only handlers (inheritable too, with ``inherit``)."""
        checked = _check_handlers(handlers, "handlers")
        if not self._owned:
            self._own()
        self._handlers, self._inheritable_handlers = [], []
        self.add_handlers(checked, inherit)

    def set_handler(self, handler: Any, inherit: bool = True) -> None:
        """Make ``handler`` the manager's only handler (inheritable too, with ``inherit``)."""
        self.set_handlers([handler], inherit)

    def remove_handler(self, handler: Any) -> None:
        """Remove ``handler`` from both lists, if it is there."""
        for handlers in (self.handlers, self.inheritable_handlers):
            handlers[:] = [h for h in handlers if h is not handler]

    def add_tags(self, tags: Sequence[str], inherit: bool = True) -> None:
        """Add the tags not yet present, after the others (S7); with ``inherit``, inheritably."""
        checked = _check_tags(tags)
        _extend(self.tags, checked, by_identity=False)
        if inherit:
            _extend(self.inheritable_tags, checked, by_identity=False)

    def remove_tags(self, tags: Sequence[str]) -> None:
        """Remove the given tags from both lists; absent tags are ignored."""
        gone = set(_check_tags(tags))
        for current in (self.tags, self.inheritable_tags):
            current[:] = [t for t in current if t not in gone]

    def add_metadata(self, metadata: Mapping[str, Any], inherit: bool = True) -> None:
        """Merge ``metadata`` in, its values winning (S8); with ``inherit``, inheritably too."""
        checked = _check_metadata(metadata)
        if not self._owned:
            self._own()
        self._metadata = {**self._metadata, **checked}
        if inherit:
            self._inheritable_metadata = {**self._inheritable_metadata, **checked}

    def remove_metadata(self, keys: Sequence[str]) -> None:
        """Remove the given keys from both dicts; absent keys are ignored."""
        for metadata in (self.metadata, self.inheritable_metadata):
            for key in keys:
                metadata.pop(key, None)

    def _custom(self, run: _Run, name: str, kwargs: dict[str, Any]) -> _Run:
        """``run``, made to carry a manager's ``on_custom_event``: heard by all its handlers."""
        if not isinstance(name, str):
            raise TypeError(f"custom event name must be a string, got {_brief(name)}")
        if kwargs:
            raise ValueError(
                f"on_custom_event() takes no keyword arguments besides run_id, got "
                f"{_brief(next(iter(kwargs)))}: put them in data"
            )
        run._listeners = run._handlers
        return run

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(handlers={list(self._handlers)!r}, "
            f"inheritable_handlers={list(self._inheritable_handlers)!r}, "
            f"parent_run_id={self.parent_run_id!r}, tags={list(self._tags)!r}, "
            f"inheritable_tags={list(self._inheritable_tags)!r}, metadata={self._metadata!r}, "
            f"inheritable_metadata={self._inheritable_metadata!r})"
        )


def _per_prompt(
    serialized: Any, items: Sequence[Any], run_id: uuid.UUID | None
) -> list[tuple[tuple[Any, ...], uuid.UUID | None]]:
    """One start per prompt or message list, each seeing a list of one; ``run_id`` names the
    first only (R2)."""
    return [((serialized, [item]), run_id if i == 0 else None) for i, item in enumerate(items)]


class CallbackManager(_Manager):
    """The handlers, tags and metadata for the next run, split into current and inheritable.

    ``handlers``, ``tags`` and ``metadata`` are what the run started by this manager uses;
    ``inheritable_handlers``, ``inheritable_tags`` and ``inheritable_metadata`` are what that
    run's children get (S1-S4). Inheritable values are always also current. Handler and tag
    lists are ordered sets: a handler (by identity, S6) or tag (S7) is kept once, at its first
    place. Metadata merges key by key, the last writer winning (S8). The fields are lists and
    dicts, as LangChain's (S12): change them through `add_handler`, `set_handlers`, `add_tags`,
    `add_metadata` and their ``remove_`` twins, or in place; a run started from the manager
    takes each handler and tag once. A run that has started keeps the values it started with.

    ``on_chain_start``, ``on_tool_start``, ``on_retriever_start`` fire a start event and return
    the `RunManager` of the new run; ``on_llm_start`` and ``on_chat_model_start`` start one run
    per prompt and return a list (R2). If a ``raise_error`` handler fails on the start event,
    the run is closed with an error event and the failure propagates (D3).
    """

    __slots__ = ()

    def _start(
        self, run_type: str, args: tuple[Any, ...], run_id: uuid.UUID | None, kwargs: dict[str, Any]
    ) -> RunManager:
        """Start a run of ``run_type``: its start event (`_START`: a dict is faster to read
        than the `Event` class) goes to the manager's handlers, if any (D7)."""
        run = RunManager._new(self, run_type, run_id)
        if self._handlers:
            run._open(_START[run_type], args, kwargs)
        return run

    def on_chain_start(
        self, serialized: Any, inputs: Any, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> RunManager:
        """Start a chain run: fire ``on_chain_start`` and return its `RunManager`."""
        return self._start("chain", (serialized, inputs), run_id, kwargs)

    def on_tool_start(
        self, serialized: Any, input_str: str, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> RunManager:
        """Start a tool run (``inputs=`` the dict input, if any): fire ``on_tool_start``."""
        return self._start("tool", (serialized, input_str), run_id, kwargs)

    def on_retriever_start(
        self, serialized: Any, query: str, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> RunManager:
        """Start a retriever run: fire ``on_retriever_start`` and return its `RunManager`."""
        return self._start("retriever", (serialized, query), run_id, kwargs)

    def on_llm_start(
        self, serialized: Any, prompts: Sequence[str], run_id: uuid.UUID | None = None, **kw: Any
    ) -> list[RunManager]:
        """Start one LLM run per prompt (R2) and return their `RunManager` s."""
        items = _per_prompt(serialized, prompts, run_id)
        return [self._start("llm", args, rid, kw) for args, rid in items]

    def on_chat_model_start(
        self,
        serialized: Any,
        messages: Sequence[Sequence[BaseMessage]],
        run_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> list[RunManager]:
        """Start one chat-model run per message list (R2) and return their `RunManager` s."""
        items = _per_prompt(serialized, messages, run_id)
        return [self._start("chat_model", args, rid, kw) for args, rid in items]

    def on_custom_event(
        self, name: str, data: Any, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> None:
        """Fire ``on_custom_event(name, data)`` to this manager's handlers, as an event of run
        ``run_id`` (a new id if None) with the manager's tags and metadata: the manager-level
        form of `dispatch_custom_event`. Any other keyword: `ValueError` (put it in ``data``)."""
        run = RunManager._new(self, "chain", run_id)
        self._custom(run, name, kwargs)._fire(Event.CUSTOM_EVENT, (name, data), _NO_EXTRA)


class AsyncCallbackManager(_Manager):
    """`CallbackManager` whose start methods are coroutines returning `AsyncRunManager` s.

    Same fields, same rules; events are dispatched under the event loop (D5).
    """

    __slots__ = ()

    async def _start(
        self, run_type: str, args: tuple[Any, ...], run_id: uuid.UUID | None, kwargs: dict[str, Any]
    ) -> AsyncRunManager:
        run = AsyncRunManager._new(self, run_type, run_id)
        if self._handlers:
            await run._aopen(_START[run_type], args, kwargs)
        return run

    async def on_chain_start(
        self, serialized: Any, inputs: Any, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> AsyncRunManager:
        """`CallbackManager.on_chain_start`, awaitable."""
        return await self._start("chain", (serialized, inputs), run_id, kwargs)

    async def on_tool_start(
        self, serialized: Any, input_str: str, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> AsyncRunManager:
        """`CallbackManager.on_tool_start`, awaitable."""
        return await self._start("tool", (serialized, input_str), run_id, kwargs)

    async def on_retriever_start(
        self, serialized: Any, query: str, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> AsyncRunManager:
        """`CallbackManager.on_retriever_start`, awaitable."""
        return await self._start("retriever", (serialized, query), run_id, kwargs)

    async def on_llm_start(
        self, serialized: Any, prompts: Sequence[str], run_id: uuid.UUID | None = None, **kw: Any
    ) -> list[AsyncRunManager]:
        """`CallbackManager.on_llm_start`, awaitable: every handler gets every start (no
        dropping of non-inline handlers, unlike langchain_core's)."""
        items = _per_prompt(serialized, prompts, run_id)
        return [await self._start("llm", args, rid, kw) for args, rid in items]

    async def on_chat_model_start(
        self,
        serialized: Any,
        messages: Sequence[Sequence[BaseMessage]],
        run_id: uuid.UUID | None = None,
        **kw: Any,
    ) -> list[AsyncRunManager]:
        """`CallbackManager.on_chat_model_start`, awaitable."""
        items = _per_prompt(serialized, messages, run_id)
        return [await self._start("chat_model", args, rid, kw) for args, rid in items]

    async def on_custom_event(
        self, name: str, data: Any, run_id: uuid.UUID | None = None, **kwargs: Any
    ) -> None:
        """`CallbackManager.on_custom_event`, awaitable."""
        run = AsyncRunManager._new(self, "chain", run_id)
        self._custom(run, name, kwargs)
        await run._afire(Event.CUSTOM_EVENT, (name, data), _NO_EXTRA)


# Run ids (R6) are random version-4 UUIDs, as `uuid.uuid4` makes, at a fifth of its cost: 128
# bits from a private generator (seeded from `os.urandom`, reseeded in a forked child, and out
# of reach of `random.seed`), stamped with the version and variant bits, put straight into the
# UUID's slots. Where `uuid.UUID` lacks those slots, `uuid.uuid4` itself is used.
_RANDOM: Final = random.Random()
if hasattr(os, "register_at_fork"):  # pragma: no branch (no fork to guard on Windows)
    os.register_at_fork(after_in_child=_RANDOM.seed)
_V4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET: Final = (0x4000 << 64) | (0x8000 << 48)


_UNKNOWN: Final = uuid.SafeUUID.unknown  # an enum member: slow to look up on each call
_SLOTS: Final = {"int", "is_safe"} <= set(getattr(uuid.UUID, "__slots__", ()))
# `uuid.UUID` refuses plain assignment: its slots are set through their own descriptors,
# looked up once here (a third of the cost of ``object.__setattr__`` by name).
_SET_INT: Final = vars(uuid.UUID)["int"].__set__ if _SLOTS else None
_SET_SAFE: Final = vars(uuid.UUID)["is_safe"].__set__ if _SLOTS else None
_GETRANDBITS: Final = _RANDOM.getrandbits
_BLANK_UUID: Final = functools.partial(object.__new__, uuid.UUID)  # slots unset: set them next


def _uuid4() -> uuid.UUID:
    """A random UUID of version 4 and the RFC 4122 variant, like `uuid.uuid4`'s."""
    run_id = _BLANK_UUID()
    _SET_INT(run_id, _GETRANDBITS(128) & _V4_CLEAR | _V4_SET)  # type: ignore[misc]
    _SET_SAFE(run_id, _UNKNOWN)  # type: ignore[misc]
    return run_id


_ID_FACTORY: contextvars.ContextVar[Callable[[], uuid.UUID]] = contextvars.ContextVar(
    "callbacks_run_id_factory", default=_uuid4 if _SLOTS else uuid.uuid4
)


_DONE: Final = ()  # `_Run._end` once every listener has heard the run's closing event
# Per event and run family: whether the event does not apply to such a run (D3), and a run's
# ``_methods`` when nobody listens (D7): no methods for each event that applies to it.
_FAMILIES: Final = ("chain", "llm", "tool", "retriever")
_WRONG_RUN: Final = {e: {f: e.run_type not in (f, "any") for f in _FAMILIES} for e in Event}
_UNHEARD: Final = {f: [None if _WRONG_RUN[e][f] else () for e in Event] for f in _FAMILIES}


class _Run(_Scope):
    """The state and checks shared by `RunManager` and `AsyncRunManager`.

    How far a run has got (D3) is in two fields, each set where the delivery it describes
    happens, so that an interrupt at any point leaves them truthful: ``_listeners`` are the
    handlers its start event reached (its later events go to them alone), and ``_end`` is None
    while it is open, then its one closing event (``(handlers yet to hear it, event, args,
    keywords)``), then `_DONE`. A run whose closing event could not reach every listener is
    handed to its parent run (``_orphans``): case 4 of the story told in Dispatch.
    """

    __slots__ = (
        "_end",
        "_family",
        "_kw",
        "_listeners",
        "_methods",
        "_orphans",
        "_run_id",
        "_usual",
        "run_type",
    )

    run_type: str
    _run_id: uuid.UUID | None
    _listeners: Sequence[Any]
    _end: tuple[Any, ...] | None
    _orphans: list[_Run] | None
    _methods: list[Any] | None  # per event, the listeners' methods once resolved (`_dispatch`)
    _family: str  # the run type its events are checked against: "llm" for a chat run too
    _kw: dict[str, Any] | None  # the keywords of its non-start events, made once (D7: lazily)
    _usual: tuple[uuid.UUID, uuid.UUID | None, list[str]]  # the same, as `_dispatch` passes them
    _child_class: ClassVar[type[_Manager]]

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is made by a manager's on_*_start, not directly")

    @classmethod
    def _new(cls, manager: _Manager | _Run, run_type: str, run_id: uuid.UUID | None) -> Self:
        """A run started by ``manager``; from a run, a child of it with its inheritable values
        (the manager ``get_child()`` would give, without making it)."""
        if run_id is not None and not isinstance(run_id, uuid.UUID):  # before any event
            raise TypeError(f"run_id must be a uuid.UUID or None, got {_brief(run_id)}")
        self = object.__new__(cls)
        if manager._owned:
            self._take(manager, inheritable_only=isinstance(manager, _Run))
            self._parent = manager if isinstance(manager, _Run) else manager._parent
        elif isinstance(manager, _Run):  # `_take`, inlined: this is made for every run
            self._handlers = self._inheritable_handlers = manager._inheritable_handlers
            self._tags = self._inheritable_tags = manager._inheritable_tags
            self._metadata = self._inheritable_metadata = manager._inheritable_metadata
            self._owned, self._parent = False, manager
        else:
            self._handlers = manager._handlers
            self._inheritable_handlers = manager._inheritable_handlers
            self._tags = manager._tags
            self._inheritable_tags = manager._inheritable_tags
            self._metadata = manager._metadata
            self._inheritable_metadata = manager._inheritable_metadata
            self._owned, self._parent = False, manager._parent
        self.run_type = run_type
        self._family = _FAMILY[run_type]
        self._run_id = run_id
        self._listeners = ()
        self._end = self._orphans = self._methods = self._kw = None
        return self

    @classmethod
    def get_noop_manager(cls, run_type: str = "chain") -> Self:
        """A started root run of ``run_type`` that nobody listens to: for calling code that
        wants a run manager where no run is observed. Its events go nowhere; it still ends
        once (D3). (LangChain's takes no argument: its run managers have a class per type.)"""
        if run_type not in _START:
            raise ValueError(f"run_type must be one of {sorted(_START)}, got {_brief(run_type)}")
        return cls._new(_EMPTY, run_type, None)

    @property
    def run_id(self) -> uuid.UUID:
        """This run's id, made on first use (R6, D7)."""
        run_id = self._run_id
        if run_id is None:
            run_id = self._run_id = _ID_FACTORY.get()()
        return run_id

    @property
    def parent_run_id(self) -> uuid.UUID | None:
        """The parent run's id, or None for a root run."""
        parent = self._parent
        return parent.run_id if isinstance(parent, _Run) else parent

    def get_child(self, tag: str | None = None) -> _Manager:
        """The manager for a child run: this run's inheritable values, this run as parent (S4).

        ``tag`` (such as ``"seq:step:2"``) is added for that child alone and is not inherited
        further. LLM and chat runs are leaves (R2): `TypeError`. The manager is the caller's
        own: changing its fields changes no other manager or run (D8).
        """
        return self._child(tag, self._child_class)

    def _child(self, tag: str | None, cls: type[_M]) -> _M:
        if self._family == "llm":
            raise TypeError(f"a {self.run_type} run is a leaf and has no child runs")
        child = cls._make(self, self)
        if tag is not None and tag not in child._tags:
            if not isinstance(tag, str):
                raise TypeError(f"tag must be a string or None, got {_brief(tag)}")
            child._tags = (*child._tags, tag)
        return child

    def _kwargs(self, event: Event, extra: dict[str, Any]) -> dict[str, Any]:
        """The keywords handlers get with ``event``: those of the event's kind, then ``extra``.

        Those of the events that are neither start nor custom events (``run_id``,
        ``parent_run_id``, ``tags``) are made once per run and handed to every such event.
        """
        kw = self._kw
        if kw is None:
            self._usual = rid, pid, tags = self.run_id, self.parent_run_id, list(self._tags)
            kw = self._kw = {"run_id": rid, "parent_run_id": pid, "tags": tags}
        keywords = event.keywords
        if keywords is _OTHER_KEYWORDS:
            return {**kw, **extra} if extra else kw
        if keywords is _START_KEYWORDS:
            start = kw.copy()
            start["metadata"] = self._metadata.copy()
            if extra:
                start.update(extra)
            return start
        return {
            "run_id": kw["run_id"],
            "tags": kw["tags"],
            "metadata": dict(self._metadata),
            **extra,
        }

    def _over(self, event: Event) -> bool:
        """Whether ``event`` comes after the run's end: anything once its closing event was
        chosen, except that same closing event again at a root whose delivery was cut short."""
        return self._end is _DONE or not event.closes or isinstance(self._parent, _Run)

    def _refuse(self, event: Event) -> NoReturn:
        """Refuse an event of another run type, or one after the end (D3)."""
        if _WRONG_RUN[event][self._family]:
            raise TypeError(f"{event.method} does not apply to a {self.run_type} run")
        raise RuntimeError(f"{event.method} after the end of {self.run_type} run {self.run_id}")

    def _fire(self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        """Fire ``event``, not a start event, for this run: what every event method of a
        `RunManager` does (`_RUN_EVENT`), and what the runnables do. It reaches the handlers
        that heard the start; an end or error event closes the run (`_finish`). When an
        interrupt cut the delivery of a root run's closing event short, an end or error event
        once more finishes that delivery: the same event, to the handlers that had not heard
        it. (A child's is delivered by its parent, `_cut_short`: the child refuses it.)"""
        if (self._end is not None and self._over(event)) or _WRONG_RUN[event][self._family]:
            self._refuse(event)
        if event.closes:  # (an open run's goes straight to `_finish`, or nowhere: D7)
            self._finish(event, args, extra)
        elif self._listeners:
            try:
                _dispatch(self, self._listeners, event, args, self._kwargs(event, extra))
            except _Undelivered as undelivered:  # too deep to go on: the real error (R1)
                raise undelivered.error from None
        else:  # nobody listens, nor ever will: the next notes return at once (D7)
            self._methods = _UNHEARD[self._family]

    def _open(self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        """Fire the start event; if that raises, close the run with an error and re-raise (D3)."""
        try:
            _dispatch(self, self._handlers, event, args, self._kwargs(event, extra))
        except BaseException as error:
            self._fail(self._heard(error))
            if isinstance(error, _Undelivered):
                raise error.error from None
            raise

    def _fail(self, error: BaseException) -> None:
        """Close the run with ``error`` (R1), unless it was closed: what a runnable does when
        anything went wrong. An interrupt meanwhile is held until everyone heard the error (case
        3); a handler's failure leaves as from `_finish`, unless an interrupt outranks it (D2)."""
        held: BaseException | None = None
        while self._end is not _DONE and (self._listeners or self._orphans):
            try:
                self._finish(_ERROR[self._family], (error,), _NO_EXTRA)
            except BaseException as again:
                if self._end is not _DONE and not isinstance(again, Exception):
                    held = held or again  # an interrupt: go on closing
                    continue
                if held is None:  # a handler's failure, delivered (or too deep to deliver)
                    raise
                raise held from held.__cause__  # an interrupt outranks it (D2)
        if held is not None:
            raise held

    def _fail_again(self) -> None:
        """`_fail` with the exception on its way out of a call: for the one point of a call's
        error path where an interrupt cannot be held, the entry of `_fail` (D3)."""
        self._fail(sys.exc_info()[1] or RuntimeError("the run was left open"))

    def _closing(
        self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]
    ) -> tuple[Any, ...]:
        """Choose the run's one closing event, for `_finish` and `_afinish` alike: kept in
        ``_end`` from here on, so that a delivery cut short is finished, never replaced (D3)."""
        listeners, kw = self._listeners, None if extra else self._kw
        kw = (kw or self._kwargs(event, extra)) if listeners else {}  # D7: nobody, no id
        self._end = (listeners, event, args, kw)
        return self._end

    def _finish(self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        """Deliver the run's closing event: ``event``, or the one chosen before if its delivery
        was cut short; first the closing events of children left open (D3)."""
        target: _Run = self
        try:
            end = self._end
            if end is None:  # from here on, the run's one closing event (D3)
                end = self._closing(event, args, extra)
            while self._orphans:
                if (target := self._orphans[0])._end:
                    _dispatch(target, *target._end)
                del self._orphans[0]
            target = self
            _dispatch(self, end[0], end[1], end[2], end[3])
        except BaseException as error:
            self._cut_short(target, error)
            if isinstance(error, _Undelivered):
                raise error.error from None
            raise

    def _cut_short(self, target: _Run, error: BaseException) -> None:
        """Delivering the closing event of ``target`` (an orphan of this run, or this run) was
        cut short by ``error``. Unless everyone heard this run's own, the handlers that did not
        (`_Undelivered` says which) hear it from the parent run: after the orphans left, before
        the parent's own event (D3). At the root, the next attempt here is the last."""
        if isinstance(error, _Undelivered):
            target._end = (error.remaining, *target._end[1:])  # type: ignore[index]
        parent = self._parent
        if self._end is not _DONE and isinstance(parent, _Run):
            known = parent._orphans or []
            if not any(run is self for run in known):
                parent._orphans = [*known, *(self._orphans or []), self]
                self._orphans = None

    def _heard(self, error: BaseException) -> BaseException:
        """After a failed start: the listeners are those the start reached (D3)."""
        if isinstance(error, _Undelivered):
            self._listeners = tuple(
                h for h in self._listeners if not any(h is r for r in error.remaining)
            )
            return error.error
        return error

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.run_type} run_id={self._run_id}>"


_M = TypeVar("_M", bound=_Manager)
_R = TypeVar("_R", bound=_Run)


@final
class RunManager(_Run):
    """One started run: fires its events and builds its children's managers.

    Besides the fields of the `CallbackManager` it came from, it has ``run_id`` (made the first
    time it is read, so an unobserved run costs no id, D7), ``parent_run_id`` and ``run_type``.
    Its event methods are those of the `Event` table that are not start events: ``on_chain_end``,
    ``on_llm_new_token``, ``on_tool_error``, ``on_text``... Each dispatches to ``handlers`` (D1,
    D2), with ``run_id``, ``parent_run_id`` and ``tags``. An event of another run type
    (``on_tool_end`` on a chain run) is a `TypeError`; any event after the run's end or error
    event is a `RuntimeError`: a run ends exactly once (D3).
    """

    __slots__ = ()
    _child_class = CallbackManager

    if TYPE_CHECKING:  # installed from the `Event` table at import; a test holds the two together

        def get_child(self, tag: str | None = None) -> CallbackManager: ...
        def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None: ...
        def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None: ...
        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None: ...
        def on_chain_end(self, outputs: Any, **kwargs: Any) -> None: ...
        def on_chain_error(self, error: BaseException, **kwargs: Any) -> None: ...
        def on_tool_end(self, output: Any, **kwargs: Any) -> None: ...
        def on_tool_error(self, error: BaseException, **kwargs: Any) -> None: ...
        def on_retriever_end(self, documents: Sequence[Document], **kwargs: Any) -> None: ...
        def on_retriever_error(self, error: BaseException, **kwargs: Any) -> None: ...
        def on_text(self, text: str, **kwargs: Any) -> None: ...
        def on_agent_action(self, action: Any, **kwargs: Any) -> None: ...
        def on_agent_finish(self, finish: Any, **kwargs: Any) -> None: ...
        def on_retry(self, retry_state: Any, **kwargs: Any) -> None: ...
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None: ...


@final
class AsyncRunManager(_Run):
    """`RunManager` whose event methods are coroutines (D5); ``get_child`` gives an
    `AsyncCallbackManager`."""

    __slots__ = ()
    _child_class = AsyncCallbackManager

    if TYPE_CHECKING:  # as in `RunManager`, each a coroutine

        def get_child(self, tag: str | None = None) -> AsyncCallbackManager: ...
        async def on_llm_new_token(
            self, token: str, *, chunk: Any = None, **kwargs: Any
        ) -> None: ...
        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None: ...
        async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None: ...
        async def on_chain_end(self, outputs: Any, **kwargs: Any) -> None: ...
        async def on_chain_error(self, error: BaseException, **kwargs: Any) -> None: ...
        async def on_tool_end(self, output: Any, **kwargs: Any) -> None: ...
        async def on_tool_error(self, error: BaseException, **kwargs: Any) -> None: ...
        async def on_retriever_end(self, documents: Sequence[Document], **kwargs: Any) -> None: ...
        async def on_retriever_error(self, error: BaseException, **kwargs: Any) -> None: ...
        async def on_text(self, text: str, **kwargs: Any) -> None: ...
        async def on_agent_action(self, action: Any, **kwargs: Any) -> None: ...
        async def on_agent_finish(self, finish: Any, **kwargs: Any) -> None: ...
        async def on_retry(self, retry_state: Any, **kwargs: Any) -> None: ...
        async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None: ...

    def get_sync(self) -> RunManager:
        """This run as a `RunManager`, for the sync code it calls (as LangChain's async models
        and tools hand theirs to the sync ``_generate`` or ``_run``): the same ``run_id``,
        parent, handlers, tags and metadata; its events reach the handlers that heard the
        start, dispatched as under ``invoke`` (D6), and its children continue the tree.

        It is a second manager of one run, as in LangChain: each keeps D3 for itself, so end
        the run through one of them only (through both, handlers would hear two ends)."""
        run, unset = RunManager.__new__(RunManager), object()
        for name in (*_Scope.__slots__, *_Run.__slots__):
            value = getattr(self, name, unset)  # (a slot made lazily may be unset yet)
            if value is not unset:
                setattr(run, name, value)
        run._orphans = run._methods = None  # its own, made as needed
        return run

    async def _afire(self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        """`_Run._fire` under asyncio: every event method of an `AsyncRunManager`."""
        if (self._end is not None and self._over(event)) or _WRONG_RUN[event][self._family]:
            self._refuse(event)
        if not event.closes:
            if self._listeners:
                try:
                    await _adispatch(self, self._listeners, event, args, self._kwargs(event, extra))
                except _Undelivered as undelivered:  # as in `_Run._fire`
                    raise undelivered.error from None
        else:
            await self._afinish(event, args, extra)

    async def _aopen(self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        try:
            await _adispatch(self, self._handlers, event, args, self._kwargs(event, extra))
        except BaseException as error:
            await self._afail(self._heard(error))
            if isinstance(error, _Undelivered):
                raise error.error from None
            raise

    async def _afail(self, error: BaseException) -> None:
        """`_Run._fail` under asyncio: a cancellation meanwhile is held alike."""
        held: BaseException | None = None
        while self._end is not _DONE and (self._listeners or self._orphans):
            try:
                await self._afinish(_ERROR[self._family], (error,), _NO_EXTRA)
            except BaseException as again:
                if self._end is not _DONE and not isinstance(again, Exception):
                    held = held or again
                    continue
                if held is None:
                    raise
                raise held from held.__cause__
        if held is not None:
            raise held

    async def _afail_again(self) -> None:
        await self._afail(sys.exc_info()[1] or RuntimeError("the run was left open"))

    async def _afinish(self, event: Event, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
        target: _Run = self
        try:
            end = self._end
            if end is None:  # from here on, the run's one closing event (D3)
                end = self._closing(event, args, extra)
            while self._orphans:
                if (target := self._orphans[0])._end:
                    await _adispatch(target, *target._end)
                del self._orphans[0]
            target = self
            await _adispatch(self, end[0], end[1], end[2], end[3])
        except BaseException as error:
            self._cut_short(target, error)
            if isinstance(error, _Undelivered):
                raise error.error from None
            raise


# Each event method of a run manager is made from these templates, with the event's own
# payload parameters: ``on_text(self, text, **kwargs)``. It fires through `_Run._fire`, where
# every decision is made (D1-D3). An event that a run may fire many times with the usual
# keywords (a token, a note) has a fast path as well, in the method's own frame: once the run
# is open and `_dispatch` has resolved its listeners' methods (``_methods``), it calls them in
# turn, with the run's keywords made once (D7), and hands over to `_dispatch` at the first
# thing out of the ordinary: a failure, a returned awaitable, an interrupt, saying how far it
# got: the line that calls a handler also notes it was called (case 1 of the story in Dispatch).
# An end or error event of an open run has a fast path too: with no extra keywords and no
# children left to close, it is kept as the run's end and delivered by `_dispatch` from the
# method's own frame, as `_Run._finish` would (two frames fewer on every run a handler
# hears); otherwise it goes to `_Run._finish`, or nowhere when nobody listens (D7).
_RUN_EVENT: Final = """\
def {method}(self, {payload}, {params}**kwargs):
    return self._fire(event, ({payload},), {extra})
"""
_RUN_EVENT_FAST: Final = """\
def {method}(self, {payload}, {params}**kwargs):
    resolved = self._methods
    if resolved is None or kwargs or self._end is not None or (methods := resolved[{index}]) is None:
        return self._fire(event, ({payload},), {extra})
    if not methods:
        return None
    rid, pid, tags = self._usual
    i, called, result, outcome = 0, None, _UNCALLED, None
    while True:
        try:
            if outcome is None:
                try:
                    for method in methods:
                        if method is not None:
                            result = (called := method)({payload}, run_id=rid, parent_run_id=pid, tags=tags{more})
                            if result is not None:
                                break
                        i, called, result = i + 1, None, _UNCALLED
                    else:
                        return None
                    outcome = [i, called, result, None]
                except BaseException as error:
                    outcome = [i, called, result, error]
            return _dispatch(self, self._listeners, event, ({payload},), {keywords}, outcome)
        except BaseException as late:  # `_dispatch` empties ``outcome`` once it took over
            if isinstance(late, _Undelivered):  # too deep to go on: the real error (R1)
                raise late.error from None
            if outcome == [] or isinstance(late, Exception):
                raise  # what `_dispatch` raised, or no stack left to call it
            if outcome is None:  # came while the handler's outcome was being noted
                outcome = [i, called, result, late]
            elif outcome[3] is None or isinstance(outcome[3], Exception):
                outcome[3] = late  # an interrupt outranks a failure (D2)
"""
_RUN_EVENT_CLOSE: Final = """\
def {method}(self, {payload}, **kwargs):
    if self._end is not None or self._family != event.run_type:
        return self._fire(event, ({payload},), kwargs)  # refused, or finishing a delivery
    listeners = self._listeners
    if kwargs or self._orphans or not listeners:
        if listeners or self._orphans:
            return self._finish(event, ({payload},), kwargs)
        self._end = _DONE  # nobody to tell (D7)
        return None
    try:  # the usual close, as `_Run._finish` makes it: kept as the run's end, then delivered
        self._end = end = (listeners, event, ({payload},), self._kw)
        return _dispatch(self, listeners, event, end[2], end[3])
    except BaseException as error:
        self._cut_short(self, error)
        if isinstance(error, _Undelivered):  # too deep to go on: the real error (R1)
            raise error.error from None
        raise
"""
_ARUN_EVENT: Final = """\
async def {method}(self, {payload}, {params}**kwargs):
    return await self._afire(event, ({payload},), {extra})
"""


def _line_of(text: str) -> int:
    """The line of this file where ``text`` starts (1 if the source cannot be read): the code
    made from a template points there, so that a traceback through it shows its lines."""
    source = "".join(linecache.getlines(__file__))
    return source.count("\n", 0, source.find(text)) + 1 if text in source else 1


def _run_manager_method(event: Event, is_async: bool) -> Callable[..., Any]:
    """The run managers' method for ``event``, from its template."""
    fast = event.dispatch[4] and event.dispatch[6]  # usual keywords, and fired many times
    template = _RUN_EVENT_FAST if fast else _RUN_EVENT_CLOSE if event.closes else _RUN_EVENT
    template = _ARUN_EVENT if is_async else template
    # A keyword payload (``chunk``) is a parameter, passed on even when None, as LangChain does.
    names = event.keyword_payload
    given = "".join(f"{name!r}: {name}, " for name in names)  # "'chunk': chunk, "
    code = template.format(
        method=event.method,
        payload=", ".join(event.payload),
        index=event.index,
        params=f"*, {'=None, '.join(names)}=None, " if names else "",
        extra="{" + given + "**kwargs}" if names else "kwargs",
        more="".join(f", {name}={name}" for name in names),
        keywords="{**self._kw, " + given + "}" if names else "self._kw",
    )
    # Inside a factory, so that the method closes over ``event``; its globals are this module's.
    tree = ast.parse(f"def make(event):\n{textwrap.indent(code, '    ')}    return {event.method}")
    ast.increment_lineno(tree, _line_of(template) - 2)  # its first line: the factory's second
    factory: dict[str, Any] = {}
    exec(compile(tree, __file__, "exec"), globals(), factory)
    method: Callable[..., Any] = factory["make"](event)
    method.__qualname__ = f"{'Async' if is_async else ''}RunManager.{event.method}"
    method.__doc__ = f"Fire {event.method} for this run (phase {event.phase})."
    return method


# =================================================================================================
# Runnables (R0-R6) and implicit propagation (S9-S11)
# =================================================================================================

# The run whose body is executing in this context, so that a runnable invoked inside it without
# a config becomes its child (S10). Set only while a body runs, never across a ``yield``, and
# reset afterwards: the caller's context is left as it was (S11).
_CURRENT_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "callbacks_current_run", default=None
)
# The enclosing call's ``max_concurrency``, inherited by nested batches and parallels.
_MAX_CONCURRENCY: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "callbacks_max_concurrency", default=None
)


class RunnableConfig(TypedDict, total=False):
    """The per-call config accepted by ``invoke``, ``batch``, ``stream`` and ``with_config``:
    langchain_core 1.7's keys (R8). ``recursion_limit`` and ``configurable`` are checked and
    ignored. ``callbacks`` may be a manager of langchain_core's, whose tree the call continues."""

    callbacks: Any  # a list of handlers, a manager, or another implementation's manager (R8)
    tags: Sequence[str]
    metadata: Mapping[str, Any]
    run_name: str
    run_id: uuid.UUID
    max_concurrency: int
    recursion_limit: int
    configurable: Mapping[str, Any]


class _Options(TypedDict, total=False):
    """The constructor keywords every runnable takes (see `Runnable`)."""

    name: str | None
    callbacks: Sequence[Any] | None
    tags: Sequence[str] | None
    metadata: Mapping[str, Any] | None


def _expect(kind: type, what: str) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"config[{key!r}] must be {what}, got {_brief(value)}")
        return value

    return check


def _check_positive(key: str, value: Any) -> int:
    _expect(int, "a positive int")(key, value)
    if value < 1:
        raise ValueError(f"config[{key!r}] must be a positive int, got {_brief(value)}")
    return int(value)


def _check_run_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"config[{key!r}] must be a non-empty string, got {_brief(value)}")
    return value


# A manager of another implementation is recognised by its fields (R8): langchain_core's, given
# as ``callbacks`` by a LangChain runnable calling a toy with its own config, continues its tree.
_MANAGER_FIELDS: Final = (
    "handlers",
    "inheritable_handlers",
    "parent_run_id",
    "tags",
    "inheritable_tags",
    "metadata",
    "inheritable_metadata",
)


def _foreign_manager(value: object) -> CallbackManager | None:
    """``value`` as a manager of this module's, if it is another's (anything but a list or a
    tuple that has a manager's seven fields), its values checked as the constructor checks
    them; None for anything else, this module's own managers included."""
    if isinstance(value, (_Manager, list, tuple)):
        return None
    if not all(hasattr(value, name) for name in _MANAGER_FIELDS):
        return None
    manager: Any = value
    return CallbackManager(
        manager.handlers,
        manager.inheritable_handlers,
        manager.parent_run_id,
        tags=manager.tags,
        inheritable_tags=manager.inheritable_tags,
        metadata=manager.metadata,
        inheritable_metadata=manager.inheritable_metadata,
    )


def _check_callbacks(key: str, value: Any) -> Any:
    if isinstance(value, _Manager):
        return value
    return _foreign_manager(value) or _check_handlers(value, f"config[{key!r}]")


def _check_configurable(key: str, value: Any) -> dict[str, Any]:
    return _check_metadata(value, f"config[{key!r}]")


_CONFIG_KEYS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "callbacks": _check_callbacks,
    "tags": lambda key, value: _check_tags(value, f"config[{key!r}]"),
    "metadata": lambda key, value: _check_metadata(value, f"config[{key!r}]"),
    "run_name": _check_run_name,
    "run_id": _expect(uuid.UUID, "a uuid.UUID"),
    "max_concurrency": _check_positive,
    # langchain_core's other keys (R8), checked and then ignored: the toys have no
    # configurable fields and no recursion of their own to limit
    "recursion_limit": _check_positive,
    "configurable": _check_configurable,
}
_NO_CONFIG: Final[dict[str, Any]] = {}


def _check_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a config: `TypeError` for an unknown key or a value of the wrong type.

    A key whose value is None counts as absent.
    """
    if config is None:
        return _NO_CONFIG
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {_brief(config)}")
    checked: dict[str, Any] = {}
    for key, value in config.items():
        check = _CONFIG_KEYS.get(key)
        if check is None:
            raise TypeError(
                f"unknown config key {_brief(key)}; valid keys are: "
                + ", ".join(sorted(_CONFIG_KEYS))
            )
        if value is not None:
            checked[key] = check(key, value)
    return checked


def _merge_configs(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """``second`` over ``first``: handlers and tags as ordered sets, metadata key by key (S9)."""
    merged = {**first, **second}
    for key, identity in (("callbacks", True), ("tags", False)):
        if key in first and key in second:
            merged[key] = _add_unique(first[key], second[key], by_identity=identity)
    if "metadata" in first and "metadata" in second:
        merged["metadata"] = {**first["metadata"], **second["metadata"]}
    return merged


def _collect(
    outcomes: Iterable[tuple[Any, BaseException | None]], return_exceptions: bool
) -> list[Any]:
    """Outputs in item order; the first failure is raised, unless ``return_exceptions`` puts
    `Exception` instances in place (an interrupt is raised all the same)."""
    results: list[Any] = []
    for output, failure in outcomes:
        if failure is None:
            results.append(output)
        elif return_exceptions and isinstance(failure, Exception):
            results.append(failure)
        else:
            raise failure
    return results


def _map_in_threads(
    func: Callable[[Any], Any], items: Sequence[Any], limit: int | None, return_exceptions: bool
) -> list[Any]:
    """``[func(item) for item in items]`` in a thread pool of at most ``limit`` workers.

    Each call runs in a copy of the caller's context (S11), so runs started there are children
    of the caller's run. Every call finishes before the results are collected (`_collect`).
    An interrupt (Ctrl-C) while they run cancels the calls not started yet, which have no run
    to close; the ones running finish, and close their runs (D3), before it is raised.
    """
    if len(items) <= 1:  # no thread for a single item
        return _collect([_attempt(func, item) for item in items], return_exceptions)
    with ThreadPoolExecutor(max_workers=min(len(items), limit or 32)) as pool:
        futures: list[concurrent.futures.Future[Any]] = []
        try:
            # A loop, not a comprehension: CPython 3.12 and 3.13 inline comprehensions, and an
            # exception a trace function raises at one of their lines (as the tests' interrupts
            # are) leaves the ``with`` without calling __exit__, so without waiting for the pool.
            for item in items:
                futures.append(pool.submit(contextvars.copy_context().run, _attempt, func, item))
            wait(futures)
        except BaseException:  # submitting or waiting: what has not started will not
            for future in futures:
                future.cancel()
            raise  # once the pool, on leaving this block, has waited for the running ones
    return _collect([f.result() for f in futures], return_exceptions)


async def _agather(
    calls: Sequence[Callable[[], Awaitable[Any]]], limit: int | None, return_exceptions: bool
) -> list[Any]:
    """`_map_in_threads` for coroutines: each call a task (a copy of the context), at most
    ``limit`` running at once, in order when ``limit`` is 1.

    Every task finishes before the results are collected. A task cancelled from elsewhere
    before its call began (while waiting for its turn, say) counts as that call raising the
    cancellation.
    """
    semaphore = asyncio.Semaphore(limit) if limit else None

    async def call(make: Callable[[], Awaitable[Any]]) -> tuple[Any, BaseException | None]:
        # an interrupt must not escape its task and stop the loop: it is an outcome
        if semaphore is None:
            return await _outcome(make())
        async with semaphore:
            return await _outcome(make())

    done = await asyncio.gather(*(call(c) for c in calls), return_exceptions=True)
    return _collect([d if isinstance(d, tuple) else (None, d) for d in done], return_exceptions)


def _drain(generator: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def _scope(run: _Run, limit: int | None) -> contextvars.Context:
    """A fresh copy of the context in which ``run`` encloses implicit children (S10) and
    ``limit`` is the inherited ``max_concurrency``. A body called through its ``run`` method
    costs no Python frame of ours, which keeps deep nesting within the recursion limit."""
    context = contextvars.copy_context()
    context.run(_CURRENT_RUN.set, run)
    if limit:
        context.run(_MAX_CONCURRENCY.set, limit)
    return context


# Streaming through a chain (R7). Under ``stream()`` a chain's steps form a pipeline, as in
# LangChain: each step reads the one before it as it streams (`_Upstream`). A step that
# pipelines (`Lambda`, `Chain`, `Parallel`: ``_pipelines``) starts its run as soon as the
# first chunk of its input is there, before the step before it ends; its start event then
# carries LangChain's placeholder input, ``{"input": ""}``, and its end event the whole input
# as ``inputs=``. Any other step (a model, a tool, a retriever) reads its whole input first,
# then starts. A step's whole input is the step before's output (its run's), not a sum of
# chunks. The async twin, `_AUpstream`, reads an async generator, whose output is put in a list.
_NOTHING: Final = object()  # no chunk read ahead yet; no output yet


@final
class _Upstream:
    """The step before, as the next step of a streamed chain reads it (R7).

    `take` gives its next chunk, or `_NOTHING` once it has ended, its output then in ``value``;
    `peek` runs it up to its first chunk and keeps that for `take`; `whole` reads it to its end
    and gives its output. No generator of its own: the step before is closed by its owner.
    """

    __slots__ = ("_chunks", "_first", "value")

    def __init__(self, chunks: Generator[Any, None, Any]) -> None:
        self._chunks, self._first, self.value = chunks, _NOTHING, _NOTHING

    def take(self) -> Any:
        if self._first is not _NOTHING:
            first, self._first = self._first, _NOTHING
            return first
        if self.value is not _NOTHING:
            return _NOTHING
        try:
            return next(self._chunks)
        except StopIteration as stop:
            self.value = stop.value
            return _NOTHING

    def peek(self) -> None:
        if self._first is _NOTHING:
            self._first = self.take()

    def whole(self) -> Any:
        while self.take() is not _NOTHING:
            pass
        return self.value


@final
class _AUpstream:
    """`_Upstream` for ``astream()``: the step before is an async generator that puts its
    output in ``output`` once it has yielded its last chunk."""

    __slots__ = ("_chunks", "_first", "_output")

    def __init__(self, chunks: AsyncGenerator[Any, None], output: list[Any]) -> None:
        self._chunks, self._first, self._output = chunks, _NOTHING, output

    @property
    def value(self) -> Any:
        return self._output[-1] if self._output else _NOTHING

    async def take(self) -> Any:
        if self._first is not _NOTHING:
            first, self._first = self._first, _NOTHING
            return first
        if self._output:
            return _NOTHING
        return await anext(self._chunks, _NOTHING)

    async def peek(self) -> None:
        if self._first is _NOTHING:
            self._first = await self.take()

    async def whole(self) -> Any:
        while await self.take() is not _NOTHING:
            pass
        return self._output[-1]


@final
class _Tee:
    """One upstream read by every branch of a `Parallel`, each at its own pace (R7): a chunk is
    read once, under a lock, and kept for the branches yet to read it; a failure to read one
    is every branch's. The `Parallel` closes the branches' readers. Under ``stream()`` the
    branches are threads (`branch`), under ``astream()`` tasks of one loop (`abranch`): the
    two readers differ only in how they wait and read."""

    __slots__ = ("_chunks", "_failure", "_lock", "_upstream")

    def __init__(self, upstream: _Upstream | _AUpstream) -> None:
        self._upstream, self._chunks = upstream, list[Any]()
        self._failure: BaseException | None = None
        self._lock: Any = threading.Lock() if type(upstream) is _Upstream else asyncio.Lock()

    def _have(self, i: int) -> bool:
        """Whether chunk ``i`` was read already; if it could not be, that failure again."""
        if i == len(self._chunks) and self._failure is not None:
            raise self._failure
        return i < len(self._chunks)

    def branch(self) -> _Upstream:
        return _Upstream(self._read())

    def abranch(self) -> _AUpstream:
        upstream: Any = self._upstream
        return _AUpstream(self._aread(), upstream._output)

    def _read(self) -> Generator[Any, None, Any]:
        upstream: Any = self._upstream
        i = 0
        while True:
            with self._lock:
                if not self._have(i):
                    try:
                        chunk = upstream.take()
                    except BaseException as error:
                        self._failure = error
                        raise
                    if chunk is _NOTHING:
                        return upstream.value
                    self._chunks.append(chunk)
                chunk = self._chunks[i]
            yield chunk
            i += 1

    async def _aread(self) -> AsyncGenerator[Any, None]:
        upstream: Any = self._upstream
        i = 0
        while True:
            async with self._lock:
                if not self._have(i):
                    try:
                        chunk = await upstream.take()
                    except BaseException as error:
                        self._failure = error
                        raise
                    if chunk is _NOTHING:
                        return
                    self._chunks.append(chunk)
                chunk = self._chunks[i]
            yield chunk
            i += 1


def _advance(stream: Generator[Any, None, Any]) -> tuple[Any, bool]:
    """``(next chunk, False)``, or ``(output, True)`` once ``stream`` has ended."""
    try:
        return next(stream), False
    except StopIteration as stop:
        return stop.value, True


def _close_all(
    streams: list[Generator[Any, None, Any]], leaving: BaseException | None = None
) -> None:
    """Close each of ``streams`` in turn, so that the runs each left open close (D3).

    A failure to close one, or an interrupt meanwhile, is held until all are closed, then
    raised if it outranks ``leaving``, the exception the caller's ``finally`` is leaving with
    (`_keep`: an interrupt outranks an ordinary failure, else the first stands). After an
    interrupt the same stream is closed again (closing twice changes nothing, so none is
    skipped); after a failure (an `Exception`: its closing failed), it is left as it is.
    """
    held = leaving
    while streams:
        try:
            while streams:
                while inspect.getgeneratorstate(streams[0]) == "GEN_RUNNING":
                    time.sleep(0.001)  # in a thread an interrupt cut loose from its pool
                streams[0].close()
                del streams[0]
        except BaseException as error:
            held = _keep(held, error)
            if isinstance(error, Exception):
                del streams[0]
    if held is not leaving and held is not None:
        raise held


async def _aclose_all(
    streams: list[AsyncGenerator[Any, None]], leaving: BaseException | None = None
) -> None:
    """`_close_all` for async generators: a cancellation meanwhile is held alike (D3)."""
    held = leaving
    while streams:
        try:
            while streams:
                await streams[0].aclose()
                del streams[0]
        except BaseException as error:
            held = _keep(held, error)
            if isinstance(error, Exception):
                del streams[0]
    if held is not leaving and held is not None:
        raise held


def _leaving(error: BaseException) -> BaseException | None:
    """What a stream body's ``finally`` is leaving with, for `_close_all`: nothing for an early
    close (`GeneratorExit`), where a failure to close what it holds is news."""
    return None if isinstance(error, GeneratorExit) else error


def _add(total: Any, chunk: Any) -> Any:
    """A generator's output so far, with one more chunk: ``total + chunk``, or the chunk where
    they do not add (LangChain's rule)."""
    if total is _NOTHING:
        return chunk
    try:
        return total + chunk
    except TypeError:
        return chunk


class _Step:
    """Hands what a coroutine yielded (a future, or None) up to the task that runs us."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, None]:
        yield self.value


async def _run_in(context: contextvars.Context, coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Await ``coroutine`` with each of its steps run in ``context``, in this very task.

    Unlike a new task with that context, this keeps an interrupt in frames of ours; a
    cancellation is passed on to the coroutine (case 8 of the story in Dispatch).
    """
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                step = context.run(coroutine.send, None)
            else:
                step = context.run(coroutine.throw, error)
        except StopIteration as stop:
            return stop.value
        try:
            await _Step(step)
            error = None
        except BaseException as caught:  # cancellation, or close(): the coroutine decides
            error = caught


class Runnable:
    """A unit of work that runs as one run and fires that run's events.

    ``Runnable(*, name=None, callbacks=None, tags=None, metadata=None)``: the constructor's
    callbacks, tags and metadata are local to this object's runs (S2, S3). Calls:

    - ``invoke(input, config=None)``: one run. It fires the start event, runs, then exactly one
      end event (with the output) or error event (with the exception, which is then re-raised,
      the same object, `BaseException` included) (R1).
    - ``batch(inputs, config=None, *, return_exceptions=False)``: one root run per input in a
      thread pool (R3).
    - ``stream(input, config=None)``: an iterator of output chunks; the run ends when the
      iterator is exhausted or closed (D3).
    - ``ainvoke``, ``abatch``, ``astream``: the same under asyncio, with the same runs, events
      and order; the events go through async dispatch (D5).
    - ``with_config(**config)``: a copy with config bound to it (S9).
    - ``a | b``: a `Chain`.

    Config keys: ``callbacks`` (a list of handlers, or a manager to continue its tree),
    ``tags``, ``metadata``, ``run_name``, ``run_id`` (this run only, R4, R6) and
    ``max_concurrency`` (inherited by nested batches and parallels). An unknown key or a value
    of the wrong type is a `TypeError` naming it.
    """

    _run_type: ClassVar[str] = "chain"
    _leaf: ClassVar[bool] = False  # a leaf's body starts no runs, so it sets no context
    _pipelines: ClassVar[bool] = False  # streamed into, starts at the first chunk (R7)

    def __init__(
        self,
        *,
        name: str | None = None,
        callbacks: Sequence[Any] | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty string or None, got {_brief(name)}")
        self.name: str | None = name
        self.callbacks: tuple[object, ...] = _check_handlers(callbacks or ())
        self.tags: tuple[str, ...] = _check_tags(tags or ())
        self.metadata: dict[str, Any] = _check_metadata(metadata or {})
        self._bound: dict[str, Any] = {}

    # -- public API --------------------------------------------------------------------------

    def get_name(self) -> str:
        """The constructor's ``name``, else a default: the function's name or the class name (R4)."""
        return self.name or self._default_name()

    def invoke(self, input: Any, config: RunnableConfig | None = None) -> Any:
        """Run on ``input`` as one run and return the output; see the class docstring."""
        return self._invoke(input, _NO_CONFIG if config is None else _check_config(config), None)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None) -> Any:
        """`invoke` under asyncio. If the task is cancelled, the run (and each open run inside
        it) fires its error event with the `asyncio.CancelledError`, which is re-raised (D3)."""
        checked = _NO_CONFIG if config is None else _check_config(config)
        return await self._ainvoke(input, checked, None)

    def batch(
        self,
        inputs: Iterable[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Invoke on each input, each a root run of its own (or a child of the enclosing run).

        ``config`` is one config for all inputs or a list of one per input (`ValueError` if
        the lengths differ). A ``run_id`` in a shared config names the first input's run only
        (R3). Up to ``max_concurrency`` inputs run at once, each in a copy of the caller's
        context. Outputs come in input order; the first failure is raised after every input
        has finished, unless ``return_exceptions`` puts exceptions in place of outputs.
        """
        items, configs, limit = self._batch(inputs, config)
        call = lambda i: self._invoke(items[i], configs[i], None)  # noqa: E731
        return _map_in_threads(call, range(len(items)), limit, return_exceptions)

    async def abatch(
        self,
        inputs: Iterable[Any],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """`batch` under asyncio: one task per input, at most ``max_concurrency`` at once."""
        items, configs, limit = self._batch(inputs, config)
        calls = [
            functools.partial(self._ainvoke, x, c, None)
            for x, c in zip(items, configs, strict=True)
        ]
        return await _agather(calls, limit, return_exceptions)

    def stream(self, input: Any, config: RunnableConfig | None = None) -> Iterator[Any]:
        """Run on ``input`` and yield the output in chunks; one chunk unless the runnable streams.

        The run starts at the first ``next()``. If the consumer closes the iterator early, each
        open run inside it fires its error event with `GeneratorExit`, innermost first (D3).
        """
        return self._stream(input, _check_config(config), None)

    def astream(self, input: Any, config: RunnableConfig | None = None) -> AsyncIterator[Any]:
        """`stream` under asyncio; ``aclose()`` on it closes the open runs innermost first.

        Leaving an ``async for`` early does not close the iterator: asyncio's finalizer then
        closes it and the streams nested in it at once, in no order, so runs may close before
        their children (D3 holds only for a closed stream). Close it (``contextlib.aclosing``).
        """
        return self._astream(input, _check_config(config), None, [])

    def with_config(
        self, config: RunnableConfig | None = None, **kwargs: Unpack[RunnableConfig]
    ) -> Self:
        """A copy of this runnable with config bound to every call (S9).

        Bound callbacks, tags and metadata act as if given at request time: they are
        inheritable. They merge with the call's own (handlers and tags as ordered sets; for
        metadata the call's value beats the binding's, which beats an inherited one). A bound
        ``run_id`` would name many runs: `TypeError`.
        """
        new = _check_config({**(config or {}), **kwargs})
        if "run_id" in new:
            raise TypeError("run_id cannot be bound: it names one run; pass it to invoke instead")
        if isinstance(new.get("callbacks"), _Manager):
            raise TypeError("with_config(callbacks=...) takes a list of handlers, not a manager")
        bound = copy.copy(self)
        bound._bound = _merge_configs(self._bound, new)
        return bound

    def __or__(self, other: Any) -> Chain:
        return Chain(self, other)

    def __ror__(self, other: Any) -> Chain:
        return Chain(other, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.get_name()!r})"

    # -- what subclasses provide ---------------------------------------------------------------

    def _default_name(self) -> str:
        return type(self).__name__

    def _serialized(self, name: str) -> dict[str, Any]:
        return {"name": name, "id": ["callbacks", type(self).__name__]}

    def _start_args(self, input: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The start event's payload and extra keywords (built only when someone listens, D7);
        ``name`` is the runnable's own (`get_name`), found once per start."""
        return (self._serialized(name), input), {}

    def _end_payload(self, input: Any, output: Any) -> Any:
        return output

    def _run(self, input: Any, run: _Run) -> Any:
        raise NotImplementedError

    async def _arun(self, input: Any, run: AsyncRunManager) -> Any:
        return self._run(input, run)

    def _stream_body(self, input: Any, run: _Run, limit: int | None) -> Generator[Any, None, Any]:
        output = self._in_scope(run, limit, self._run, input)
        yield output
        return output

    async def _astream_body(
        self, input: Any, run: AsyncRunManager, limit: int | None, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        out.append(await self._ain_scope(run, limit, self._arun, input))
        yield out[-1]

    # -- the run protocol ----------------------------------------------------------------------

    def _batch(
        self, inputs: Iterable[Any], config: RunnableConfig | Sequence[RunnableConfig] | None
    ) -> tuple[list[Any], list[dict[str, Any]], int | None]:
        items = list(inputs)
        if isinstance(config, Sequence):
            if len(config) != len(items):
                raise ValueError(
                    f"batch() got {len(config)} configs for {len(items)} inputs; "
                    "pass one config, or one per input"
                )
            configs = [_check_config(c) for c in config]
            first: dict[uuid.UUID, int] = {}
            for i, c in enumerate(configs):
                if (run_id := c.get("run_id")) is not None:
                    if run_id in first:
                        raise ValueError(
                            f"batch() got run_id {run_id} for inputs {first[run_id]} and {i}; "
                            "a run id names one run"
                        )
                    first[run_id] = i
        else:
            shared = _check_config(config)
            rest = {k: v for k, v in shared.items() if k != "run_id"}
            configs = [shared, *[rest] * (len(items) - 1)] if items else []
        limit = self._limit(configs[0] if configs else {}) or _MAX_CONCURRENCY.get()
        return items, configs, limit

    def _limit(self, config: Mapping[str, Any]) -> int | None:
        """This call's own ``max_concurrency``, if it sets one (else the enclosing call's holds):
        None without a config or a binding, which `_invoke` knows without calling this."""
        return config.get("max_concurrency") or self._bound.get("max_concurrency")

    def _begin(self, config: Mapping[str, Any], parent: _Manager | None, cls: type[_R]) -> _R:
        """The run of this call, not started yet (an interrupt before its start is delivered
        leaves nothing to close), from the manager for this call: inherited or given, then
        binding, request and constructor layers. An implicit child that adds nothing is made
        from the enclosing run itself: no manager in between."""
        callbacks = run_id = None
        adds = bool(self._bound or self.callbacks or self.tags or self.metadata)
        if config:  # (a call with no config, as a nested call often is, asks for nothing)
            callbacks, run_id = config.get("callbacks"), config.get("run_id")
            adds = adds or "tags" in config or "metadata" in config
        request: tuple[Any, ...] = ()
        if parent is not None:  # a composite handing a child its manager
            manager = parent
        elif callbacks is None:  # S10: a child of the enclosing run, if any
            current = _CURRENT_RUN.get()
            if current is None:
                manager = _EMPTY
            elif not adds:
                return cls._new(current, self._run_type, run_id)
            else:
                manager = current._child(None, CallbackManager)
        elif isinstance(callbacks, _Manager):  # the caller continues a tree explicitly
            manager = callbacks
        else:  # S10: a list of handlers starts a new root that inherits nothing
            manager, request = _EMPTY, callbacks
        if request or adds:
            bound, manager = self._bound, CallbackManager._clone(manager)
            manager._merge(bound.get("callbacks"), bound.get("tags"), bound.get("metadata"), True)
            manager._merge(request, config.get("tags"), config.get("metadata"), True)  # S1, S3
            # S2, S3, S5: local values last
            manager._merge(self.callbacks, self.tags, self.metadata, False)
        return cls._new(manager, self._run_type, run_id)

    def _start_event(
        self, input: Any, config: Mapping[str, Any]
    ) -> tuple[Event, tuple[Any, ...], dict[str, Any]]:
        own = self.get_name()  # the serialized name, and the run's unless a config names it
        args, extra = self._start_args(input, own)
        name = config.get("run_name") or self._bound.get("run_name") or own
        return _START[self._run_type], args, {**extra, "name": name}

    def _in_scope(
        self, run: _Run, limit: int | None, body: Callable[[Any, Any], Any], input: Any
    ) -> Any:
        """Run ``body`` in a copy of the context where ``run`` encloses implicit children (S10);
        whatever the body sets there stays there (S11)."""
        if self._leaf:
            return body(input, run)
        return _scope(run, limit).run(body, input, run)

    async def _ain_scope(
        self,
        run: AsyncRunManager,
        limit: int | None,
        body: Callable[[Any, Any], Coroutine[Any, Any, Any]],
        input: Any,
    ) -> Any:
        """`_in_scope` for a coroutine body; tasks it starts copy its context, so inherit it."""
        if self._leaf:
            return await body(input, run)
        context = _scope(run, limit)
        return await _run_in(context, context.run(body, input, run))

    # The run protocol, one function per call mode. Each makes its run first (no event), then in
    # one ``try``: fires the start (D7: only if someone listens), runs the body, fires the end;
    # and on any exception fires the error instead (R1). Every step is inside the ``try``, so
    # that an interrupt anywhere after the start still closes the run (cases 3 and 4, Dispatch).

    def _invoke(self, input: Any, config: Mapping[str, Any], parent: _Manager | None) -> Any:
        run = self._begin(config, parent, RunManager)
        try:
            if run._handlers:  # D7: no payload, no id, no dispatch when nobody listens
                run._open(*self._start_event(input, config))
            if self._leaf:  # `_in_scope`, inlined: two frames per level of nesting, not four
                output = self._run(input, run)
            else:
                limit = self._limit(config) if config or self._bound else None
                output = _scope(run, limit).run(self._run, input, run)
            if run._listeners or run._orphans:
                run._finish(_END[run._family], (self._end_payload(input, output),), _NO_EXTRA)
        except BaseException as error:  # R1: BaseException counts
            run._fail(error)
            raise
        finally:  # an interrupt at the entry of `_fail` (not held there): once more
            if (run._listeners or run._orphans) and run._end is not _DONE:
                run._fail_again()
        return output

    async def _ainvoke(self, input: Any, config: Mapping[str, Any], parent: _Manager | None) -> Any:
        run = self._begin(config, parent, AsyncRunManager)
        try:
            if run._handlers:
                await run._aopen(*self._start_event(input, config))
            if self._leaf:  # `_ain_scope`, inlined, as in `_invoke`
                output = await self._arun(input, run)
            else:
                limit = self._limit(config) if config or self._bound else None
                context = _scope(run, limit)
                output = await _run_in(context, context.run(self._arun, input, run))
            if run._listeners or run._orphans:
                await run._afinish(
                    _END[run._family], (self._end_payload(input, output),), _NO_EXTRA
                )
        except BaseException as error:  # R1, and asyncio.CancelledError (D3)
            await run._afail(error)
            raise
        finally:
            if (run._listeners or run._orphans) and run._end is not _DONE:
                await run._afail_again()
        return output

    def _stream(
        self, input: Any, config: Mapping[str, Any], parent: _Manager | None
    ) -> Generator[Any, None, Any]:
        fed = type(input) is _Upstream  # R7: the step before streams into this one
        if fed:
            if self._pipelines:
                input.peek()  # this run starts once the first chunk is there
            else:
                input, fed = input.whole(), False
        run, body = self._begin(config, parent, RunManager), None
        try:
            if run._handlers:
                run._open(*self._start_event({"input": ""} if fed else input, config))
            body = self._stream_body(input, run, self._limit(config))
            output = yield from body
            if run._listeners or run._orphans:
                extra = {"inputs": input.value} if fed else _NO_EXTRA
                run._finish(_END[run._family], (self._end_payload(input, output),), extra)
        except BaseException as error:  # includes GeneratorExit from an early close (D3)
            failure = error
            if body is not None:  # an interrupt raised here, not in the body, leaves it open
                try:
                    body.close()  # inner runs close first
                except BaseException as closing:  # their closing failed: that is ours too,
                    early_close = isinstance(error, GeneratorExit)  # unless we had an interrupt
                    failure = _keep(None if early_close else error, closing) or error
            run._fail(failure)
            if failure is not error:
                raise failure from None
            raise
        finally:
            if (run._listeners or run._orphans) and run._end is not _DONE:
                run._fail_again()
        return output

    async def _astream(
        self, input: Any, config: Mapping[str, Any], parent: _Manager | None, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        """`_stream` for asyncio; the final output is appended to ``out``."""
        fed = type(input) is _AUpstream  # R7, as in `_stream`
        if fed:
            if self._pipelines:
                await input.peek()
            else:
                input, fed = await input.whole(), False
        run, body = self._begin(config, parent, AsyncRunManager), None
        inner: list[Any] = []
        try:
            if run._handlers:
                await run._aopen(*self._start_event({"input": ""} if fed else input, config))
            body = self._astream_body(input, run, self._limit(config), inner)
            async for chunk in body:
                yield chunk
            if run._listeners or run._orphans:
                extra = {"inputs": input.value} if fed else _NO_EXTRA
                payload = self._end_payload(input, inner[-1])
                await run._afinish(_END[run._family], (payload,), extra)
        except BaseException as error:  # GeneratorExit from aclose() too (D3)
            failure = error
            if body is not None:
                try:
                    await body.aclose()  # inner runs close first
                except BaseException as closing:  # their closing failed: that is ours too,
                    early_close = isinstance(error, GeneratorExit)  # unless we had an interrupt
                    failure = _keep(None if early_close else error, closing) or error
            await run._afail(failure)
            if failure is not error:
                raise failure from None
            raise
        finally:
            if (run._listeners or run._orphans) and run._end is not _DONE:
                await run._afail_again()
        out.append(inner[-1])


_EMPTY: Final = CallbackManager()  # never mutated: managers are copied before they change


def _coerce(step: Any) -> Runnable:
    if isinstance(step, Runnable):
        return step
    if isinstance(step, Mapping):
        return Parallel(step)
    if callable(step):
        return Lambda(step)
    raise TypeError(
        f"cannot use {_brief(step)} as a step: expected a Runnable, a function or a dict"
    )


def _function_name(func: Callable[..., Any], default: str) -> str:
    """A function's ``__name__``, or ``default`` for a lambda or a nameless callable (R4)."""
    name = getattr(func, "__name__", "<lambda>")
    return default if name == "<lambda>" else str(name)


def _text(value: Any) -> str:
    """``str(value)`` for a start payload, or, if that fails, the value's type and address:
    building a payload, which happens only when someone listens (D7), must never change what
    a call returns or raises (D8)."""
    try:
        return value if isinstance(value, str) else str(value)
    except Exception:
        return object.__repr__(value)


class Lambda(Runnable):
    """Runs ``func(input)``, or ``func(input, config)`` if ``func`` has a ``config`` parameter.

    ``func`` may be sync or async: ``invoke`` runs an async one to completion, ``ainvoke`` runs a
    sync one in a worker thread (with a copy of the context). The config it receives is
    ``{"callbacks": <child manager>}``: pass it on to continue the run tree explicitly.
    Runnables invoked inside ``func`` without a config are children of this run anyway (S10).
    The default name is the function's ``__name__``, or ``"Lambda"`` for a lambda (R4).

    A generator function streams (R7): under ``stream()`` each chunk it yields is yielded as it
    comes; its output is its chunks added up with ``+`` (where they do not add, the last one),
    as LangChain's. Streamed into by the step before, a Lambda starts at the first chunk and
    then reads the whole input before calling ``func``.
    """

    _pipelines: ClassVar[bool] = True

    def __init__(self, func: Callable[..., Any], **options: Unpack[_Options]) -> None:
        super().__init__(**options)
        if not callable(func):
            raise TypeError(f"Lambda expects a function, got {_brief(func)}")
        if inspect.isasyncgenfunction(func):
            raise TypeError(
                f"Lambda takes a function, a coroutine function or a generator function, "
                f"not an async generator function: got {_brief(func)}"
            )
        self.func: Callable[..., Any] = func
        self._is_async = inspect.iscoroutinefunction(func)
        self._is_generator = inspect.isgeneratorfunction(func)
        try:
            self._takes_config = "config" in inspect.signature(func).parameters
        except (TypeError, ValueError):  # some builtins have no signature
            self._takes_config = False

    def _default_name(self) -> str:
        return _function_name(self.func, type(self).__name__)

    def _run(self, input: Any, run: _Run, drive: bool = True) -> Any:
        """Call ``func``; with ``drive``, run an async one to completion (D6's loop rules),
        and add up a generator's chunks."""
        try:
            if self._takes_config:
                result = self.func(input, {"callbacks": run.get_child()})
            else:
                result = self.func(input)
        except (StopIteration, StopAsyncIteration) as stop:  # the same error in every mode (D8)
            raise _raisable(stop, f"the function of {self!r}")  # noqa: B904 (it is chained)
        if self._is_generator and drive:
            total = _NOTHING
            for chunk in result:
                total = _add(total, chunk)
            return None if total is _NOTHING else total
        return _run_coroutine(result) if drive and self._is_async else result

    def _stream_body(self, input: Any, run: _Run, limit: int | None) -> Generator[Any, None, Any]:
        if type(input) is _Upstream:
            input = input.whole()  # R7: the whole input, then the call
        if not self._is_generator:
            output = self._in_scope(run, limit, self._run, input)
            yield output
            return output
        context = _scope(run, limit)  # each chunk is made in the run's context (S10)
        chunks, total = context.run(self._run, input, run, False), _NOTHING
        try:
            while (chunk := context.run(next, chunks, _NOTHING)) is not _NOTHING:
                yield chunk
                total = _add(total, chunk)
        finally:
            chunks.close()  # an early close reaches the function too
        return None if total is _NOTHING else total

    async def _astream_body(
        self, input: Any, run: AsyncRunManager, limit: int | None, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        if type(input) is _AUpstream:
            input = await input.whole()
        if not self._is_generator:
            out.append(await self._ain_scope(run, limit, self._arun, input))
            yield out[-1]
            return
        context = _scope(run, limit)  # as under `stream`, each chunk made in a worker thread
        chunks, total = context.run(self._run, input, run, False), _NOTHING
        try:
            while True:
                chunk, error = await _in_thread(context.run, next, chunks, _NOTHING)
                if error is not None:
                    raise error
                if chunk is _NOTHING:
                    break
                yield chunk
                total = _add(total, chunk)
        finally:
            chunks.close()
        out.append(None if total is _NOTHING else total)

    def _arun(self, input: Any, run: AsyncRunManager) -> Coroutine[Any, Any, Any]:
        """The body as a coroutine: an async ``func``'s own (no frame of ours in between, so
        nesting goes deep), else a call of ``func`` in a worker thread."""
        if self._is_async:
            result: Coroutine[Any, Any, Any] = self._run(input, run, drive=False)
            return result
        return _body_in_thread(self._run, input, run)


class Chain(Runnable):
    """Feeds each step's output to the next; step N's run is tagged ``seq:step:N`` (1-based).

    Steps may be runnables, functions (wrapped in `Lambda`) or dicts (wrapped in `Parallel`).
    A plain nested `Chain` (no name, callbacks, tags, metadata or binding) is spliced into its
    parent, so ``a | b | c`` is one chain of three steps.

    ``stream`` streams every step into the next (R7): the steps form a pipeline, a model
    anywhere in it fires its tokens as it makes them, and the chain yields the last step's
    chunks. A step that pipelines starts at the first chunk of the step before, so before that
    step ends; the others start once it has ended.
    """

    _pipelines: ClassVar[bool] = True

    def __init__(self, *steps: Any, **options: Unpack[_Options]) -> None:
        super().__init__(**options)
        flat: list[Runnable] = []
        for step in map(_coerce, steps):
            if type(step) is Chain and step._is_plain():
                flat.extend(step.steps)
            else:
                flat.append(step)
        if not flat:
            raise ValueError("a Chain needs at least one step")
        self.steps: tuple[Runnable, ...] = tuple(flat)
        self._steps = tuple((step, f"seq:step:{i}") for i, step in enumerate(flat, 1))

    def _is_plain(self) -> bool:
        return not (self.name or self.callbacks or self.tags or self.metadata or self._bound)

    def _run(self, input: Any, run: _Run) -> Any:
        for step, tag in self._steps:
            input = step._invoke(input, _NO_CONFIG, run._child(tag, CallbackManager))
        return input

    async def _arun(self, input: Any, run: AsyncRunManager) -> Any:
        for step, tag in self._steps:
            input = await step._ainvoke(input, _NO_CONFIG, run._child(tag, CallbackManager))
        return input

    def _stream_body(self, input: Any, run: _Run, limit: int | None) -> Generator[Any, None, Any]:
        limit = limit or _MAX_CONCURRENCY.get()  # this generator holds no context across yields
        config = {"max_concurrency": limit} if limit else _NO_CONFIG
        streams: list[Generator[Any, None, Any]] = []
        leaving = None
        try:
            for step, tag in self._steps:  # each step reads the one before as it streams (R7)
                streams.append(step._stream(input, config, run._child(tag, CallbackManager)))
                input = _Upstream(streams[-1])
            return (yield from streams[-1])
        except BaseException as error:
            leaving = _leaving(error)
            raise
        finally:  # a step left open (the consumer stopped, a later step failed) closes (D3)
            _close_all(streams[::-1], leaving)

    async def _astream_body(
        self, input: Any, run: AsyncRunManager, limit: int | None, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        limit = limit or _MAX_CONCURRENCY.get()
        config = {"max_concurrency": limit} if limit else _NO_CONFIG
        streams: list[AsyncGenerator[Any, None]] = []
        leaving = None
        try:
            for step, tag in self._steps:
                output: list[Any] = []
                manager = run._child(tag, CallbackManager)
                streams.append(step._astream(input, config, manager, output))
                input = _AUpstream(streams[-1], output)
            async for chunk in streams[-1]:
                yield chunk
            out.append(output[-1])
        except BaseException as error:
            leaving = _leaving(error)
            raise
        finally:
            await _aclose_all(streams[::-1], leaving)


class Parallel(Runnable):
    """Runs every step on the same input in a thread pool (or as tasks); returns ``{key: output}``.

    ``Parallel(key=step, ...)`` or ``Parallel({"key": step})``. Each branch's run is tagged
    ``map:key:<key>`` and runs in a copy of the context (S11); at most ``max_concurrency``
    branches run at once (1 makes the order that of the keys). If branches fail, the first in
    key order is raised once all have finished.

    ``stream`` streams every branch at once (each in a worker thread, or as a task) and yields
    ``{key: chunk}`` for each chunk a branch makes, as it comes (R7); a branch's failure is
    raised as under ``invoke``, once the others have finished. Streamed into by the step
    before, it starts at the first chunk, and each branch reads the input as it streams.
    """

    _pipelines: ClassVar[bool] = True

    def __init__(
        self,
        steps: Mapping[str, Any] | None = None,
        /,
        *,
        name: str | None = None,
        callbacks: Sequence[Any] | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, callbacks=callbacks, tags=tags, metadata=metadata)
        steps = dict(steps or {})
        for key in steps:
            if not isinstance(key, str):  # a key that str() would merge with another
                raise TypeError(f"Parallel step keys must be strings, got {_brief(key)}")
            if key in kwargs:
                raise ValueError(f"Parallel got the step {key!r} twice")
        if not (steps or kwargs):
            raise ValueError("a Parallel needs at least one step")
        self.steps: dict[str, Runnable] = {
            key: _coerce(step) for key, step in {**steps, **kwargs}.items()
        }

    def _branches(self, run: _Run) -> list[tuple[str, Runnable, CallbackManager]]:
        return [(k, s, run._child(f"map:key:{k}", CallbackManager)) for k, s in self.steps.items()]

    def _run(self, input: Any, run: _Run) -> Any:
        branches = self._branches(run)
        outputs = _map_in_threads(
            lambda b: b[1]._invoke(input, _NO_CONFIG, b[2]), branches, _MAX_CONCURRENCY.get(), False
        )
        return {key: output for (key, _, _), output in zip(branches, outputs, strict=True)}

    async def _arun(self, input: Any, run: AsyncRunManager) -> Any:
        branches = self._branches(run)
        calls = [functools.partial(s._ainvoke, input, _NO_CONFIG, m) for _, s, m in branches]
        outputs = await _agather(calls, _MAX_CONCURRENCY.get(), False)
        return {key: output for (key, _, _), output in zip(branches, outputs, strict=True)}

    def _stream_body(self, input: Any, run: _Run, limit: int | None) -> Generator[Any, None, Any]:
        limit = limit or _MAX_CONCURRENCY.get()
        config = {"max_concurrency": limit} if limit else _NO_CONFIG
        # Each branch is a stream advanced one chunk at a time in a worker thread, in a copy
        # of the context of its own (S11); a chunk is handed on as soon as any branch has one.
        # At most ``limit`` branches make a chunk at once; the others wait their turn, first
        # come first served (so 1 makes the order of chunks that of the keys, round after round).
        readers: list[Generator[Any, None, Any]] = []  # a branch's share of a streamed input
        streams: dict[str, Generator[Any, None, Any]] = {}
        outcomes: dict[str, tuple[Any, BaseException | None]] = {}
        pending: dict[concurrent.futures.Future[Any], str] = {}
        pool, leaving = None, None
        try:  # everything made here is closed below, whatever interrupts the making (D3)
            tee = _Tee(input) if type(input) is _Upstream else None  # each branch reads it (R7)
            for key, step, manager in self._branches(run):
                reader = tee.branch() if tee else input
                if tee:
                    readers.append(reader._chunks)
                streams[key] = step._stream(reader, config, manager)
            contexts = {key: contextvars.copy_context() for key in streams}
            pool = ThreadPoolExecutor(max_workers=min(len(streams), limit or 32))
            waiting = list(streams)
            while waiting or pending:
                while waiting and len(pending) < (limit or len(streams)):
                    key = waiting.pop(0)
                    pending[pool.submit(contexts[key].run, _attempt, _advance, streams[key])] = key
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: list(streams).index(pending[f])):
                    key = pending.pop(future)
                    advanced, error = future.result()
                    if error is not None:  # the branch failed: its run is closed
                        outcomes[key] = (None, error)
                    elif advanced[1]:  # it ended: this is its output
                        outcomes[key] = (advanced[0], None)
                    else:
                        yield {key: advanced[0]}
                        waiting.append(key)
        except BaseException as error:
            leaving = _leaving(error)
            raise
        finally:  # a branch being advanced finishes its chunk; then every one is closed (D3)
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            _close_all([*streams.values(), *readers], leaving)
        outputs = _collect([outcomes[key] for key in streams], False)
        return dict(zip(streams, outputs, strict=True))

    async def _astream_body(
        self, input: Any, run: AsyncRunManager, limit: int | None, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        limit = limit or _MAX_CONCURRENCY.get()
        config = {"max_concurrency": limit} if limit else _NO_CONFIG
        outputs: dict[str, list[Any]] = {key: [] for key in self.steps}
        readers: list[AsyncGenerator[Any, None]] = []
        streams: dict[str, AsyncGenerator[Any, None]] = {}
        outcomes: dict[str, tuple[Any, BaseException | None]] = {}
        pending: dict[asyncio.Future[Any], str] = {}
        leaving = None
        try:  # as under `stream`: everything made here is closed below
            tee = _Tee(input) if type(input) is _AUpstream else None
            for key, step, manager in self._branches(run):
                reader = tee.abranch() if tee else input
                if tee:
                    readers.append(reader._chunks)
                streams[key] = step._astream(reader, config, manager, outputs[key])
            loop = asyncio.get_running_loop()
            # As the threads of a pool: at most ``limit`` branches make a chunk at once, the
            # others wait their turn, first come first served.
            waiting = list(streams)
            while waiting or pending:
                while waiting and len(pending) < (limit or len(streams)):
                    key = waiting.pop(0)
                    pending[_task(loop, _outcome(anext(streams[key], _NOTHING)))] = key
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: list(streams).index(pending[t])):
                    key = pending.pop(task)
                    chunk, error = task.result()
                    if error is not None:  # the branch failed: its run is closed
                        outcomes[key] = (None, error)
                    elif chunk is _NOTHING:
                        outcomes[key] = (outputs[key][-1], None)
                    else:
                        yield {key: chunk}
                        waiting.append(key)
            outputs_in_order = _collect([outcomes[key] for key in streams], False)
            out.append(dict(zip(streams, outputs_in_order, strict=True)))
        except BaseException as error:
            leaving = _leaving(error)
            raise
        finally:  # a branch being advanced is cancelled and waited for; then all are closed
            for task in pending:
                task.cancel()
            cancelled = await _complete(list(pending)) if pending else None
            now = _keep(leaving, cancelled)  # a cancellation meanwhile outranks a failure
            await _aclose_all([*streams.values(), *readers], now)
            if now is not leaving and now is not None:
                raise now


def _check_error(error: BaseException | None) -> BaseException | None:
    if error is not None and not isinstance(error, BaseException):
        raise TypeError(f"error must be an exception instance or None, got {_brief(error)}")
    try:
        copy.copy(error)
    except Exception as failure:
        raise TypeError(
            f"error must be an exception that copy.copy() can copy (each call raises a fresh "
            f"copy), got {_brief(error)}: {failure!r}"
        ) from None
    return error


def _raise(error: BaseException) -> NoReturn:
    """Raise a fresh copy of ``error`` (R0): the toy keeps no traceback, and so no frame, input
    or handler, of any call it made (D8)."""
    raise copy.copy(error)


_TOKEN: Final = re.compile(r"\S+\s*|\s+")


def _as_messages(input: Any) -> list[Any]:
    """A model's input as messages: a message, a list of messages, or anything else as text.
    Used for payloads alone: an input that fails to be read so is shown as text (D8)."""
    try:
        if hasattr(input, "content") and hasattr(input, "type"):
            return [input]
        if isinstance(input, Sequence) and input and all(hasattr(m, "content") for m in input):
            return list(input)
    except Exception:
        pass
    return [HumanMessage(_text(input))]


class LLM(Runnable):
    """A deterministic completion model: returns its ``responses`` in turn, cycling.

    The input is a prompt string; messages are rendered as one, anything else goes through
    ``str()`` (a toy model accepts what the previous step made). ``stream()`` yields the
    response word by word, firing ``on_llm_new_token`` before each word; ``invoke()`` fires
    tokens only when the model was built with ``streaming=True`` (LangChain's rule). With
    ``error=exc`` every call raises ``exc`` inside the run, after the start event, or after the
    first token when streaming (R0). LLM runs are leaves (R2).
    """

    _run_type: ClassVar[str] = "llm"
    _leaf: ClassVar[bool] = True

    def __init__(
        self,
        responses: str | Sequence[str],
        *,
        streaming: bool = False,
        error: BaseException | None = None,
        **options: Unpack[_Options],
    ) -> None:
        super().__init__(**options)
        listed = [responses] if isinstance(responses, str) else list(responses)
        if not listed or not all(isinstance(r, str) for r in listed):
            raise TypeError(
                f"responses must be a string or a non-empty list of strings, got {_brief(responses)}"
            )
        self.responses: tuple[str, ...] = tuple(listed)
        self.streaming: bool = streaming
        self.error: BaseException | None = _check_error(error)
        self._cycle = itertools.cycle(self.responses)
        self._lock = threading.Lock()

    def _prompt(self, input: Any) -> str:
        if isinstance(input, str):
            return input
        messages = _as_messages(input)
        try:
            return _buffer_string(messages)
        except Exception:  # a message whose content cannot be shown (D8)
            return _text(input)

    def _start_args(self, input: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._serialized(name), [self._prompt(input)]), {}

    def _message(self, text: str) -> BaseMessage | None:
        return None

    def _output(self, text: str) -> Any:
        """A streamed chunk of output."""
        return text

    def _final(self, input: Any, text: str) -> Any:
        """The call's output: for a chat model, a message that reports its usage."""
        return text

    def _usage(self, input: Any, text: str) -> dict[str, int]:
        """Deterministic token counts, langchain_core's ``usage_metadata`` keys: a token is a
        word with the spaces after it, of the prompt as ``on_llm_start`` shows it and of the
        response."""
        prompt, response = len(_TOKEN.findall(self._prompt(input))), len(_TOKEN.findall(text))
        return {
            "input_tokens": prompt,
            "output_tokens": response,
            "total_tokens": prompt + response,
        }

    def _end_payload(self, input: Any, output: Any) -> Any:
        """An `LLMResult` with the usage in ``llm_output``, as providers' models report it."""
        if isinstance(output, AIMessage) and output.usage_metadata is not None:
            text, message, usage = output.content, output, output.usage_metadata
        else:  # a completion model's text: counted here, as someone listens (D7)
            text, message, usage = output, None, self._usage(input, output)
        token_usage = {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"],
        }
        llm_output = {"token_usage": token_usage, "model_name": self.get_name()}
        return LLMResult([[Generation(text, message)]], llm_output)

    def _tokens(self, stream: bool) -> tuple[str, list[tuple[str, Generation]]]:
        """The next response, and its tokens with their ``chunk`` keyword (none unless streaming)."""
        with self._lock:
            text = next(self._cycle)
        tokens = _TOKEN.findall(text) if stream else []
        return text, [(t, Generation(t, self._message(t))) for t in tokens]

    def _generate(self, input: Any, run: _Run, stream: bool) -> Generator[Any, None, Any]:
        text, tokens = self._tokens(stream)
        on_token = cast("RunManager", run).on_llm_new_token  # a sync body's run is sync
        for i, (token, chunk) in enumerate(tokens):
            if run._listeners:  # fire the token before handing it on (LangChain #16913)
                on_token(token, chunk=chunk)
            yield self._output(token)
            if i == 0 and self.error is not None:
                _raise(self.error)
        if self.error is not None:
            _raise(self.error)
        return self._final(input, text)

    async def _agenerate(
        self, input: Any, run: AsyncRunManager, stream: bool, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        text, tokens = self._tokens(stream)
        for i, (token, chunk) in enumerate(tokens):
            if run._listeners:
                await run.on_llm_new_token(token, chunk=chunk)
            yield self._output(token)
            if i == 0 and self.error is not None:
                _raise(self.error)
        if self.error is not None:
            _raise(self.error)
        out.append(self._final(input, text))

    def _run(self, input: Any, run: _Run) -> Any:
        return _drain(self._generate(input, run, self.streaming))

    async def _arun(self, input: Any, run: AsyncRunManager) -> Any:
        out: list[Any] = []
        async for _ in self._agenerate(input, run, self.streaming, out):
            pass
        return out[-1]

    def _stream_body(self, input: Any, run: _Run, limit: int | None) -> Generator[Any, None, Any]:
        return (yield from self._generate(input, run, True))

    def _astream_body(
        self, input: Any, run: AsyncRunManager, limit: int | None, out: list[Any]
    ) -> AsyncGenerator[Any, None]:
        return self._agenerate(input, run, True, out)


class ChatModel(LLM):
    """`LLM` for chat: messages in (anything else becomes one human message), an `AIMessage` out.

    Fires ``on_chat_model_start`` (handlers without it get ``on_llm_start``, D4), then tokens,
    end and error as an LLM run. ``stream()`` yields `AIMessage` chunks.
    """

    _run_type: ClassVar[str] = "chat_model"

    def _start_args(self, input: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._serialized(name), [_as_messages(input)]), {}

    def _message(self, text: str) -> BaseMessage | None:
        return AIMessage(text)

    def _prompt(self, input: Any) -> str:
        """The messages as one text, roles included (what the usage counts)."""
        return super()._prompt(_as_messages(input))

    def _output(self, text: str) -> Any:
        return AIMessage(text)

    def _final(self, input: Any, text: str) -> Any:
        metadata = {"model_name": self.get_name(), "finish_reason": "stop"}
        return AIMessage(text, usage_metadata=self._usage(input, text), response_metadata=metadata)


class Tool(Runnable):
    """Calls ``func(**input)`` for a dict input, ``func(input)`` otherwise (sync or async).

    ``on_tool_start`` gets ``str(input)`` as ``input_str`` and the dict input as ``inputs``
    (None otherwise); ``serialized`` carries the description. The default name is the
    function's name (R4). ``error=exc`` raises ``exc`` inside the run (R0).
    """

    _run_type: ClassVar[str] = "tool"

    def __init__(
        self,
        func: Callable[..., Any],
        name: str | None = None,
        description: str | None = None,
        *,
        error: BaseException | None = None,
        callbacks: Sequence[Any] | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name=name, callbacks=callbacks, tags=tags, metadata=metadata)
        if not callable(func):
            raise TypeError(f"Tool expects a function, got {_brief(func)}")
        self.func: Callable[..., Any] = func
        self._is_async = inspect.iscoroutinefunction(func)
        self.description: str = (
            description if description is not None else (inspect.getdoc(func) or "")
        )
        self.error: BaseException | None = _check_error(error)

    def _default_name(self) -> str:
        return _function_name(self.func, type(self).__name__)

    def _start_args(self, input: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        serialized = {**self._serialized(name), "description": self.description}
        return (serialized, _text(input)), {"inputs": input if isinstance(input, dict) else None}

    def _call_func(self, input: Any) -> Any:
        if self.error is not None:
            _raise(self.error)
        try:
            return self.func(**input) if isinstance(input, dict) else self.func(input)
        except (StopIteration, StopAsyncIteration) as stop:  # the same error in every mode (D8)
            raise _raisable(stop, f"the function of {self!r}")  # noqa: B904 (it is chained)

    def _run(self, input: Any, run: _Run) -> Any:
        result = self._call_func(input)
        return _run_coroutine(result) if self._is_async else result

    async def _arun(self, input: Any, run: AsyncRunManager) -> Any:
        if self._is_async:
            return await self._call_func(input)
        return await _body_in_thread(self._run, input, run)


class Retriever(Runnable):
    """Returns the documents whose text contains every word of the query (case-insensitive).

    ``documents`` are `Document` objects or strings. ``error=exc`` raises ``exc`` inside the
    run (R0). Constructor callbacks, tags and metadata are local, as for every runnable.
    """

    _run_type: ClassVar[str] = "retriever"
    _leaf: ClassVar[bool] = True

    def __init__(
        self,
        documents: Iterable[Document | str],
        *,
        error: BaseException | None = None,
        **options: Unpack[_Options],
    ) -> None:
        super().__init__(**options)
        self.documents: tuple[Document, ...] = tuple(
            d if isinstance(d, Document) else Document(str(d)) for d in documents
        )
        self.error: BaseException | None = _check_error(error)

    def _start_args(self, input: Any, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._serialized(name), _text(input)), {}

    def _run(self, input: Any, run: _Run) -> Any:
        if self.error is not None:
            _raise(self.error)
        words = str(input).lower().split()
        return [d for d in self.documents if all(w in d.page_content.lower() for w in words)]


def _enclosing_run(config: RunnableConfig | None) -> _Run:
    callbacks = _check_config(config).get("callbacks")
    run = callbacks._parent if isinstance(callbacks, _Manager) else _CURRENT_RUN.get()
    if not isinstance(run, _Run):
        raise RuntimeError(
            "dispatching a custom event needs an enclosing run: call it from inside a "
            "runnable, or pass the config that runnable received"
        )
    return run


def dispatch_custom_event(name: str, data: Any, *, config: RunnableConfig | None = None) -> None:
    """Fire ``on_custom_event(name, data)`` as an event of the enclosing run.

    The enclosing run is the one whose child manager ``config["callbacks"]`` is, else the one
    whose body is executing (S10). Its own handlers receive ``run_id`` = that run's id, its
    tags and metadata, and no ``parent_run_id``. Outside any run: `RuntimeError`.
    """
    if not isinstance(name, str):
        raise TypeError(f"custom event name must be a string, got {_brief(name)}")
    _enclosing_run(config)._fire(Event.CUSTOM_EVENT, (name, data), _NO_EXTRA)


async def adispatch_custom_event(
    name: str, data: Any, *, config: RunnableConfig | None = None
) -> None:
    """`dispatch_custom_event` for async code: awaited under async dispatch (D5)."""
    if not isinstance(name, str):
        raise TypeError(f"custom event name must be a string, got {_brief(name)}")
    run = _enclosing_run(config)
    if isinstance(run, AsyncRunManager):
        await run._afire(Event.CUSTOM_EVENT, (name, data), _NO_EXTRA)
    else:
        run._fire(Event.CUSTOM_EVENT, (name, data), _NO_EXTRA)


# =================================================================================================
# Extras: recorded traces (X2), conformance checking (X1), deterministic ids (X3)
# =================================================================================================


class Record(NamedTuple):
    """One event as a `Recorder` saw it: the payload in ``args`` (positional, even where the
    emitter passed it by keyword), the other keywords in ``kwargs``."""

    event: Event
    args: tuple[Any, ...]
    run_id: uuid.UUID | None
    parent_run_id: uuid.UUID | None
    tags: list[str] | None
    metadata: dict[str, Any] | None
    kwargs: dict[str, Any]


class Recorder(BaseCallbackHandler):
    """A handler that keeps every event, in arrival order, as a `Record` in ``records`` (X2).

    ``tree()`` renders the runs it saw as an indented tree, with names, run types, tags and
    outcomes. Thread-safe. It records ``on_chat_model_start`` as such (no D4 fallback).
    """

    def __init__(self, label: str = "recorder") -> None:
        self.label: str = label
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def _record(self, event: Event, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Record:
        if len(args) < len(event.payload):  # a payload argument passed by keyword (LangChain's
            rest = event.payload[len(args) :]  # sync on_llm_new_token passes token=...)
            args = (*args, *(kwargs.pop(name) for name in rest if name in kwargs))
        record = Record(
            event,
            args,
            kwargs.pop("run_id", None),
            kwargs.pop("parent_run_id", None),
            kwargs.pop("tags", None),
            kwargs.pop("metadata", None),
            kwargs,
        )
        with self._lock:
            self.records.append(record)
        return record

    def events(self) -> list[str]:
        """The method names of the recorded events, in order."""
        return [r.event.method for r in self.records]

    def jsonl(self) -> str:
        """The recorded events as a trace in JSON lines (X5), one event per line: what
        ``python -m callbacks check`` reads (see `_trace_line`)."""
        return "".join(_trace_line(r) + "\n" for r in self.records)

    def tree(self) -> str:
        """The recorded runs as an indented tree, one line per run, children under parents.

        A run whose parent this recorder never saw is shown as a root.
        """
        runs: dict[uuid.UUID | None, dict[str, Any]] = {}
        for r in self.records:
            if r.event.phase == "start":
                name = r.kwargs.get("name") or (r.args[0] or {}).get("name", "?")
                runs[r.run_id] = {"r": r, "name": name, "kids": [], "out": "open", "notes": []}
            elif r.run_id in runs:
                run = runs[r.run_id]
                if r.event.phase == "end":
                    run["out"] = "ok"
                elif r.event.phase == "error":
                    run["out"] = f"error {r.args[0]!r}"
                else:
                    run["notes"].append(r.event.method)
        roots: list[dict[str, Any]] = []
        for run in runs.values():
            parent = runs.get(run["r"].parent_run_id)
            (parent["kids"] if parent else roots).append(run)

        lines: list[str] = []

        def render(run: dict[str, Any], depth: int) -> None:
            r = run["r"]
            notes = ", ".join(f"{n} x{c}" for n, c in _counts(run["notes"]))
            lines.append(
                f"{'    ' * depth}{run['name']} ({r.event.run_type})"
                f"{' tags=' + repr(r.tags) if r.tags else ''}"
                f"{' [' + notes + ']' if notes else ''} -> {run['out']}"
            )
            for kid in run["kids"]:
                render(kid, depth + 1)

        for run in roots:
            render(run, 0)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Recorder({self.label!r})"


def _counts(items: list[str]) -> list[tuple[str, int]]:
    return [(k, len(list(g))) for k, g in itertools.groupby(items)]


def _recorder_method(event: Event) -> Callable[..., None]:
    def record(self: Recorder, *args: Any, **kwargs: Any) -> None:
        self._record(event, args, kwargs)

    return record


@dataclass(slots=True)
class _RunState:
    family: str
    start: str  # the start event's method, to name a run that never closed
    must_close: bool  # False when the checker's own flags hide this run's end and error
    open: bool = True
    children: set[uuid.UUID] = field(default_factory=set)


class Violation(NamedTuple):
    """One broken rule seen by a `TraceChecker`: the rule's id (``D3``, ``R6`` or ``X1``), the
    run it concerns (as received, so not always a UUID), the event that showed it and what."""

    rule: str
    run_id: Any
    event: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule} {self.event}(run_id={self.run_id}): {self.message}"


class TraceChecker(BaseCallbackHandler):
    """A handler that checks the events it receives against the rules, as they arrive (X1).

    It checks: every start is followed by exactly one end or error (D3); a child starts while
    its parent is open and closes before it (D3); run ids are unique UUIDs (R6); tokens and
    notes come only inside an open run of the right kind, and an end or error matches the run's
    kind; tags are lists of strings and metadata dicts with string keys (X1). A partial view is
    fine: a run whose parent it never saw is a root, and events of runs whose start its own
    ``ignore_*`` flags hid are accepted. It uses only the handler API, so it can watch a real
    LangChain app as well as this module.

    Each broken rule is appended to ``violations`` as a `Violation`. ``check()`` raises
    `AssertionError` listing them, and every run still open. With ``strict=True`` the event that
    shows a violation raises `AssertionError` at once: the checker sets ``raise_error``, so the
    error leaves the call after the other handlers got the event (D2).
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict: bool = strict
        self.raise_error = strict
        self.violations: list[Violation] = []
        self._runs: dict[uuid.UUID, _RunState] = {}
        self._unseen_parents: set[uuid.UUID] = set()
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise `AssertionError` if a rule was broken or a run is still open (D3)."""
        with self._lock:
            violations = self.violations + self._unclosed()
        if violations:
            raise AssertionError("trace breaks the rules:\n" + "\n".join(map(str, violations)))

    def _unclosed(self) -> list[Violation]:
        return [
            Violation("D3", i, s.start, "never closed by an end or error event")
            for i, s in self._runs.items()
            if s.open and s.must_close
        ]

    def _flag(self, rule: str, run_id: Any, event: Event, message: str) -> None:
        self.violations.append(Violation(rule, run_id, event.method, message))

    def _check(self, event: Event, kwargs: dict[str, Any]) -> None:
        run_id = kwargs.get("run_id")
        tags, metadata = kwargs.get("tags"), kwargs.get("metadata")
        if not isinstance(run_id, uuid.UUID):
            return self._flag("R6", run_id, event, "run_id is not a UUID")
        for what, value, kind in (("tags", tags, list), ("metadata", metadata, dict)):
            if value is None:
                continue
            wrong = [x for x in value if not isinstance(x, str)] if isinstance(value, kind) else []
            if wrong or not isinstance(value, kind):
                shape = "a list of strings" if kind is list else "a dict with string keys"
                got = f"{_brief(wrong[0])} in it" if wrong else _brief(value)
                self._flag("X1", run_id, event, f"{what} must be {shape}, got {got}")
        state = self._runs.get(run_id)
        if event.phase == "start":
            return self._start(event, run_id, kwargs.get("parent_run_id"), state)
        if state is None:
            hidden = {
                _FAMILY[e.run_type]
                for e in _START.values()
                if getattr(self, e.ignore_flag or "", False)
            }
            if not (hidden and (event.run_type == "any" or event.run_type in hidden)):
                self._flag("D3", run_id, event, "no run with this id has started")
            return None
        if not state.open:
            self._flag("D3", run_id, event, "after the run's end or error")
        if event.run_type not in ("any", state.family):
            self._flag(
                "X1", run_id, event, f"an event of {event.run_type} runs on a {state.family} run"
            )
        if event.closes:
            still_open = sorted(
                str(c) for c in state.children if self._runs[c].open and self._runs[c].must_close
            )
            if still_open:
                self._flag("D3", run_id, event, f"closed before its children {still_open}")
            state.open = False
        return None

    def _start(
        self, event: Event, run_id: uuid.UUID, parent_id: Any, state: _RunState | None
    ) -> None:
        if state is not None:
            return self._flag("R6", run_id, event, "run id used twice")
        if run_id in self._unseen_parents:
            self._flag("D3", run_id, event, "started after a child that names it as parent")
        parent = self._runs.get(parent_id) if parent_id is not None else None
        if parent is not None:
            if not parent.open:
                self._flag("D3", run_id, event, f"started after its parent {parent_id} closed")
            parent.children.add(run_id)
        elif parent_id is not None:  # a partial view, unless that parent starts later
            self._unseen_parents.add(parent_id)
        family = _FAMILY[event.run_type]
        hidden = getattr(self, _END[family].ignore_flag or "", False)
        self._runs[run_id] = _RunState(family, event.method, must_close=not hidden)
        return None


def _checker_method(event: Event) -> Callable[..., None]:
    def check(self: TraceChecker, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            seen = len(self.violations)
            self._check(event, kwargs)
            new = self.violations[seen:]
        if new and self.strict:
            raise AssertionError("trace breaks the rules: " + "; ".join(map(str, new)))

    return check


def _generate_event_methods() -> None:
    """Give each class its event methods, generated from the `Event` table: the run managers',
    the recorder's and the checker's (the handler bases declare theirs, to be seen by type
    checkers; a test holds them to the table).

    Run once, at import. Running it again rebuilds the same methods: a test does, so that
    mutation testing (which switches code at call time) reaches these generators too.
    """
    for event in Event:
        if event.phase != "start":
            setattr(RunManager, event.method, _run_manager_method(event, False))
            setattr(AsyncRunManager, event.method, _run_manager_method(event, True))
    _install_event_methods(Recorder, _recorder_method)
    _install_event_methods(TraceChecker, _checker_method)


_generate_event_methods()


@contextlib.contextmanager
def sequential_run_ids(start: int = 1) -> Iterator[None]:
    """Within this block (and threads it starts through the library), new run ids count up.

    Ids are ``uuid.UUID(int=start)``, ``uuid.UUID(int=start + 1)``, ...: reproducible traces for
    tests and docs (X3). Ids are made when first needed (D7), so their order is that of need.
    """
    counter = itertools.count(start)
    lock = threading.Lock()

    def factory() -> uuid.UUID:
        with lock:
            return uuid.UUID(int=next(counter))

    token = _ID_FACTORY.set(factory)
    try:
        yield
    finally:
        _ID_FACTORY.reset(token)


# Traces as JSON lines (X5): how a trace travels between this module, an implementation of the
# rules in another language and ``python -m callbacks check``. One event per line, an object:
# ``event`` (the handler method, Python's name or JavaScript's, from the `Event` table),
# ``run_id``, ``parent_run_id`` (null for a root), ``tags`` and ``metadata`` (null where the
# event has none), and what a trace may keep of the payload: a start's ``name``, a token's
# ``token``, an error's ``error`` (``type`` and ``message``). Inputs and outputs are left out:
# no rule reads them, and they may hold secrets.
_EVENT_NAMES: Final = {name: e for e in Event for name in (e.method, e.js_name) if name}


def _trace_line(record: Record) -> str:
    """One recorded event as a line of a JSON-lines trace (without the newline)."""
    return json.dumps(_trace_fields(record), default=_brief)  # a value JSON cannot hold: its repr


def _trace_fields(record: Record) -> dict[str, Any]:
    """One recorded event as the fields of a trace line."""
    line: dict[str, Any] = {
        "event": record.event.method,
        "run_id": None if record.run_id is None else str(record.run_id),
        "parent_run_id": None if record.parent_run_id is None else str(record.parent_run_id),
        "tags": record.tags,
        "metadata": record.metadata,
    }
    if record.event.phase == "start":
        serialized = record.args[0] if record.args and isinstance(record.args[0], dict) else {}
        line["name"] = record.kwargs.get("name") or serialized.get("name")  # langchain_core's
        # models send name=None and their name in ``serialized``
    elif record.event is Event.LLM_NEW_TOKEN and record.args:
        line["token"] = record.args[0]
    elif record.event.phase == "error" and record.args:
        error = record.args[0]
        line["error"] = {"type": type(error).__name__, "message": _text(error)[:200]}
    return line


def _read_trace(lines: Iterable[str]) -> Iterator[tuple[int, Event, dict[str, Any]]]:
    """``(line number, event, keywords)`` for each event of a JSON-lines trace (blank lines
    skipped); `ValueError` naming the line that is not JSON or names no known event."""
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number} is not JSON: {error.msg}") from None
        name = line.get("event") if isinstance(line, dict) else None
        event = _EVENT_NAMES.get(name) if isinstance(name, str) else None
        if event is None:
            raise ValueError(f"line {number} names no known event: {_REPR.repr(text.strip())}")
        keywords = {key: line.get(key) for key in ("run_id", "parent_run_id", "tags", "metadata")}
        for key in ("run_id", "parent_run_id"):  # as received if not a UUID: the checker says so
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                keywords[key] = uuid.UUID(keywords[key])
        yield number, event, keywords


def _check_command(path: str) -> int:
    """``python -m callbacks check PATH`` (``-``: standard input): each broken rule with its
    id and line, then a summary. Exit status 0 if the trace keeps the rules, 1 if it breaks
    one, 2 if it cannot be read."""
    try:
        with (
            contextlib.nullcontext(sys.stdin) if path == "-" else open(path, encoding="utf-8") as f
        ):
            events = list(_read_trace(f))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        print(f"{path}: cannot read the trace: {error}", file=sys.stderr)
        return 2
    checker, found = TraceChecker(), list[tuple[int, Violation]]()
    started: dict[Any, int] = {}  # run id: the line of its start
    for number, event, keywords in events:
        seen = len(checker.violations)
        getattr(checker, event.method)(**keywords)
        found += [(number, violation) for violation in checker.violations[seen:]]
        if event.phase == "start":
            started.setdefault(keywords["run_id"], number)
    found += [(started.get(v.run_id, 0), v) for v in checker._unclosed()]  # at their start
    for number, violation in sorted(found, key=lambda item: item[0]):
        print(f"{path}:{number}: {violation}")
    verdict = f"{len(found)} broken rule(s)" if found else "keeps the rules"
    print(f"{path}: {len(events)} events, {len(started)} runs: {verdict}")
    return 1 if found else 0


# =================================================================================================
# Scenarios: the rules as data, for any implementation (X5)
# =================================================================================================

# A scenario is a small program, in JSON, that an implementation of these rules in any language
# can run: handlers by label, a tree of runnables by kind, one call, and what each handler must
# hear. `_SCENARIOS` below is the only description; ``python -m callbacks scenarios`` plays each
# on the toys and writes the corpus: the descriptions with the outcome and the trace each gave.
# The interpreter (`_Play`) takes the classes to build with as a *kit*: given langchain_core's,
# it builds that library's tree (the suite does), and the scenarios whose traces differ there
# must be exactly those marked ``differs``, the README's list of differences made executable.
#
# A node is ``{"kind": K, ...}``. ``chain`` has ``steps`` (a list of nodes), ``parallel`` has
# ``steps`` (a dict of nodes); ``llm`` and ``chat_model`` have ``text`` (the reply; streamed as
# tokens of one word with the spaces after it) and ``streaming``; ``retriever`` has
# ``documents`` (strings; it returns those containing every word of the query); models and
# retrievers take ``error`` (raised inside the run, after the first token when streaming).
# ``lambda`` and ``tool`` run a function that calls each of its ``calls`` in turn with its own
# input (``{"runnable": node}``, plus ``config``, an explicit config, or ``pass_config``, the
# config the lambda received), then raises ``error`` if given, else returns the last call's
# output, or its input if it has no calls; a lambda's ``add_handler`` adds that handler to the
# manager in its config (S12) before its calls. Every node takes ``name``
# (required for lambdas and tools, whose function is the interpreter's) and ``bind`` (the
# config of `Runnable.with_config`); models, tools and retrievers take constructor
# ``callbacks`` (handler labels), ``tags`` and ``metadata``, as LangChain's do. An error is
# ``{"type": <a Python builtin exception>, "message": ...}``.
#
# A handler is ``{label: {...}}``: the ``ignore_*``, ``raise_error`` and ``run_inline`` flags;
# ``async`` (its methods are coroutines); ``fails_on`` (event methods in which it raises
# ``fails_with``, a RuntimeError unless given, after recording the event); ``chat_start``:
# false (it has no ``on_chat_model_start``: D4); ``flag_raises`` (a flag that raises when read:
# D8). The call has ``mode`` (``invoke``, ``ainvoke``, ``stream``, ``astream``, ``batch``,
# ``abatch``), ``input`` (a list for the batch modes), ``config`` (handlers by label) and, for
# the stream modes, ``take`` (stop after that many chunks). In the corpus, ``outcome`` is
# ``{"returns": value}`` (messages as ``{"type", "content"}``, documents as
# ``{"page_content"}``) or ``{"raises": error}``, and ``trace`` lists every event in the order
# heard, each line in the JSON-lines trace format plus ``handler``, its run ids renumbered in
# order of first appearance, handler after handler in the order they are listed (so the ids
# are the same however an implementation makes them). ``ordered`` says whether the order
# between handlers is part of what is expected (it is not where sync handlers run concurrently
# under async dispatch, D5); the order of each handler's own events always is.

_HANDLER_FLAGS: Final = (
    "raise_error",
    "run_inline",
    *sorted({e.ignore_flag for e in Event if e.ignore_flag}),
)
_HANDLER_KEYS: Final = frozenset({*_HANDLER_FLAGS, "async", "fails_on", "fails_with"}) | {
    "chat_start",
    "flag_raises",
}
_NODE_KEYS: Final = {  # what each kind of node takes besides kind, name and bind
    "chain": {"steps"},
    "parallel": {"steps"},
    "lambda": {"calls", "error", "add_handler"},
    "tool": {"calls", "error", "callbacks", "tags", "metadata"},
    "llm": {"text", "streaming", "error", "callbacks", "tags", "metadata"},
    "chat_model": {"text", "streaming", "error", "callbacks", "tags", "metadata"},
    "retriever": {"documents", "error", "callbacks", "tags", "metadata"},
}
_MODES: Final = ("invoke", "ainvoke", "stream", "astream", "batch", "abatch")

# The toys as a kit: each kind's constructor, called with the node's first value (steps, a
# function, a text, documents) and its options by keyword.
_TOY_KIT: Final[Mapping[str, Callable[..., Any]]] = {
    "chain": lambda steps, **options: Chain(*steps, **options),
    "parallel": Parallel,
    "lambda": Lambda,
    "tool": Tool,
    "llm": LLM,
    "chat_model": ChatModel,
    "retriever": Retriever,
}


class _Actor(Recorder):
    """A scenario's handler: records each event into the scenario's log, in arrival order, then
    fails where its description says."""

    def __init__(self, label: str, spec: Mapping[str, Any], log: list[tuple[str, Record]]) -> None:
        super().__init__(label)
        self.log = log
        self.fails_on = frozenset(spec.get("fails_on", ()))
        self.fails_with = spec.get("fails_with", {"type": "RuntimeError", "message": label})
        self.chat_start = spec.get("chat_start", True)
        for flag in _HANDLER_FLAGS:
            if flag in spec and flag != spec.get("flag_raises"):
                setattr(self, flag, bool(spec[flag]))

    def _record(self, event: Event, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Record:
        if event is Event.CHAT_MODEL_START and not self.chat_start:
            raise NotImplementedError(event.method)  # the manager falls back (D4)
        record = super()._record(event, args, kwargs)
        self.log.append((self.label, record))
        if event.method in self.fails_on:
            raise _scenario_error(self.fails_with)
        return record


class _AsyncActor(_Actor):
    """A scenario's handler whose methods are coroutines."""


def _async_actor_method(event: Event) -> Callable[..., Any]:
    async def record(self: _AsyncActor, *args: Any, **kwargs: Any) -> None:
        self._record(event, args, kwargs)

    return record


_install_event_methods(_AsyncActor, _async_actor_method)


def _scenario_error(spec: Mapping[str, Any]) -> BaseException:
    """The exception an error description names: a builtin exception class and its message."""
    kind = getattr(builtins, str(spec.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, BaseException)):
        raise ValueError(
            f"an error's type must name a builtin exception, got {_brief(spec.get('type'))}"
        )
    return kind(spec["message"]) if "message" in spec else kind()


def _unknown_keys(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    extra = sorted(set(given) - set(known))
    if extra:
        raise ValueError(f"{what} has unknown keys {extra}: expected some of {sorted(known)}")


def _plain(value: Any) -> Any:
    """An output as JSON data: messages by type and content, documents by their text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "page_content"):
        return {"page_content": value.page_content}
    if hasattr(value, "content"):
        return {"type": getattr(value, "type", None), "content": _plain(value.content)}
    return _brief(value)


@final
class _Play:
    """One scenario played once: its handlers, the tree built with ``kit``, the call, and the
    log of what every handler heard.

    ``outcome()`` makes the call and returns ``{"returns": ...}`` or ``{"raises": ...}``;
    ``trace()`` then gives the log as numbered trace lines. A bad description is a
    `ValueError` naming what is wrong.
    """

    __slots__ = ("asynchronous", "call", "handlers", "kit", "log", "raised", "runnable")

    def __init__(
        self, scenario: Mapping[str, Any], kit: Mapping[str, Callable[..., Any]] = _TOY_KIT
    ) -> None:
        self.kit = kit
        self.call = scenario["call"]
        if self.call.get("mode") not in _MODES:
            raise ValueError(f"a call's mode must be one of {_MODES}, got {_brief(self.call)}")
        self.asynchronous = self.call["mode"].startswith("a")
        self.log: list[tuple[str, Record]] = []
        self.raised: list[BaseException] = []  # the errors the scenario's functions raised
        self.handlers: dict[str, _Actor] = {}
        for label, spec in scenario.get("handlers", {}).items():
            _unknown_keys(f"handler {label!r}", spec, _HANDLER_KEYS)
            cls: type[_Actor] = _AsyncActor if spec.get("async") else _Actor
            if "flag_raises" in spec:  # a flag whose reading raises (D8)
                flag, message = spec["flag_raises"], f"{label}.{spec['flag_raises']}"

                def fails(self: _Actor, message: str = message) -> bool:
                    raise RuntimeError(message)

                cls = cast("type[_Actor]", type(cls.__name__, (cls,), {flag: property(fails)}))
            self.handlers[label] = cls(label, spec, self.log)
        self.runnable = self.build(scenario["runnable"])

    def labelled(self, labels: Iterable[str]) -> list[_Actor]:
        try:
            return [self.handlers[label] for label in labels]
        except KeyError as error:
            raise ValueError(f"no handler is labelled {error.args[0]!r}") from None

    def config(self, spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A config from its description: handlers by label."""
        if spec is None:
            return None
        config = dict(spec)
        if "callbacks" in config:
            config["callbacks"] = self.labelled(config["callbacks"])
        return config

    def build(self, node: Mapping[str, Any]) -> Any:
        """The runnable a node describes, built with the kit (each kind's constructor)."""
        kind = node.get("kind")
        if kind not in _NODE_KEYS:
            raise ValueError(f"a node's kind must be one of {list(_NODE_KEYS)}, got {_brief(kind)}")
        _unknown_keys(f"a {kind} node", node, {"kind", "name", "bind", *_NODE_KEYS[kind]})
        options = {
            key: node[key] for key in ("name", "tags", "metadata", "streaming") if key in node
        }
        if "callbacks" in node:
            options["callbacks"] = self.labelled(node["callbacks"])
        first: Any
        if kind == "chain":
            first = [self.build(step) for step in node["steps"]]
        elif kind == "parallel":
            first = {key: self.build(step) for key, step in node["steps"].items()}
        elif kind in ("lambda", "tool"):
            if "name" not in node:
                raise ValueError(f"a {kind} node needs a name: {_brief(node)}")
            first = self.function(node)
        else:
            first = node["text"] if kind != "retriever" else node["documents"]
            if "error" in node:
                options["error"] = _scenario_error(node["error"])
        runnable = self.kit[kind](first, **options)
        if "bind" in node:
            runnable = runnable.with_config(**self.config(node["bind"]) or {})
        return runnable

    def function(self, node: Mapping[str, Any]) -> Callable[..., Any]:
        """A lambda's or tool's function: its calls in turn, then its error or its output.
        Async under the async modes, so that nested calls are ``ainvoke``s."""
        calls = [(self.build(call["runnable"]), call) for call in node.get("calls", ())]
        adds = self.labelled([node["add_handler"]]) if "add_handler" in node else []

        def config_for(call: Mapping[str, Any], config: Any) -> Any:
            return config if call.get("pass_config") else self.config(call.get("config"))

        def start(config: Any) -> None:
            for handler in adds:
                config["callbacks"].add_handler(handler)

        def finish(output: Any) -> Any:
            if "error" in node:
                self.raised.append(_scenario_error(node["error"]))
                raise self.raised[-1]
            return output

        def function(input: Any, config: Any = None) -> Any:
            start(config)
            output = input
            for runnable, call in calls:
                output = runnable.invoke(input, config_for(call, config))
            return finish(output)

        async def afunction(input: Any, config: Any = None) -> Any:
            start(config)
            output = input
            for runnable, call in calls:
                output = await runnable.ainvoke(input, config_for(call, config))
            return finish(output)

        if node["kind"] == "lambda":  # it takes a config, so the toy passes it one
            return afunction if self.asynchronous else function

        async def atool(input: Any) -> Any:  # a tool's function takes its input alone
            return await afunction(input)

        def tool(input: Any) -> Any:
            return function(input)

        return atool if self.asynchronous else tool

    def outcome(self, timeout: float | None = None) -> dict[str, Any]:
        """Make the call: ``{"returns": output}``, or ``{"raises": error}`` for an exception
        or one the scenario raised on purpose (a real interrupt is not swallowed). An async
        call still running after ``timeout`` seconds is cancelled (`TimeoutError`): for
        implementations that hang."""
        config = self.config(self.call.get("config"))
        with sequential_run_ids():
            try:
                if self.asynchronous:
                    output = asyncio.run(asyncio.wait_for(self._adrive(config), timeout))
                else:
                    output = self._drive(config)
            except BaseException as error:
                if not isinstance(error, Exception) and all(error is not e for e in self.raised):
                    raise
                return {"raises": {"type": type(error).__name__, "message": _text(error)}}
        return {"returns": _plain(output)}

    def _drive(self, config: Any) -> Any:
        mode, value = self.call["mode"], self.call.get("input")
        if mode == "invoke":
            return self.runnable.invoke(value, config)
        if mode == "batch":
            return self.runnable.batch(list(value), config)
        chunks: list[Any] = []
        with contextlib.closing(self.runnable.stream(value, config)) as stream:
            for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == self.call.get("take"):
                    break
        return chunks

    async def _adrive(self, config: Any) -> Any:
        mode, value = self.call["mode"], self.call.get("input")
        if mode == "ainvoke":
            return await self.runnable.ainvoke(value, config)
        if mode == "abatch":
            return await self.runnable.abatch(list(value), config)
        chunks: list[Any] = []
        stream = self.runnable.astream(value, config)
        try:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == self.call.get("take"):
                    break
        finally:
            await stream.aclose()
        return chunks

    def trace(self) -> list[dict[str, Any]]:
        """The log as trace lines (`_trace_fields` plus ``handler``), run ids renumbered in
        order of first appearance, handler after handler in the order they are listed."""
        ids: dict[Any, str] = {}
        for label in self.handlers:
            for heard, record in self.log:
                if heard == label:
                    for run_id in (record.run_id, record.parent_run_id):
                        if run_id is not None and run_id not in ids:
                            ids[run_id] = str(uuid.UUID(int=len(ids) + 1))
        lines = []
        for label, record in self.log:
            line = {"handler": label, **_trace_fields(record)}
            line["run_id"] = ids.get(record.run_id)
            line["parent_run_id"] = ids.get(record.parent_run_id)
            lines.append(line)
        return lines


# Nodes several scenarios share (never mutated).
_PROMPT: Final = {"kind": "lambda", "name": "prompt"}
_MODEL: Final = {"kind": "llm", "name": "model", "text": "a b"}
_CHAT: Final = {"kind": "chat_model", "name": "chat", "text": "hi there"}
_DOCS: Final = {"kind": "retriever", "name": "docs", "documents": ["a b", "b c"]}
_TOOL: Final = {"kind": "tool", "name": "lookup"}
_FOUR: Final = ("invoke", "ainvoke", "stream", "astream")  # batch modes: see R3's scenario


def _chain(*steps: Mapping[str, Any], name: str = "outer", **more: Any) -> dict[str, Any]:
    return {"kind": "chain", "name": name, "steps": list(steps), **more}


def _calling(name: str, *calls: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    """A lambda that calls each runnable (``{"runnable": ...}`` or a bare node) in turn."""
    listed = [call if "runnable" in call else {"runnable": call} for call in calls]
    return {"kind": "lambda", "name": name, "calls": listed, **more}


# The scenarios, in SPEC order: ``rules`` are the rules each shows, ``differs`` the rules on
# which LangChain (langchain-core 1.7) gives another trace, each in the README's list of
# differences; ``modes`` the call modes it is played in (one corpus entry each). The call's
# input is "a b" unless given (a list of two for the batch modes). What a scenario leaves out
# is `_USUAL`'s: one handler ``h``, given at request time, and the two invoke modes.
_USUAL: Final = {
    "handlers": {"h": {}},
    "config": {"callbacks": ["h"]},
    "modes": ("invoke", "ainvoke"),
}
_SCENARIOS: Final[tuple[dict[str, Any], ...]] = (
    {
        "id": "request-handlers-hear-every-run",
        "rules": ["S1", "S4"],
        "about": "a request-time handler hears the chain and both steps, each step tagged",
        "runnable": _chain(_PROMPT, _MODEL),
        "modes": _FOUR,
    },
    {
        "id": "constructor-handlers-hear-their-own-runs",
        "rules": ["S2", "S5"],
        "about": "a model's constructor handler hears the model's run alone, after the "
        "request-time handlers, which hear every run in the order given",
        "handlers": {"h": {}, "g": {}, "c": {}},
        "runnable": _chain(_PROMPT, {**_MODEL, "callbacks": ["c"]}),
        "config": {"callbacks": ["h", "g"]},
        "modes": _FOUR,
    },
    {
        "id": "constructor-handlers-of-a-tool-miss-its-children",
        "rules": ["S2"],
        "about": "a tool's constructor handler hears the tool, not the model it calls",
        "handlers": {"h": {}, "c": {}},
        "runnable": {**_TOOL, "callbacks": ["c"], "calls": [{"runnable": _MODEL}]},
    },
    {
        "id": "request-tags-and-metadata-are-inherited-constructor-ones-are-local",
        "rules": ["S3", "S8"],
        "about": "request tags and metadata reach every run; a tool's own reach its run only",
        "runnable": _chain(
            _PROMPT,
            {**_TOOL, "tags": ["own"], "metadata": {"k": "tool"}, "calls": [{"runnable": _DOCS}]},
        ),
        "config": {"callbacks": ["h"], "tags": ["req"], "metadata": {"k": "req", "r": 1}},
    },
    {
        "id": "a-step-tag-marks-one-child",
        "rules": ["S4"],
        "about": "a nested named chain's steps carry their own seq:step tags, not its own",
        "runnable": _chain(_PROMPT, _chain({**_PROMPT, "name": "inner1"}, _MODEL, name="inner")),
        "modes": ("invoke", "stream"),
    },
    {
        "id": "a-handler-listed-twice-hears-once",
        "rules": ["S6"],
        "differs": {"S6": ("invoke", "ainvoke")},
        "about": "a handler listed twice in the request hears each event once",
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["h", "h"]},
    },
    {
        "id": "a-bound-handler-given-again-hears-once",
        "differs": {"S6": ("invoke", "ainvoke")},
        "rules": ["S6", "S9"],
        "about": "a handler both bound and given in the request hears each event once",
        "runnable": {**_calling("outer", _MODEL), "bind": {"callbacks": ["h"]}},
    },
    {
        "id": "tags-are-an-ordered-set",
        "rules": ["S7", "S3"],
        "differs": {"S7": ("invoke",)},
        "about": "repeated tags are dropped, and a tool's own tag equal to an inherited one "
        "does not stop that tag from reaching the tool's children",
        "runnable": {**_TOOL, "tags": ["x", "t"], "calls": [{"runnable": _MODEL}]},
        "config": {"callbacks": ["h"], "tags": ["x", "y", "x"]},
        "modes": ("invoke",),
    },
    {
        "id": "metadata-merges-key-by-key",
        "rules": ["S8", "S10"],
        "about": "a nested call's metadata adds to the request's, a model's own beats both "
        "for its run, and a sibling called without a config sees the request's",
        "runnable": _calling(
            "outer",
            {
                "runnable": {**_MODEL, "metadata": {"k": "model"}},
                "config": {"metadata": {"k": "nested", "n": 2}},
            },
            _DOCS,
        ),
        "config": {"callbacks": ["h"], "metadata": {"k": "req", "r": 1}},
    },
    {
        "id": "bound-handlers-are-inherited",
        "rules": ["S9"],
        "about": "a handler bound with with_config hears the bound lambda and its children",
        "handlers": {"h": {}, "b": {}},
        "runnable": _chain(
            _PROMPT, {**_calling("user", _MODEL), "bind": {"callbacks": ["b"], "tags": ["bound"]}}
        ),
        "modes": ("invoke", "ainvoke", "stream"),
    },
    {
        "id": "a-bound-runnable-called-inside-a-run-stays-its-child",
        "rules": ["S9", "S10"],
        "differs": {"S9": ("invoke", "ainvoke")},
        "about": "a bound model called without a config inside a run is that run's child, "
        "heard by the inherited handler and the bound one",
        "handlers": {"h": {}, "b": {}},
        "runnable": _calling("outer", {**_MODEL, "bind": {"callbacks": ["b"]}}),
    },
    {
        "id": "a-binding-beats-inherited-metadata",
        "rules": ["S9", "S8"],
        "differs": {"S9": ("invoke",)},
        "about": "a step's bound metadata beats the request's for that step",
        "runnable": _chain(_PROMPT, {**_PROMPT, "name": "bound", "bind": {"metadata": {"k": "b"}}}),
        "config": {"callbacks": ["h"], "metadata": {"k": "req"}},
        "modes": ("invoke",),
    },
    {
        "id": "nested-calls-without-a-config-are-children",
        "rules": ["S10", "S1"],
        "about": "a lambda's function calls a chat model and a tool without passing a config: "
        "both are the lambda's children",
        "runnable": _calling("agent", _CHAT, _TOOL),
        "modes": _MODES,
    },
    {
        "id": "a-nested-call-with-its-own-callbacks-starts-a-new-root",
        "rules": ["S10"],
        "differs": {"S10": ("invoke", "ainvoke")},
        "about": "a nested call with its own callbacks is a root heard by those alone, "
        "with no inherited tag or metadata",
        "handlers": {"h": {}, "g": {}},
        "runnable": _calling("outer", {"runnable": _MODEL, "config": {"callbacks": ["g"]}}),
        "config": {"callbacks": ["h"], "tags": ["req"], "metadata": {"r": 1}},
    },
    {
        "id": "empty-callbacks-hide-a-subtree",
        "rules": ["S10", "S2", "D7"],
        "about": "a nested call with callbacks [] hides it and its children from the "
        "inherited handler; a constructor handler inside still hears its run",
        "handlers": {"h": {}, "c": {}},
        "runnable": _calling(
            "outer",
            {
                "runnable": _calling("hidden", {**_MODEL, "callbacks": ["c"]}),
                "config": {"callbacks": []},
            },
        ),
    },
    {
        "id": "a-nested-config-of-tags-adds-to-the-inherited-manager",
        "rules": ["S10", "S3"],
        "about": "a nested call with tags alone stays in the tree, with both tag sets",
        "runnable": _calling("outer", {"runnable": _MODEL, "config": {"tags": ["extra"]}}),
        "config": {"callbacks": ["h"], "tags": ["req"]},
    },
    {
        "id": "run-name-names-the-receiving-run-only",
        "rules": ["S10"],
        "about": "config run_name renames the root, not its steps",
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["h"], "run_name": "renamed"},
        "modes": ("invoke",),
    },
    {
        "id": "parallel-branches-keep-the-tree-in-their-threads",
        "rules": ["S11", "S10", "S4"],
        "about": "each Parallel branch (tagged map:key) runs in a copy of the context, so a "
        "model it calls without a config is its child",
        "runnable": {
            "kind": "parallel",
            "name": "fan",
            "steps": {"x": _calling("left", _MODEL), "y": _calling("right", _DOCS)},
        },
        "config": {"callbacks": ["h"], "max_concurrency": 1},
        "modes": ("invoke", "batch"),  # langchain_core's async Parallel ignores the bound
    },
    {
        "id": "a-handler-added-to-a-lambdas-manager-hears-what-it-passes-on",
        "rules": ["S12"],
        "about": "a handler a function adds to its config's manager hears the call it "
        "passes that config to",
        "handlers": {"h": {}, "late": {}},
        "runnable": _calling(
            "outer", {"runnable": _MODEL, "pass_config": True}, add_handler="late"
        ),
    },
    {
        "id": "a-chain-batches-input-by-input",
        "rules": ["S1", "R3"],
        "differs": {"R3": ("batch", "abatch")},
        "about": "a batched chain takes each input through every step before the next input",
        "runnable": _chain(_PROMPT, _MODEL),
        "modes": ("batch", "abatch"),
    },
    {
        "id": "ignore-flags-silence-their-events",
        "rules": ["D1"],
        "about": "a handler ignoring LLM events misses the model's, tokens included; one "
        "ignoring chain events hears only the model",
        "handlers": {"h": {}, "q": {"ignore_llm": True}, "r": {"ignore_chain": True}},
        "runnable": _chain(_PROMPT, {**_MODEL, "streaming": True}),
        "config": {"callbacks": ["h", "q", "r"]},
        "modes": _FOUR,
    },
    {
        "id": "a-failing-handler-is-logged-and-the-run-goes-on",
        "rules": ["D2"],
        "about": "a handler raising in two events changes nothing for the call or the others",
        "handlers": {"f": {"fails_on": ["on_chain_start", "on_llm_end"]}, "h": {}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["f", "h"]},
    },
    {
        "id": "a-raise-error-handler-fails-the-call-after-everyone-heard",
        "rules": ["D2", "D3"],
        "differs": {"D2": ("invoke",)},
        "about": "a raise_error handler failing in on_llm_end fails the call once the others "
        "heard the event; every run closes with the error",
        "handlers": {"f": {"fails_on": ["on_llm_end"], "raise_error": True}, "h": {}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["f", "h"]},
    },
    {
        "id": "a-failing-model-closes-every-run-innermost-first",
        "rules": ["D3", "S1"],
        "about": "a model raising inside its run: its error, then the chain's",
        "runnable": _chain(
            _PROMPT, {**_MODEL, "text": "a b c", "error": {"type": "ValueError", "message": "x"}}
        ),
        "modes": _FOUR,
    },
    {
        "id": "a-failing-tool-inside-a-lambda-closes-both",
        "rules": ["D3"],
        "about": "a tool raising inside a lambda: the tool's error, then the lambda's",
        "runnable": _calling(
            "agent", {**_TOOL, "error": {"type": "LookupError", "message": "none"}}
        ),
    },
    {
        "id": "an-interrupt-from-a-body-closes-every-run",
        "differs": {"D3": ("ainvoke",)},
        "rules": ["D3"],
        "about": "a KeyboardInterrupt raised by a step still closes both runs",
        "runnable": _chain(
            _PROMPT, {**_PROMPT, "name": "stop", "error": {"type": "KeyboardInterrupt"}}
        ),
    },
    {
        "id": "a-raise-error-handler-failing-at-a-start-still-closes-the-run",
        "rules": ["D3", "D2"],
        "differs": {"D3": ("invoke", "ainvoke")},
        "about": "a raise_error failure in on_chain_start fails the call, and the run it "
        "started gets its error event",
        "handlers": {"f": {"fails_on": ["on_chain_start"], "raise_error": True}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["f"]},
    },
    {
        "id": "a-stream-closed-early-fails-its-runs-innermost-first",
        "rules": ["D3"],
        "differs": {"D3": ("stream", "astream")},
        "about": "a consumer that stops after the first chunk: the model's run fails with "
        "GeneratorExit, then the chain's",
        "runnable": _chain(_PROMPT, {**_MODEL, "text": "a b c"}),
        "take": 1,
        "modes": ("stream", "astream"),
    },
    {
        "id": "a-handler-without-chat-start-gets-llm-start",
        "rules": ["D4"],
        "about": "a handler with no on_chat_model_start hears the chat run's start as "
        "on_llm_start; one that also ignores LLM events hears nothing of it",
        "handlers": {"n": {"chat_start": False}, "m": {"chat_start": False, "ignore_llm": True}},
        "runnable": _chain(_PROMPT, _CHAT),
        "config": {"callbacks": ["n", "m"]},
    },
    {
        "id": "inline-handlers-go-first-under-async-dispatch",
        "rules": ["D5"],
        "about": "under async dispatch a run_inline handler hears each event before an async one "
        "listed before it",
        "handlers": {"a": {"async": True}, "i": {"run_inline": True}},
        "runnable": _chain(_PROMPT, _DOCS),
        "config": {"callbacks": ["a", "i"]},
        "modes": ("ainvoke", "astream"),
    },
    {
        "id": "every-handler-gets-llm-start-beside-an-inline-one",
        "rules": ["D5"],
        "differs": {"D5": ("ainvoke",)},
        "about": "an inline handler beside an async one: both hear on_llm_start",
        "handlers": {"a": {"async": True}, "i": {"run_inline": True}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["a", "i"]},
        "modes": ("ainvoke",),
    },
    {
        "id": "async-handlers-run-in-their-turn-under-sync-dispatch",
        "rules": ["D6"],
        "differs": {"D6": ("invoke", "stream")},
        "about": "under invoke an async handler listed first hears each event before the sync "
        "one after it",
        "handlers": {"a": {"async": True}, "h": {}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["a", "h"]},
        "modes": ("invoke", "stream"),
    },
    {
        "id": "an-async-raise-error-handler-fails-a-sync-call",
        "rules": ["D6", "D2"],
        "differs": {"D6": ("invoke",)},
        "about": "under invoke an async raise_error handler's failure fails the call",
        "handlers": {"a": {"async": True, "fails_on": ["on_llm_start"], "raise_error": True}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["a"]},
        "modes": ("invoke",),
    },
    {
        "id": "an-unobserved-parent-still-gives-its-id",
        "rules": ["D7", "S2"],
        "about": "nobody listens to the chain, yet its model's constructor handler gets the "
        "chain's id as parent",
        "handlers": {"c": {}},
        "runnable": _chain(_PROMPT, {**_MODEL, "callbacks": ["c"]}),
        "config": None,
        "modes": ("invoke", "ainvoke", "stream"),
    },
    {
        "id": "a-flag-that-raises-is-its-handlers-failure",
        "rules": ["D8", "D2"],
        "about": "a handler whose ignore_chain flag raises misses the chain events, logged; "
        "the call and the other handler are unaffected",
        "handlers": {"b": {"flag_raises": "ignore_chain"}, "h": {}},
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["b", "h"]},
    },
    {
        "id": "stop-iteration-from-a-handler-is-an-ordinary-failure",
        "rules": ["D8", "D2"],
        "differs": {"D8": ("ainvoke",)},
        "about": "a handler raising StopIteration is a logged failure in every mode",
        "handlers": {
            "f": {"fails_on": ["on_chain_start"], "fails_with": {"type": "StopIteration"}}
        },
        "runnable": _chain(_PROMPT, _MODEL),
        "config": {"callbacks": ["f"]},
    },
)


def _corpus(kit: Mapping[str, Callable[..., Any]] = _TOY_KIT) -> dict[str, Any]:
    """The corpus: every scenario in each of its modes, with what playing it gave."""
    entries = []
    for given in _SCENARIOS:
        scenario = {**_USUAL, **given}
        for mode in scenario["modes"]:
            batch = mode.endswith("batch")
            config = scenario["config"]
            if batch:  # one input after the other: a trace with one order
                config = {**(config or {}), "max_concurrency": 1}
            call = {"mode": mode, "input": ["a b", "b"] if batch else "a b", "config": config}
            if "take" in scenario:
                call["take"] = scenario["take"]
            differs = scenario.get("differs", {})
            entry = {
                "id": f"{scenario['id']}/{mode}",
                "rules": scenario["rules"],
                "differs": [rule for rule, modes in differs.items() if mode in modes],
                "about": scenario["about"],
                "handlers": scenario["handlers"],
                "runnable": scenario["runnable"],
                "call": call,
            }
            entries.append(_played(entry, kit))
    return {
        "format": "callbacks-scenarios",
        "version": __version__,
        "about": "see callbacks.py, section Scenarios, and its README",
        "scenarios": entries,
    }


def _played(
    scenario: Mapping[str, Any],
    kit: Mapping[str, Callable[..., Any]] = _TOY_KIT,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``scenario`` with ``ordered``, ``outcome`` and ``trace`` from playing it with ``kit``."""
    play = _Play(scenario, kit)
    outcome = play.outcome(timeout)
    handlers = scenario.get("handlers", {}).values()  # sync ones run concurrently (async)
    ordered = not play.asynchronous or all(h.get("async") or h.get("run_inline") for h in handlers)
    return {**scenario, "ordered": ordered, "outcome": outcome, "trace": play.trace()}


def _scenarios_command() -> int:
    """``python -m callbacks scenarios``: the corpus, as JSON on standard output."""
    quiet = logging.NullHandler()  # handler failures some scenarios cause on purpose (D2)
    _LOGGER.addHandler(quiet)
    try:
        corpus = _corpus()
    finally:
        _LOGGER.removeHandler(quiet)
    print(json.dumps(corpus, indent=1))
    return 0


def _main(argv: Sequence[str]) -> int:
    """``python callbacks.py`` (or ``python -m callbacks``): the demo; with ``check PATH``,
    `_check_command`; with ``scenarios``, `_scenarios_command`; with ``-h`` or ``--help``, the
    usage. Anything else: the usage on standard error, exit status 2."""
    if not argv:
        _demo()
        return 0
    if len(argv) == 2 and argv[0] == "check":
        return _check_command(argv[1])
    if list(argv) == ["scenarios"]:
        return _scenarios_command()
    usage = "usage: python -m callbacks [check TRACE.jsonl | check - | scenarios]"
    asked = list(argv) in (["-h"], ["--help"])
    print(usage, file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


# =================================================================================================
# Demo: python callbacks.py
# =================================================================================================


def _demo() -> None:
    """Run a small question-answering chain and print what two handlers saw."""
    request, constructor = Recorder(), Recorder()
    retriever = Retriever(["Paris is the capital of France.", "Lyon is in France."], name="docs")
    model = ChatModel("The capital of France is Paris.", streaming=True, callbacks=[constructor])

    def prompt(inputs: dict[str, Any]) -> str:
        context = " ".join(d.page_content for d in inputs["context"])
        return f"Context: {context}\nQuestion: {inputs['question']}"

    def count_words(message: AIMessage) -> int:
        """Count the words of a message."""
        return len(message.content.split())

    chain = (
        {"context": retriever, "question": Lambda(lambda q: q, name="passthrough")}
        | Lambda(prompt)
        | model
        | Tool(count_words)
    ).with_config(run_name="qa")
    with sequential_run_ids():
        answer = chain.invoke(
            "France",
            {"callbacks": [request], "tags": ["demo"], "max_concurrency": 1},
        )
    (start,) = [r for r in request.records if r.event is Event.CHAT_MODEL_START]
    tokens = [r.args[0] for r in constructor.records if r.event is Event.LLM_NEW_TOKEN]
    print(f"answer: {answer!r}\n")
    print("The chat model's messages, as on_chat_model_start got them:")
    for message in start.args[1][0]:
        print(f"    {message.type}: {message.content!r}")
    print(f"\nIts tokens, as on_llm_new_token got them: {tokens!r}\n")
    print(f"Request-time handler, {len(request.records)} events: inherited by every run (S1).")
    print(request.tree())
    print(f"\nConstructor handler, {len(constructor.records)} events: local to the chat model, so")
    print("only its run (S2); that run's parent, qa, was never heard, so it shows as a root.")
    print(constructor.tree())


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
