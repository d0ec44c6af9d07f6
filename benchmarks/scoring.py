"""Scoring benchmark: ``python -m benchmarks.scoring [--interactions 400] [--duration 20]``.

Measures, on this machine, in one run:
  1. ``jobs/score.py``'s throughput (interactions scored and stored per second) with actor pools of
     1 and 2, beside the baseline of one process scoring the same interactions in a loop
     (``QualityService.score_ids``);
  2. the time from commit to stored score (``quality_scores.created_at - interactions.received_at``)
     with the scorer deployed beside the collector: at a rate the scorer can follow, and under the
     collector benchmark's load (5,000 interactions/s offered), where it reports the sustained
     ingestion rate beside the same load with the scorer off (ingestion must not slow down) and
     the backlog left pending for the sweep.

Prints a table and writes ``benchmarks/results/scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.collector import deploy, run_load
from benchmarks.common import pct, print_table

RESULTS = Path(__file__).resolve().parent / "results"


def _config(db: Path, port: int = 8000, scorer: bool = True) -> Any:
    from app.config import KaizenConfig

    return KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "bench"},
            "serve": {
                "port": port,
                "generator": {"enabled": False},
                "scorer": {
                    "enabled": scorer,
                    "num_cpus": 1,
                    "sweep_interval_s": 2.0,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
                "collector": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
            },
        }
    )


def _seed_store(db: Path, n: int) -> list[str]:
    from app.config import KaizenConfig
    from app.ingest import IngestPipeline
    from app.sample import sample_events
    from app.store.sqlite import SQLiteStore

    store = SQLiteStore(db)
    store.migrate()
    prepared = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "bench"}})).prepare(
        sample_events(n, seed=11)
    )
    prepared.finish(store.write(prepared.to_commit))
    ids = [ev.id for ev in prepared.to_commit]
    store.close()
    return ids


def bench_job(work: Path, n: int) -> dict[str, Any]:
    """Throughput of the score job (pools of 1 and 2) against one process scoring in a loop."""
    from app.quality.relevance import get_embedder
    from app.quality.service import QualityService
    from app.store.sqlite import SQLiteStore
    from jobs import score

    out: dict[str, Any] = {"interactions": n}
    db = work / "job-baseline.db"
    ids = _seed_store(db, n)
    get_embedder()
    store = SQLiteStore(db)
    t0 = time.perf_counter()
    QualityService(store).score_ids(ids)
    out["baseline_loop_per_s"] = len(ids) / (time.perf_counter() - t0)
    store.close()
    for actors in (1, 2):
        db = work / f"job-{actors}.db"
        _seed_store(db, n)
        result = score.main(_config(db), status="pending", actors=actors, batch_size=16, progress=False)
        out[f"actors_{actors}"] = {
            "selected": result.selected,
            "scored": result.scored,
            "seconds": result.seconds,
            "per_s": result.per_second,
        }
    return out


def _commit_to_score(db: Path, prefix: str) -> dict[str, Any]:
    from app.store.sqlite import SQLiteStore

    store = SQLiteStore(db)
    rows = store._fetch(
        "SELECT i.received_at AS r, q.created_at AS c FROM interactions i JOIN quality_scores q "
        "ON q.interaction_id = i.id WHERE i.id LIKE ?",
        [f"{prefix}-%"],
    )
    total = store._fetch("SELECT COUNT(*) AS n FROM interactions WHERE id LIKE ?", [f"{prefix}-%"])[0]["n"]
    pending = store._fetch(
        "SELECT COUNT(*) AS n FROM interactions WHERE id LIKE ? AND quality_status = 'pending'", [f"{prefix}-%"]
    )[0]["n"]
    store.close()
    lags = [(datetime.fromisoformat(r["c"]) - datetime.fromisoformat(r["r"])).total_seconds() * 1000 for r in rows]
    return {
        "interactions": int(total),
        "scored": len(rows),
        "pending": int(pending),
        "commit_to_score_ms": {"p50": pct(lags, 50), "p99": pct(lags, 99)},
    }


def bench_live(work: Path, duration: float, rate: float, slow_rate: float, procs: int) -> dict[str, Any]:
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        db = work / "live.db"
        deploy(_config(db, port, scorer=True), "kaizen-scoring")
        time.sleep(10)  # the scorer replica loads MiniLM
        print(f"followable rate: {slow_rate:.0f}/s offered ...", flush=True)
        slow = run_load(url, str(db), "slow", 20, slow_rate, duration, 1, work / "spool")
        time.sleep(3)
        out["followable"] = {
            "offered_per_s": slow_rate,
            "sustained_per_s": slow["sustained_per_s"],
            "lost": slow["lost"],
            **_commit_to_score(db, "slow"),
        }
        print(f"collector load with the scorer on: {rate:.0f}/s offered ...", flush=True)
        load = run_load(url, str(db), "load", 1000, rate, duration, procs, work / "spool")
        out["load_scorer_on"] = {
            "offered_per_s": rate,
            "sustained_per_s": load["sustained_per_s"],
            "record_to_committed_p99_ms": load["latency_p99_ms"],
            "lost": load["lost"],
            **_commit_to_score(db, "load"),
        }
        serve.delete("kaizen-scoring")
        db_off = work / "off.db"
        deploy(_config(db_off, port, scorer=False), "kaizen-scoring")
        print(f"collector load with the scorer off: {rate:.0f}/s offered ...", flush=True)
        off = run_load(url, str(db_off), "off", 1000, rate, duration, procs, work / "spool")
        out["load_scorer_off"] = {
            "offered_per_s": rate,
            "sustained_per_s": off["sustained_per_s"],
            "record_to_committed_p99_ms": off["latency_p99_ms"],
            "lost": off["lost"],
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interactions", type=int, default=400, help="stored interactions the job scores")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per live run")
    parser.add_argument("--rate", type=float, default=5000.0, help="offered interactions/s of the load run")
    parser.add_argument("--slow-rate", type=float, default=5.0, help="offered interactions/s the scorer can follow")
    parser.add_argument("--procs", type=int, default=2, help="agent processes")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="kaizen-scoring-"))
    result: dict[str, Any] = {"name": "scoring", "machine": f"{os.cpu_count()} cores", "args": vars(args)}
    try:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
        print(f"score job over {args.interactions} stored interactions ...", flush=True)
        result["job"] = bench_job(work, args.interactions)
        result["live"] = bench_live(work, args.duration, args.rate, args.slow_rate, args.procs)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scoring.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {RESULTS / 'scoring.json'}")


def report(r: dict[str, Any]) -> None:
    job, live = r["job"], r["live"]
    slow, on, off = live["followable"], live["load_scorer_on"], live["load_scorer_off"]
    rows = [
        (
            "jobs/score.py, 1 actor (interactions/s)",
            f"{job['actors_1']['per_s']:.1f}",
            f"one process in a loop {job['baseline_loop_per_s']:.1f}",
            "-",
        ),
        (
            "jobs/score.py, 2 actors (interactions/s)",
            f"{job['actors_2']['per_s']:.1f}",
            f"ratio to the loop {job['actors_2']['per_s'] / job['baseline_loop_per_s']:.2f}",
            "-",
        ),
        (
            f"commit to score p50 / p99 at {slow['offered_per_s']:.0f}/s (ms)",
            f"{slow['commit_to_score_ms']['p50']:.0f} / {slow['commit_to_score_ms']['p99']:.0f}",
            f"{slow['scored']} of {slow['interactions']} scored",
            "<= 500",
        ),
        (
            f"ingestion at {on['offered_per_s']:.0f}/s offered, scorer on (/s)",
            f"{on['sustained_per_s']:.0f}",
            f"scorer off {off['sustained_per_s']:.0f}",
            ">= 5000, not slowed",
        ),
        (
            "record to committed p99, scorer on (ms)",
            f"{on['record_to_committed_p99_ms']:.0f}",
            f"scorer off {off['record_to_committed_p99_ms']:.0f}",
            "-",
        ),
        (
            "under that load: scored / left pending",
            f"{on['scored']} / {on['pending']}",
            f"of {on['interactions']}",
            "-",
        ),
        (
            "under that load: commit to score p50 / p99 (ms)",
            f"{on['commit_to_score_ms']['p50']:.0f} / {on['commit_to_score_ms']['p99']:.0f}",
            "",
            "-",
        ),
        ("lost (all runs)", f"{slow['lost'] + on['lost'] + off['lost']}", "", "0"),
    ]
    print_table(("metric", "measured", "baseline (same run)", "goal"), rows)


if __name__ == "__main__":
    main()
