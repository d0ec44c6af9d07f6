"""Realistic sample interactions built from real code that ships with Python.

Each request asks for a documented standard-library function (its name, signature and the first
line of its docstring); a good answer is that function's real source. About a quarter of the
answers are poor, as in real traffic: code with a syntax error, the wrong function, a truncated
answer, or prose with no code. Tool calls, feedback and outcomes are simulated to match the
answer's quality, and a few requests carry personal data for the privacy filter to catch.

``kaizen seed`` sends them through :class:`app.client.KaizenClient`, the real path.
"""

from __future__ import annotations

import importlib
import inspect
import random
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["SampleInteraction", "sample_events", "sample_interactions", "send_samples", "stdlib_functions"]

_MODULES = (
    "textwrap",
    "json.decoder",
    "json.encoder",
    "statistics",
    "bisect",
    "heapq",
    "string",
    "functools",
    "shlex",
    "fnmatch",
    "glob",
    "base64",
    "calendar",
    "difflib",
    "html",
    "ipaddress",
    "colorsys",
    "copy",
    "posixpath",
    "ntpath",
    "urllib.parse",
    "email.utils",
    "random",
    "fractions",
    "keyword",
    "dataclasses",
    "inspect",
    "tokenize",
    "zipfile",
    "tarfile",
    "configparser",
    "argparse",
    "pprint",
    "reprlib",
    "quopri",
    "wave",
    "gettext",
    "locale",
    "contextlib",
    "operator",
    "abc",
    "enum",
    "graphlib",
    "secrets",
)
_PROMPTS = (
    "Write a Python function `{name}{sig}` that {doc}",
    "How do I implement `{name}` in Python? It should {doc}",
    "Can you show me an implementation of {module}.{name}? Docs say: {Doc}",
    "I need `{name}{sig}` for my project. Requirement: {doc}",
    "Implement {name} from scratch (no imports of {module}): {doc}",
)
_POOR_KINDS = ("syntax_error", "wrong_function", "truncated", "no_code")
_TOOLS = ("read_file", "search_code", "run_tests", "shell", "write_file")
_PII = (
    "My email is {user}@example.com if you need more details.",
    "The repo is checked out in /home/{user}/work/project.",
    "It fails when I connect with postgres://{user}:S3cretPassw0rd@db.internal:5432/app",
    "Call me on +1 415 555 0134 if it is unclear.",
)


@dataclass(frozen=True)
class StdlibFunction:
    module: str
    name: str
    signature: str
    doc: str
    source: str
    path: str


@dataclass
class SampleInteraction:
    """One interaction with the follow-up events an agent would send about it."""

    interaction: dict[str, Any]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    feedback: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    poor: str | None = None  # the kind of poor answer, None for a good one


def stdlib_functions(max_lines: int = 60) -> list[StdlibFunction]:
    """Documented pure-Python functions of the standard library, with their source."""
    found = []
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
            path = inspect.getsourcefile(module) or module_name
        except Exception:  # a module missing on this build of Python
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc.split()) < 4:
                continue
            try:
                source = textwrap.dedent(inspect.getsource(obj))
                sig = str(inspect.signature(obj))
            except (OSError, TypeError, ValueError):
                continue
            if source.count("\n") > max_lines:
                continue
            first = doc.strip().split("\n\n")[0].replace("\n", " ")
            found.append(StdlibFunction(module_name, name, sig, first, source, path))
    return found


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text else text


