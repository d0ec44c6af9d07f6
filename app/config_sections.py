"""The configuration's sections, each a pydantic model: the seed's ``LearningConfig`` sections
(collection, quality, training, model, privacy, performance), validation and deployment, and the
sections a running service needs (store, serve, ray, security). :class:`app.config.KaizenConfig`
puts them together; import them from :mod:`app.config`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

__all__ = [
    "ApiKeyConfig",
    "AutoscalingConfig",
    "CollectionConfig",
    "CollectorServeConfig",
    "DeployConfig",
    "GeneratorServeConfig",
    "ModelConfig",
    "PerformanceConfig",
    "PrivacyConfig",
    "QualityConfig",
    "RayConfig",
    "ResourceLimitsConfig",
    "ScorerServeConfig",
    "SecurityConfig",
    "ServeConfig",
    "StoreConfig",
    "TrainingConfig",
    "ValidationConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- the seed's LearningConfig sections -------------------------------------------------------

# The description of a key that nothing reads yet starts so; validate_config warns when one is set.


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
        description="Raw interactions older than this many days are removed by the daily retention run (kept "
        "while a kept dataset holds them; their days' aggregates are kept).",
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
        5,
        gt=0,
        description="Adapters kept with their files (the newest); older ones that are not champion, challenger "
        "or the previous champion are retired by the daily retention run.",
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
        False,
        description="Encrypt every stored text field of what users sent (Fernet; app.privacy.encryption); "
        "the keys come from encryption_key_env or encryption_key_file.",
    )
    encryption_key_env: str = Field(
        "KAIZEN_DATA_KEYS", min_length=1, description="Environment variable with the data keys, newest first."
    )
    encryption_key_file: str | None = Field(
        None, description="A file with the data keys, newest first, one per line (instead of the variable)."
    )
    audit_trail: bool = Field(
        True,
        description="Audit every read of interaction content through the API (which key, which interactions); "
        "key changes, erasures, alias moves and deployments are always audited.",
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
    # Set from privacy.encryption by KaizenConfig (the stores opened from this section encrypt).
    _encryption: Any = PrivateAttr(default=None)
    engine: Literal["sqlite", "postgres"] = Field("sqlite", description="Storage engine.")
    sqlite_path: str = Field("data/kaizen.db", description="SQLite database file (engine=sqlite).")
    postgres_dsn: str = Field(
        "postgresql://postgres@127.0.0.1:5432/kaizen",
        description="libpq connection string (engine=postgres); the password may come from PGPASSWORD.",
    )
    pool_size: int = Field(4, gt=0, description="PostgreSQL connections per process.")
    postgres_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        None,
        description="libpq sslmode of the PostgreSQL connections (require or verify-full in production); None: the "
        "DSN's own, else libpq's default (prefer).",
    )


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
    tls_certfile: str | None = Field(
        None, description="PEM certificate (chain) of the HTTPS endpoint; with tls_keyfile the API answers HTTPS only."
    )
    tls_keyfile: str | None = Field(None, description="PEM private key of tls_certfile.")
    tls_ca_file: str | None = Field(
        None,
        description="CA bundle Kaizen's own clients (readiness, the deployer's smoke test, kaizen traffic) trust for "
        "the endpoint; None: the system's (a self-signed certificate is its own CA: name it here).",
    )
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
    key_env: str = Field(
        min_length=1, description="Environment variable that holds the key (a config never holds a key itself)."
    )
    role: Literal["agent", "operator", "admin"] = Field(
        "agent",
        description="agent: record, chat, assess; operator: also read data, review, train, deploy; "
        "admin: also keys, erasure, audit.",
    )


class SecurityConfig(_Section):
    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list,
        description="Keys named by environment variable, besides those `kaizen keys create` keeps (as salted "
        "hashes) in the store; with none of either, no authentication.",
    )
    rate_limit_per_s: float = Field(
        20.0, ge=0, description="Requests a second per key (token bucket, per collector replica); 0: no limit."
    )
    rate_limit_burst: float = Field(100.0, ge=1, description="Requests a key may make at once before the rate applies.")
