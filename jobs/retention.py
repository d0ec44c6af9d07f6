"""Retention: remove raw interactions older than ``collection.retention_days`` (kept where a kept
dataset holds them; their days' aggregates kept, anonymised) and retire adapters beyond
``model.max_checkpoints`` (not the champion, the challenger or the previous champion) with their
files; audited. The scheduler runs it daily; ``kaizen retention run`` runs it now.

    python -m jobs.retention --config configs/default.yaml [section.key=value ...]

The policy is :mod:`app.privacy.retention`'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.config import KaizenConfig
from app.job_cli import job_parser, run_job
from app.privacy.retention import RetentionResult, retain

__all__ = ["cli", "main", "parser"]


def main(cfg: KaizenConfig, *, actor: str = "retention") -> RetentionResult:
    """One retention run on the configured store."""
    return retain(cfg, actor=actor)


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs.retention", __doc__)
    p.add_argument("--actor", default="retention", help="who runs it (audit)")
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    return run_job(parser(), lambda args, cfg, _: main(cfg, actor=args.actor), argv)


if __name__ == "__main__":
    sys.exit(cli())