def _poor_answer(kind: str, fn: StdlibFunction, other: StdlibFunction, rng: random.Random) -> str:
    if kind == "syntax_error":
        lines = fn.source.splitlines()
        i = next((k for k, line in enumerate(lines) if line.rstrip().endswith(":")), 0)
        lines[i] = lines[i].rstrip()[:-1]  # drop the colon of the def or a block
        return f"Sure:\n\n```python\n{chr(10).join(lines)}\n```\n"
    if kind == "wrong_function":
        return f"This should do it:\n\n```python\n{other.source}```\n"
    if kind == "truncated":
        lines = fn.source.splitlines()
        return "Here you go:\n\n```python\n" + "\n".join(lines[: max(2, len(lines) // 3)]) + "\n"
    return rng.choice(
        (
            f"You could probably write a loop for that. {fn.name} is not something I know well.",
            "Have you tried searching the documentation? It is usually straightforward.",
            f"Just use a library for {fn.name}, there should be one on PyPI.",
        )
    )


def sample_interactions(
    count: int, seed: int = 0, poor_share: float = 0.25, pii_share: float = 0.08, start: datetime | None = None
) -> Iterator[SampleInteraction]:
    """``count`` sample interactions, deterministic for a seed (see the module docstring)."""
    rng = random.Random(seed)
    functions = stdlib_functions()
    if not functions:
        raise RuntimeError("no standard-library sources found; is this Python built without them?")
    # Gaps are at most 40 s, so the last interaction is never in the future.
    start = start or datetime.now(UTC) - timedelta(seconds=40 * count + 60)
    users = ("alice", "bob", "carol", "dmitri", "eun-ji", "farid")
    sessions = [f"session-{rng.randrange(16**8):08x}" for _ in range(max(1, count // 8))]
    for i in range(count):
        fn = rng.choice(functions)
        other = rng.choice(functions)
        poor = rng.choice(_POOR_KINDS) if rng.random() < poor_share else None
        user = rng.choice(users)
        prompt = rng.choice(_PROMPTS).format(
            name=fn.name, sig=fn.signature, module=fn.module, doc=_lower_first(fn.doc), Doc=fn.doc
        )
        if rng.random() < pii_share:
            prompt += " " + rng.choice(_PII).format(user=user)
        if poor:
            response = _poor_answer(poor, fn, other, rng)
        else:
            response = f"Here is an implementation of `{fn.name}`:\n\n```python\n{fn.source}```\n\n{fn.doc}\n"
        ts = start + timedelta(seconds=i * rng.uniform(5, 40))
        interaction_id = uuid.UUID(int=rng.getrandbits(128)).hex
        session = rng.choice(sessions)
        gen_ms = rng.uniform(300, 2500) if not poor else rng.uniform(200, 4000)
        interaction = {
            "id": interaction_id,
            "session_id": session,
            "user_id": user,
            "prompt": prompt,
            "response": response,
            "timestamp": ts.isoformat(),
            "input_type": rng.choice(("prompt", "prompt", "command")),
            "intent": rng.choice(("implement_function", "explain", "refactor")),
            "complexity": "simple" if fn.source.count("\n") < 15 else rng.choice(("moderate", "complex")),
            "output_format": "markdown",
            "generation_time_ms": round(gen_ms, 1),
            "token_count": max(1, len(response) // 4),
            "streaming": rng.random() < 0.7,
            "metadata": {
                "model_version": "qwen2.5-coder-7b-instruct",
                "temperature": rng.choice((0.0, 0.2, 0.7)),
                "max_tokens": 2048,
                "stop_sequences": ["<|im_end|>"],
                "system_prompt": "You are a helpful coding assistant.",
            },
            "context": {
                "project_type": rng.choice(("library", "cli", "web-service")),
                "technologies": ["python"] + rng.sample(["pytest", "fastapi", "numpy", "click", "sqlalchemy"], 2),
                "architecture": rng.choice(("monolith", "layered", "plugin")),
                "working_directory": f"/home/{user}/src/project",
                "git": {
                    "branch": rng.choice(("main", "feature/parser", "fix/encoding")),
                    "last_commit": f"{rng.getrandbits(160):040x}",
                    "uncommitted_changes": rng.random() < 0.5,
                    "stash_count": rng.randrange(3),
                },
                "build": {"system": rng.choice(("setuptools", "poetry", "hatch")), "last_build_success": True},
                "testing": {"framework": "pytest", "test_coverage": round(rng.uniform(40, 95), 1)},
            },
            "sequence_number": i,
        }
        tools = []
        t0 = ts - timedelta(seconds=rng.uniform(2, 10))
        for order in range(rng.randrange(0, 4)):
            tool = rng.choice(_TOOLS)
            params = {
                "read_file": {"path": fn.path},
                "search_code": {"query": f"def {fn.name}", "path": "."},
                "run_tests": {"command": "python -m pytest -q"},
                "shell": {"command": f"python -c 'import {fn.module}; help({fn.module}.{fn.name})'"},
                "write_file": {"path": f"src/{fn.name}.py", "content": fn.source[:200]},
            }[tool]
            duration = rng.uniform(5, 900)
            ok = rng.random() < (0.95 if not poor else 0.6)
            tools.append(
                {
                    "tool_name": tool,
                    "invocation_order": order,
                    "parameters": params,
                    "start_time": t0.isoformat(),
                    "end_time": (t0 + timedelta(milliseconds=duration)).isoformat(),
                    "duration_ms": round(duration, 1),
                    "success": ok,
                    "exit_code": 0 if ok else 1,
                    "output": f"{fn.module}.{fn.name} found" if ok else "",
                    "error": None if ok else "FileNotFoundError: no such file",
                }
            )
            t0 += timedelta(milliseconds=duration + rng.uniform(10, 200))
        feedback = None
        if rng.random() < 0.8:
            if poor:
                feedback = {
                    "rating": rng.choice((1, 2, 2, 3)) if rng.random() < 0.6 else None,
                    "thumbs": "down" if rng.random() < 0.5 else None,
                    "abandoned": rng.random() < 0.6,
                    "modified": rng.random() < 0.4,
                    "time_to_first_use_s": round(rng.uniform(60, 900), 1),
                    "comment": rng.choice((None, "This does not run.", "Not what I asked for.")),
                }
            else:
                feedback = {
                    "rating": rng.choice((4, 5, 5)) if rng.random() < 0.6 else None,
                    "thumbs": "up" if rng.random() < 0.5 else None,
                    "accepted": rng.random() < 0.8,
                    "time_to_first_use_s": round(rng.uniform(2, 120), 1),
                    "copy_events": rng.randrange(0, 3),
                }
        outcome = None
        if rng.random() < 0.6:
            compiles = poor not in ("syntax_error", "truncated", "no_code")
            outcome = {
                "code_compiles": compiles,
                "tests_pass": compiles and poor is None and rng.random() < 0.9,
                "lint_passes": compiles and rng.random() < 0.8,
                "no_runtime_errors": compiles and poor is None,
            }
        yield SampleInteraction(interaction, tools, feedback, outcome, poor)


def sample_events(count: int, seed: int = 5) -> list[dict[str, Any]]:
    """``count`` sample interactions as ingestion events (``{id, type, timestamp, body}``), with
    their explicit ratings inline, for loading a store without a server (tests, benchmarks)."""
    events = []
    for s in sample_interactions(count, seed=seed):
        it = s.interaction
        body: dict[str, Any] = {
            "session_id": it["session_id"],
            "input": {"raw": it["prompt"]},
            "output": {"content": it["response"], "generation_time_ms": it["generation_time_ms"]},
            "context": it["context"],
        }
        if s.feedback and s.feedback.get("rating"):
            body["feedback"] = {"explicit": {"rating": s.feedback["rating"]}}
        events.append({"id": it["id"], "type": "interaction", "timestamp": it["timestamp"], "body": body})
    return events


def send_samples(client: Any, count: int, seed: int = 0) -> dict[str, int]:
    """Record ``count`` samples through a :class:`~app.client.KaizenClient`: the interaction, then
    its tool calls, feedback and outcome as separate events, as an agent sends them."""
    sent = {"interactions": 0, "tool_usage": 0, "feedback": 0, "outcomes": 0, "poor": 0}
    for sample in sample_interactions(count, seed=seed):
        it = dict(sample.interaction)
        iid = client.record_interaction(it.pop("session_id"), it.pop("prompt"), it.pop("response"), **it)
        sent["interactions"] += 1
        sent["poor"] += sample.poor is not None
        for tool in sample.tool_calls:
            tool = dict(tool)
            client.record_tool_usage(iid, tool.pop("tool_name"), **tool)
            sent["tool_usage"] += 1
        if sample.feedback:
            client.record_feedback(iid, **{k: v for k, v in sample.feedback.items() if v is not None})
            sent["feedback"] += 1
        if sample.outcome:
            client.record_outcome(iid, **sample.outcome)
            sent["outcomes"] += 1
    return sent
