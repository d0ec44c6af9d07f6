"""Forgetting benchmark: ``python -m benchmarks.forgetting [--quick] [--base-cache DIR]``.

Measures learning efficacy on a CPU in one run (about 20 minutes on 2 cores): three tasks
(``benchmarks/tasks.py``: next, before, partner: the word of a fixed list of 48 that follows,
precedes or faces the first of four input words) are learned one after another by the real jobs,
each stage a LoRA adapter continued from the previous stage's, with

  (a) naive    fine-tuning on the new task alone (the baseline);
  (b) ssr      Self-Synthesized Rehearsal (``jobs/synthesize.py``, Huang et al. ACL 2024): at each
               stage the base model writes inputs of the task just learned from 2-shot prompts
               built on a real sample of it, the latest adapter (the one that has just learned
               it, set as the registry's champion) answers them, the answers less sure than its
               answers to the real sample are dropped, k-means picks the rehearsal instances among
               the rest, the earlier tasks' rows are carried over from the previous stage's set
               (``ssr.carry_over``), and ``jobs/finetune.py`` mixes them all into the epochs
               (``finetune.rehearsal_ratio``); :class:`Settings` says which options and why;
  (c) real     rehearsal of real earlier rows instead (as many per task as SSR keeps): the reference;
  (d) fggm     Fisher-guided gradient masking alone: no rehearsal; the Fisher information of the
               adapter is estimated on a small real sample of the earlier tasks
               (``--fisher-data``) and only the half of the entries that matter least to them is
               updated;
  (e) ssr+fggm SSR rehearsal with the masking, the Fisher estimated on the rehearsal rows.

Each task is new knowledge (16 associations, the other three words varying); each task's inputs
start with its own third of the list, so one model can hold all three, and all three read the same
position and answer from the same words: learned alone, a later task overwrites the earlier ones.

The first stage (task 1 from a fresh adapter) is the same for every method and is trained once.
After every stage every task is scored on 100 held-out inputs (exact match of greedy answers), so
each method has a score matrix R (R[j][i]: task i after stage j), from which the table reports the
average score after the last stage, the last task's score, backward transfer, forgetting (mean over
earlier tasks of the best score minus the final one) and the seed's relative forgetting rate
(mean over earlier tasks of (best - final) / best). Goals (issue 5): SSR forgets at most half as
much as naive fine-tuning, its forgetting rate is under 0.3, and its last-task score is within 5%
of naive's.

The base model is pre-trained by ``benchmarks/base_model.py`` (shared with the other learning
benchmarks through ``--base-cache``).

Prints a table and writes ``benchmarks/results/forgetting.json`` (config, base model, the score
matrices, rehearsal statistics, the summary and the goals with pass/fail).

"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.base_model import TASK_DESCRIPTION, BaseSettings, Evaluator, ensure_base_model
from benchmarks.common import (
    add_common_arguments,
    curve_summary,
    finished_seeds,
    kaizen_config,
    keep_evaluations,
    machine,
    print_table,
    quiet_process,
    start_local_ray,
    work_folder,
)
from benchmarks.tasks import (
    BENCHMARK_TASKS,
    WORDS,
    Task,
    make_examples,
    summarize,
    task_rows,
    words_of,
    write_rows,
)

RESULTS = Path(__file__).resolve().parent / "results"
VOCABULARY = frozenset(WORDS)
METHODS = ("naive", "ssr", "real", "fggm", "ssr+fggm")


@dataclass
class Settings(BaseSettings):
    """Everything that decides the numbers (with the base model's, :class:`BaseSettings`); written to
    the JSON."""

    # the tasks
    train_rows: int = 320
    """Twenty examples of each of a task's 16 associations. With 160 (ten each) whether a stage learned
    its task depended on the base: on one pre-trained afresh (seed 2) stage 1 memorised its rows
    (training loss 0.004, validation loss rising from 1.75 to 2.50, held-out ``next`` 0.26), whatever
    the fine-tuning seed (0.26, 0.08, 0.03), the rate (5e-4: 0.05; 2e-3: 0.70 after a late turn), weight
    decay (1.0: 0.35), LoRA dropout (0.1: 0.02) or the stopping rule (no early stop, 1,600 steps:
    0.26); with 320 rows it answered 1.00 (kept step 640, 85 s)."""
    validation_rows: int = 32
    test_rows: int = 100
    # fine-tuning (jobs/finetune.py)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 1e-3
    """3e-3 sat near the edge where LoRA on this base blows up and settles on one answer for every
    input (a score of 0.06-0.09, the share of inputs whose answer that word is): at 1e-2 one seed
    in three did, at 5e-3 and 7e-3 runs oscillated, and another CPU's numerics (AVX-512 against
    AVX2) move a run across it. At 1e-3 with warm-up every seed learned by step 100-120 on that
    machine's base; on this session's base (seed 0) stage 1 at 2e-3 stayed on the plateau (0.03-0.09
    for ten epochs) while 3e-3 left it at step 80 and 1e-3 at step 200: near the plateau the outcome
    is chaotic in the rate, and 1e-3 is the rate that left it on every base tried."""
    warmup_fraction: float = 0.05
    early_stopping_patience: int = 8
    """Evaluations (one an epoch) without a better selection key (the validation exact match, with the
    earlier tasks' held-out match once it reaches finetune.learned_exact_match, then the loss)
    before a stage stops; ``epochs`` is the cap. A stage can sit on the one-answer plateau for
    several epochs before it leaves it (stage 1 of seed 0 scored 0.03-0.12 for nine epochs)."""
    early_stopping_min_delta: float = 1e-3
    """Once every validation row is answered exactly, the loss goes on falling by ever less: a fall
    under this does not count, so a learned stage stops instead of running to the cap."""
    epochs: int = 80
    """The cap. With 40 (800 steps, the cosine schedule decaying over them) stage 1 of seed 0 at lr
    1e-3 had reached a validation exact match of only 0.84 (test 0.91) when it stopped; with 80 it
    reached 1.00 at step 520 (test 1.00)."""
    batch_size: int = 8
    rehearsal_ratio: float = 0.25
    mask_fraction: float = 0.5
    fisher_rows_per_task: int = 32
    # SSR (jobs/synthesize.py)
    ssr_demonstrations: int = 16
    """ssr.min_demonstrations (the real sample): 1 % of a task's 320 rows is 3. Each of a task's 16
    first words is a fact of its own, and the rehearsal rows must cover them: after stage 1, the
    rows of ``next`` started with 9 of its 16 words with 4 demonstrations and top-p 0.6, 10 with 16
    or 32 demonstrations, and 13 with 16 and top-p 1.0 (14 with 32)."""
    ssr_top_p: float = 1.0
    """ssr.top_p: the paper's 0.6 keeps this small base model to the few words it likes best."""
    ssr_prompts_per_domain: int = 120
    """480 candidates: about a fifth pass the confidence floor, enough for the 96 instances."""
    ssr_samples_per_prompt: int = 4
    ssr_instances_per_domain: int = 96
    ssr_clusters: int = 20
    ssr_min_output_confidence: float = 0.0
    ssr_sample_confidence_ratio: float = 1.0
    """ssr.sample_confidence_ratio: how sure the latest adapter is depends on the base model and the
    stage (one base's adapter answered inputs starting with its task's own words at 0.996 to 0.998,
    and the others, which it gets wrong, at 0.63 to 0.996; another's answered its own training
    inputs at 0.64 and up, median 0.85), so the floor is calibrated on its answers to the real
    sample's inputs."""
    ssr_answer_before_selecting: bool = True
    methods: list[str] = field(default_factory=lambda: list(METHODS))


QUICK = {
    "pretrain_steps": 60,
    "copy_warmup_steps": 20,
    "train_rows": 48,
    "validation_rows": 8,
    "test_rows": 24,
    "epochs": 1,
    "ssr_prompts_per_domain": 4,
    "ssr_samples_per_prompt": 2,
    "ssr_instances_per_domain": 6,
    "ssr_clusters": 3,
    "fisher_rows_per_task": 8,
}


# --- data ----------------------------------------------------------------------------------------


@dataclass
class TaskData:
    task: Task
    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]
    folder: Path


