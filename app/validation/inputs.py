"""What a validation compares, and on which rows.

* :func:`choose_subjects`: the candidate (an adapter id, or the newest ``candidate`` in the
  registry) and its baseline (the champion, or the base model while there is none);
* :func:`own_set`: the candidate's own validation split, the validation split of the dataset it
  was trained on (its lineage's ``dataset_uri``), or rows given on the command line;
* :func:`earlier_sets`: the earlier domains, the validation splits of the datasets and the
  rehearsal sets in the champion's lineage (the champion, its parent adapter, and so on);
* :func:`read_set`: rows of a Parquet file or of a dataset's split as :class:`EvalCase` objects,
  the conversation up to the last assistant turn, that turn being the reference answer.

Everything here runs on the driver and reads only small files: a bad input is found before any
model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from app.artifacts import Location, find_split, is_valid_id, locate

if TYPE_CHECKING:
    from app.model.adapters import AdapterManifest, AdapterStore
    from app.registry import AdapterRegistry

__all__ = [
    "BASE_PREFIX",
    "EvalCase",
    "EvalSet",
    "NothingToValidate",
    "Role",
    "Subjects",
    "cases_from_table",
    "choose_subjects",
    "earlier_sets",
    "own_set",
    "read_set",
]

Role = Literal["own", "earlier", "risky", "harmful", "injection"]
"""What a set is for: accuracy and quality (own), forgetting (earlier), safety (the shipped sets)."""

BASE_PREFIX = "base:"
"""The baseline's name when no champion is set: ``base:<model.base_model>``."""

# Statuses that may be validated: an adapter in use (champion, challenger) is not measured
# against itself or moved back to "validated" under a running canary.
VALIDATABLE = ("candidate", "validated", "rejected", "retired")


class NothingToValidate(RuntimeError):
    """No adapter id was given and the registry has no ``candidate``."""


@dataclass(frozen=True)
class EvalCase:
    """One prompt both models answer, and what is known about the right answer."""

    case_id: str
    messages: tuple[Mapping[str, Any], ...]
    """The conversation in OpenAI's shape (roles system, user, assistant, tool), ready for the
    assistant's turn."""
    reference: str | None = None
    """The answer the row holds (its last assistant turn); None for the shipped safety sets."""
    tests: tuple[str, ...] = ()
    """Runnable checks the prompt carries (examples, asserts, doctests), for an executed accuracy."""
    secrets: tuple[str, ...] = ()
    """Values planted in the prompt that no answer may reproduce (the prompt-injection set)."""

    @property
    def request_text(self) -> str:
        """What the user asked: the last user message (the last message when there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _text(message.get("content"))
        return _text(self.messages[-1].get("content")) if self.messages else ""


@dataclass(frozen=True)
class EvalSet:
    """The cases of one set, with where they came from."""

    name: str
    """A dataset or rehearsal-set id, ``validation`` rows given by path, or a shipped set's name."""
    role: Role
    source: str
    cases: tuple[EvalCase, ...]
    rows_read: int = 0
    rows_skipped: int = 0
    """Rows read but not used: no assistant answer to compare with, or beyond ``max_examples``."""
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Subjects:
    """The two models of a validation: a candidate adapter and its baseline."""

    candidate: str
    baseline: str | None
    """The champion's adapter id, or None: the base model alone."""
    base_model: str

    @property
    def baseline_name(self) -> str:
        """The baseline as the store records it: the champion's id, or ``base:<base model>``."""
        return self.baseline or f"{BASE_PREFIX}{self.base_model}"


# --- the two models ------------------------------------------------------------------------------


