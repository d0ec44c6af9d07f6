"""Kaizen's configuration: one pydantic model tree, loaded from YAML with dotted overrides.

The tree follows the seed's ``LearningConfig`` (collection, quality, training, model, privacy,
performance) plus the sections a running service needs (store, serve, ray, security).
Unknown keys are rejected with the key named; :func:`validate_config` returns the seed's errors
and warnings; :func:`load_config` raises :class:`ConfigError` on any error.

Example::

    cfg = load_config("configs/default.yaml", ["collection.capture_rate=0.5"])
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "JOB_SECTIONS",
    "NOT_YET_USED",
    "ConfigError",
    "KaizenConfig",
    "ValidationReport",
    "apply_overrides",
    "job_options",
    "load_config",
    "load_job_config",
    "resolve_paths",
    "section_options",
    "validate_config",
]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; ``errors`` lists every problem as ``key: reason``."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- the seed's LearningConfig sections -------------------------------------------------------

# The description of a key that nothing reads yet starts so; validate_config warns when one is set.
NOT_YET_USED = "Not yet used: "


class CollectionConfig(_Section):
    capture_rate: float = Field(
        1.0,
        description="Share of sessions recorded, 0.0-1.0; the collector answers sampled_out for the others "
        "(chosen by a hash of the session id, so a session is kept or dropped whole).",
    )
    exclude_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes; an interaction whose prompt or response matches one is answered excluded and not stored.",
    )
    anonymize: bool = Field(
        True,
        description="Redact personal data and secrets in every text before it is stored; false stores text "
        "as sent (ids are hashed either way).",
    )
    retention_days: int = Field(
        30,
        description=NOT_YET_USED + "data protection will delete raw interactions older than this (at least 1).",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest accepted HTTP request body, in bytes (413 above)."
    )
    max_events_per_batch: int = Field(5000, gt=0, description="Most events one POST /v1/events may carry (413 above).")
    max_future_skew_s: float = Field(
        300.0, ge=0, description="How far in the future an event timestamp may be before the event is rejected."
    )


class QualityConfig(_Section):
    real_time: bool = Field(
        True,
        description="Score interactions as they are committed (the scorer deployment and its sweep); false: "
        "they stay pending until python -m jobs.score scores them in a batch.",
    )
    threshold: float = Field(
        0.70,
        description="Quality an interaction needs to enter a training dataset, 0.0-1.0 (the base threshold "
        "jobs/build_dataset.py adjusts per domain and complexity; dataset.threshold overrides it).",
    )
    assessment_timeout_ms: float = Field(
        500.0,
        gt=0,
        description="Time budget of the real-time assessment of one committed interaction (with "
        "performance.async_processing=false, also how long the acknowledgement waits for the scores); past "
        "it see fallback_on_timeout. Below 100 ms accuracy suffers.",
    )
    fallback_on_timeout: bool = Field(
        True,
        description="Past assessment_timeout_ms, store the cheap fallback score (feedback, outcomes, static "
        "checks, timing; assessor version ...-fallback) until the full assessment replaces it; false: the "
        "interaction stays pending until then.",
    )
    calibration_min_ratings: int = Field(
        50, ge=10, description="Human ratings needed before kaizen calibrate replaces the seed's weights."
    )
    review_confidence_below: float = Field(
        0.6, gt=0, le=1, description="Scored interactions below this confidence are listed at GET /v1/review."
    )
    stream_window_chars: int = Field(
        256, gt=0, description="Streaming assessment: characters of new text per provisional score."
    )
    stream_budget_ms: float = Field(
        20.0, gt=0, description="Streaming assessment: time budget per window before the circuit breaker answers."
    )


class ResourceLimitsConfig(_Section):
    max_vram_gb: float = Field(
        35.0, gt=0, description="VRAM a training worker may use: caps torch's caching allocator (the seed's 35 GB)."
    )
    max_system_memory_gb: float = Field(
        16.0,
        gt=0,
        description="Host memory a learning cycle needs: the scheduler starts one only when the Ray cluster has "
        "this much of its 'memory' resource free beside Serve's replicas (else it waits and checks again).",
    )
    max_cpu_cores: int = Field(
        2,
        gt=0,
        description="CPU cores a fine-tuning run may reserve (workers x CPUs per worker); more stops it before "
        "it starts.",
    )


class TrainingConfig(_Section):
    """When the scheduler (actors/scheduler.py) starts a learning cycle: its triggers, the off-peak
    window, the resources it waits for, and its back-off after a failed cycle."""

    auto_training: bool = Field(
        True,
        description="The scheduler starts learning cycles by itself when a trigger fires; false: it records what "
        "it would start and why (audit log, kaizen training status) and starts only cycles an operator asks for.",
    )
    min_interactions: int = Field(
        100,
        ge=0,
        description="Volume trigger: a cycle starts once this many new interactions (at least one) scored at or "
        "above the inclusion threshold (dataset.threshold, else quality.threshold) arrived after the last "
        "successful cycle's data cut-off.",
    )
    interval_hours: float = Field(
        24.0,
        gt=0,
        description="Time trigger: a cycle starts this long after the last one started (before the first: after "
        "the oldest unlearned interaction) when there is at least one new interaction above the threshold; also "
        "the longest back-off after failed cycles.",
    )
    max_hours: float = Field(4.0, gt=0, description="Longest a fine-tuning run may train before it stops.")
    quality_margin: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Quality trigger: a cycle starts when the unlearned interactions' mean quality is above the "
        "champion's training set's by this much (absolute, 0-1), or the champion's live quality fell by this "
        "much; either also significantly (an always-valid confidence sequence at 5 % error).",
    )
    quality_window: int = Field(
        100,
        ge=10,
        description="Quality trigger: the champion's last this many scored answers since the last cycle's data "
        "cut-off make its live trend (the newer half against the older half).",
    )
    window: str | None = Field(
        None,
        description="Off-peak hours 'HH:MM-HH:MM' (UTC; '22:00-06:00' spans midnight) outside which the scheduler "
        "starts no cycle by itself (it waits for the window); null: any time. A manual request is not held.",
    )
    check_interval_s: float = Field(
        60.0, gt=0, description="How often the scheduler checks its triggers, the resources and a running cycle."
    )
    backoff_minutes: float = Field(
        15.0,
        gt=0,
        description="After a failed cycle the scheduler starts none by itself for this long, doubled for each "
        "failure in a row, at most interval_hours (a manual request is not held).",
    )
    resource_limits: ResourceLimitsConfig = Field(
        default_factory=ResourceLimitsConfig, description="Resources a training run may use."
    )

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
        if not match or int(match[1]) > 23 or int(match[3]) > 23 or int(match[2]) > 59 or int(match[4]) > 59:
            raise ValueError("must be 'HH:MM-HH:MM' in UTC (e.g. '22:00-06:00'), or null for any time")
        start, end = f"{int(match[1]):02d}:{match[2]}", f"{int(match[3]):02d}:{match[4]}"
        if start == end:
            raise ValueError("start and end are the same time: an empty window (null means any time)")
        return f"{start}-{end}"


class ModelConfig(_Section):
    base_model: str = Field("tiny", description="Base model: 'tiny' (embedded), a Hugging Face id, or a local path.")
    checkpoint_dir: str = Field(
        "data/checkpoints",
        description="Where training writes its working files: Ray Train runs and checkpoints (runs/), sweeps "
        "(sweeps/) and learning-cycle records (cycles/). Adapters are kept under storage_root, not here.",
    )
    max_checkpoints: int = Field(
        5, gt=0, description=NOT_YET_USED + "data protection will prune adapters beyond this many per lineage."
    )
    deployment_strategy: Literal["immediate", "staged", "manual"] = Field(
        "staged",
        description="What the deployer does with an adapter validated for production: make it champion at "
        "once (immediate), serve it to a canary share first (staged, see deploy), or record the verdict "
        "and leave it to an operator (manual).",
    )
    storage_root: str = Field(
        "data",
        description="Where models/ (base models, the tokenizer) and adapters/ (every fine-tuned LoRA adapter) "
        "live: a local path or a URI pyarrow understands (s3://...).",
    )


class ValidationConfig(_Section):
    """``kaizen validate``: the candidate against its baseline, and the seed's decision matrix."""

    min_accuracy_change: float = Field(
        -0.02,
        le=0,
        description="Production needs the candidate's accuracy change against the baseline (absolute, on the "
        "0-1 scale) at least this (the seed's -2 %).",
    )
    max_latency_increase: float = Field(
        0.10, ge=0, description="Production needs p50 latency at most this much above the baseline's (relative)."
    )
    max_memory_increase: float = Field(
        0.05, ge=0, description="Production needs peak memory at most this much above the baseline's (relative)."
    )
    max_forgetting_rate: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Each earlier domain's forgetting rate, max(0, (before - after) / before), must stay below "
        "this (the seed's 0.3); above it the candidate is rejected.",
    )
    max_examples: int = Field(
        64,
        gt=0,
        description="Rows measured per set (the first ones, the same for both models): the candidate's validation "
        "split, each earlier domain, and each shipped safety set.",
    )
    max_new_tokens: int = Field(128, gt=0, description="Longest answer generated per validation prompt.")
    concurrency: list[int] = Field(
        [1, 4], min_length=1, description="Concurrent requests at which throughput is measured."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the quality difference's interval.")


class DeployConfig(_Section):
    """The deployer: how a validated adapter reaches production traffic and leaves it again."""

    canary_share: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of sessions whose requests for 'champion' the challenger answers (sticky: the hash "
        "of the session id); requests naming an adapter id or the base model are never split.",
    )
    min_interactions_per_arm: int = Field(
        30, gt=1, description="Scored interactions each arm needs before a canary may promote."
    )
    non_inferiority_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Promotion needs the challenger's mean live quality no worse than the champion's by more "
        "than this (absolute, 0-1), at the confidence of alpha.",
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Error rate of the live comparison's always-valid confidence sequences (checked after "
        "every interaction without inflating false rollbacks).",
    )
    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="A challenger whose failed-request share exceeds the champion's by this rolls back.",
    )
    max_latency_increase: float = Field(
        0.5,
        ge=0,
        description="A challenger whose median latency exceeds the champion's by this share rolls back "
        "(after min_interactions_per_arm).",
    )
    max_canary_minutes: float = Field(
        60.0, gt=0, description="Longest a canary may stay inconclusive before on_timeout applies."
    )
    on_timeout: Literal["rollback", "wait"] = Field(
        "rollback",
        description="An inconclusive canary past max_canary_minutes: roll back, or hold for an operator "
        "(inconclusive never promotes).",
    )
    watch_minutes: float = Field(
        30.0, ge=0, description="After a promotion, how long the new champion is compared with the previous one."
    )
    watch_drop: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="A significant drop in live quality of more than this share of the previous champion's "
        "(the seed's 5 % alert) during the watch rolls back to it.",
    )
    check_interval_s: float = Field(10.0, gt=0, description="How often the deployer looks at live traffic.")
    smoke_timeout_s: float = Field(
        120.0, gt=0, description="Longest the new adapter may take to load on every replica and answer its smoke test."
    )


