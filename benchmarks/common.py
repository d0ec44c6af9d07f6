"""What every benchmark program shares: percentiles, the printed table, a training run's learning
curve, the seeds that a stopped multi-seed run had finished, and the learning benchmarks' harness
(their common options, a quiet process, a work folder, a Kaizen config and a local Ray)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_common_arguments",
    "curve_summary",
    "finished_seeds",
    "kaizen_config",
    "keep_evaluations",
    "machine",
    "pct",
    "print_table",
    "quiet_process",
    "start_local_ray",
    "train_answer_adapter",
    "work_folder",
]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def train_answer_adapter(model_root: Any, store: Any, adapter_id: str, answer: str, prompts: Sequence[str]) -> Any:
    """Train a LoRA adapter on the tiny model, for a few steps, to answer ``answer`` to each of
    ``prompts``; save it in ``store`` and return its manifest."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.model import load_model

    torch.manual_seed(0)  # LoRA's A matrices are drawn at random
    base, tokenizer = load_model("tiny", root=model_root, device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=targets)
    model = get_peft_model(base, config)
    # Prompts followed by the answer and <|im_end|>, left-padded; the loss is on the answer only,
    # so the vocabulary-wide head is computed for those few positions alone (it is most of the cost).
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] + answer_ids for p in rendered]
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = input_ids[:, -len(answer_ids) :]
    inner = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(15):
        hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = inner.lm_head(hidden[:, -len(answer_ids) - 1 : -1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    if not (logits.argmax(-1) == labels).all():
        raise RuntimeError(f"adapter {adapter_id!r} did not learn its answer {answer!r} in 15 steps; choose another")
    return store.save(model, base_model="tiny", adapter_id=adapter_id)


def keep_evaluations(curve: list[dict[str, Any]]) -> Any:
    """A progress callback that keeps each evaluation of a run (with ``finetune.trials``, from the
    winning trial's; with ``finetune.attempts``, every attempt's, each marked): its step, the
    training loss of the steps since the last one, the validation loss and exact match (and, with
    held-out rows of earlier domains, theirs)."""

    def point(e: dict[str, Any], train_loss: Any) -> dict[str, Any]:
        return {
            "step": e.get("step"),
            "train_loss": train_loss,
            "val_loss": e["val_loss"],
            "val_exact_match": e.get("val_exact_match"),
            **({"attempt": e["attempt"]} if e.get("attempt") is not None else {}),
            **(
                {"heldout_exact_match": e["heldout_exact_match"], "heldout_loss": e["heldout_loss"]}
                if e.get("heldout_exact_match") is not None
                else {}
            ),
        }

    def keep(metrics: dict[str, Any]) -> None:
        if metrics.get("trial_evaluations"):  # the winning trial's validations, the last at the choice
            curve.extend(point(e, e.get("train_loss")) for e in metrics["trial_evaluations"])
        elif "val_loss" in metrics and not metrics.get("final"):
            steps = metrics.get("step_metrics") or []
            losses = [m["loss"] for m in steps if m.get("loss") is not None]
            curve.append(point(metrics, sum(losses) / len(losses) if losses else metrics.get("loss")))

    return keep


def curve_summary(name: str, info: dict[str, Any]) -> str:
    """One line for a stage: where its curve started and ended, the step whose adapter was kept,
    and what that adapter scored on the stage's own task."""
    curve = info.get("curve") or []
    if not curve:
        return f"    {name}: no evaluations"
    first, last = curve[0], curve[-1]
    return (
        f"    {name}: {len(curve)} evaluations to step {last['step']}, train loss {first['train_loss']:.3f} -> "
        f"{last['train_loss']:.3f}, val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}, val exact "
        f"{first['val_exact_match']:.2f} -> {last['val_exact_match']:.2f}"
        + (
            f", held-out exact {first['heldout_exact_match']:.2f} -> {last['heldout_exact_match']:.2f}"
            if "heldout_exact_match" in first
            else ""
        )
        + (
            f"; {len(info['attempts'])} attempts (seeds "
            + ", ".join(f"{a['seed']}: val exact {a['val_exact_match']:.2f}" for a in info["attempts"])
            + f"), attempt {info.get('kept_attempt', 0) + 1}'s"
            if info.get("attempts")
            else ""
        )
        + f"; kept step {info.get('kept_step')} "
        f"(val exact {info.get('val_exact_match') or 0:.2f}); test {info.get('own_score', float('nan')):.2f}"
    )


def finished_seeds(
    output: Path, benchmark: str, key: str, seeds: Sequence[int], settings: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The runs of ``seeds`` that a stopped run of ``benchmark`` left in its partial results file
    ``output`` (``complete: false``, the runs under ``key``), so that ``--resume`` runs only the
    others; none when the file is missing or complete.

    Raises:
        ValueError: the file is another benchmark's, or a finished run's settings (its own
            ``settings``, else the file's ``options``; the seed aside) differ from ``settings``,
            naming the first that does."""
    if not output.is_file():
        return []
    prior = json.loads(output.read_text())
    if prior.get("benchmark") != benchmark:
        raise ValueError(f"{output} holds {prior.get('benchmark')!r} results, not {benchmark!r}")
    if prior.get("complete"):
        return []
    runs = [r for r in prior.get(key, []) if r.get("seed") in seeds]
    for run in runs:
        theirs = _plain(run.get("settings", prior.get("options", {})))
        for name, value in _plain(settings).items():
            if name != "seed" and theirs.get(name) != value:
                raise ValueError(
                    f"{output}: seed {run['seed']} ran with {name}={theirs.get(name)!r}, this run has {value!r}; "
                    "resume only with the settings it started with"
                )
    return runs


def _plain(value: Any) -> Any:
    """``value`` as it reads back from the results file (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options the learning benchmarks take."""
    parser.add_argument("--quick", action="store_true", help="a short smoke run (numbers mean little)")
    parser.add_argument(
        "--base-cache",
        type=Path,
        default=None,
        help="keep the pre-trained base model in this folder and reuse it (keyed by its settings)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp folder)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help=f"results file (default benchmarks/results/{name}.json)"
    )


def quiet_process() -> None:
    """Offline, no usage stats, no warnings or Ray Data progress lines, torch on both cores."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    torch.set_num_threads(2)


@contextlib.contextmanager
def work_folder(keep: Path | None, prefix: str) -> Iterator[Path]:
    """The run's folder (``keep``, else a temp folder removed afterwards); Ray, if the run started
    it, is shut down on the way out."""
    work = keep or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if keep is None:
                shutil.rmtree(work, ignore_errors=True)


def kaizen_config(base_dir: Path, work: Path) -> Any:
    """A Kaizen config whose base model is ``base_dir`` and whose store and storage live in ``work``."""
    from app.config import KaizenConfig

    return KaizenConfig.model_validate(
        {
            "model": {
                "base_model": str(base_dir),
                "storage_root": str(work),
                "checkpoint_dir": str(work / "checkpoints"),
            },
            "store": {"sqlite_path": str(work / "kaizen.db")},
            "privacy": {"hmac_key": "benchmark"},
            "ray": {"num_cpus": 2},
        }
    )


def start_local_ray() -> None:
    """A local 2-CPU Ray for the jobs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def machine() -> dict[str, Any]:
    """What computed a run's numbers: the CPU model (another CPU's kernels round differently, and a
    small model pre-trained or fine-tuned on it can take another path: base 3, pre-trained with the
    same code and settings in two sessions on different hosts, dropped the last word at 0.94 and
    0.72), its cores, torch and torch's threads, and the versions of the libraries that train."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    versions = {name: importlib.metadata.version(name) for name in ("transformers", "peft", "ray")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **versions,
    }
