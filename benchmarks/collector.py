"""Collector benchmark: ``python -m benchmarks.collector [--duration 20] [--sessions 1000]``.

Measures, on this machine, in one run:
  1. the client's ``record_*`` cost per call (p50/p99), beside a blocking HTTP POST per
     interaction as the baseline;
  2. ingestion through Ray Serve from N concurrent simulated agent sessions using the client, with
     ~2 KB interactions of real code and prose: sustained interactions/s, p99 record-to-committed,
     and loss (every recorded id must be in the store, once);
  3. the same interactions written straight into the store without Serve (the baseline, a ratio);
  4. the privacy filter's cost per interaction and its share of the direct-ingestion time
     (``benchmarks/privacy.py`` compares the filter with detect-secrets' scanner);
  5. fault runs: the collector replica killed, and the whole app stopped, in the middle of a load;
  6. the saturated load again with ``privacy.encryption`` on (every text field sealed before it is
     written) against the plain run (goal: throughput ratio >= 0.8), and with the quality scorer
     deployed beside the collector (scoring every committed interaction, as the embedded default
     does) against the collector alone; the direct-store baseline with and without encryption too.

Prints a table and writes ``benchmarks/results/collector.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import pct, print_table

RESULTS = Path(__file__).resolve().parent / "results"


# --- payloads ----------------------------------------------------------------------------------


def build_payloads(n: int = 400, target_bytes: int = 2048) -> list[tuple[str, str]]:
    """(prompt, response) pairs of about ``target_bytes`` together, from real stdlib code; some of
    the prompts carry personal data or a secret, as in real traffic."""
    from app.sample import sample_interactions

    pairs = []
    for s in sample_interactions(n * 2, seed=7):
        prompt, response = s.interaction["prompt"], s.interaction["response"]
        size = len(prompt) + len(response)
        if size < target_bytes * 0.6:
            continue
        if size > target_bytes:
            response = response[: max(200, target_bytes - len(prompt))]
        pairs.append((prompt, response))
        if len(pairs) == n:
            break
    return pairs


# --- 1. record cost ----------------------------------------------------------------------------


def bench_record_cost(url: str, payloads: list[tuple[str, str]], n: int, spool: Path) -> dict[str, Any]:
    from app.client import KaizenClient

    client = KaizenClient(url, spool_dir=spool / "record-cost", batch_size=200)
    costs = []
    perf = time.perf_counter_ns
    for k in range(n):
        prompt, response = payloads[k % len(payloads)]
        t0 = perf()
        client.record_interaction(f"session-{k % 1000}", prompt, response, generation_time_ms=900.0)
        costs.append((perf() - t0) / 1000)
        if k % 1000 == 999:
            time.sleep(0.05)  # an agent's pace: the sender thread runs between calls, as in real use
    delivered = client.flush(timeout=120)
    client.close()
    return {
        "calls": n,
        "p50_us": pct(costs, 50),
        "p99_us": pct(costs, 99),
        "p999_us": pct(costs, 99.9),
        "mean_us": statistics.fmean(costs),
        "delivered": delivered,
    }


def bench_blocking_post(url: str, payloads: list[tuple[str, str]], n: int) -> dict[str, Any]:
    """The baseline an agent without the client pays: one blocking POST per interaction."""
    import httpx

    costs = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for k in range(n):
            prompt, response = payloads[k % len(payloads)]
            body = {"session_id": "baseline", "input": {"raw": prompt}, "output": {"content": response}}
            t0 = time.perf_counter_ns()
            http.post("/v1/interactions", json=body)
            costs.append((time.perf_counter_ns() - t0) / 1000)
    return {"calls": n, "p50_us": pct(costs, 50), "p99_us": pct(costs, 99), "mean_us": statistics.fmean(costs)}


# --- 2. load through Serve -------------------------------------------------------------------


def _agent_process(
    proc: int,
    run: str,
    url: str,
    sessions: int,
    rate: float,
    duration: float,
    spool: str,
    start_at: float,
    out: Any,
) -> None:
    """N simulated sessions in one process sharing one client, paced to ``rate`` interactions/s."""
    from app.client import KaizenClient

    payloads = build_payloads()
    recorded_at: dict[str, float] = {}
    latencies: list[float] = []

    def delivered(batch: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
        t = time.perf_counter()
        for event, result in zip(batch, results):
            t0 = recorded_at.pop(event["id"], None)
            if t0 is not None and result.get("status") in ("accepted", "duplicate"):
                latencies.append(t - t0)

    client = KaizenClient(
        url,
        spool_dir=spool,
        batch_size=250,
        flush_interval_s=0.02,
        max_retries=6,
        backoff_base_s=0.1,
        backoff_max_s=2.0,
        probe_interval_s=0.5,
        timeout_s=30,
        on_delivered=delivered,
    )
    seq = [0] * sessions
    while time.time() < start_at:
        time.sleep(0.005)
    t_start = time.perf_counter()
    k = 0
    tick = 0.01
    while True:
        elapsed = time.perf_counter() - t_start
        if elapsed >= duration:
            break
        due = int(rate * elapsed) - k
        for _ in range(max(0, due)):
            s = k % sessions
            prompt, response = payloads[k % len(payloads)]
            iid = f"{run}-{proc}-{k}"
            recorded_at[iid] = time.perf_counter()
            client.record_interaction(
                f"agent-{proc}-{s}", prompt, response, id=iid, sequence_number=seq[s], generation_time_ms=850.0
            )
            seq[s] += 1
            k += 1
        time.sleep(tick)
    load_end = time.perf_counter()
    ok = client.flush(timeout=180)
    drained = time.perf_counter()
    client.close(timeout=5)
    out.put(
        {
            "proc": proc,
            "recorded": k,
            "load_s": load_end - t_start,
            "drain_s": drained - load_end,
            "flushed": ok,
            "latencies": latencies,
            "stats": dict(client.stats),
        }
    )


def run_load(
    url: str,
    store_path: str,
    run: str,
    sessions: int,
    rate: float,
    duration: float,
    procs: int,
    spool: Path,
    fault: Any = None,
) -> dict[str, Any]:
    """Drive the load from ``procs`` processes; ``fault(t)`` is called in a thread mid-load."""
    from app.store.sqlite import SQLiteStore

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 8.0  # spawned interpreters need a few seconds to import
    workers = [
        ctx.Process(
            target=_agent_process,
            args=(p, run, url, sessions // procs, rate / procs, duration, str(spool / f"{run}-{p}"), start_at, out),
        )
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    store = SQLiteStore(store_path)
    while time.time() < start_at:
        time.sleep(0.01)
    fault_info: dict[str, Any] = {}
    if fault is not None:
        threading.Thread(target=lambda: fault_info.update(fault()), daemon=True).start()
    # Sustained rate: committed interactions over the middle of the load (past warm-up).
    time.sleep(duration * 0.2)
    c0, t0 = store.count("interactions"), time.perf_counter()
    time.sleep(duration * 0.6)
    c1, t1 = store.count("interactions"), time.perf_counter()
    reports = [out.get(timeout=duration + 400) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    latencies = [x for r in reports for x in r["latencies"]]
    recorded = sum(r["recorded"] for r in reports)
    expected = [f"{run}-{r['proc']}-{k}" for r in reports for k in range(r["recorded"])]
    stored = store.existing_ids(expected)
    rows = store._fetch("SELECT COUNT(*) AS n FROM interactions WHERE id LIKE ?", [f"{run}-%"])[0]["n"]
    store.close()
    stats = {k: sum(r["stats"].get(k, 0) for r in reports) for k in reports[0]["stats"]}
    return {
        "sessions": sessions,
        "offered_rate": rate,
        "duration_s": duration,
        "recorded": recorded,
        "sustained_per_s": (c1 - c0) / (t1 - t0),
        "achieved_offered_per_s": recorded / max(r["load_s"] for r in reports),
        "latency_p50_ms": pct(latencies, 50) * 1000,
        "latency_p99_ms": pct(latencies, 99) * 1000,
        "stored_unique": len(stored),
        "stored_rows": int(rows),
        "lost": recorded - len(stored),
        "duplicated_rows": int(rows) - len(stored),
        "flushed": all(r["flushed"] for r in reports),
        "drain_s": max(r["drain_s"] for r in reports),
        "client": stats,
        "fault": fault_info,
    }


# --- 3 and 4. direct store baseline, privacy cost ----------------------------------------------


def _events(payloads: list[tuple[str, str]], n: int, run: str) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    return [
        {
            "id": f"{run}-{k}",
            "type": "interaction",
            "timestamp": now,
            "body": {
                "session_id": f"agent-{k % 1000}",
                "input": {"raw": payloads[k % len(payloads)][0]},
                "output": {"content": payloads[k % len(payloads)][1], "generation_time_ms": 850.0},
            },
        }
        for k in range(n)
    ]


def bench_direct(payloads: list[tuple[str, str]], n: int, workdir: Path) -> dict[str, Any]:
    """The same ingestion (parse, validate, privacy, commit in batches of 250) without Serve."""
    from app.config import KaizenConfig
    from app.ingest import IngestPipeline
    from app.privacy.encryption import DataCipher, new_key
    from app.store.sqlite import SQLiteStore

    out: dict[str, Any] = {}
    for name, anonymize, encrypt in (
        ("with_privacy", True, False),
        ("without_privacy", False, False),
        ("with_privacy_encrypted", True, True),
    ):
        db = workdir / f"direct-{name}.db"
        store = SQLiteStore(db)
        store.migrate()
        store.cipher = DataCipher([new_key()]) if encrypt else None
        cfg = KaizenConfig.model_validate({"collection": {"anonymize": anonymize}, "privacy": {"hmac_key": "b"}})
        pipeline = IngestPipeline(cfg)
        raw = json.dumps({"events": _events(payloads, n, f"direct-{name}")}).encode()
        t_prepare = t_write = 0.0
        t0 = time.perf_counter()
        events = json.loads(raw)["events"]
        t_parse = time.perf_counter() - t0
        for start in range(0, n, 250):
            t0 = time.perf_counter()
            prepared = pipeline.prepare(events[start : start + 250])
            t1 = time.perf_counter()
            prepared.finish(store.write(prepared.to_commit))
            t_write += time.perf_counter() - t1
            t_prepare += t1 - t0
        assert store.count("interactions") == n
        store.close()
        total = t_parse + t_prepare + t_write
        out[name] = {
            "interactions": n,
            "per_s": n / total,
            "parse_us": t_parse / n * 1e6,
            "prepare_us": t_prepare / n * 1e6,
            "write_us": t_write / n * 1e6,
            "total_us": total / n * 1e6,
        }
    on, off = out["with_privacy"], out["without_privacy"]
    out["privacy_us_per_interaction"] = on["prepare_us"] - off["prepare_us"]
    out["privacy_share_of_direct"] = out["privacy_us_per_interaction"] / on["total_us"]
    out["encryption_throughput_ratio"] = out["with_privacy_encrypted"]["per_s"] / on["per_s"]
    return out


# --- Serve --------------------------------------------------------------------------------------


def deploy(cfg: Any, name: str) -> None:
    from ray import serve

    from app.client import wait_until_ready
    from app.serve.build import build_app

    serve.run(build_app(cfg), name=name, route_prefix="/", blocking=False)
    if not wait_until_ready(f"http://127.0.0.1:{cfg.serve.port}"):
        raise RuntimeError("Serve app did not become ready")


def make_config(db: Path, port: int, replicas: int, *, encryption: bool = False, scorer: bool = False) -> Any:
    from app.config import KaizenConfig

    return KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "bench", "encryption": encryption},
            # Collection alone unless ``scorer``: the scorer scores every committed interaction.
            "serve": {
                "port": port,
                "scorer": {"enabled": scorer, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "generator": {"enabled": False},
                "collector": {
                    "num_cpus": 0.5,
                    "max_batch_size": 64,
                    "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
                },
            },
        }
    )


def kill_replica() -> dict[str, Any]:
    import ray

    time.sleep(4.0)
    names = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "Collector" in a["name"]
    ]
    if not names:
        return {"killed": 0}
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    return {"killed": 1, "at_s": 4.0}


def stop_app(cfg: Any, name: str, down_s: float = 6.0) -> Any:
    def fault() -> dict[str, Any]:
        from ray import serve

        time.sleep(4.0)
        t0 = time.perf_counter()
        serve.delete(name)
        time.sleep(down_s)
        deploy(cfg, name)
        return {"stopped_at_s": 4.0, "down_s": time.perf_counter() - t0}

    return fault


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5000.0, help="offered interactions/s of the goal run")
    parser.add_argument("--max-rate", type=float, default=9000.0, help="offered interactions/s of the saturation run")
    parser.add_argument("--procs", type=int, default=2, help="agent processes")
    parser.add_argument("--replicas", type=int, default=2, help="collector replicas (the default config's max)")
    parser.add_argument("--record-calls", type=int, default=100_000)
    parser.add_argument("--skip-faults", action="store_true")
    args = parser.parse_args()

    import ray
    from ray import serve

    from app.privacy.encryption import new_key

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The replicas inherit it from this process (the encrypted run's data key).
    os.environ["KAIZEN_DATA_KEYS"] = new_key()
    work = Path(tempfile.mkdtemp(prefix="kaizen-bench-"))
    payloads = build_payloads()
    avg_bytes = statistics.fmean(len(p) + len(r) for p, r in payloads)
    result: dict[str, Any] = {
        "name": "collector",
        "machine": f"{os.cpu_count()} cores",
        "payload_bytes_mean": avg_bytes,
        "args": vars(args),
    }

    print("direct-store baseline and the privacy filter's cost ...", flush=True)
    result["direct"] = bench_direct(payloads, 20_000, work)

    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        cfg = make_config(work / "load.db", port, args.replicas)
        deploy(cfg, "kaizen-bench")
        print("record cost ...", flush=True)
        result["record_cost"] = bench_record_cost(url, payloads, args.record_calls, work)
        result["blocking_post_baseline"] = bench_blocking_post(url, payloads, 300)
        print(f"load: {args.sessions} sessions, {args.rate:.0f}/s offered, {args.duration:.0f} s ...", flush=True)
        result["load"] = run_load(
            url, str(work / "load.db"), "load", args.sessions, args.rate, args.duration, args.procs, work / "spool"
        )
        print(f"saturation: {args.sessions} sessions, {args.max_rate:.0f}/s offered ...", flush=True)
        result["saturation"] = run_load(
            url, str(work / "load.db"), "sat", args.sessions, args.max_rate, args.duration, args.procs, work / "spool"
        )
        for run, label, options in (
            ("encrypted", "privacy.encryption on", {"encryption": True}),
            ("scored", "the quality scorer on", {"scorer": True}),
        ):
            deploy(make_config(work / f"{run}.db", port, args.replicas, **options), "kaizen-bench")
            time.sleep(5)  # the old replicas drain
            print(f"saturation with {label} ...", flush=True)
            result[f"saturation_{run}"] = run_load(
                url,
                str(work / f"{run}.db"),
                run,
                args.sessions,
                args.max_rate,
                args.duration,
                args.procs,
                work / "spool",
            )
        sat = result["saturation"]["sustained_per_s"]
        result["encryption_throughput_ratio"] = result["saturation_encrypted"]["sustained_per_s"] / sat
        result["scorer_throughput_ratio"] = result["saturation_scored"]["sustained_per_s"] / sat
        if not args.skip_faults:
            # One replica, so that killing "the collector replica" is an outage the client sees.
            fault_cfg = make_config(work / "load.db", port, 1)
            deploy(fault_cfg, "kaizen-bench")
            time.sleep(5)  # the old replicas drain
            fault_rate = min(args.rate, 3000.0)
            print("fault run: collector replica killed mid-load ...", flush=True)
            result["fault_kill_replica"] = run_load(
                url,
                str(work / "load.db"),
                "kill",
                args.sessions,
                fault_rate,
                args.duration,
                args.procs,
                work / "spool",
                kill_replica,
            )
            print("fault run: whole app stopped mid-load ...", flush=True)
            result["fault_stop_app"] = run_load(
                url,
                str(work / "load.db"),
                "stop",
                args.sessions,
                fault_rate,
                args.duration,
                args.procs,
                work / "spool",
                stop_app(fault_cfg, "kaizen-bench"),
            )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "collector.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {RESULTS / 'collector.json'}")


def report(r: dict[str, Any]) -> None:
    rc, base, load, sat, direct = r["record_cost"], r["blocking_post_baseline"], r["load"], r["saturation"], r["direct"]
    on = direct["with_privacy"]
    rows = [
        ("record_* cost p50 (µs)", f"{rc['p50_us']:.1f}", f"blocking POST {base['p50_us']:.0f}", "-"),
        ("record_* cost p99 (µs)", f"{rc['p99_us']:.1f}", f"blocking POST {base['p99_us']:.0f}", "<= 50 (seed: 5000)"),
        (f"ingest via Serve at {load['offered_rate']:.0f}/s offered (/s)", f"{load['sustained_per_s']:.0f}", "", ""),
        (
            "  record -> committed p50 / p99 (ms)",
            f"{load['latency_p50_ms']:.0f} / {load['latency_p99_ms']:.0f}",
            "",
            "",
        ),
        ("  lost / duplicated", f"{load['lost']} / {load['duplicated_rows']}", "", "0 / 0"),
        (
            f"ingest via Serve, saturated ({sat['offered_rate']:.0f}/s offered)",
            f"{sat['sustained_per_s']:.0f}",
            f"direct store {on['per_s']:.0f}",
            ">= 5000",
        ),
        ("  Serve / direct-store ratio", f"{sat['sustained_per_s'] / on['per_s']:.2f}", "", ""),
        ("  record -> committed p50 / p99 (ms)", f"{sat['latency_p50_ms']:.0f} / {sat['latency_p99_ms']:.0f}", "", ""),
        ("  lost / duplicated", f"{sat['lost']} / {sat['duplicated_rows']}", "", "0 / 0"),
        (
            "privacy filter per interaction (µs)",
            f"{direct['privacy_us_per_interaction']:.0f}",
            f"direct ingestion without it {direct['without_privacy']['total_us']:.0f}",
            "",
        ),
        ("privacy share of direct ingestion", f"{direct['privacy_share_of_direct']:.0%}", "", ""),
    ]
    if "saturation_encrypted" in r:
        enc, scored = r["saturation_encrypted"], r["saturation_scored"]
        rows += [
            (
                "ingest via Serve, saturated, encryption on (/s)",
                f"{enc['sustained_per_s']:.0f}",
                f"encryption off {sat['sustained_per_s']:.0f}",
                "",
            ),
            ("  encryption on / off", f"{r['encryption_throughput_ratio']:.2f}", "", ">= 0.8"),
            ("  lost / duplicated", f"{enc['lost']} / {enc['duplicated_rows']}", "", "0 / 0"),
            (
                "direct store, encryption on / off",
                f"{direct['encryption_throughput_ratio']:.2f}",
                f"{direct['with_privacy_encrypted']['per_s']:.0f} vs {on['per_s']:.0f}/s",
                "",
            ),
            (
                "ingest via Serve, saturated, scorer on (/s)",
                f"{scored['sustained_per_s']:.0f}",
                f"collector alone {sat['sustained_per_s']:.0f}",
                "",
            ),
            ("  scorer on / off", f"{r['scorer_throughput_ratio']:.2f}", "", "(reported)"),
            ("  lost / duplicated", f"{scored['lost']} / {scored['duplicated_rows']}", "", "0 / 0"),
        ]
    for key, label in (("fault_kill_replica", "fault: replica killed"), ("fault_stop_app", "fault: app stopped")):
        if key in r:
            f = r[key]
            rows.append(
                (
                    f"{label}: recorded / stored",
                    f"{f['recorded']} / {f['stored_unique']}",
                    f"spooled {f['client'].get('spooled', 0)}, retries {f['client'].get('retries', 0)}",
                    "all, once",
                )
            )
            rows.append(("  lost / duplicated", f"{f['lost']} / {f['duplicated_rows']}", "", "0 / 0"))
    print_table(("metric", "measured", "baseline (same run)", "goal"), rows)


if __name__ == "__main__":
    main()