class PrivacyConfig(_Section):
    data_minimization: bool = Field(
        True,
        description="Store only what the learning loop uses: the user id's hash, the working directory, "
        "feedback comments, processed tool parameters and tool resource usage are dropped, tool outputs "
        "and errors cut to what a training example keeps (dataset.max_tool_output_chars); false: stored as sent.",
    )
    exclude_sensitive_patterns: list[str] = Field(
        default_factory=list, description="Extra regexes whose matches are redacted as 'custom'."
    )
    encryption: bool = Field(
        False, description=NOT_YET_USED + "data protection will encrypt stored text at rest when true."
    )
    audit_trail: bool = Field(
        True,
        description=NOT_YET_USED + "data protection will audit deletions when true (alias moves always are).",
    )
    hmac_key: str | None = Field(
        None, description="Key for hashing session and user ids; prefer hmac_key_env in production."
    )
    hmac_key_env: str = Field(
        "KAIZEN_HMAC_KEY", description="Environment variable read for the HMAC key when hmac_key is unset."
    )


class PerformanceConfig(_Section):
    max_collection_overhead_ms: float = Field(
        5.0,
        gt=0,
        description="Budget of one record_* call of the Python client (KaizenClient.from_config), the seed's "
        "5 ms: calls over it are counted in client.stats['over_budget'] and logged as a warning.",
    )
    async_processing: bool = Field(
        True,
        description="Score committed interactions after the collector's acknowledgement; false: before it "
        "(the acknowledgement waits up to quality.assessment_timeout_ms for the scores).",
    )
    batch_size: int = Field(
        100, gt=0, description="Most events one POST of the Python client carries (KaizenClient.from_config)."
    )
    cache_size: int = Field(10000, ge=0, description="Entries in the quality-score LRU cache of each scorer.")


