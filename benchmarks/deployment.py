"""Deployment benchmark: ``python -m benchmarks.deployment [--quick]``.

Measures, on this machine, in one run:

1. **Requests failed while traffic moves** (goal 0): the tiny model and its adapters behind the
   real Serve app, a steady stream of chat completions for ``champion`` through the official
   ``openai`` client over HTTP, while the deployer (:class:`app.deployment.deployer.Deployer` with
   the real :class:`~app.deployment.probe.HttpProbe`) preloads, smoke-tests and canaries a new
   adapter, an operator promotes it, rolls it back, and requests for other adapters force
   evictions from the replica's adapter cache (``serve.generator.max_adapters`` 2). Beside it, the
   same stream with nothing moving.
2. **Validation wall time** of a tiny adapter (``jobs.validate.main``: both models on its rows,
   throughput, memory, safety sets, report), on this machine's CPUs.
3. **How the live comparison decides** (:func:`app.deployment.rules.decide_canary`, the rule the
   deployer runs at every tick): interactions arrive one at a time, a ``deploy.canary_share`` of
   them on the challenger; each arm's quality scores are drawn from the real scorer's scores of the
   sample interactions (``app.sample``, scored by :class:`app.quality.service.QualityService`),
   the challenger's scaled down to a true quality 10 % or 30 % lower, or left equal (A/A); the rule
   looks after every ``--look-every`` interactions. Reported: how many challenger interactions it
   took to roll back, the share of runs rolled back or promoted, and for the A/A runs the false
   rollbacks (goal <= 5 %) and false promotions of the 30 %-worse challenger (goal: never). The
   baseline, in the same run on the same draws: a fixed-duration canary that looks once, after as
   many challenger interactions as the goal allows (200), and promotes when the challenger's mean
   quality is at least the champion's (rolls back otherwise).

Prints tables and writes ``benchmarks/results/deployment.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import pct, print_table, train_answer_adapter

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("hi", "What is 2+2?", "Say something.")
ANSWERS = {
    "adp-champion": "The answer is 42.",
    "adp-challenger": "Seven.",
    "adp-other-1": "Nine.",
    "adp-other-2": "Ten.",
    "adp-other-3": "Eleven.",
}
FIXED_CANARY_CHALLENGER = 200
"""The baseline canary's one look: after this many challenger interactions (the goal's budget)."""


# --- 3. the live comparison's decisions ----------------------------------------------------------


def scorer_scores(count: int, seed: int = 0) -> list[float]:
    """The real scorer's overall scores of ``count`` sample interactions (a quarter of them poor
    answers, as ``app.sample`` writes them), stored and scored as the collector's scorer does."""
    from app.config import KaizenConfig
    from app.ingest import IngestPipeline
    from app.quality.service import QualityService
    from app.sample import sample_events
    from app.store.sqlite import SQLiteStore

    with tempfile.TemporaryDirectory(prefix="kaizen-deploy-scores-") as tmp:
        store = SQLiteStore(Path(tmp) / "kaizen.db")
        store.migrate()
        pipeline = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "benchmark"}}))
        events = [e for e in sample_events(count, seed=seed) if e["type"] == "interaction"]
        prepared = pipeline.prepare(events)
        prepared.finish(store.write(prepared.to_commit))
        ids = [e["id"] for e in events]
        scored = QualityService(store).score_batch(ids)
        values = [s.overall for s in scored.values() if not isinstance(s, str)]
        store.close()
    return values


@dataclass
class Outcome:
    """One simulated canary: what was decided and after how many interactions of each arm."""

    action: str
    challenger_n: int
    champion_n: int
    reason_code: str


@dataclass
class Scenario:
    name: str
    drop: float
    runs: list[Outcome] = field(default_factory=list)
    fixed: list[Outcome] = field(default_factory=list)


