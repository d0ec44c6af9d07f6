"""From raw JSON events to privacy-filtered rows: validation, exclusion, sampling, redaction, minimization.

:class:`IngestPipeline` is the collector's logic without Serve or HTTP: ``prepare`` answers every
event of a batch on its own (one bad event never spoils the rest) and returns the accepted ones as
:class:`~app.store.StoredEvent` rows; the caller commits them and fills in accepted or duplicate.

With ``privacy.data_minimization`` (the default) only what the learning loop reads is stored: the
user id's hash, the working directory, feedback comments, processed tool parameters and tool
resource usage are dropped (nothing reads them), and tool outputs and errors are cut to what a
training example keeps of them (``dataset.max_tool_output_chars``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from app.config import KaizenConfig, job_options
from app.learning.dataset.options import DatasetConfig
from app.privacy import PrivacyFilter
from app.schemas import (
    EventEnvelope,
    EventResult,
    Feedback,
    Interaction,
    Outcome,
    ToolUsage,
    format_validation_error,
    parse_event_body,
)
from app.store.base import OUTCOME_FIELDS, StoredEvent

__all__ = ["TOOL_OUTPUT_CHARS", "IngestPipeline", "Prepared"]

log = logging.getLogger("kaizen.ingest")

TOOL_OUTPUT_CHARS: int = DatasetConfig.model_fields["max_tool_output_chars"].default
"""Characters of a tool's output (or error) a training example keeps: the default of
``dataset.max_tool_output_chars``, which a config may change (one value, the dataset options')."""


@dataclass
class Prepared:
    """``prepare``'s answer: a result per input event (``None`` where the commit decides) and the
    events to commit, with their positions in the input."""

    results: list[EventResult | None]
    to_commit: list[StoredEvent]
    positions: list[int]
    notes: list[str | None] = dataclass_field(default_factory=list)
    """What was corrected in each event of ``to_commit`` (said in its result), or None."""

    def finish(self, written: Sequence[bool]) -> list[EventResult]:
        """Fill in accepted or duplicate from the store's answer for ``to_commit``."""
        for pos, ev, new, note in zip(self.positions, self.to_commit, written, self.notes):
            self.results[pos] = EventResult(id=ev.id, status="accepted" if new else "duplicate", reason=note)
        return [r for r in self.results if r is not None]


class IngestPipeline:
    """Validate, filter and convert events; see the module docstring."""

    def __init__(self, cfg: KaizenConfig):
        self.cfg = cfg
        self.anonymize = cfg.collection.anonymize
        self.max_skew = timedelta(seconds=cfg.collection.max_future_skew_s)
        self.privacy = PrivacyFilter(
            hmac_key=cfg.hmac_key(),
            extra_patterns=cfg.privacy.exclude_sensitive_patterns,
            exclude_patterns=cfg.collection.exclude_patterns,
            capture_rate=cfg.collection.capture_rate,
        )
        self.minimize = cfg.privacy.data_minimization
        self.tool_output_chars = job_options(cfg, "dataset").max_tool_output_chars

    # --- the batch -----------------------------------------------------------------------------

    def prepare(self, raw_events: Sequence[Any], now: datetime | None = None) -> Prepared:
        now = now or datetime.now(UTC)
        out = Prepared(results=[], to_commit=[], positions=[])
        for i, raw in enumerate(raw_events):
            note = None
            try:
                result, stored, note = self._prepare_one(raw, now)
            except Exception:  # a bug must reject one event, never the batch; the log has the cause
                log.exception("preparing event %d failed", i)
                result = EventResult(
                    id=raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None,
                    status="rejected",
                    field=None,
                    reason="internal error while processing the event",
                )
                stored = None
            out.results.append(result)
            if stored is not None:
                out.positions.append(i)
                out.to_commit.append(stored)
                out.notes.append(note)
        return out

    def _prepare_one(self, raw: Any, now: datetime) -> tuple[EventResult | None, StoredEvent | None, str | None]:
        """The event's result (None when the commit decides), what to commit, and what was corrected."""
        if not isinstance(raw, dict):
            return _rejected(None, "", f"an event must be a JSON object, not {_json_type(raw)}"), None, None
        event_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        try:
            env = EventEnvelope.model_validate(raw)
        except ValidationError as exc:
            field, reason = format_validation_error(exc)
            return _rejected(event_id, field, reason), None, None
        corrected = None
        if env.timestamp - now > self.max_skew or env.timestamp.year < EARLIEST_YEAR:
            # A client's clock far ahead (or one that never was set) says nothing of when it
            # happened; the event is kept with the time it arrived, and the answer says so.
            ahead = (env.timestamp - now).total_seconds()
            corrected = (
                f"timestamp {ahead:.0f} s in the future (at most {self.max_skew.total_seconds():.0f} s allowed): "
                if ahead > 0
                else f"timestamp before {EARLIEST_YEAR}: "
            ) + "kept with the time it was received"
            env = env.model_copy(update={"timestamp": now})
        try:
            body = parse_event_body(env.type, env.body)
        except ValidationError as exc:
            field, reason = format_validation_error(exc, prefix="body")
            return _rejected(env.id, field, reason), None, None
        except ValueError as exc:
            field, _, reason = str(exc).partition(": ")
            return _rejected(env.id, f"body.{field}", reason), None, None

        if isinstance(body, Interaction):
            if self.privacy.excluded(body.input.raw, body.output.content):
                return EventResult(id=env.id, status="excluded", reason="matched an exclude pattern"), None, None
            if not self.privacy.should_capture(body.session_id):
                return EventResult(id=env.id, status="sampled_out", reason="session not sampled"), None, None
            return None, self._interaction(env, body, now), corrected
        return None, self._attachment(env, body, now), corrected

    # --- rows ------------------------------------------------------------------------------------

    def _text(self, value: str | None, found: Counter[str]) -> str | None:
        if value is None or not self.anonymize:
            return value
        red = self.privacy.redact(value)
        found.update(red.findings)
        return red.text

    def _json(self, value: Any, found: Counter[str]) -> Any:
        if not self.anonymize:
            return value
        clean, kinds = self.privacy.redact_json(value)
        found.update(kinds)
        return clean

    def _cut(self, text: str | None) -> str | None:
        """Minimization: a tool's output or error cut to what a training example keeps, the number
        of characters left out said at the end (after redaction: a cut must not split a secret)."""
        limit = self.tool_output_chars
        if text is None or not self.minimize or len(text) <= limit:
            return text
        keep = max(0, limit - 40)  # room for the note, so the stored text is within the limit
        return text[:keep] + f"\n[... {len(text) - keep} more characters]"[: limit - keep]

    def _interaction(self, env: EventEnvelope, it: Interaction, now: datetime) -> StoredEvent:
        found: Counter[str] = Counter()
        rows: dict[str, list[dict[str, Any]]] = {
            "interactions": [
                {
                    "id": env.id,
                    "session_hash": self.privacy.hash_id(it.session_id),
                    "user_hash": self.privacy.hash_id(it.user_id) if it.user_id and not self.minimize else None,
                    "timestamp": env.timestamp,
                    "received_at": now,
                    "sequence_number": it.sequence_number,
                    "input_raw": self._text(it.input.raw, found),
                    "input_processed": self._text(it.input.processed, found),
                    "input_type": it.input.type,
                    "intent": it.input.intent,
                    "complexity": it.input.complexity,
                    "output_content": self._text(it.output.content, found),
                    "output_format": it.output.format,
                    "generation_time_ms": it.output.generation_time_ms,
                    "token_count": it.output.token_count,
                    "streaming": it.output.streaming,
                    "model_version": it.metadata.model_version,
                    "serving_arm": it.metadata.serving_arm,
                    "deployment_id": it.metadata.deployment_id,
                    "temperature": it.metadata.temperature,
                    "max_tokens": it.metadata.max_tokens,
                    "stop_sequences": list(it.metadata.stop_sequences),
                    "system_prompt": self._text(it.metadata.system_prompt, found),
                }
            ]
        }
        if it.context is not None:
            # The working directory is a local path (often with a user name) that nothing reads.
            context = it.context.model_dump(
                mode="json", exclude_none=True, exclude={"working_directory"} if self.minimize else None
            )
            rows["context_snapshots"] = [
                {
                    "interaction_id": env.id,
                    "project_context": self._json(context, found),
                    "created_at": env.timestamp,
                }
            ]
        for i, tool in enumerate(it.tool_calls):
            rows.setdefault("tool_usage", []).append(
                self._tool_row(f"{env.id}/tool/{i}", env.id, env.timestamp, tool, found)
            )
        if it.feedback is not None:
            rows["feedback"] = [self._feedback_row(f"{env.id}/feedback", env.id, env.timestamp, it.feedback, found)]
        if it.outcome is not None:
            rows["outcomes"] = [self._outcome_row(f"{env.id}/outcome", env.id, env.timestamp, it.outcome)]
        rows["interactions"][0]["redaction_count"] = sum(found.values())
        self._redaction_rows(rows, env, found)
        return StoredEvent(env.id, env.type, env.timestamp, rows, received_at=now, interaction_id=env.id)

    def _attachment(self, env: EventEnvelope, body: Any, now: datetime) -> StoredEvent:
        found: Counter[str] = Counter()
        target = body.interaction_id
        if isinstance(body, Feedback):
            rows = {"feedback": [self._feedback_row(env.id, target, env.timestamp, body, found)]}
        elif isinstance(body, ToolUsage):
            rows = {"tool_usage": [self._tool_row(env.id, target, env.timestamp, body, found)]}
        else:
            assert isinstance(body, Outcome)
            rows = {"outcomes": [self._outcome_row(env.id, target, env.timestamp, body)]}
        self._redaction_rows(rows, env, found)
        return StoredEvent(env.id, env.type, env.timestamp, rows, received_at=now, interaction_id=target)

    def _tool_row(
        self, row_id: str, interaction_id: str, ts: datetime, tool: ToolUsage, found: Counter[str]
    ) -> dict[str, Any]:
        return {
            "id": row_id,
            "interaction_id": interaction_id,
            "timestamp": ts,
            "tool_name": tool.tool_name,
            "invocation_order": tool.invocation_order,
            "parameters_raw": self._json(tool.parameters_raw, found),
            "parameters_processed": (
                self._json(tool.parameters_processed, found)
                if tool.parameters_processed is not None and not self.minimize
                else None
            ),
            "start_time": tool.start_time,
            "end_time": tool.end_time,
            "duration_ms": (
                tool.duration_ms
                if tool.duration_ms is not None or not (tool.start_time and tool.end_time)
                else (tool.end_time - tool.start_time).total_seconds() * 1000
            ),
            "success": tool.success,
            "retry_count": tool.retry_count,
            "output": self._cut(self._text(tool.output, found)),
            "error": self._cut(self._text(tool.error, found)),
            "exit_code": tool.exit_code,
            "resource_usage": None if self.minimize else tool.resource_usage,
        }

    def _feedback_row(
        self, row_id: str, interaction_id: str, ts: datetime, fb: Feedback, found: Counter[str]
    ) -> dict[str, Any]:
        ex, im, te = fb.explicit, fb.implicit, fb.temporal
        return {
            "id": row_id,
            "interaction_id": interaction_id,
            "timestamp": ts,
            "rating": ex.rating if ex else None,
            "thumbs": ex.thumbs if ex else None,
            "comment": self._text(ex.comment, found) if ex and not self.minimize else None,
            "correction": self._text(ex.correction, found) if ex else None,
            "accepted": im.accepted if im else None,
            "modified": im.modified if im else None,
            "abandoned": im.abandoned if im else None,
            "time_to_acceptance_s": im.time_to_acceptance_s if im else None,
            "time_to_first_use_s": te.time_to_first_use_s if te else None,
            "usage_time_s": te.usage_time_s if te else None,
            "return_visits": te.return_visits if te else None,
            "copy_events": te.copy_events if te else None,
        }

    @staticmethod
    def _outcome_row(row_id: str, interaction_id: str, ts: datetime, oc: Outcome) -> dict[str, Any]:
        row: dict[str, Any] = {"id": row_id, "interaction_id": interaction_id, "timestamp": ts}
        row.update({name: getattr(oc, name) for name in OUTCOME_FIELDS})
        return row

    @staticmethod
    def _redaction_rows(rows: dict[str, list[dict[str, Any]]], env: EventEnvelope, found: Counter[str]) -> None:
        if found:
            rows["redactions"] = [
                {"event_id": env.id, "kind": kind, "count": n, "timestamp": env.timestamp}
                for kind, n in sorted(found.items())
            ]


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (what the client sent, not Python's name for it)."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), "not an object")


EARLIEST_YEAR = 2000
"""An event timestamp before this year is a clock that was never set: the time received is kept."""


def _rejected(event_id: str | None, field: str, reason: str) -> EventResult:
    return EventResult(id=event_id, status="rejected", field=field or None, reason=reason)
