"""Generation benchmark: ``python -m benchmarks.generation [--model tiny] [--tokens 64]``.

Measures, on this machine, in one run:
  1. time to first token and tokens/s of one streamed request, for the base model and with a LoRA
     adapter (the LoRA overhead as a ratio in the same run), in process (``GeneratorService``);
  2. an adapter's cold-load time (from the adapter store into the running model);
  3. requests/s through Ray Serve and real HTTP (the ``openai`` client) at 1, 8 and 32 concurrent
     requests spread over 4 adapters;
  4. failed requests while a new adapter is registered and loaded under that load (goal 0).

The adapters have random LoRA weights (rank 16 on every projection): their values do not change
the cost. ``--model qwen2.5-7b-shape`` runs part 1 and 2 on a GPU with a model of Qwen2.5-7B's
shape in bf16 (random weights).

Prints a table and writes ``benchmarks/results/generation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import pct, print_table

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


def make_adapters(root: Path, model_name: str, ids: list[str], rank: int = 16) -> None:
    """LoRA adapters with random weights, saved in the adapter store under ``root``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.model import load_model
    from app.model.adapters import AdapterStore

    store = AdapterStore(root)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, adapter_id in enumerate(ids):
        torch.manual_seed(i)
        base, _ = load_model(model_name, root=root, device="cpu")
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
        )
        store.save(get_peft_model(base, config), base_model=model_name, adapter_id=adapter_id)


def _request(max_tokens: int) -> Any:
    from app.generation import ChatCompletionRequest

    # Greedy with a presence penalty: the random model would otherwise repeat one token and stop early.
    return ChatCompletionRequest.model_validate(
        {
            "model": "x",
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "presence_penalty": 2.0,
            "max_tokens": max_tokens,
        }
    )


def bench_in_process(root: Path, model_name: str, tokens: int, repeats: int) -> dict[str, Any]:
    """TTFT and tokens/s, base against adapter; an adapter's cold load."""
    from app.generation import GeneratorService
    from app.model.adapters import AdapterStore

    service = GeneratorService(model_name, root=root, adapter_store=AdapterStore(root), max_adapters=8)
    out: dict[str, Any] = {}
    loads = []
    for adapter_id in ("bench-a0", "bench-a1", "bench-a2"):
        t0 = time.perf_counter()
        service.load_adapter(adapter_id)
        loads.append((time.perf_counter() - t0) * 1000)
        service.unload_adapter(adapter_id)
    out["adapter_cold_load_ms"] = {"p50": statistics.median(loads), "all": loads}
    service.load_adapter("bench-a0")
    for label, adapter_id in (("base", None), ("adapter", "bench-a0")):
        ttft, rate = [], []
        for i in range(repeats + 1):
            stream = service.stream(_request(tokens), adapter_id)
            for _ in stream:
                pass
            g = stream.generation
            if i == 0:
                continue  # warm-up
            ttft.append(g.ttft_ms)
            decode_s = (g.generation_time_ms - g.ttft_ms) / 1000
            rate.append((g.completion_tokens - 1) / decode_s if decode_s > 0 else float("nan"))
        out[label] = {
            "ttft_ms_p50": statistics.median(ttft),
            "tokens_per_s": statistics.median(rate),
            "completion_tokens": g.completion_tokens,
        }
    out["lora_overhead_ratio"] = out["base"]["tokens_per_s"] / out["adapter"]["tokens_per_s"]
    return out


def _serve(root: Path, db: Path, model_name: str, adapters: int) -> tuple[str, Any]:
    from ray import serve

    from app.client import wait_until_ready
    from app.config import KaizenConfig
    from app.serve.build import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "bench"},
            "model": {"base_model": model_name, "storage_root": str(root)},
            "serve": {
                "port": port,
                "scorer": {"enabled": False},
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "generator": {"num_cpus": 1, "max_adapters": adapters, "max_batch_size": 8, "max_ongoing_requests": 64},
            },
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="kaizen-gen-bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(url, timeout_s=180):
        raise RuntimeError("Serve app did not become ready")
    return url, cfg