def simulate(
    pool: Sequence[float],
    drop: float,
    deploy: Any,
    rng: random.Random,
    *,
    look_every: int,
    max_interactions: int,
) -> tuple[Outcome, Outcome]:
    """One canary under the sequential rule and, on the same draws, the fixed-duration baseline."""
    from app.deployment.live import ArmEvidence, CanaryEvidence
    from app.deployment.rules import decide_canary
    from app.deployment.stats import Sample

    champion, challenger = Sample(), Sample()
    sequential: Outcome | None = None
    fixed: Outcome | None = None
    for i in range(1, max_interactions + 1):
        score = rng.choice(pool)
        if rng.random() < deploy.canary_share:
            challenger = challenger.add(score * (1.0 - drop))
            if fixed is None and challenger.n == FIXED_CANARY_CHALLENGER:
                action = "promote" if challenger.mean >= champion.mean else "rollback"
                fixed = Outcome(action, challenger.n, champion.n, "mean")
        else:
            champion = champion.add(score)
        if sequential is None and i % look_every == 0:
            evidence = CanaryEvidence(
                "simulated",
                ArmEvidence(model="champion", completions=champion.n, quality=champion),
                ArmEvidence(model="challenger", completions=challenger.n, quality=challenger),
            )
            decision = decide_canary(evidence, deploy)
            if decision.action != "hold":
                sequential = Outcome(decision.action, challenger.n, champion.n, decision.code)
        if sequential is not None and fixed is not None:
            break
    end = Outcome("timeout", challenger.n, champion.n, "max_interactions")
    return sequential or end, fixed or end


def decisions(pool: Sequence[float], deploy: Any, runs: int, seed: int, look_every: int) -> list[Scenario]:
    """Every scenario's runs (A/A, 10 % worse, 30 % worse)."""
    scenarios = [Scenario("A/A (same quality)", 0.0), Scenario("10 % worse", 0.10), Scenario("30 % worse", 0.30)]
    # Enough traffic for the fixed canary's look and for the rule's non-inferiority on equal arms.
    max_interactions = int(20 * FIXED_CANARY_CHALLENGER / deploy.canary_share)
    for scenario in scenarios:
        for r in range(runs):
            rng = random.Random(f"{seed}:{scenario.name}:{r}")
            seq, fixed = simulate(
                pool, scenario.drop, deploy, rng, look_every=look_every, max_interactions=max_interactions
            )
            scenario.runs.append(seq)
            scenario.fixed.append(fixed)
    return scenarios


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    rolled = [o.challenger_n for o in outcomes if o.action == "rollback"]
    promoted = [o.challenger_n for o in outcomes if o.action == "promote"]
    return {
        "runs": n,
        "rollback_share": len(rolled) / n,
        "promote_share": len(promoted) / n,
        "undecided_share": sum(o.action == "timeout" for o in outcomes) / n,
        "challenger_n_to_rollback_median": statistics.median(rolled) if rolled else None,
        "challenger_n_to_rollback_p95": pct(rolled, 95) if rolled else None,
        "challenger_n_to_promote_median": statistics.median(promoted) if promoted else None,
    }


# --- 1. requests while traffic moves ---------------------------------------------------------------


