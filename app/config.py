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
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from app.config_sections import (
    CollectionConfig,
    DeployConfig,
    ModelConfig,
    PerformanceConfig,
    PrivacyConfig,
    QualityConfig,
    RayConfig,
    SecurityConfig,
    ServeConfig,
    StoreConfig,
    TrainingConfig,
    ValidationConfig,
    _Section,
)

__all__ = [
    "JOB_SECTIONS",
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


# The sections: app/config_sections.py.


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

    @model_validator(mode="after")
    def _store_encrypts(self) -> KaizenConfig:
        from app.privacy.encryption import EncryptionSettings

        p = self.privacy
        self.store._encryption = (
            EncryptionSettings(key_env=p.encryption_key_env, key_file=p.encryption_key_file) if p.encryption else None
        )
        return self

    def api_url(self) -> str:
        """Where this node reaches the Kaizen API: Serve's HTTP proxy (``serve.host``/``serve.port``,
        a wildcard bind address read as the loopback) plus ``serve.route_prefix``."""
        host = "127.0.0.1" if self.serve.host in ("0.0.0.0", "::") else self.serve.host
        scheme = "https" if self.serve.tls_certfile else "http"
        return f"{scheme}://{host}:{self.serve.port}{self.serve.route_prefix.rstrip('/')}"

    def tls_verify(self) -> Any:
        """What Kaizen's own HTTP clients verify the endpoint's certificate with (httpx's
        ``verify``): an SSL context trusting ``serve.tls_ca_file``, else True (the system's CAs)."""
        import ssl

        return ssl.create_default_context(cafile=self.serve.tls_ca_file) if self.serve.tls_ca_file else True

    def http_options(self) -> dict[str, Any]:
        """Serve's HTTP proxy options: where it binds and, with ``serve.tls_certfile``, its TLS files."""
        options: dict[str, Any] = {"host": self.serve.host, "port": self.serve.port}
        if self.serve.tls_certfile:
            options.update(ssl_certfile=self.serve.tls_certfile, ssl_keyfile=self.serve.tls_keyfile)
        return options

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
