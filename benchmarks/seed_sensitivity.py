"""Seed sensitivity of a small set: ``python -m benchmarks.seed_sensitivity [--quick] --base-cache DIR``.

Whether a few hundred clean rows teach the data-selection tasks (``benchmarks.tasks.SELECTION_TASKS``)
can depend on the fine-tuning seed alone: one seed learns them, another memorises its rows and
confuses two tasks. This measures it on one pre-trained base (``--pretrain-seed``, default 3, the
base on which the data-selection benchmark's sets did not learn): ``--per-task`` clean rows of each
task (77: the ~231 rows Kaizen's selection trains on), ``--validation-per-task`` more to validate
on, the data-selection benchmark's recipe (its ``Options``: rate, rank, cap, patience, evaluations),
trained in this process (``app.learning.trainer.Trainer``, as every worker runs it) from each seed
of ``--seeds``:

  (a) one seed   ``finetune.attempts=1``, ``trials=1``: the run as its seed makes it (the baseline);
  (b) attempts   ``finetune.attempts=3``: a run whose kept adapter answers under
                 ``learned_exact_match`` of the validation rows exactly starts over from the next
                 seed. Its first attempt is (a)'s run, step for step (deterministic algorithms),
                 so where (a) learned (b) is (a) and is not trained again.

``--dataset DIR`` trains on a dataset folder's rows instead (a data-selection run's selection kept
with ``--keep``; ``--drop-poor`` leaves its wrong answers out), and ``--hard-first N`` draws random
clean rows of which at most N start with one of the words where that benchmark's assistant errs
(a selection's sparse coverage of those requests, without its choice of rows).

Score: exact match of greedy answers on 100 held-out inputs per task (the teacher-forced argmax,
``Trainer.measure_on``, which is what greedy decoding writes). A seed's run counts as learned at
0.9 on every task. Goal: with attempts every seed learns. Prints a table and writes
``benchmarks/results/seed_sensitivity.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.base_model import ensure_base_model
from benchmarks.common import add_common_arguments, machine, print_table, quiet_process, work_folder
from benchmarks.data_selection import REQUIRED_ABILITIES, Options, hard_words, recipe, settings
from benchmarks.tasks import SELECTION_TASKS, make_examples, task_rows, words_of

RESULTS = Path(__file__).resolve().parent / "results"
LEARNED = 0.9


def _rows(task: Any, examples: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"messages": r["messages"]} for r in task_rows(task, examples)]


def task_sets(per_task: int, validation_per_task: int, test_per_task: int, data_seed: int) -> dict[str, Any]:
    """Clean training and validation rows of every task (drawn with ``data_seed``), and each
    task's held-out test rows (the data-selection benchmark's: inputs no training row has)."""
    rng = random.Random(data_seed)
    train, validation, tests = [], [], {}
    for task in SELECTION_TASKS:
        test = make_examples(task, test_per_task, random.Random(f"test:{task.name}"))
        drawn = make_examples(task, per_task + validation_per_task, rng, exclude=[words_of(task, x) for x, _ in test])
        train += _rows(task, drawn[:per_task])
        validation += _rows(task, drawn[per_task:])
        tests[task.name] = _rows(task, test)
    rng.shuffle(train)
    return {"train": train, "validation": validation, "tests": tests}


def hard_limited_sets(
    per_task: int, validation_per_task: int, test_per_task: int, data_seed: int, hard: set[str], hard_first: int
) -> dict[str, Any]:
    """Clean rows as :func:`task_sets` draws them (twice as many to draw from), ``per_task`` of each
    task in their order, of which at most ``hard_first`` in all start with one of ``hard`` (the
    words where the data-selection benchmark's assistant errs): random clean rows that cover the
    requests as sparsely as a selection that found few good answers there."""
    tasks = {t.instruction: t for t in SELECTION_TASKS}
    drawn = task_sets(2 * per_task, validation_per_task, test_per_task, data_seed)
    counts, left, train = dict.fromkeys(tasks, 0), hard_first, []
    for row in drawn["train"]:
        request = json.loads(row["messages"])[0]["content"]
        instruction = request.split(":")[0]
        on_hard = words_of(tasks[instruction], request)[0] in hard
        if counts[instruction] >= per_task or (on_hard and left == 0):
            continue
        left -= on_hard
        counts[instruction] += 1
        train.append(row)
    return {**drawn, "train": train}


def dataset_sets(folder: Path, drop_poor: bool, test_per_task: int) -> dict[str, Any]:
    """A dataset folder's training and validation rows (``jobs/build_dataset.py``'s, e.g. a
    data-selection run's selection kept with ``--keep``), with the rows whose answer is not their
    task's left out when ``drop_poor``; the tasks' held-out test rows as :func:`task_sets` draws them.

    Raises:
        ValueError: a row whose request is none of the tasks'."""
    import pyarrow.parquet as pq

    tasks = {t.instruction: t for t in SELECTION_TASKS}

    def rows(name: str) -> tuple[list[dict[str, Any]], int]:
        kept, poor = [], 0
        for row in pq.read_table(folder / f"{name}.parquet").to_pylist():
            messages = json.loads(row["messages"])
            request = [m for m in messages if m["role"] == "user"][-1]["content"]
            task = tasks.get(request.split(":")[0])
            if task is None:
                raise ValueError(f"{folder / name}.parquet: {request!r} is no request of {', '.join(tasks)}")
            wrong = messages[-1]["content"].strip() != task.answer(words_of(task, request))
            poor += wrong
            if not (drop_poor and wrong):
                kept.append({"messages": row["messages"]})
        return kept, poor

    (train, train_poor), (validation, validation_poor) = rows("train"), rows("validation")
    tests = task_sets(0, 0, test_per_task, 0)["tests"]
    return {"train": train, "validation": validation, "tests": tests, "poor": [train_poor, validation_poor]}


def train(
    o: Options, base_dir: Path, work: Path, data: dict[str, Any], seed: int, attempts: int, dropout: float = 0.0
) -> dict[str, Any]:
    """One run of the benchmark's recipe from ``seed`` in this process: its final report, each
    task's test score, and its evaluations."""
    from app.learning.tokenization import tokenize_messages
    from app.learning.trainer import Trainer
    from app.learning.worker_context import LocalContext, WorkerSpec, deterministic_algorithms

    opts = recipe(o, trials=1, attempts=attempts, lora_dropout=dropout, seed=seed)
    spec = WorkerSpec(
        opts=opts,
        base_model=str(base_dir),
        storage_root=str(work),
        max_vram_gb=80.0,
        max_seconds=1e9,
        datasets=["train", "validation"],
    )
    context = LocalContext({"train": data["train"], "validation": data["validation"]})
    trainer = Trainer(spec, context)
    t0 = time.perf_counter()
    with deterministic_algorithms(opts.deterministic):
        trainer.setup()
        final = trainer.fit()
        tokenized = {
            name: [tokenize_messages(trainer.tokenizer, r["messages"], opts.max_length) for r in rows]
            for name, rows in data["tests"].items()
        }
        scores = {name: trainer.measure_on(rows)[1] for name, rows in tokenized.items()}
    return {
        "seed": seed,
        "attempts": final.get("attempts") or [],
        "kept_attempt": final.get("attempt", 0),
        "kept_seed": final["seed"],
        "steps": sum(a["steps"] for a in final["attempts"]) if final.get("attempts") else final["step"],
        "kept_step": final.get("kept_step"),
        "val_exact_match": final.get("val_exact_match"),
        "scores": scores,
        "score": sum(scores.values()) / len(scores),
        "learned": min(scores.values()) >= LEARNED,
        "seconds": round(time.perf_counter() - t0, 1),
        "curve": [
            {k: r.get(k) for k in ("attempt", "step", "val_loss", "val_exact_match")}
            for r in context.reports
            if "val_loss" in r and not r.get("final")
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "seed_sensitivity")
    parser.add_argument("--pretrain-seed", type=int, default=3, help="the base model's pre-training seed (default 3)")
    parser.add_argument("--seeds", default="3,4,5,6,7", help="fine-tuning seeds, comma-separated (default 3-7)")
    parser.add_argument("--per-task", type=int, default=77, help="training rows per task (default 77)")
    parser.add_argument("--validation-per-task", type=int, default=40, help="validation rows per task (default 40)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0, the benchmark's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="change one of the data-selection benchmark's Options (e.g. lr=3e-4, lora_rank=4); repeatable",
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="train on this dataset folder's train and validation rows instead (e.g. a kept data-selection run's)",
    )
    parser.add_argument("--drop-poor", action="store_true", help="--dataset: leave out the rows whose answer is wrong")
    parser.add_argument(
        "--hard-first",
        type=int,
        default=None,
        help="at most this many training rows start with one of the data-selection seed's hard words",
    )
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    try:
        o, s = settings(args.quick, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    quiet_process()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "seed_sensitivity",
        "quick": args.quick,
        "options": asdict(o),
        "per_task": args.per_task,
        "validation_per_task": args.validation_per_task,
        "lora_dropout": args.lora_dropout,
        "machine": machine(),
    }
    with work_folder(args.keep, "kaizen-seed-sensitivity-") as work:
        base_dir, base = ensure_base_model(
            work,
            args.base_cache,
            replace(s, seed=args.pretrain_seed),
            required=() if args.quick else REQUIRED_ABILITIES,
        )
        result["base_model"] = {**base, "path": str(base_dir)}
        test_rows = 20 if args.quick else 100
        if args.dataset is not None:
            data = dataset_sets(args.dataset, args.drop_poor, test_rows)
            result["dataset"] = {"path": str(args.dataset), "drop_poor": args.drop_poor, "poor": data["poor"]}
        elif args.hard_first is not None:
            hard = set(hard_words(replace(o, seed=args.pretrain_seed)))
            data = hard_limited_sets(
                args.per_task, args.validation_per_task, test_rows, args.pretrain_seed, hard, args.hard_first
            )
            result["hard_first"] = args.hard_first
        else:
            data = task_sets(args.per_task, args.validation_per_task, test_rows, args.pretrain_seed)
        runs = []
        for seed in seeds:
            alone = train(o, base_dir, work, data, seed, attempts=1, dropout=args.lora_dropout)
            if alone["val_exact_match"] is not None and alone["val_exact_match"] >= 0.95:
                again = {**alone, "same_as_one_seed": True}  # its first attempt is this run: nothing more
            else:
                again = train(o, base_dir, work, data, seed, attempts=3, dropout=args.lora_dropout)
            runs.append({"seed": seed, "one_seed": alone, "attempts": again})
            for name, r in (("one seed", alone), ("attempts", again)):
                print(
                    f"  seed {seed} {name}: "
                    + " ".join(f"{k} {v:.2f}" for k, v in r["scores"].items())
                    + f", kept step {r['kept_step']} of attempt {r['kept_attempt'] + 1} (seed {r['kept_seed']}), "
                    f"{r['steps']} steps, {r['seconds']:.0f} s",
                    flush=True,
                )
    result["runs"] = runs
    learned = {k: sum(r[k]["learned"] for r in runs) for k in ("one_seed", "attempts")}
    result["goals"] = [
        {
            "goal": "every seed's run learns every task (0.9) with attempts",
            "measured": f"{learned['attempts']}/{len(runs)}",
            "baseline": f"{learned['one_seed']}/{len(runs)} with one seed",
            "passed": learned["attempts"] == len(runs),
        }
    ]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    rows = []
    for r in runs:
        for name in ("one_seed", "attempts"):
            x = r[name]
            rows.append(
                [
                    r["seed"],
                    name.replace("_", " "),
                    " / ".join(f"{v:.2f}" for v in x["scores"].values()),
                    "yes" if x["learned"] else "NO",
                    ", ".join(f"{a['seed']}: {a['val_exact_match']:.2f}" for a in x["attempts"]) or "1",
                    f"{x['steps']} ({x['kept_step']})",
                ]
            )
    print_table(["seed", "run", "head / front / trim", "learned", "attempts (val exact)", "steps (kept)"], rows)
    g = result["goals"][0]
    print(f"\n{g['goal']}: {g['measured']} (baseline {g['baseline']}) {'PASS' if g['passed'] else 'FAIL'}")
    output = args.output or RESULTS / "seed_sensitivity.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
