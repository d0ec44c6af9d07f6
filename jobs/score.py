"""Score or re-score stored interactions in batches on a Ray Data actor pool, writing the scores back.

    python -m jobs.score --config configs/default.yaml [--status pending | --all] [--since ISO]
        [--until ISO] [--limit N] [--actors 2] [--batch-size 32] [--no-execute] [key=value ...]

Run it after ``kaizen calibrate`` (``--all``: every interaction gets a score under the new
calibration, stored beside the old one per assessor version), or to catch up a backlog of pending
interactions faster than the scorer's sweep. Submit it to a cluster with
``ray job submit --working-dir . -- python -m jobs.score --config configs/postgres.yaml --all``.

The chain: the ids to score are read from the store a page at a time; ``ScoreBatch`` actors (each
with its own store connection and MiniLM embedder, ``num_cpus`` per actor) score a batch and write
it back in one transaction; the driver counts what came back.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from app.config import KaizenConfig
from app.job_cli import job_parser, run_job
from app.ray_setup import start_ray

__all__ = ["ScoreBatch", "ScoreJobResult", "cli", "main", "parser", "select_ids"]


@dataclass
class ScoreJobResult:
    selected: int
    scored: int
    no_evidence: int
    missing: int
    seconds: float
    per_second: float
    assessor_versions: dict[str, int]


def select_ids(
    cfg: KaizenConfig,
    *,
    status: str | None = "pending",
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[str]:
    """Stage 1: the ids of the interactions to score, walked a page at a time."""
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        return store.all_interaction_ids(since=since, until=until, quality_status=status, limit=limit)
    finally:
        store.close()


class ScoreBatch:
    """Stage 2 (an actor per pool slot): score a batch of ids and store the scores."""

    def __init__(self, config: dict[str, Any], execute: bool = True):
        from app.quality.relevance import get_embedder
        from app.quality.service import QualityService
        from app.store import open_store

        cfg = KaizenConfig.model_validate(config)
        self.service = QualityService(open_store(cfg.store), cache_size=cfg.performance.cache_size)
        self.execute = execute
        get_embedder()  # load MiniLM once per actor, before the first batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        results = self.service.score_batch(ids, execute=self.execute)
        status, overall, version = [], [], []
        for interaction_id in ids:
            result = results[interaction_id]
            if isinstance(result, str):
                status.append(result)
                overall.append(np.nan)
                version.append("")
            else:
                status.append("scored")
                overall.append(result.overall)
                version.append(result.assessor_version)
        return {
            "id": np.array(ids),
            "status": np.array(status),
            "overall": np.array(overall),
            "assessor_version": np.array(version),
        }


def main(
    cfg: KaizenConfig,
    *,
    status: str | None = "pending",
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    actors: int = 2,
    batch_size: int = 32,
    num_cpus: float = 1.0,
    execute: bool = True,
    progress: bool = True,
) -> ScoreJobResult:
    """Score the selected interactions; Ray is started here unless the caller already has it."""
    import ray

    started = time.perf_counter()
    ids = select_ids(cfg, status=status, since=since, until=until, limit=limit)
    if not ids:
        return ScoreJobResult(0, 0, 0, 0, 0.0, 0.0, {})
    start_ray(cfg)
    ds = ray.data.from_items([{"id": i} for i in ids]).map_batches(
        ScoreBatch,
        fn_constructor_args=(cfg.model_dump(mode="json"), execute),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
    )
    counts = {"scored": 0, "no_evidence": 0, "missing": 0}
    versions: dict[str, int] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for st, version in zip(out["status"], out["assessor_version"]):
            counts[str(st)] = counts.get(str(st), 0) + 1
            if version:
                versions[str(version)] = versions.get(str(version), 0) + 1
        if progress:
            done = sum(counts.values())
            print(f"\rscored {done}/{len(ids)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    seconds = time.perf_counter() - started
    return ScoreJobResult(
        len(ids),
        counts["scored"],
        counts["no_evidence"],
        counts["missing"],
        round(seconds, 2),
        round(len(ids) / seconds, 2),
        versions,
    )


def parser() -> argparse.ArgumentParser:
    """The job's command line: ``--config``, which interactions, the pool's shape, overrides."""
    parser = job_parser("jobs.score", __doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--status",
        default="pending",
        choices=["pending", "scored", "no_evidence"],
        help="score the interactions with this quality status (default: pending)",
    )
    which.add_argument("--all", action="store_true", help="re-score every interaction")
    parser.add_argument("--since", type=datetime.fromisoformat, default=None, help="inclusive, ISO 8601")
    parser.add_argument("--until", type=datetime.fromisoformat, default=None, help="exclusive, ISO 8601")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many")
    parser.add_argument("--actors", type=int, default=2, help="scoring actors in the pool")
    parser.add_argument("--batch-size", type=int, default=32, help="interactions per batch")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (torch threads)")
    parser.add_argument("--no-execute", action="store_true", help="do not run examples in the sandbox")
    return parser


def cli(argv: list[str] | None = None) -> int:
    """``python -m jobs.score``: exit 0 with the counts as JSON, 2 on a bad option."""

    def run(args: argparse.Namespace, cfg: KaizenConfig, _opts: None) -> ScoreJobResult:
        return main(
            cfg,
            status=None if args.all else args.status,
            since=args.since,
            until=args.until,
            limit=args.limit,
            actors=args.actors,
            batch_size=args.batch_size,
            num_cpus=args.num_cpus,
            execute=not args.no_execute,
        )

    return run_job(parser(), run, argv)


if __name__ == "__main__":
    sys.exit(cli())