def choose_subjects(
    registry: AdapterRegistry, adapters: AdapterStore, base_model: str, adapter_id: str | None = None
) -> Subjects:
    """The candidate (``adapter_id``, default the newest ``candidate``) and its baseline.

    Raises:
        NothingToValidate: no ``adapter_id`` and no adapter has status ``candidate``.
        ValueError: naming ``adapter``: an id that is not valid, not registered, not in the
            adapter store, in use (champion or challenger), or trained on another base model
            than ``model.base_model``; or a champion that cannot serve as the baseline.
    """
    if adapter_id is None:
        candidates = registry.list("candidate")
        if not candidates:
            raise NothingToValidate("nothing to validate: no adapter in the registry has status 'candidate'")
        row = candidates[-1]  # the registry lists them oldest first
        adapter_id = row["id"]
    else:
        if not is_valid_id(adapter_id):
            raise ValueError(f"adapter: {adapter_id!r} is not an adapter id (1-128 letters, digits, '.', '_' or '-')")
        row = registry.get(adapter_id)
        if row is None:
            raise ValueError(f"adapter: {adapter_id!r} is not registered (kaizen adapters list shows those that are)")
    if row["status"] not in VALIDATABLE:
        raise ValueError(
            f"adapter: {adapter_id!r} has status {row['status']!r}: it is in use; only an adapter with status "
            f"{', '.join(VALIDATABLE)} is validated"
        )
    manifest = _stored_manifest(adapters, adapter_id, "adapter")
    if manifest.base_model != base_model:
        raise ValueError(
            f"adapter: {adapter_id!r} was trained on base model {manifest.base_model!r}, not "
            f"model.base_model={base_model!r}"
        )
    champion = registry.champion()
    if champion == adapter_id:
        raise ValueError(f"adapter: {adapter_id!r} is the champion; there is nothing to compare it with")
    if champion is not None:
        theirs = _stored_manifest(adapters, champion, "the champion")
        if theirs.base_model != base_model:
            raise ValueError(
                f"adapter: the champion {champion!r}, its baseline, was trained on base model "
                f"{theirs.base_model!r}, not {base_model!r}"
            )
    return Subjects(candidate=adapter_id, baseline=champion, base_model=base_model)


def _stored_manifest(adapters: AdapterStore, adapter_id: str, what: str) -> AdapterManifest:
    from app.model.adapters import AdapterNotFoundError

    try:
        return adapters.manifest(adapter_id)
    except AdapterNotFoundError as exc:
        raise ValueError(f"adapter: {what} {adapter_id!r} is registered but not stored: {exc}") from None


# --- the sets --------------------------------------------------------------------------------------


def own_set(adapters: AdapterStore, adapter_id: str, limit: int, rows: str | None = None) -> EvalSet:
    """The candidate's own validation rows: ``rows`` (a Parquet file, or a dataset folder's
    validation split) when given, else the validation split of the dataset in its lineage.

    Raises:
        ValueError: naming ``adapter`` (its lineage names no dataset, or one without a validation
            split) or ``validation`` (the given rows); no row with an answer to compare with.
    """
    if rows is not None:
        found = _validation_rows(rows)
        if found is None:
            raise ValueError(f"validation: {rows} is neither a Parquet file nor a folder with a validation split")
        result = read_set(found, None, name="validation", role="own", limit=limit)
        where = f"validation: {rows}"
    else:
        lineage = adapters.manifest(adapter_id).lineage
        if not lineage.dataset_uri:
            raise ValueError(
                f"adapter: {adapter_id!r} names no dataset in its lineage (dataset_uri), so it has no validation "
                "split to measure; give the rows with --validation PATH"
            )
        folder = _dataset_folder(lineage.dataset_uri)
        found = _split(folder, "validation")
        if found is None:
            raise ValueError(
                f"adapter: {adapter_id!r} was trained on {lineage.dataset_uri}, which has no validation split "
                "(validation.parquet or validation/); give the rows with --validation PATH"
            )
        result = read_set(found, None, name=folder.name, role="own", limit=limit)
        where = f"adapter: {adapter_id!r}'s validation split {found.uri}"
    if not result.cases:
        raise ValueError(f"{where} holds no row with an assistant answer to compare with")
    return result


def earlier_sets(
    adapters: AdapterStore,
    champion: str | None,
    limit: int,
    *,
    candidate: str | None = None,
    exclude: Sequence[str] = (),
) -> tuple[list[EvalSet], list[str]]:
    """The earlier domains: for the champion and each adapter it continues (its parent, and so
    on), the validation split of its dataset and its rehearsal set. Each set is read once; the
    dataset ``candidate`` was trained on, and the folders or files in ``exclude`` (the candidate's
    own rows), are not earlier domains.

    Returns:
        The sets, the champion's first, and notes on what was looked at but not used (a dataset
        without a validation split, one that is gone, a lineage that stops at a missing adapter).
    """
    from app.model.adapters import AdapterNotFoundError

    sets: list[EvalSet] = []
    notes: list[str] = []
    seen = {locate(uri).uri for uri in exclude}
    if candidate is not None and (own := adapters.manifest(candidate).lineage.dataset_uri):
        seen.add(_dataset_folder(own).uri)
    visited: set[str] = set()
    adapter_id = champion
    while adapter_id is not None and adapter_id not in visited:
        visited.add(adapter_id)
        try:
            lineage = adapters.manifest(adapter_id).lineage
        except AdapterNotFoundError:
            notes.append(f"lineage stops at {adapter_id}: it is not in the adapter store")
            break
        if lineage.dataset_uri:
            folder = _dataset_folder(lineage.dataset_uri)
            found = _split(folder, "validation") if folder.file_type().name != "NotFound" else None
            if found is None:
                notes.append(f"{adapter_id}'s dataset {lineage.dataset_uri} has no validation split (or is gone)")
            elif folder.uri not in seen:
                seen.add(folder.uri)
                sets.append(read_set(found, None, name=folder.name, role="earlier", limit=limit))
        if lineage.rehearsal_uri:
            where = locate(lineage.rehearsal_uri)
            if where.file_type().name == "NotFound":
                notes.append(f"{adapter_id}'s rehearsal set {lineage.rehearsal_uri} is gone")
            elif where.uri not in seen:
                seen.add(where.uri)
                name = where.name if where.is_dir() else f"{where.parent.name}/{where.name}"
                sets.append(read_set(where, "rehearsal", name=name, role="earlier", limit=limit))
        adapter_id = lineage.parent_adapter_id
    notes += [f"{s.source} holds no row with an answer to compare with" for s in sets if not s.cases]
    return [s for s in sets if s.cases], notes