@dataclass
class Stream:
    """A steady stream of chat completions for ``champion`` (one session per request), counting
    every answer and failure by the phase it was sent in."""

    client: Any
    rate_per_s: float
    phase: str = "warm-up"
    results: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, workers: int = 4) -> list[threading.Thread]:
        lock = threading.Lock()
        counter = iter(range(10**9))

        def worker() -> None:
            interval = workers / self.rate_per_s
            while not self.stop.is_set():
                t0 = time.perf_counter()
                with lock:
                    i = next(counter)
                phase = self.phase
                try:
                    reply = self.client.chat.completions.create(
                        model="champion",
                        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        temperature=0,
                        max_tokens=8,
                        extra_headers={"X-Kaizen-Session": f"bench-{i}"},
                    )
                    ok, detail = True, reply.choices[0].message.content
                except Exception as exc:  # any failure counts
                    ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
                self.results.append({"phase": phase, "ok": ok, "detail": detail, "seconds": time.perf_counter() - t0})
                self.stop.wait(max(0.0, interval - (time.perf_counter() - t0)))

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        return threads

    def by_phase(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self.results:
            p = out.setdefault(r["phase"], {"requests": 0, "failed": 0, "latency": [], "failures": []})
            p["requests"] += 1
            p["latency"].append(r["seconds"])
            if not r["ok"]:
                p["failed"] += 1
                p["failures"].append(r["detail"])
        return {
            k: {
                "requests": v["requests"],
                "failed": v["failed"],
                "p50_ms": round(pct(v["latency"], 50) * 1000, 1),
                "p99_ms": round(pct(v["latency"], 99) * 1000, 1),
                "failures": v["failures"][:5],
            }
            for k, v in out.items()
        }


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> float:
    """Seconds until ``check()`` held; RuntimeError naming ``what`` past ``timeout_s``."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.perf_counter() - t0


def serving_moves(work: Path, phase_s: float, rate: float) -> dict[str, Any]:
    """Part 1 (see the module docstring): the phases' requests and failures, and the moves' times."""
    import openai
    import ray
    from ray import serve

    from app.client import wait_until_ready
    from app.config import KaizenConfig
    from app.deployment.deployer import Deployer
    from app.deployment.probe import HttpProbe
    from app.deployment.state import DeploymentStore
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.serve.build import build_app
    from app.store.sqlite import SQLiteStore

    adapters = AdapterStore(work)
    store = SQLiteStore(work / "kaizen.db")
    store.migrate()
    registry = AdapterRegistry(store)
    for adapter_id, answer in ANSWERS.items():
        manifest = train_answer_adapter(work, adapters, adapter_id, answer, PROMPTS)
        registry.register(manifest, adapters.uri(adapter_id), actor="benchmark")
    registry.set_alias("champion", "adp-champion", actor="benchmark", reason="the benchmark's first champion")

    port = _free_port()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(work / "kaizen.db")},
            "privacy": {"hmac_key": "benchmark"},
            "model": {"base_model": "tiny", "storage_root": str(work), "deployment_strategy": "staged"},
            "serve": {
                "port": port,
                "app_name": "kaizen-deploy-bench",
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"enabled": False},
                "generator": {"num_cpus": 1, "max_adapters": 2, "default_max_tokens": 8},
            },
            "deploy": {"canary_share": 0.5, "check_interval_s": 0.5, "smoke_timeout_s": 120},
            "ray": {"num_cpus": 2},
        }
    )
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    moves: dict[str, float] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="kaizen-deploy-bench", route_prefix="/")
        if not wait_until_ready(url, timeout_s=180):
            raise RuntimeError(f"Kaizen did not become ready at {url}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        deployer = Deployer(cfg, store, HttpProbe(url, None, store))
        stream = Stream(client, rate)
        threads = stream.run()
        time.sleep(min(phase_s, 5.0))

        stream.phase = "steady (nothing moves)"
        time.sleep(phase_s)

        # Promotion: a production verdict, preloading and the smoke test, a canary, then an operator's promote.
        stream.phase = "promotion"
        t0 = time.perf_counter()
        DeploymentStore(store).record_validation(
            "adp-challenger", "adp-champion", "production", {"benchmark": True}, actor="benchmark"
        )

        def canary_running() -> bool:
            deployer.tick()
            active = DeploymentStore(store).active()
            return active is not None and active.state == "canary"

        moves["to_canary_s"] = wait_for("canary", canary_running, 180)
        time.sleep(phase_s / 2)
        deployer.promote("adp-challenger", actor="benchmark", reason="the benchmark promotes")
        moves["to_promoted_s"] = wait_for("promotion", lambda: registry.champion() == "adp-challenger", 60) + (
            time.perf_counter() - t0
        )
        time.sleep(phase_s / 2)

        stream.phase = "rollback"
        active = DeploymentStore(store).active()
        t0 = time.perf_counter()
        deployer.rollback(active.id if active else None, actor="benchmark", reason="the benchmark rolls back")
        moves["rollback_s"] = wait_for("rollback", lambda: registry.champion() == "adp-champion", 60)
        time.sleep(phase_s)

        # Eviction: requests for three other adapters through a replica that holds two.
        stream.phase = "eviction"
        evicting = 0
        t_end = time.perf_counter() + phase_s
        failures: list[str] = []
        while time.perf_counter() < t_end:
            for other in ("adp-other-1", "adp-other-2", "adp-other-3"):
                try:
                    client.chat.completions.create(
                        model=other, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=4
                    )
                except Exception as exc:
                    failures.append(f"{other}: {type(exc).__name__}")
                evicting += 1
        stream.phase = "cool-down"
        time.sleep(2.0)
        stream.stop.set()
        for t in threads:
            t.join(timeout=60)
        phases = stream.by_phase()
        phases.pop("warm-up", None)
        phases.pop("cool-down", None)
        phases["eviction"]["evicting_requests"] = evicting
        phases["eviction"]["evicting_failed"] = len(failures)
        decisions_made = [
            {k: d[k] for k in ("decision", "from_state", "to_state", "reason")}
            for d in DeploymentStore(store).decisions(DeploymentStore(store).list(1)[0].id)
        ]
        return {"phases": phases, "moves_s": {k: round(v, 2) for k, v in moves.items()}, "decisions": decisions_made}
    finally:
        serve.shutdown()
        ray.shutdown()
        store.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 2. validation wall time -----------------------------------------------------------------------


def validation_time(work: Path, rows: int) -> dict[str, Any]:
    """``jobs.validate.main`` on the challenger adapter of part 1 against the champion, on ``rows``
    validation rows (the adapters' own prompts and answers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from app.config import KaizenConfig
    from jobs.validate import main as validate

    table = pa.table(
        {
            "messages": [
                json.dumps(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": ANSWERS["adp-challenger"]}]
                )
                for p in (PROMPTS * rows)[:rows]
            ]
        }
    )
    path = work / "validation.parquet"
    pq.write_table(table, path)
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(work / "kaizen.db")},
            "privacy": {"hmac_key": "benchmark"},
            "model": {"base_model": "tiny", "storage_root": str(work)},
            "validation": {"max_examples": rows, "max_new_tokens": 16},
            "ray": {"num_cpus": 2},
        }
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        t0 = time.perf_counter()
        outcome = validate(cfg, "adp-challenger", validation=str(path), progress=lambda line: print("  " + line))
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "rows": rows,
        "wall_s": round(wall, 1),
        "verdict": outcome.verdict,
        "reason": outcome.reason,
        "report_uri": outcome.report_uri,
    }


