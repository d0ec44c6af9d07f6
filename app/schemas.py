"""Wire and storage schemas: the seed's interaction, context, tool-usage, feedback and outcome
records, the quality score, and the ingestion event envelope ``{id, type, timestamp, body}``.

Field names are snake_case; the camelCase names a TypeScript agent sends (``sessionId``,
``generationTime``) are accepted too. Unknown fields are rejected, so a typo is named in the
rejection instead of being silently dropped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "EVENT_TYPES",
    "Complexity",
    "ContextSnapshot",
    "EventEnvelope",
    "EventResult",
    "ExplicitFeedback",
    "Feedback",
    "ImplicitFeedback",
    "Interaction",
    "InteractionInput",
    "InteractionMetadata",
    "InteractionOutput",
    "IsoDatetime",
    "JsonInt",
    "Outcome",
    "QualityScore",
    "TemporalFeedback",
    "ToolUsage",
    "format_validation_error",
    "json_int",
    "parse_event_body",
]

Complexity = Literal["simple", "moderate", "complex", "expert"]
MAX_TEXT = 1_000_000  # characters in one text field; larger is rejected, not truncated


class _Model(BaseModel):
    """A wire record: strict types (``"5"`` is no integer, ``0`` no boolean: what the OpenAPI
    document promises is what is accepted), unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False, strict=True
    )


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _iso_datetime(value: Any) -> Any:
    """An ISO 8601 date-time string (as JSON carries it) to a datetime; a number is refused
    rather than read as a Unix time, which is not what the schema's ``date-time`` says."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 date-time string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date-time: {value[:40]!r}") from None


IsoDatetime = Annotated[datetime, BeforeValidator(_iso_datetime)]


def _integral(value: Any) -> Any:
    # JSON has one number type: 3.0 is the integer 3 (JSON Schema says so too), 3.5 is not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def json_int(ge: int = INT64_MIN, le: int = INT64_MAX) -> Any:
    """The type of an integer field of a wire record: a JSON integer (``3`` or ``3.0``, not ``"3"``,
    not ``true``) from ``ge`` to ``le``, within what a 64-bit database column holds. (The bounds
    are part of the type: pydantic does not apply a field's own bounds through the validator.)"""
    return Annotated[int, Field(ge=max(ge, INT64_MIN), le=min(le, INT64_MAX)), BeforeValidator(_integral)]


JsonInt = json_int()
"""A date-time field of a wire record (and a query parameter): ISO 8601 strings only."""


Text = Annotated[str, Field(max_length=MAX_TEXT)]
Id = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:\-]+$")]


# --- interactions ------------------------------------------------------------------------------


class InteractionInput(_Model):
    raw: Text = Field(description="What the user typed or the agent was asked, verbatim.")
    processed: Text | None = Field(None, description="The prompt as sent to the model, if different.")
    type: Literal["command", "workflow", "prompt"] = Field("prompt", description="Kind of request.")
    intent: str | None = Field(None, max_length=200, description="Classified intent, e.g. 'fix_bug'.")
    complexity: Complexity | None = Field(None, description="Estimated task complexity.")


class InteractionOutput(_Model):
    content: Text = Field(description="The agent's response.")
    format: Literal["text", "markdown", "code"] = Field("markdown", description="Response format.")
    generation_time_ms: float | None = Field(
        None,
        ge=0,
        validation_alias=AliasChoices("generation_time_ms", "generationTimeMs", "generationTime"),
        description="Time the model took to generate the response, in milliseconds.",
    )
    token_count: json_int(0) | None = Field(None, description="Tokens in the response.")
    streaming: bool = Field(False, description="Whether the response was streamed.")


class InteractionMetadata(_Model):
    model_version: str | None = Field(None, max_length=200, description="Model or adapter that answered.")
    temperature: float | None = Field(None, ge=0, le=5, description="Sampling temperature.")
    max_tokens: json_int(0) | None = Field(None, description="Token limit of the request.")
    stop_sequences: list[str] = Field(default_factory=list, description="Stop sequences.")
    system_prompt: Text | None = Field(None, description="System prompt in effect.")
    serving_arm: Literal["champion", "challenger"] | None = Field(
        None,
        description="Which arm of a deployment answered a request for 'champion' (set by Kaizen's own "
        "generator; None when the request named an adapter id or the base model).",
    )
    deployment_id: str | None = Field(
        None, max_length=100, description="The deployment whose traffic split chose the arm."
    )


class GitState(_Model):
    branch: str | None = None
    last_commit: str | None = None
    uncommitted_changes: bool | None = None
    stash_count: json_int(0) | None = None


class BuildState(_Model):
    system: str | None = None
    last_build_time: IsoDatetime | None = None
    last_build_success: bool | None = None
    dependencies: list[str] = Field(default_factory=list)


class TestingState(_Model):
    framework: str | None = None
    last_test_run: IsoDatetime | None = None
    test_coverage: float | None = Field(None, ge=0, le=100)
    test_results: dict[str, json_int(0)] = Field(
        default_factory=dict, description="Counts such as passed, failed, skipped."
    )


class ContextSnapshot(_Model):
    """The project at interaction time (the seed's ``ProjectContext``)."""

    project_type: str | None = Field(None, max_length=200)
    technologies: list[str] = Field(default_factory=list)
    architecture: str | None = Field(None, max_length=2000)
    development_phase: str | None = Field(None, max_length=200)
    working_directory: str | None = Field(None, max_length=4096)
    git: GitState | None = None
    build: BuildState | None = None
    testing: TestingState | None = None