def _load(
    url: str, concurrency: int, duration: float, models: list[str], tokens: int, during: Any = None
) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def worker(k: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            model = models[(k + n) % len(models)]
            n += 1
            t0 = time.perf_counter()
            try:
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPT}],
                    temperature=0,
                    presence_penalty=2.0,
                    max_tokens=tokens,
                )
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # every failure is counted, whatever it is
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    during_info = during() if during is not None else None
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "requests_per_s": len(latencies) / elapsed,
        "latency_p50_s": pct(latencies, 50),
        "latency_p99_s": pct(latencies, 99),
        "during": during_info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, or qwen2.5-7b-shape on a GPU")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--repeats", type=int, default=5, help="streamed requests per in-process measurement")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--skip-serve", action="store_true", help="in-process measurements only")
    args = parser.parse_args()

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="kaizen-gen-bench-"))
    result: dict[str, Any] = {
        "name": "generation",
        "model": args.model,
        "machine": f"{os.cpu_count()} cores",
        "args": vars(args),
    }
    try:
        print("adapters ...", flush=True)
        ids = [f"bench-a{i}" for i in range(5)]
        make_adapters(work, args.model, ids)
        print("in process: TTFT, tokens/s, cold load ...", flush=True)
        result["in_process"] = bench_in_process(work, args.model, args.tokens, args.repeats)
        if not args.skip_serve:
            from app.model.adapters import AdapterStore
            from app.registry import AdapterRegistry
            from app.store.sqlite import SQLiteStore

            db = work / "kaizen.db"
            store = SQLiteStore(db)
            store.migrate()
            registry = AdapterRegistry(store)
            adapter_store = AdapterStore(work)
            for adapter_id in ids[:4]:
                registry.register(adapter_store.manifest(adapter_id), adapter_store.uri(adapter_id), actor="bench")
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
            )
            url, _ = _serve(work, db, args.model, adapters=5)
            _load(url, 4, 5.0, ids[:4], args.tokens)  # warm-up: every adapter loaded once
            result["serve"] = {}
            for concurrency in (1, 8, 32):
                print(f"serve: {concurrency} concurrent over 4 adapters ...", flush=True)
                result["serve"][str(concurrency)] = _load(url, concurrency, args.duration, ids[:4], args.tokens)

            models = list(ids[:4])  # the workers read it on every request

            def register_new() -> dict[str, Any]:
                time.sleep(args.duration / 4)
                t0 = time.perf_counter()
                registry.register(adapter_store.manifest("bench-a4"), adapter_store.uri("bench-a4"), actor="bench")
                registry.set_alias("challenger", "bench-a4", actor="bench", reason="benchmark: new adapter under load")
                models.append("challenger")  # from now on every fifth request asks for it
                return {"registered_after_s": args.duration / 4, "register_ms": (time.perf_counter() - t0) * 1000}

            print("serve: a new adapter registered and loaded under 8 concurrent ...", flush=True)
            result["new_adapter_under_load"] = _load(url, 8, args.duration, models, args.tokens, during=register_new)
            store.close()
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {RESULTS / 'generation.json'}")


def report(r: dict[str, Any]) -> None:
    p = r["in_process"]
    rows = [
        (
            "time to first token p50, base / adapter (ms)",
            f"{p['base']['ttft_ms_p50']:.1f} / {p['adapter']['ttft_ms_p50']:.1f}",
            "",
            "-",
        ),
        ("tokens/s, adapter", f"{p['adapter']['tokens_per_s']:.1f}", f"base {p['base']['tokens_per_s']:.1f}", "-"),
        ("LoRA overhead (base tokens/s / adapter tokens/s)", f"{p['lora_overhead_ratio']:.2f}", "", "-"),
        ("adapter cold load p50 (ms)", f"{p['adapter_cold_load_ms']['p50']:.0f}", "", "-"),
    ]
    if "serve" in r:
        one = r["serve"]["1"]["requests_per_s"]
        for c, s in r["serve"].items():
            rows.append(
                (
                    f"requests/s at {c} concurrent, 4 adapters (HTTP)",
                    f"{s['requests_per_s']:.2f}",
                    f"1 concurrent {one:.2f}" if c != "1" else "",
                    "-",
                )
            )
            rows.append(
                (
                    f"  latency p50 / p99 at {c} (s); failed",
                    f"{s['latency_p50_s']:.2f} / {s['latency_p99_s']:.2f}; {s['failed']}",
                    "",
                    "0 failed",
                )
            )
        n = r["new_adapter_under_load"]
        rows.append(
            (
                "failed requests while a new adapter is registered and loaded",
                f"{n['failed']} of {n['requests'] + n['failed']}",
                "",
                "0",
            )
        )
    print_table(("metric", "measured", "baseline (same run)", "goal"), rows)


if __name__ == "__main__":
    main()