def make_task_data(root: Path, s: Settings) -> list[TaskData]:
    """Train, validation and held-out test inputs of every task (disjoint), and a dataset folder
    per task as ``jobs/build_dataset.py`` lays it out (``train.parquet``, ``validation.parquet``,
    ``manifest.json``)."""
    out = []
    for k, task in enumerate(BENCHMARK_TASKS):
        rng = random.Random(f"{s.seed}:{task.name}")
        test = make_examples(task, s.test_rows, rng)
        held = [words_of(task, x) for x, _ in test]
        rest = make_examples(task, s.train_rows + s.validation_rows, rng, exclude=held)
        train, validation = rest[: s.train_rows], rest[s.train_rows :]
        folder = root / "datasets" / f"task{k + 1}-{task.name}"
        write_rows(folder / "train.parquet", task_rows(task, train))
        write_rows(folder / "validation.parquet", task_rows(task, validation, prefix="val-"))
        (folder / "manifest.json").write_text(
            json.dumps(
                {"dataset_id": folder.name, "task": task.name, "train": len(train), "validation": len(validation)}
            )
        )
        out.append(TaskData(task, train, validation, test, folder))
    return out


def _heldout(root: Path, tasks: list[TaskData], stage: int, name: str) -> Path:
    """The validation rows of every task before ``stage`` (0-based), never trained on, as a dataset
    folder: what ``kaizen learn`` hands a cycle as its held-out earlier domains
    (``learn.measure_forgetting``), whose loss and exact match the trainer's objective and kept
    adapter follow."""
    folder = root / "heldout" / name
    write_rows(
        folder / "validation.parquet",
        [row for data in tasks[:stage] for row in task_rows(data.task, data.validation, prefix="val-")],
    )
    return folder