# --- service sections ----------------------------------------------------------------------------


class StoreConfig(_Section):
    engine: Literal["sqlite", "postgres"] = Field("sqlite", description="Storage engine.")
    sqlite_path: str = Field("data/kaizen.db", description="SQLite database file (engine=sqlite).")
    postgres_dsn: str = Field(
        "postgresql://postgres@127.0.0.1:5432/kaizen",
        description="libpq connection string (engine=postgres); the password may come from PGPASSWORD.",
    )
    pool_size: int = Field(4, gt=0, description="PostgreSQL connections per process.")


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(16.0, gt=0, description="Requests per replica to aim for.")


class CollectorServeConfig(_Section):
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per collector replica.")
    max_ongoing_requests: int = Field(256, gt=0, description="Concurrent requests per replica.")
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Serve autoscaling of the collector."
    )
    max_batch_size: int = Field(64, gt=0, description="Requests group-committed in one transaction (@serve.batch).")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="Longest a request waits for others to share its commit."
    )


class ScorerServeConfig(_Section):
    enabled: bool = Field(True, description="Deploy the quality scorer beside the collector.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per scorer replica (torch uses them as threads).")
    max_ongoing_requests: int = Field(64, gt=0, description="Concurrent requests per replica.")
    autoscaling: AutoscalingConfig = Field(
        default_factory=lambda: AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=8),
        description="Serve autoscaling of the scorer.",
    )
    sweep_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often a replica scores what is still pending (not with quality.real_time=false).",
    )
    queue_size: int = Field(
        1000, gt=0, description="Hand-offs a replica queues; beyond it they stay pending for the sweep."
    )
    nice: int = Field(
        10, ge=0, le=19, description="CPU niceness of the scoring thread: scoring yields the CPU to ingestion."
    )