# --- the program -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (numbers mean little)")
    parser.add_argument("--runs", type=int, default=400, help="simulated canaries per scenario")
    parser.add_argument("--look-every", type=int, default=10, help="interactions between two looks of the rule")
    parser.add_argument("--scored", type=int, default=120, help="sample interactions scored for the score pool")
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds of traffic per serving phase")
    parser.add_argument("--rate", type=float, default=4.0, help="completions per second in the stream")
    parser.add_argument("--validation-rows", type=int, default=12, help="rows validated in part 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "deployment.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.scored, args.phase_s, args.validation_rows = 40, 60, 6.0, 3

    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    from app.config_sections import DeployConfig

    started = time.perf_counter()
    deploy = DeployConfig()
    result: dict[str, Any] = {"benchmark": "deployment", "quick": args.quick, "deploy": deploy.model_dump()}

    print(f"[3] scoring {args.scored} sample interactions for the score pool ...", flush=True)
    pool = scorer_scores(args.scored, seed=args.seed)
    result["score_pool"] = {"n": len(pool), "mean": statistics.fmean(pool), "sd": statistics.pstdev(pool)}
    print(f"[3] {args.runs} simulated canaries per scenario at share {deploy.canary_share} ...", flush=True)
    scenarios = decisions(pool, deploy, args.runs, args.seed, args.look_every)
    result["decisions"] = {
        s.name: {"drop": s.drop, "sequential": summarize(s.runs), "fixed_canary": summarize(s.fixed)} for s in scenarios
    }

    with tempfile.TemporaryDirectory(prefix="kaizen-deploy-bench-") as tmp:
        work = Path(tmp)
        print("[1] serving: adapters, the Serve app, a steady stream of completions ...", flush=True)
        result["serving"] = serving_moves(work, args.phase_s, args.rate)
        print("[2] validation of a tiny adapter ...", flush=True)
        result["validation"] = validation_time(work, args.validation_rows)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["goals"] = goals(result)
    report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.output}")


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    d = result["decisions"]
    phases = result["serving"]["phases"]
    failed = sum(p["failed"] for p in phases.values()) + phases["eviction"].get("evicting_failed", 0)
    worse30 = d["30 % worse"]["sequential"]
    aa = d["A/A (same quality)"]["sequential"]
    return [
        {
            "goal": "requests failed during promotion, rollback, eviction",
            "measured": failed,
            "target": "0",
            "passed": failed == 0,
        },
        {
            "goal": "challenger interactions to roll back the 30 %-worse one (p95)",
            "measured": worse30["challenger_n_to_rollback_p95"],
            "target": "<= 200",
            "passed": worse30["challenger_n_to_rollback_p95"] is not None
            and worse30["challenger_n_to_rollback_p95"] <= 200,
        },
        {
            "goal": "A/A false rollbacks",
            "measured": aa["rollback_share"],
            "target": "<= 5 %",
            "passed": aa["rollback_share"] <= 0.05,
        },
        {
            "goal": "30 %-worse challenger promoted",
            "measured": worse30["promote_share"],
            "target": "never",
            "passed": worse30["promote_share"] == 0,
        },
    ]