class ToolUsage(_Model):
    """One tool invocation (the seed's ``ToolUsageRecord``)."""

    interaction_id: Id | None = Field(None, description="The interaction it belongs to (implied when nested in one).")
    tool_name: str = Field(min_length=1, max_length=200)
    invocation_order: json_int(0) = 0
    parameters_raw: dict[str, Any] = Field(default_factory=dict)
    parameters_processed: dict[str, Any] | None = None
    start_time: IsoDatetime | None = None
    end_time: IsoDatetime | None = None
    duration_ms: float | None = Field(None, ge=0)
    success: bool | None = None
    retry_count: json_int(0) = 0
    output: Text | None = None
    error: Text | None = None
    exit_code: JsonInt | None = None
    resource_usage: dict[str, float] = Field(default_factory=dict, description="e.g. cpu_ms, memory_mb, io_bytes.")

    _utc_times = field_validator("start_time", "end_time")(_utc)


class ExplicitFeedback(_Model):
    rating: json_int(1, 5) | None = Field(None, description="1-5 stars.")
    thumbs: Literal["up", "down"] | None = Field(None, description="Binary feedback.")
    comment: Text | None = None
    correction: Text | None = Field(None, description="The answer the user would have wanted.")


class ImplicitFeedback(_Model):
    accepted: bool | None = Field(None, description="Used without modification.")
    modified: bool | None = Field(None, description="Changed before use.")
    abandoned: bool | None = Field(None, description="Discarded without use.")
    time_to_acceptance_s: float | None = Field(None, ge=0)


class TemporalFeedback(_Model):
    time_to_first_use_s: float | None = Field(None, ge=0)
    usage_time_s: float | None = Field(None, ge=0)
    return_visits: json_int(0) | None = None
    copy_events: json_int(0) | None = None


class Feedback(_Model):
    """What the user did with an answer; may arrive before or after its interaction."""

    interaction_id: Id | None = Field(None, description="The interaction it is about.")
    explicit: ExplicitFeedback | None = None
    implicit: ImplicitFeedback | None = None
    temporal: TemporalFeedback | None = None


class Outcome(_Model):
    """Objective results the agent observed (the seed's ``OutcomeMetrics``)."""

    interaction_id: Id | None = None
    code_compiles: bool | None = None
    tests_pass: bool | None = None
    lint_passes: bool | None = None
    type_check_passes: bool | None = None
    deployment_success: bool | None = None
    no_runtime_errors: bool | None = None


class Interaction(_Model):
    """One prompt and response (the seed's ``InteractionRecord``), optionally with its context,
    tool calls, feedback and outcome nested."""

    session_id: str = Field(min_length=1, max_length=500, description="Hashed before storage.")
    user_id: str | None = Field(None, max_length=500, description="Hashed before storage.")
    sequence_number: json_int(0) = 0
    input: InteractionInput
    output: InteractionOutput
    metadata: InteractionMetadata = Field(default_factory=InteractionMetadata)
    context: ContextSnapshot | None = None
    tool_calls: list[ToolUsage] = Field(default_factory=list, max_length=1000)
    feedback: Feedback | None = None
    outcome: Outcome | None = None


# --- quality -------------------------------------------------------------------------------------


class QualityScore(_Model):
    model_config = ConfigDict(strict=False)  # built here (an interval tuple), read back from JSON
    overall: float = Field(ge=0, le=1)
    components: dict[str, float] = Field(default_factory=dict)
    confidence: float = Field(ge=0, le=1)
    interval: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high]")
    assessor_version: str = "unversioned"
    cap: float | None = Field(
        None,
        description="The most the overall could be: failing its own examples, unparseable code, an injection risk.",
    )


# --- ingestion envelope ------------------------------------------------------------------------

EVENT_TYPES: dict[str, type[_Model]] = {
    "interaction": Interaction,
    "feedback": Feedback,
    "tool_usage": ToolUsage,
    "outcome": Outcome,
}
_NEEDS_INTERACTION_ID = {"feedback", "tool_usage", "outcome"}


class EventEnvelope(_Model):
    """``{id, type, timestamp, body}``; the id makes retries idempotent (and is the interaction id
    for ``type: interaction``)."""

    id: Id
    type: str = Field(description=f"One of {', '.join(EVENT_TYPES)}.")
    timestamp: IsoDatetime
    body: dict[str, Any]

    _utc_ts = field_validator("timestamp")(_utc)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in EVENT_TYPES:
            raise ValueError(f"unknown event type {value!r} (allowed: {', '.join(EVENT_TYPES)})")
        return value


class EventResult(BaseModel):
    """The answer for one event of a batch."""

    id: str | None = None
    status: Literal["accepted", "duplicate", "rejected", "excluded", "sampled_out"]
    field: str | None = None
    reason: str | None = None


def format_validation_error(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    """The first error of a pydantic ``ValidationError`` as ``(field, reason)`` for people."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    reason = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        reason = "unknown field"
    elif err["type"] == "missing":
        reason = "required field is missing"
    more = len(exc.errors()) - 1
    if more:
        reason += f" (and {more} more error{'s' if more > 1 else ''})"
    return field, reason


def parse_event_body(event_type: str, body: dict[str, Any]) -> _Model:
    """Validate an event body against its type's schema.

    Raises:
        pydantic.ValidationError: naming the field.
        ValueError: a feedback, tool-usage or outcome event without ``interaction_id``.
    """
    model = EVENT_TYPES[event_type].model_validate(body)
    if event_type in _NEEDS_INTERACTION_ID and not getattr(model, "interaction_id", None):
        raise ValueError("interaction_id: required for a " + event_type + " event")
    return model