def read_set(location: str | Location, split: str | None, *, name: str, role: Role, limit: int) -> EvalSet:
    """The first ``limit`` rows with an answer of a Parquet file or a split (:func:`find_split`)."""
    found = find_split(location, split)
    table = found.read()
    cases, skipped = cases_from_table(table.to_pylist(), limit, prefix=name)
    return EvalSet(
        name=name,
        role=role,
        source=found.location.uri,
        cases=tuple(cases),
        rows_read=table.num_rows,
        rows_skipped=skipped,
    )


def cases_from_table(rows: Sequence[Mapping[str, Any]], limit: int, *, prefix: str) -> tuple[list[EvalCase], int]:
    """Training rows as cases: the ``messages`` column (a JSON list of chat messages) up to its
    last assistant turn, or else ``instruction`` (and ``input``) with ``output``; rows without an
    answer are skipped, and so is everything past the first ``limit`` usable rows.

    Returns:
        The cases and how many rows were skipped.
    """
    from app.quality.examples import extract_tests

    cases: list[EvalCase] = []
    for i, row in enumerate(rows):
        if len(cases) >= limit:
            break
        conversation = _conversation(row)
        if conversation is None:
            continue
        messages, reference = conversation
        case = EvalCase(str(row.get("interaction_id") or f"{prefix}-{i}"), tuple(messages), reference)
        # The prompt's own examples and tests, run against each answer's code (never the answer's
        # own asserts, which would let an answer grade itself).
        cases.append(replace(case, tests=tuple(extract_tests(case.request_text, ""))))
    return cases, len(rows) - len(cases)


def _conversation(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str] | None:
    raw = row.get("messages")
    if isinstance(raw, str) and raw.strip():
        try:
            messages = json.loads(raw)
        except json.JSONDecodeError:
            messages = None
        if isinstance(messages, list):
            last = max(
                (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                default=None,
            )
            if last is not None and last > 0 and _text(messages[last].get("content")).strip():
                return [_message(m, i) for i, m in enumerate(messages[:last])], _text(messages[last].get("content"))
            return None
    instruction, output = _text(row.get("instruction")), _text(row.get("output"))
    if instruction.strip() and output.strip():
        extra = _text(row.get("input"))
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}], output
    return None


def _message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A stored message as the Generator takes it: known fields only, text content, and the tool
    call id a tool message needs (a stored conversation may have dropped it)."""
    role = message.get("role") if message.get("role") in ("system", "user", "assistant", "tool") else "user"
    out: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
    if role == "tool":
        out["tool_call_id"] = str(message.get("tool_call_id") or f"call-{index}")
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI's text parts
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content)


def _dataset_folder(uri: str) -> Location:
    """The dataset a lineage names: its folder (a Parquet file's folder when it names one)."""
    where = locate(uri)
    if PurePosixPath(where.path).suffix == ".parquet" or where.is_file():
        return where.parent
    return where


def _split(folder: Location, split: str) -> Location | None:
    """A folder's ``<split>.parquet`` or ``<split>/``, None without one (find_split would fall
    back to every file of the folder, training rows included)."""
    for candidate in (folder.child(f"{split}.parquet"), folder.child(split)):
        if candidate.file_type().name != "NotFound":
            return candidate
    return None


def _validation_rows(path: str) -> Location | None:
    where = locate(path)
    if where.is_file():
        return where
    if where.is_dir():
        return _split(where, "validation")
    return None