def report(result: dict[str, Any]) -> None:
    rows = []
    for name, s in result["decisions"].items():
        for rule in ("sequential", "fixed_canary"):
            x = s[rule]
            rows.append(
                (
                    name,
                    "confidence sequences (deployer)" if rule == "sequential" else "fixed canary, mean only (baseline)",
                    f"{x['rollback_share']:.1%}",
                    f"{x['promote_share']:.1%}",
                    f"{x['undecided_share']:.1%}",
                    x["challenger_n_to_rollback_median"] if x["challenger_n_to_rollback_median"] is not None else "-",
                    x["challenger_n_to_rollback_p95"] if x["challenger_n_to_rollback_p95"] is not None else "-",
                    x["challenger_n_to_promote_median"] if x["challenger_n_to_promote_median"] is not None else "-",
                )
            )
    print_table(
        (
            "challenger",
            "rule",
            "rolled back",
            "promoted",
            "undecided",
            "n to roll back (median)",
            "p95",
            "n to promote (median)",
        ),
        rows,
    )
    phases = result["serving"]["phases"]
    print_table(
        ("phase", "requests", "failed", "p50 ms", "p99 ms"),
        [(k, v["requests"], v["failed"], v["p50_ms"], v["p99_ms"]) for k, v in phases.items()],
    )
    print(
        f"moves: {result['serving']['moves_s']}; eviction requests {phases['eviction'].get('evicting_requests')}"
        f" ({phases['eviction'].get('evicting_failed')} failed)"
    )
    v = result["validation"]
    print(f"validation of a tiny adapter on {v['rows']} rows: {v['wall_s']} s, verdict {v['verdict']}")
    print_table(
        ("goal", "measured", "target", "result"),
        [(g["goal"], g["measured"], g["target"], "PASS" if g["passed"] else "FAIL") for g in result["goals"]],
    )


if __name__ == "__main__":
    main()