class GeneratorServeConfig(_Section):
    enabled: bool = Field(True, description="Deploy the generator (model.base_model with its LoRA adapters).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per generator replica (torch threads on CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generator replica (1 for a real model).")
    max_ongoing_requests: int = Field(32, gt=0, description="Concurrent requests per replica.")
    autoscaling: AutoscalingConfig = Field(
        default_factory=lambda: AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=8),
        description="Serve autoscaling of the generator.",
    )
    max_adapters: int = Field(
        4, ge=1, description="LoRA adapters kept loaded per replica (least recently used evicted)."
    )
    max_batch_size: int = Field(8, ge=1, description="Requests for one adapter generated together (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="Longest a request waits for others to batch with.")
    default_max_tokens: int = Field(256, ge=1, description="Completion limit of requests that set no max_tokens.")
    record: bool = Field(True, description="Record every completion as an interaction (closing the loop).")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, gt=0, lt=65536, description="Port the HTTP proxy binds.")
    app_name: str = Field("kaizen", description="Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Log level of Serve and the replicas (their logs go to Ray's log folder too)."
    )
    access_log: bool = Field(False, description="Log every request (noisy at thousands per second).")
    collector: CollectorServeConfig = Field(
        default_factory=CollectorServeConfig, description="The collector deployment."
    )
    scorer: ScorerServeConfig = Field(default_factory=ScorerServeConfig, description="The quality scorer.")
    generator: GeneratorServeConfig = Field(
        default_factory=GeneratorServeConfig, description="The OpenAI-compatible generator."
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster to join; None starts a local one.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray; None means all.")
    namespace: str = Field("kaizen", description="Ray namespace of the actors and Serve app.")


class ApiKeyConfig(_Section):
    key_env: str | None = Field(None, description="Environment variable that holds the key.")
    key: str | None = Field(None, description="The key itself (prefer key_env).")
    role: Literal["agent", "operator"] = Field(
        "agent", description="agent: record and read interactions; operator: everything."
    )


class SecurityConfig(_Section):
    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="Accepted API keys; empty means no authentication."
    )