def _earlier_rows(tasks: list[TaskData], stage: int, per_task: int, seed: int) -> list[dict[str, Any]]:
    """``per_task`` real training rows of each task before ``stage`` (0-based), drawn at random."""
    rows = []
    for data in tasks[:stage]:
        examples = random.Random(f"{seed}:{data.task.name}:{stage}").sample(data.train, min(per_task, len(data.train)))
        rows.extend(task_rows(data.task, examples, prefix=f"s{stage}-"))
    return rows


# --- the stages ----------------------------------------------------------------------------------


def _finetune(
    cfg: Any,
    s: Settings,
    data: TaskData,
    parent: str | None,
    name: str,
    *,
    rehearsal: Path | None = None,
    fisher: Path | None = None,
    heldout: Path | None = None,
    masking: str = "none",
) -> dict[str, Any]:
    from app.learning.training import FinetuneConfig
    from jobs import finetune

    opts = FinetuneConfig(
        lora_rank=s.lora_rank,
        lora_alpha=s.lora_alpha,
        lora_dropout=0.0,
        lr=s.lr,
        warmup_fraction=s.warmup_fraction,
        select_by="exact_match",
        epochs=s.epochs,
        batch_size=s.batch_size,
        max_length=64,
        rehearsal_ratio=s.rehearsal_ratio if rehearsal else 0.0,
        masking=masking,
        mask_fraction=s.mask_fraction,
        continue_from=parent,
        num_workers=1,
        cpus_per_worker=2,
        checkpoint_every_steps=10_000,
        early_stopping_patience=s.early_stopping_patience,
        early_stopping_min_delta=s.early_stopping_min_delta,
        seed=s.seed,
        fisher_samples=64,
    )
    from app.learning.lineage import TrainingDidNotLearn

    t0 = time.perf_counter()
    curve: list[dict[str, Any]] = []
    try:
        result = finetune.main(
            cfg,
            opts,
            data.folder,
            rehearsal=rehearsal,
            fisher_data=fisher,
            heldout=heldout,
            run_name=name,
            progress=keep_evaluations(curve),
        )
    except TrainingDidNotLearn as exc:
        # A failed stage publishes nothing: the method goes on from the adapter it had (its run is
        # then invalid, its own task unlearned), and the failure is in the results.
        print(f"  {name}: FAILED, {exc}", flush=True)
        result = {
            "adapter_id": parent,
            "metrics": {**exc.metrics, "steps": exc.metrics.get("step")},
            "failed": str(exc),
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["curve"] = curve
    return result


def _synthesize(
    cfg: Any, s: Settings, tasks: list[TaskData], stage: int, champion: str, name: str, carry: str | None
) -> tuple[Path, dict[str, Any]]:
    """SSR rehearsal rows of the tasks before ``stage``, as the paper rehearses them: the task
    just learned (``stage - 1``) is synthesized now, its outputs written by ``champion`` (the
    adapter that has just learned it), and the rows of the tasks before it are carried over from
    the previous stage's set ``carry`` as they were written."""
    from app.artifacts import artifact_uri
    from app.learning.ssr import SSRConfig
    from app.registry import AdapterRegistry
    from app.store import open_store
    from jobs import synthesize

    store = open_store(cfg.store)
    try:
        AdapterRegistry(store).set_alias(
            "champion",
            champion,
            actor="benchmarks.forgetting",
            reason=f"{name}: latest model",
        )
    finally:
        store.close()
    source = Path(cfg.model.storage_root) / "sources" / name
    write_rows(source / "train.parquet", task_rows(tasks[stage - 1].task, tasks[stage - 1].train))
    opts = SSRConfig(
        rehearsal_id=name,
        carry_over=carry,
        task_description=TASK_DESCRIPTION,
        min_demonstrations=s.ssr_demonstrations,
        prompts_per_domain=s.ssr_prompts_per_domain,
        samples_per_prompt=s.ssr_samples_per_prompt,
        top_p=s.ssr_top_p,
        max_input_tokens=16,
        max_output_tokens=12,
        min_input_chars=8,
        num_clusters=s.ssr_clusters,
        rehearsal_instances_per_domain=s.ssr_instances_per_domain,
        batch_size=16,
        min_output_confidence=s.ssr_min_output_confidence,
        sample_confidence_ratio=s.ssr_sample_confidence_ratio,
        answer_before_selecting=s.ssr_answer_before_selecting,
        num_cpus=2,
        num_gpus=0,
        seed=s.seed,
    )
    t0 = time.perf_counter()
    manifest = synthesize.main(cfg, opts, source)
    seconds = time.perf_counter() - t0
    folder = Path(artifact_uri(cfg.model.storage_root, "rehearsal", manifest.rehearsal_id))
    stats = _rehearsal_stats(folder, tasks[:stage])
    stats.update(
        seconds=round(seconds, 1),
        rows=manifest.rows,
        counts=manifest.counts,
        carried=manifest.carried,
        domains={d: r.model_dump() for d, r in manifest.domains.items()},
    )
    return folder, stats


def _rehearsal_stats(folder: Path, tasks: list[TaskData]) -> dict[str, Any]:
    """How good the synthetic rows are: the share whose input is a well-formed input of its task
    (four words of :data:`WORDS` after its instruction) and, of those, the share whose output (the
    latest model's) is the right answer and the share that start with one of the task's own first
    words."""
    import pyarrow.parquet as pq

    by_name = {d.task.name: d.task for d in tasks}
    well_formed = correct = own_first = 0
    rows = pq.read_table(folder / "rehearsal.parquet").to_pylist()
    examples = []
    for r in rows:
        task = by_name.get(r["source_domain"])
        try:
            words = words_of(task, r["instruction"]) if task else None
        except ValueError:
            words = None
        if words is not None and len(words) == 4 and set(words) <= VOCABULARY:
            well_formed += 1
            correct += r["output"].split() == task.apply(list(words))
            own_first += not task.first_words or words[0] in task.first_words
        if len(examples) < 3:
            examples.append({"input": r["instruction"], "output": r["output"]})
    n = len(rows)
    return {
        "well_formed_inputs": well_formed / n if n else float("nan"),
        "correct_outputs": correct / well_formed if well_formed else float("nan"),
        "own_first_words": own_first / well_formed if well_formed else float("nan"),
        "examples": examples,
    }


def run_method(
    method: str,
    cfg: Any,
    s: Settings,
    tasks: list[TaskData],
    first: dict[str, Any],
    evaluator: Evaluator,
    first_scores: list[float],
) -> dict[str, Any]:
    """Stages 2..T of one method from the shared first adapter; the score matrix and what each stage did."""
    root = Path(cfg.model.storage_root)
    matrix = [first_scores]
    m = first["metrics"]
    stages = [
        {
            "adapter_id": first["adapter_id"],
            "train_seconds": first["seconds"],
            "shared": True,
            "steps": m.get("steps"),
            "val_exact_match": m.get("val_exact_match"),
            "kept_step": m.get("kept_step"),
            "stop_reason": m.get("stop_reason"),
            "own_score": first_scores[0],
            "curve": first["curve"],
        }
    ]
    parent = first["adapter_id"]
    carry = None  # SSR: the previous stage's rehearsal set
    for stage in range(1, len(tasks)):
        name = f"{method.replace('+', '-')}-stage{stage + 1}"
        info: dict[str, Any] = {}
        rehearsal = fisher = None
        masking = "fggm" if "fggm" in method else "none"
        if method.startswith("ssr"):
            rehearsal, info["ssr"] = _synthesize(cfg, s, tasks, stage, parent, name, carry)
            carry = name
            if not info["ssr"]["rows"]:  # e.g. a --quick adapter, whose answers are empty: train without,
                rehearsal = None  # and without masking, whose Fisher information comes from these rows
                masking = info["masking"] = "none"
        elif method == "real":
            rehearsal = root / "real" / name
            write_rows(
                rehearsal / "rehearsal.parquet",
                _earlier_rows(tasks, stage, s.ssr_instances_per_domain, s.seed),
            )
        elif method == "fggm":
            fisher = root / "fisher" / name
            write_rows(
                fisher / "fisher.parquet",
                _earlier_rows(tasks, stage, s.fisher_rows_per_task, s.seed),
            )
        result = _finetune(
            cfg,
            s,
            tasks[stage],
            parent,
            name,
            rehearsal=rehearsal,
            fisher=fisher,
            heldout=_heldout(root, tasks, stage, name),
            masking=masking,
        )
        parent = result["adapter_id"]
        scores = evaluator.scores(parent, [t.test for t in tasks])
        matrix.append(scores)
        m = result["metrics"]
        info.update(
            adapter_id=parent,
            train_seconds=result["seconds"],
            steps=m.get("steps"),
            train_loss=m.get("train_loss"),
            val_loss=m.get("val_loss"),
            val_exact_match=m.get("val_exact_match"),
            kept_step=m.get("kept_step"),
            stop_reason=m.get("stop_reason"),
            loss_fell=m.get("loss_fell"),
            failed=result.get("failed"),
            own_score=scores[stage],
            curve=result["curve"],
            rows=m.get("rows"),
            mask=m.get("mask"),
        )
        stages.append(info)
        print(
            f"  {method} stage {stage + 1} ({tasks[stage].task.name}): scores "
            + ", ".join(f"{d.task.name} {x:.2f}" for d, x in zip(tasks, scores)),
            flush=True,
        )
        print(curve_summary(f"{method} stage {stage + 1}", info), flush=True)
    learned_each = all(matrix[i][i] >= VALID_SCORE for i in range(len(matrix)))
    return {"scores": matrix, "stages": stages, "summary": summarize(matrix), "valid": learned_each}


# --- the run -------------------------------------------------------------------------------------


LEARNED = 0.5
"""A task counts as learned when its score right after its own stage reaches this."""
VALID_SCORE = 0.9
"""A method's run is valid only when every stage learned its own task to this score: a low
"forgetting" from a run that learned nothing to forget is no result."""


def goals(summary: dict[str, dict[str, float]], naive_scores: list[list[float]] | None = None) -> list[dict[str, Any]]:
    """The issue's three goals for SSR, each against naive fine-tuning measured in the same run.

    They say something only when naive fine-tuning learned every task and then forgot: otherwise
    (``passed`` None, printed as NOT MEASURED) a zero-forgetting "pass" would only mean that
    nothing was learned."""
    if "ssr" not in summary or "naive" not in summary:
        return []
    ssr, naive = summary["ssr"], summary["naive"]
    learned = naive_scores is not None and all(naive_scores[i][i] >= LEARNED for i in range(len(naive_scores)))
    informative = learned and naive["forgetting"] > 0
    out = [
        {
            "goal": "SSR forgets at most half as much as naive",
            "measured": ssr["forgetting"],
            "target": f"<= {0.5 * naive['forgetting']:.3f} (naive {naive['forgetting']:.3f} / 2)",
            "passed": ssr["forgetting"] <= 0.5 * naive["forgetting"],
        },
        {
            "goal": "SSR forgetting rate under 0.3",
            "measured": ssr["forgetting_rate"],
            "target": "< 0.3",
            "passed": ssr["forgetting_rate"] < 0.3,
        },
        {
            "goal": "SSR last-task score within 5% of naive",
            "measured": ssr["last_task"],
            "target": f">= {0.95 * naive['last_task']:.3f} (naive {naive['last_task']:.3f} x 0.95)",
            "passed": ssr["last_task"] >= 0.95 * naive["last_task"],
        },
    ]
    if not informative:
        why = (
            f"naive fine-tuning did not learn every task (score >= {LEARNED} after its stage)"
            if not learned
            else "naive fine-tuning forgot nothing"
        )
        for g in out:
            g["passed"], g["not_measured"] = None, why
    return out


FORGETTING_ABILITIES = ("first",)
"""What this benchmark needs of the base model: its answers are one word chosen by the input's
first (the version-5 base pre-trained on an AMD EPYC failed there: it copied every word but the
first, and a run on it learned nothing)."""


def local_setup(base_dir: Path, work: Path) -> Any:
    """:func:`kaizen_config`, with :func:`start_local_ray`."""
    cfg = kaizen_config(base_dir, work)
    start_local_ray()
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "forgetting")
    parser.add_argument("--seeds", type=int, default=3, help="runs, each with its own base and fine-tuning seed")
    parser.add_argument("--seed", type=int, default=0, help="the first run's seed (the next runs count up)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds that a stopped run with the same settings finished in --output, and run the others",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    args = parser.parse_args()

    s = Settings(
        **(QUICK if args.quick else {}),
        methods=[m for m in args.methods.split(",") if m],
    )
    unknown = sorted(set(s.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    quiet_process()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), flush=True)
    started = time.perf_counter()
    seeds = [args.seed + i for i in range(args.seeds)]
    output = args.output or RESULTS / "forgetting.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    if args.resume:
        try:
            runs = finished_seeds(output, "forgetting", "runs", seeds, asdict(s))
        except ValueError as exc:
            parser.error(str(exc))
    for seed in seeds:
        if any(r["seed"] == seed for r in runs):
            print(f"\n=== seed {seed}: finished in {output}, kept", flush=True)
            continue
        print(f"\n=== seed {seed} (base pre-training and fine-tuning)", flush=True)
        runs.append(run_seed(args, replace(s, seed=seed)))
        runs.sort(key=lambda r: r["seed"])
        # The seeds done so far, so that a run stopped part-way keeps them (``complete`` says which).
        output.write_text(json.dumps({"benchmark": "forgetting", "complete": False, "runs": runs}, default=str))
    result: dict[str, Any] = {
        "complete": True,
        "benchmark": "forgetting",
        "quick": args.quick,
        "settings": asdict(s),
        "seeds": seeds,
        "tasks": [t.name for t in BENCHMARK_TASKS],
        "runs": runs,
    }
    result["spread"], naive_mean = spread(runs)
    means = {m: {k: v["mean"] for k, v in x.items() if isinstance(v, dict)} for m, x in result["spread"].items()}
    result["goals"] = goals(means, naive_mean)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    report_spread(result)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {output}")


def run_seed(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    """One complete run at ``s.seed``: the base pre-trained from it (or reused from the cache),
    the shared first stage, every method's later stages; its table is printed."""
    started = time.perf_counter()
    result: dict[str, Any] = {
        "seed": s.seed,
        "settings": asdict(s),
        "tasks": [t.name for t in BENCHMARK_TASKS],
        "machine": machine(),
    }
    with work_folder(args.keep, "kaizen-forgetting-") as work:
        # 1. The base model.
        base_dir, base = ensure_base_model(
            work, args.base_cache, s, required=() if args.quick else FORGETTING_ABILITIES
        )
        result["base_model"] = base

        # 2. Data, config, Ray.
        tasks = make_task_data(work, s)
        cfg = local_setup(base_dir, work)
        evaluator = Evaluator(base_dir, work)
        result["base_scores"] = evaluator.scores(None, [t.test for t in tasks])
        print("base model scores: " + ", ".join(f"{d.task.name} {x:.2f}" for d, x in zip(tasks, result["base_scores"])))

        # 3. Stage 1, shared; then every method's later stages.
        first = _finetune(cfg, s, tasks[0], None, f"stage1-seed{s.seed}")
        first_scores = evaluator.scores(first["adapter_id"], [t.test for t in tasks])
        print(
            f"stage 1 ({tasks[0].task.name}, shared, {first['seconds']:.0f} s): scores "
            + ", ".join(f"{d.task.name} {x:.2f}" for d, x in zip(tasks, first_scores)),
            flush=True,
        )
        m = first["metrics"]
        shared = {"kept_step": m.get("kept_step"), "val_exact_match": m.get("val_exact_match")}
        print(curve_summary("stage 1", {**shared, "own_score": first_scores[0], "curve": first["curve"]}), flush=True)
        result["methods"] = {}
        for method in s.methods:
            t0 = time.perf_counter()
            result["methods"][method] = run_method(method, cfg, s, tasks, first, evaluator, first_scores)
            result["methods"][method]["seconds"] = round(time.perf_counter() - t0, 1)
    summary = {m: r["summary"] for m, r in result["methods"].items()}
    result["summary"] = summary
    result["goals"] = goals(summary, result["methods"].get("naive", {}).get("scores"))
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    report(result)
    invalid = [name for name, r in result["methods"].items() if not r.get("valid")]
    if invalid:
        print(f"INVALID at seed {s.seed} (a stage's own task below {VALID_SCORE}): {', '.join(invalid)}")
    return result


def spread(runs: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[list[float]] | None]:
    """Each method's summary figures as mean and sample sd over the seeds' runs, with how many of
    its runs were valid; and naive fine-tuning's score matrix averaged over the seeds (None without
    naive), from which the goals tell whether naive learned each task."""
    import statistics

    out: dict[str, dict[str, Any]] = {}
    for method in runs[0]["methods"]:
        per_seed = [r["methods"][method] for r in runs]
        figures: dict[str, Any] = {}
        for key in per_seed[0]["summary"]:
            values = [p["summary"][key] for p in per_seed]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            figures[key] = {"mean": statistics.fmean(values), "sd": sd, "values": values}
        figures["valid_runs"] = sum(bool(p.get("valid")) for p in per_seed)
        figures["runs"] = len(per_seed)
        out[method] = figures
    naive = [r["methods"]["naive"]["scores"] for r in runs if "naive" in r["methods"]]
    mean = None
    if naive:
        mean = [
            [statistics.fmean(m[i][j] for m in naive) for j in range(len(naive[0][i]))] for i in range(len(naive[0]))
        ]
    return out, mean


def report_spread(result: dict[str, Any]) -> None:
    """The table over seeds: each method's figures as mean ± sd, its valid runs, and the goals."""
    spread_ = result["spread"]
    keys = [k for k in next(iter(spread_.values())) if k not in ("valid_runs", "runs")]
    rows = [
        (method, *(f"{f[k]['mean']:.3f} ± {f[k]['sd']:.3f}" for k in keys), f"{f['valid_runs']}/{f['runs']}")
        for method, f in spread_.items()
    ]
    print(f"\nover seeds {', '.join(map(str, result['seeds']))} (mean ± sd)")
    print_table(("method", *keys, "valid runs"), rows)
    invalid = [m for m, f in spread_.items() if f["valid_runs"] < f["runs"]]
    if invalid:
        print(f"INVALID: {', '.join(invalid)} did not learn every task to {VALID_SCORE} at every seed")
    print_goals(result["goals"])


def report(r: dict[str, Any]) -> None:
    tasks = r["tasks"]
    rows = []
    for method, m in r["methods"].items():
        sm = m["summary"]
        train = sum(st["train_seconds"] for st in m["stages"][1:])
        synth = sum(st.get("ssr", {}).get("seconds", 0.0) for st in m["stages"][1:])
        rows.append(
            (
                method,
                f"{sm['average']:.3f}",
                f"{sm['last_task']:.3f}",
                f"{sm['backward_transfer']:+.3f}",
                f"{sm['forgetting']:.3f}",
                f"{sm['forgetting_rate']:.3f}",
                " ".join(f"{x:.2f}" for x in m["scores"][-1]),
                f"{train:.0f}" + (f" + {synth:.0f}" if synth else ""),
            )
        )
    base = r["base_model"]
    print(
        f"\nbase model: {base['parameters'] / 1e6:.1f}M parameters, pre-training loss {base['first_loss']:.2f} -> "
        f"{base['final_loss']:.2f}, {base['wall_seconds']:.0f} s" + (" (reused)" if "reused" in base else "")
    )
    print(
        f"tasks in order: {', '.join(tasks)}; scores: exact match on {r['settings']['test_rows']} held-out inputs each"
    )
    print_table(
        (
            "method",
            "avg after last",
            "last task",
            "BWT",
            "forgetting",
            "forgetting rate",
            f"final ({' / '.join(tasks)})",
            "train s (+ SSR s)",
        ),
        rows,
    )
    print_goals(r["goals"], "same run")
    print(f"\ntotal {r['total_seconds'] / 60:.1f} min")


def print_goals(goals_: list[dict[str, Any]], over: str = "means over seeds") -> None:
    """The goals' table: what was measured against its target, and the verdict."""
    if not goals_:
        return
    print_table(
        (f"goal (SSR vs naive, {over})", "measured", "target", "result"),
        [(g["goal"], f"{g['measured']:.3f}", g["target"], _verdict(g)) for g in goals_],
    )
    if goals_[0].get("not_measured"):
        print(f"goals not measured: {goals_[0]['not_measured']}")


def _verdict(goal: dict[str, Any]) -> str:
    return "NOT MEASURED" if goal["passed"] is None else "PASS" if goal["passed"] else "FAIL"


if __name__ == "__main__":
    main()