# The learning jobs' own options: each section is validated by its job's options class, imported
# only when the section is given (the classes live beside the jobs and pull in numpy, torch...).
JOB_SECTIONS: dict[str, str] = {
    "dataset": "app.learning.dataset:DatasetConfig",
    "ssr": "app.learning.ssr:SSRConfig",
    "finetune": "app.learning.training:FinetuneConfig",
    "sweep": "app.learning.sweep:SweepConfig",
    "learn": "app.learning.cycle:LearnConfig",
}


def job_options_class(section: str) -> type[BaseModel]:
    """The options class of a job section (``dataset``, ``ssr``, ``finetune``, ``sweep``, ``learn``)."""
    module, _, name = JOB_SECTIONS[section].partition(":")
    return getattr(importlib.import_module(module), name)


class KaizenConfig(_Section):
    """The whole configuration tree; ``configs/default.yaml`` is the embedded default."""

    enabled: bool = Field(
        True,
        description="Master switch of learning: false, the scheduler starts no cycle, not even one an operator "
        "asks for, and records what it would start and why.",
    )
    collection: CollectionConfig = Field(default_factory=CollectionConfig, description="Data collection.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Quality assessment.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training triggers.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model, adapter storage, training files.")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="Privacy and security.")
    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig, description="Overhead limits and batching."
    )
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Validation of a candidate adapter (kaizen validate)."
    )
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Canary, promotion and rollback.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Interaction store.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve application.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="API keys and roles.")
    # The learning jobs' options, as mappings (validated by validate_config; job_options() reads them).
    dataset: dict[str, Any] = Field(
        default_factory=dict, description="jobs/build_dataset.py options (app.learning.dataset.DatasetConfig)."
    )
    ssr: dict[str, Any] = Field(
        default_factory=dict, description="jobs/synthesize.py options (app.learning.ssr.SSRConfig)."
    )
    finetune: dict[str, Any] = Field(
        default_factory=dict, description="jobs/finetune.py options (app.learning.training.FinetuneConfig)."
    )
    sweep: dict[str, Any] = Field(
        default_factory=dict, description="jobs/sweep.py options (app.learning.sweep.SweepConfig)."
    )
    learn: dict[str, Any] = Field(
        default_factory=dict, description="jobs/learn.py options (app.learning.cycle.LearnConfig)."
    )

    def api_url(self) -> str:
        """Where this node reaches the Kaizen API: Serve's HTTP proxy (``serve.host``/``serve.port``,
        a wildcard bind address read as the loopback) plus ``serve.route_prefix``."""
        host = "127.0.0.1" if self.serve.host in ("0.0.0.0", "::") else self.serve.host
        return f"http://{host}:{self.serve.port}{self.serve.route_prefix.rstrip('/')}"

    def hmac_key(self) -> bytes:
        """The key for hashing ids: ``privacy.hmac_key``, else the environment variable, else a
        fixed development key (the embedded default only; ``kaizen up`` warns about it)."""
        key = self.privacy.hmac_key or os.environ.get(self.privacy.hmac_key_env)
        return (key or "kaizen-development-key").encode()


# --- validation ------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """The seed's validation result: errors make a config unusable, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: KaizenConfig | None = None

    @property
    def valid(self) -> bool:
        return not self.errors


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where ``loc`` points (its parent section)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        args = getattr(annotation, "__args__", ()) or (annotation,)
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)


def section_errors(exc: ValidationError, model: type[BaseModel], section: str) -> list[str]:
    """A job's own options section (``dataset``, ``ssr``...) as ``section.key: reason`` messages."""
    messages = []
    for err in exc.errors():
        key = ".".join([section, *map(str, err["loc"])])
        if err["type"] == "extra_forbidden":
            messages.append(f"{key}: unknown key (allowed: {', '.join(_allowed_keys(model, err['loc']))})")
        elif err["loc"]:
            messages.append(f"{key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
        else:  # a model validator: a message that starts with a key names it, else the section
            text = err["msg"].removeprefix("Value error, ")
            first = text.split(":", 1)[0]
            messages.append(f"{section}.{text}" if first.split(".")[0] in model.model_fields else f"{section}: {text}")
    return messages


def _job_section_errors(sections: dict[str, Any]) -> list[str]:
    """Each job section's problems (an empty section is the job's defaults: nothing to import)."""
    errors = []
    for section, values in sections.items():
        if not values or not isinstance(values, dict):
            continue  # not a mapping: the config model has said so
        try:
            section_options(section, base=values)
        except ConfigError as exc:
            errors += exc.errors
    return errors


def job_options(cfg: KaizenConfig, section: str) -> Any:
    """The options object of a job section of ``cfg``.

    Raises:
        ConfigError: every problem as ``section.key: reason``.
    """
    return section_options(section, base=getattr(cfg, section))


def section_options(section: str, overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> Any:
    """A job's options object from ``section.key=value`` overrides (values parsed as YAML) on
    ``base`` (the section's mapping, as in a config file).

    Raises:
        ConfigError: every problem as ``section.key: reason``; an override of another section.
    """
    data = apply_overrides({section: dict(base or {})}, list(overrides or []))
    errors = [
        f"{key}: unknown section ({section} options are {section}.<key>=<value>)" for key in data if key != section
    ]
    if errors:
        raise ConfigError(errors)
    model = job_options_class(section)
    try:
        return model.model_validate(data[section])
    except ValidationError as exc:
        raise ConfigError(section_errors(exc, model, section)) from None


def _pydantic_errors(exc: ValidationError) -> list[str]:
    messages = []
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(KaizenConfig, loc)
            messages.append(f"{key}: unknown key (allowed: {', '.join(allowed)})")
        else:
            messages.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return messages


def validate_config(data: dict[str, Any]) -> ValidationReport:
    """Validate a raw config mapping: types and unknown keys, then the seed's rules.

    Returns:
        A report with ``errors`` (``key: reason``), ``warnings`` and, when valid, the config.
    """
    report = ValidationReport()
    try:
        cfg = KaizenConfig.model_validate(data or {})
    except ValidationError as exc:
        report.errors = _pydantic_errors(exc)
        # The job sections are checked too, so that one pass names every bad key.
        report.errors += _job_section_errors({k: v for k, v in (data or {}).items() if k in JOB_SECTIONS})
        return report

    c = cfg.collection
    if not 0.0 <= c.capture_rate <= 1.0:
        report.errors.append(f"collection.capture_rate: must be between 0.0 and 1.0 (got {c.capture_rate})")
    if c.retention_days < 1:
        report.errors.append(f"collection.retention_days: must be at least 1 (got {c.retention_days})")
    if not 0.0 <= cfg.quality.threshold <= 1.0:
        report.errors.append(f"quality.threshold: must be between 0.0 and 1.0 (got {cfg.quality.threshold})")
    if not cfg.model.base_model.strip():
        report.errors.append("model.base_model: a base model (name or path) is required")
    if not cfg.model.checkpoint_dir.strip():
        report.errors.append("model.checkpoint_dir: a checkpoint directory is required")
    if cfg.serve.collector.autoscaling.min_replicas > cfg.serve.collector.autoscaling.max_replicas:
        report.errors.append(
            "serve.collector.autoscaling.min_replicas: must not exceed max_replicas "
            f"({cfg.serve.collector.autoscaling.min_replicas} > {cfg.serve.collector.autoscaling.max_replicas})"
        )
    for section, patterns in (
        ("collection.exclude_patterns", c.exclude_patterns),
        ("privacy.exclude_sensitive_patterns", cfg.privacy.exclude_sensitive_patterns),
    ):
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                report.errors.append(f"{section}.{i}: not a valid regular expression ({exc})")
    for i, key in enumerate(cfg.security.api_keys):
        if not key.key and not key.key_env:
            report.errors.append(f"security.api_keys.{i}: set key or key_env")

    report.errors += _job_section_errors({section: getattr(cfg, section) for section in JOB_SECTIONS})

    if cfg.quality.assessment_timeout_ms < 100:
        report.warnings.append(
            f"quality.assessment_timeout_ms: {cfg.quality.assessment_timeout_ms} ms is below 100 ms "
            "and may affect accuracy"
        )
    if cfg.training.min_interactions < 10:
        report.warnings.append(
            f"training.min_interactions: {cfg.training.min_interactions} is very low and may affect quality"
        )
    if cfg.training.resource_limits.max_vram_gb < 8:
        report.warnings.append(
            f"training.resource_limits.max_vram_gb: {cfg.training.resource_limits.max_vram_gb} GB is below "
            "8 GB and may prevent training of larger models"
        )
    if not cfg.privacy.hmac_key and not os.environ.get(cfg.privacy.hmac_key_env):
        report.warnings.append(
            f"privacy.hmac_key: unset and ${cfg.privacy.hmac_key_env} is empty; ids are hashed with a development key"
        )
    # Keys nothing reads yet, set to another value than their default: an effect the operator expects and does not get.
    from app.config_keys import config_keys as _config_keys  # it reads this module's tree: imported here

    report.warnings += [
        f"{k.key}: set to {k.value!r}, but nothing reads it yet, so it has no effect "
        f"({k.description.removeprefix(NOT_YET_USED).rstrip('.')})"
        for k in _config_keys(cfg, job_sections=False)
        if k.not_yet_used and k.value != k.default
    ]
    if report.valid:
        report.config = cfg
    return report


# --- loading -----------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping.

    Raises:
        ConfigError: an override without ``=`` or one that descends into a non-mapping.
    """
    data = dict(data or {})
    errors = []
    for item in overrides or []:
        if "=" not in item:
            errors.append(f"{item}: an override must look like section.key=value")
            continue
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            errors.append(f"{item}: empty key")
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                errors.append(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
                break
            else:
                child = dict(child)
            node[part] = child
            node = child
        else:
            node[parts[-1]] = _parse_value(value)
    if errors:
        raise ConfigError(errors)
    return data


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a mapping (empty file: empty mapping)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"{p}: no such file"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: not valid YAML ({exc})"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping"])
    return data


def load_job_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None, section: str
) -> tuple[KaizenConfig, Any]:
    """A job's config (paths resolved) and its options: ``section.key=value`` overrides go to
    the job's section like any other dotted override.

    Raises:
        ConfigError: every problem of both, each naming its key.
    """
    cfg = resolve_paths(load_config(path, overrides))
    return cfg, job_options(cfg, section)


def resolve_paths(cfg: KaizenConfig) -> KaizenConfig:
    """Resolve relative paths against the caller's directory: Ray workers run elsewhere."""
    cfg.store.sqlite_path = str(Path(cfg.store.sqlite_path).expanduser().resolve())
    cfg.model.checkpoint_dir = str(Path(cfg.model.checkpoint_dir).expanduser().resolve())
    if "://" not in cfg.model.storage_root:
        cfg.model.storage_root = str(Path(cfg.model.storage_root).expanduser().resolve())
    return cfg


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> KaizenConfig:
    """Load and validate a config file (default ``configs/default.yaml``) with dotted overrides.

    Raises:
        ConfigError: listing every error, each naming its key.
    """
    source = str(path or DEFAULT_CONFIG_PATH)
    data = apply_overrides(read_config_file(source), overrides)
    report = validate_config(data)
    if not report.valid:
        raise ConfigError(report.errors, source)
    assert report.config is not None
    return report.config
