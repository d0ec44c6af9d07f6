"""Data-selection benchmark: ``python -m benchmarks.data_selection [--quick] [--base-cache DIR]``.

The seed's data-efficiency claim, measured in one run: from a pool of interactions in which a
realistic share is poor, a LoRA adapter is trained (``jobs/finetune.py``, a fresh adapter each,
the same options) on

  (a) all    every interaction in the pool, as it was answered (the baseline);
  (b) random a random subset of the same size as (c);
  (c) kaizen Kaizen's selection of at most 10%: the interactions go through the real path into a
             real SQLite store (``app.ingest.IngestPipeline``), are scored by ``app.quality``
             (``QualityService.score_pending``), and ``jobs/build_dataset.py`` keeps those above
             the inclusion threshold, drops duplicates, balances, drops the answers a probe
             trained on the pool finds implausible (``dataset.loss_filter_ratio=5``) and picks a diverse subset
             weighted by quality and confidence (k-means over MiniLM embeddings,
             ``dataset.quality_weight=4``): 10% of the pool to train on, and half as many
             again to validate every set on (a third of the selection).

The interactions are the three tasks of ``benchmarks.tasks.SELECTION_TASKS`` (head, front, trim: a
project's names for operations the base model does under others), asked of an assistant. About
30% of the answers are poor, and, as in real traffic, not at random: on inputs that start with one
of 12 words the assistant misreads the task 80% of the time (the same mistake each time,
``SELECTION_MISTAKES``), and elsewhere 13% of its answers are wrong (another task's answer, a wrong
word, the question's words echoed) or sloppy (the right answer wrapped in chatter, or in capitals
with a period). Feedback follows the answer's quality as users give it: most good answers get a
rating of 4 or 5 and most poor ones 1 or 2, some get none, and a few ratings are wrong. Training on
everything teaches the assistant's own mistakes back to it; that is what selection is for.

Score: exact match of greedy answers on 300 held-out inputs of each task (the mean over tasks; also
shown alone for the inputs where the assistant errs);
time: the training loop's seconds (``train_time_s``) and the job's wall time. Goal (issue 5):
(c) scores at least as well as (a) in at most a tenth of (a)'s training time. The base model is
``benchmarks/base_model.py``'s (shared with the other learning benchmarks through ``--base-cache``).

Every set trains until its validation exact match stops improving (``early_stopping_patience``
validations every ``eval_every_steps``), capped at ``max_steps``, the same for all.
A few hundred rows give scores that move by several points with the seed
alone, and one seed in three failed outright; so every set trains with ``finetune.trials`` (three
seeds, each validating as the run does, the one with the best validation goes on; every set validates
on the selection's ~120 validation rows), and the run repeats everything with ``--seeds`` seeds (default 3):
each draws its own pool
(and where the assistant errs), random subset, selection and training. The goals are judged on
the means; the table also shows each seed, and the results file each seed's difference (c) - (a).
``--sets random,kaizen`` leaves out the slow baseline (for probing the selection).

Prints a table and writes ``benchmarks/results/data_selection.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from benchmarks.base_model import BaseSettings, Evaluator, ensure_base_model
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
    SELECTION_MISTAKES,
    SELECTION_TASKS,
    WORDS,
    Task,
    make_examples,
    task_rows,
    words_of,
    write_rows,
)

if TYPE_CHECKING:
    from app.learning.training import FinetuneConfig

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Options:
    pool_per_task: int = 800
    hard_words: int = 12
    """Inputs whose first word is one of this many words are where the assistant errs systematically."""
    hard_error: float = 0.8
    """How often it misreads the task on those inputs (:data:`benchmarks.tasks.SELECTION_MISTAKES`)."""
    noise_share: float = 0.13
    """The share of poor answers (another task's answer, a wrong word, the question echoed, chatter,
    capitals) elsewhere: with the mistakes, about 30% of the pool is poor."""
    keep_fraction: float = 0.10
    """Kaizen's training rows, as a share of the pool: the seed's 10%. It was 8% while the time goal
    was within reach (a run's fixed costs make a set of exactly a tenth train in a little more than a
    tenth of the time: 24.0 s against 23.3 s); under a stopping rule it is not (Kaizen's ~190 rows
    took 58-74% of all rows' time), and at 8% the sets kept their adapter at step 200-375 with a task
    at 0.88-0.89 where the assistant answered right on one seed in four. At 10% (on another host)
    Kaizen's sets scored 0.964, 0.931, 0.983 and 0.812 (seeds 0-3) against all rows' 0.907, 0.991,
    0.968 and 0.938: the selections were 7.5-9.2% poor, mostly mistakes users rated 4 or 5 (README)."""
    validation_fraction: float = 1 / 3
    """The share of Kaizen's selection that validates (dataset.validation_fraction; the selection is
    keep_fraction / (1 - this) of the pool, so its training rows stay keep_fraction): ~120 rows, on
    which every set is validated. With 0.1 of an 8% selection (16 to 26 rows, 1 or 2 of them poor),
    the validation exact match moved in steps of 0.04-0.06, by as much as 0.3 between evaluations; one
    row decided which adapter was kept and when a run stopped, and keeping the best of more
    evaluations (trials that validate) took the all-rows baseline of seed 0 from 0.943 to 0.850."""
    selection: Literal["k_center", "k_means"] = "k_means"
    """dataset.selection: k-center's farthest-first favours sparse regions, and one task's requests
    embed closer together than the others' (it got 13 to 21 of 213 rows against 55 with k-means)."""
    quality_weight: float = 4.0
    quality_neighbours: int = 20
    """dataset.quality_neighbours (its default): quality measured against the 20 most similar
    requests; with 0 (raw scores) the selection gave ``head`` far fewer rows (see README)."""
    confidence_weight: float = 1.0
    """dataset.confidence_weight (its default): a score the user's rating backs outranks an equal
    one inferred without it; with 0 the selection was 17% poor, with 1 about 5%."""
    loss_filter_ratio: float = 5.0
    """dataset.loss_filter_ratio: before the selection, drop the rows whose answer loss under a probe
    (a short fine-tune on the pool above the threshold) is over five times the median. The
    selections of 7ff86a8 were 7.5-9.2% poor, mostly mistakes users rated 4 or 5, which the scores
    cannot tell from good answers; on each selection's ~360 rows, "loss over 5x the median" under the
    all-rows adapter would have dropped 27 of 33, 23 of 27 and 26 of 32 poor rows with 5, 17 and 3
    good ones (seeds 1, 3, 2; README). With it (a644d82, same host) the probe dropped 215-286 rows of
    ~1,800 at seeds 0-2, 5-69 of them good, and the selections held no poor row; at seed 3, whose base
    had not learned the tasks, 78 (the selection 6.1% poor). With the probe trained until it has
    learned the pool (loss_filter_max_steps), seed 3's probe stopped at step 600 (median 0.042) and
    dropped 273 rows, 205 of the 206 poor: the selection held none, and learned the tasks. 0: no probe."""
    loss_filter_steps: int = 300
    """dataset.loss_filter_steps: the probe's rounds (the sets' own recipe otherwise), each about one
    and a half passes over the pool above the threshold."""
    loss_filter_max_steps: int = 1200
    """dataset.loss_filter_max_steps (its default). A probe of 300 steps alone (its rate decaying over
    them) left seed 3's pool (1,767 rows, 206 poor; base 3 on an AMD EPYC) at a median answer loss of
    0.46, and its 5x limit let 130 poor rows through; decaying over 1,200 steps, the median was 0.12
    at step 300 (79 poor rows through), 0.035 at 600 (none through, 139 good rows dropped), 0.018 at
    900 and 0.024 at 1,200 (one through)."""
    loss_filter_learned_loss: float = 0.05
    """dataset.loss_filter_learned_loss (its default): the probe stops after the first round whose
    median answer loss is at most this."""
    test_rows: int = 300
    """Held-out inputs per task. At 100 (~85 of them where the assistant answers right) a task's
    score where right has a standard error of about 0.03 at 0.9, so a set that taught a task to 0.93
    fell below the 0.9 bar about one time in seven, and one seed's difference (c) - (a) had one of about
    0.018; 300 divides both by 1.7."""
    max_steps: int = 2000
    """The cap on every set's optimizer steps (finetune.max_steps), the same for all, over which the
    learning rate decays (cosine). At 1,000 with lr 5e-4 and patience 8, seed 3's base (which does
    ``first two`` and ``drop last`` under their own names) stopped at step 400-450 on every set with
    ``front`` and ``trim`` at 0.19-0.75, and on 200 clean rows a task got 0.46 and 0.47 (each task's
    inputs answered in the other's way); with this cap, lr 1e-3 and patience 16 the same clean rows
    reached 1.00, 0.96 and 0.95 (kept at step 425 and 825, validation 0.99). With ten epochs as the
    cap, a set of ~175 rows stopped after 220 steps, its tasks still being learned."""
    epochs: int = 1000
    """Never the limit (max_steps is): the sets stop when validation stops improving."""
    eval_every_steps: int = 25
    early_stopping_patience: int = 16
    """Validations (every eval_every_steps) without a better validation exact match (or, at equal
    match, loss) before a set stops: 400 steps, some thirteen epochs of a ~240-row set. With 8, seed
    3's sets stopped on a plateau (validation 0.56-0.64 for 200 steps) that 400 more steps left."""
    lr: float = 1e-3
    """Peak rate. At 5e-4 seed 3's base learned none of the sets' tasks (0.60-0.62 on every set, see
    max_steps). Seed 2's Kaizen set at 1e-3 (a 1,000-step cap, 3 trials of 300 steps) scored 0.953,
    against 0.980 at 5e-4: its errors were on 4-word inputs, in the shape of the 13 wrongly rated
    mistakes the selection kept (``front`` answered with three words, ``trim`` copied).
    3e-3 left one task at 0.08-0.09 on another machine: near the rate at which LoRA on this base
    blows up and settles on one answer for every input (see benchmarks/forgetting.py's ``lr``)."""
    warmup_fraction: float = 0.05
    lora_rank: int = 16
    lora_alpha: float = 32.0
    batch_size: int = 8
    trials: int = 3
    """finetune.trials, for every set: a set of under 200 rows trained with one seed failed one run in
    three (0.357 against 0.947 and 0.933, the failed adapters' validation loss 0.46 to 0.50 against
    0.02 to 0.19), and which seed fails depends on the set; three seeds, the one with the lowest
    validation loss after trial_fraction of the steps going on."""
    attempts: int = 3
    """finetune.attempts, for every set: a set whose kept adapter answers under learned_exact_match
    (0.95) of the validation rows exactly starts over from the next unused seed. On seed 3's base
    (AMD EPYC) 231 clean rows of the three tasks, one seed at a time with this recipe, learned them
    (0.94-0.97) from seeds 4 to 7 and memorised them from seed 3 (0.65: ``front`` and ``trim``
    confused, validation loss rising from step 225); at step 300, where the trials choose, the seed
    that memorised stood at validation exact 0.73 and seed 4, which learned, at 0.69 (README).
    Costs nothing where a set learns: the seeds 0-2 sets that reached 0.95 trained as before."""
    trial_fraction: float = 0.15
    """Of max_steps: 300 steps a trial, by which a seed that learns has started to (step 100-120 in
    benchmarks/forgetting.py at 1e-3)."""
    seed: int = 0


QUICK = {
    "pool_per_task": 60,
    "test_rows": 20,
    "max_steps": 20,
    "eval_every_steps": 10,
    "loss_filter_steps": 10,
    "loss_filter_max_steps": 20,
}


def hard_words(o: Options) -> frozenset[str]:
    """The first words on which the assistant misreads the tasks (seeded)."""
    return frozenset(random.Random(f"hard:{o.seed}").sample(WORDS, o.hard_words))


def _poor_answer(task: Task, words: list[str], rng: random.Random) -> tuple[str, str]:
    """A poor answer to ``words`` (noise, not the systematic mistake) and its kind."""
    right = task.apply(list(words))
    kind = rng.choice(["other_task", "wrong_word", "echo", "chatter", "shouting"])
    if kind == "other_task":  # the answer of another task: the instruction misread
        other = rng.choice([t for t in SELECTION_TASKS if t.name != task.name])
        return " ".join(other.apply(list(words))), kind
    if kind == "wrong_word":  # one word of the answer replaced
        wrong = list(right)
        wrong[rng.randrange(len(wrong))] = rng.choice([w for w in WORDS if w not in right])
        return " ".join(wrong), kind
    if kind == "echo":  # the question's words given back
        return " ".join(words), kind
    if kind == "chatter":
        return (
            f"Sure! Here is the result you asked for: {' '.join(right)}. Let me know if you need anything else!",
            kind,
        )
    return " ".join(right).upper() + ".", kind


def make_pool(o: Options, rng: random.Random, held: dict[str, set[tuple[str, ...]]]) -> list[dict[str, Any]]:
    """The pool: interactions with their answers, quality kind and the user's rating (or None).

    Where the first word is one of :func:`hard_words`, the assistant answers with the task's
    systematic mistake ``hard_error`` of the time (kind ``mistake``); elsewhere ``noise_share`` of
    its answers are poor in one of five ways."""
    hard = hard_words(o)
    pool = []
    for task in SELECTION_TASKS:
        for text, answer in make_examples(task, o.pool_per_task, rng, exclude=held[task.name]):
            words = list(words_of(task, text))
            kind = "good"
            if words[0] in hard:
                if rng.random() < o.hard_error:
                    answer, kind = " ".join(SELECTION_MISTAKES[task.name](words)), "mistake"
            elif rng.random() < o.noise_share:
                answer, kind = _poor_answer(task, words, rng)
            good = kind == "good"
            rating = None
            if rng.random() < 0.75:  # most users leave a rating; some ratings are wrong
                truthful = rng.random() < 0.9
                rating = rng.choice([4, 5]) if good == truthful else rng.choice([1, 2])
            pool.append(
                {
                    "task": task.name,
                    "input": text,
                    "answer": answer,
                    "kind": kind,
                    "rating": rating,
                    "hard": words[0] in hard,
                }
            )
    rng.shuffle(pool)
    return pool


def _events(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    start = datetime.now(UTC) - timedelta(days=1)
    events = []
    for i, item in enumerate(pool):
        body: dict[str, Any] = {
            "session_id": f"bench-{i % 50}",
            "input": {"raw": item["input"]},
            "output": {"content": item["answer"], "generation_time_ms": 300.0},
            "context": {},
        }
        if item["rating"] is not None:
            body["feedback"] = {"explicit": {"rating": item["rating"]}}
        item["id"] = str(uuid.UUID(int=random.Random(i).getrandbits(128)))
        events.append(
            {
                "id": item["id"],
                "type": "interaction",
                "timestamp": (start + timedelta(seconds=i)).isoformat(),
                "body": body,
            }
        )
    return events


def _rows(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tasks = {t.name: t for t in SELECTION_TASKS}
    rows = []
    for item in pool:
        (row,) = task_rows(tasks[item["task"]], [(item["input"], item["answer"])])
        row["interaction_id"] = item.get("id") or row["interaction_id"]
        rows.append(row)
    return rows


REQUIRED_ABILITIES = ("first", "first-two", "drop-last")
"""What ``benchmarks/data_selection.py`` needs of the base model (each at least 0.5): its tasks are
``first``, ``first two`` and ``drop last`` renamed, which a few hundred examples teach only to a
model that does them under their own names."""


SETS = ("all", "random", "kaizen")


def parse_options(items: list[str]) -> dict[str, Any]:
    """``OPTION=VALUE`` strings as :class:`Options` fields, each value of its field's type.

    Raises:
        ValueError: naming the item, when it is not ``OPTION=VALUE``, names no field, or its
            value is not of the field's type."""
    defaults = asdict(Options())
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in defaults:
            raise ValueError(f"--set {item!r}: expected OPTION=VALUE with OPTION one of {', '.join(defaults)}")
        kind = type(defaults[name])
        try:
            out[name] = {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise ValueError(f"--set {item!r}: {name} must be {kind.__name__}, got {text!r}") from None
    return out


def recipe(o: Options, **changes: Any) -> FinetuneConfig:
    """The fine-tuning options every set trains with (``o``'s rate, rank, cap, patience, trials and
    attempts, seeded by ``o.seed``), with ``changes`` (FinetuneConfig keys) on top."""
    from app.learning.training import FinetuneConfig

    return FinetuneConfig(
        **{
            "lora_rank": o.lora_rank,
            "lora_alpha": o.lora_alpha,
            "lora_dropout": 0.0,
            "lr": o.lr,
            "warmup_fraction": o.warmup_fraction,
            "select_by": "exact_match",
            "epochs": o.epochs,
            "max_steps": o.max_steps,
            "eval_every_steps": o.eval_every_steps,
            "batch_size": o.batch_size,
            "max_length": 96,
            "rehearsal_ratio": 0.0,
            "continue_from": None,
            "num_workers": 1,
            "cpus_per_worker": 2,
            "checkpoint_every_steps": 100_000,
            "early_stopping_patience": o.early_stopping_patience,
            "trials": o.trials,
            "trial_fraction": o.trial_fraction,
            "attempts": o.attempts,
            "seed": o.seed,
            **changes,
        }
    )


def settings(quick: bool, changes: list[str]) -> tuple[Options, BaseSettings]:
    """The run's :class:`Options` (a --quick run's, with ``--set OPTION=VALUE`` ``changes``) and its
    base model's settings.

    Raises:
        ValueError: a change that is not OPTION=VALUE of an option's type (:func:`parse_options`)."""
    o = replace(Options(**(QUICK if quick else {})), **parse_options(changes))
    return o, BaseSettings(**({"pretrain_steps": 60, "copy_warmup_steps": 20} if quick else {}))


def run_seed(o: Options, base_dir: Path, work: Path, sets: tuple[str, ...]) -> dict[str, Any]:
    """One repetition with seed ``o.seed``: the pool, its scores in a real store, Kaizen's
    selection, and an adapter trained on each of ``sets`` and scored on the held-out inputs.
    The seed draws the pool (and where the assistant errs), the random subset, the selection's
    k-means and the training (LoRA initialisation, batch order)."""
    import pyarrow.parquet as pq

    from app.ingest import IngestPipeline
    from app.learning.dataset import DatasetConfig
    from app.learning.lineage import TrainingDidNotLearn
    from app.quality.service import QualityService
    from app.store.sqlite import SQLiteStore
    from jobs import build_dataset, finetune

    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"seed": o.seed, "machine": machine()}
    rng = random.Random(o.seed)
    hard = hard_words(o)
    tests, held = [], {}  # per task: its held-out inputs where the assistant errs, then the others
    for task in SELECTION_TASKS:
        test = make_examples(task, o.test_rows, random.Random(f"test:{task.name}"))
        held[task.name] = {words_of(task, x) for x, _ in test}
        for on_hard in (True, False):
            part = [(x, y) for x, y in test if (words_of(task, x)[0] in hard) == on_hard]
            tests.append(part)
    pool = make_pool(o, rng, held)
    result["pool"] = {
        "interactions": len(pool),
        "poor": sum(p["kind"] != "good" for p in pool),
        "hard_words": sorted(hard),
        "on_hard_words": sum(p["hard"] for p in pool),
        "kinds": {k: sum(p["kind"] == k for p in pool) for k in sorted({p["kind"] for p in pool})},
    }

    # Every set's recipe; Kaizen's loss filter trains its probe with it too (the finetune section).
    opts = recipe(o)
    cfg = kaizen_config(base_dir, work).model_copy(update={"finetune": opts.model_dump(mode="json")})
    # The real path into a real store, then the quality scores.
    t0 = time.perf_counter()
    store = SQLiteStore(work / "kaizen.db")
    store.migrate()
    store.write(IngestPipeline(cfg).prepare(_events(pool)).to_commit)
    service = QualityService(store)
    while service.score_pending():  # a batch at a time, until none is pending
        pass
    store.close()
    result["scoring_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    # keep_fraction of the pool to train on, and the validation rows besides: all that passes the
    # threshold, duplicates and balance when that is less, else the diverse, quality-weighted
    # subset of that size.
    manifest = build_dataset.main(
        cfg,
        DatasetConfig(
            dataset_id="kaizen-selection",
            keep_fraction=1.0,
            max_rows=round(o.keep_fraction * len(pool) / (1 - o.validation_fraction)),
            quality_weight=o.quality_weight,
            selection=o.selection,
            confidence_weight=o.confidence_weight,
            min_examples=8,
            quality_neighbours=o.quality_neighbours,
            validation_fraction=o.validation_fraction,
            loss_filter_ratio=o.loss_filter_ratio,
            loss_filter_steps=o.loss_filter_steps,
            loss_filter_max_steps=o.loss_filter_max_steps,
            loss_filter_learned_loss=o.loss_filter_learned_loss,
            seed=o.seed,
        ),
    )
    result["selection"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "funnel": manifest.funnel.model_dump(),
        "rows": manifest.rows,
        "share_of_pool": manifest.rows / len(pool),
    }
    by_id = {p["id"]: p for p in pool}
    picked = [
        by_id[i]
        for split in ("train", "validation")
        for i in pq.read_table(Path(manifest.uri) / f"{split}.parquet").column("interaction_id").to_pylist()
    ]
    result["selection"]["poor_share"] = sum(p["kind"] != "good" for p in picked) / max(1, len(picked))
    result["selection"]["per_task"] = {t.name: sum(p["task"] == t.name for p in picked) for t in SELECTION_TASKS}
    probe = manifest.loss_filter
    probe_s = probe.train_time_s + probe.scoring_s if probe else 0.0
    if probe:
        dropped = [by_id[i] for i in probe.dropped_rows]
        result["selection"]["loss_filter"] = {
            **probe.model_dump(exclude={"dropped_rows"}),
            "dropped_poor": sum(p["kind"] != "good" for p in dropped),
            "dropped_mistakes": sum(p["kind"] == "mistake" for p in dropped),
        }
        print(
            f"  seed {o.seed} loss filter: {probe.dropped} of {probe.rows} rows dropped "
            f"({result['selection']['loss_filter']['dropped_poor']} poor), probe {probe.steps} steps "
            f"{probe_s:.0f} s, median loss "
            + " ".join(f"{r.step}:{r.median_loss:.3f}" for r in probe.rounds)
            + ("" if probe.learned else " (did not reach the learned loss)"),
            flush=True,
        )

    folders = {"all": work / "sets" / "all", "random": work / "sets" / "random", "kaizen": Path(manifest.uri)}
    write_rows(folders["all"] / "train.parquet", _rows(pool))
    # As many rows as Kaizen's selection trains on (its validation rows only validate).
    write_rows(
        folders["random"] / "train.parquet", _rows(random.Random(o.seed + 1).sample(pool, manifest.funnel.train))
    )
    evaluator = Evaluator(base_dir, work)
    result["runs"] = {}
    for name in sets:
        t0 = time.perf_counter()
        curve: list[dict[str, Any]] = []
        # Every set validates on the selection's validation rows, which finetune.trials chooses by (for
        # (a) and (b) a validation set cleaner than their own would be: it can only help them).
        try:
            validation = Path(manifest.uri) / "validation.parquet"
            out = finetune.main(
                cfg,
                opts,
                folders[name],
                validation=validation,
                run_name=f"select-{name}",
                progress=keep_evaluations(curve),
            )
        except TrainingDidNotLearn as exc:
            # Nothing published: the set is scored as the base model it left unchanged, and says why.
            print(f"  seed {o.seed} {name}: FAILED, {exc}", flush=True)
            out = {"adapter_id": None, "failed": str(exc), "metrics": {**exc.metrics, "steps": exc.metrics.get("step")}}
            out["metrics"].setdefault("rows", {"train": pq.read_metadata(folders[name] / "train.parquet").num_rows})
        wall = time.perf_counter() - t0
        parts = evaluator.scores(out["adapter_id"], tests)
        sizes = [len(t) for t in tests]
        # Per task, over all its held-out inputs; and over the inputs where the assistant errs.
        scores = [
            sum(parts[j] * sizes[j] for j in (i, i + 1) if sizes[j]) / (sizes[i] + sizes[i + 1])
            for i in range(0, len(tests), 2)
        ]
        on_hard = sum(parts[i] * sizes[i] for i in range(0, len(tests), 2) if sizes[i]) / max(1, sum(sizes[0::2]))
        # Per task, where the assistant's answers were right: whether the set taught the task at all.
        learned = [parts[i + 1] for i in range(0, len(tests), 2)]
        m = out["metrics"]
        result["runs"][name] = {
            "failed": out.get("failed"),
            "rows": m["rows"]["train"],
            # Every attempt's steps (finetune.attempts); the kept adapter's step in its attempt.
            "steps": sum(a["steps"] for a in m["attempts"]) if m.get("attempts") else m["steps"],
            # Kaizen's selection trained a probe too: its time counts as the set's training time.
            "train_time_s": m["train_time_s"] + (probe_s if name == "kaizen" else 0.0),
            "probe_s": probe_s if name == "kaizen" else 0.0,
            "wall_s": round(wall, 1),
            "scores": scores,
            "score": sum(scores) / len(scores),
            "score_on_hard_words": on_hard,
            "learned_scores": learned,
            "valid": min(learned) >= VALID_SCORE,
            "kept_step": m.get("kept_step"),
            "val_exact_match": m.get("val_exact_match"),
            "stop_reason": m.get("stop_reason"),
            "attempts": m.get("attempts") or [],
            "kept_attempt": m.get("attempt", 0),
            "curve": curve,
        }
        print(
            f"  seed {o.seed} {name}: {m['rows']['train']} rows, score {sum(scores) / len(scores):.3f} "
            f"({' '.join(f'{x:.2f}' for x in scores)}), train {m['train_time_s']:.0f} s",
            flush=True,
        )
        print(curve_summary(f"seed {o.seed} {name}", {**result["runs"][name], "own_score": sum(scores) / len(scores)}))
    return result


def _spread(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}


VALID_SCORE = 0.9
"""A set's run is valid only when it taught every task to this score on the held-out inputs where
the assistant answered right (on the others, training on its mistakes teaches them back, by
design). A seed counts only when training on all rows is valid: the selections are compared with a
baseline that learned, not one that did not. A goal asks it of all rows and Kaizen's selection at
every seed; the random subset is shown against it but not held to it, since about 30 % of its rows
are poor answers it learns (its least task where right 0.70 to 0.93 at lr 5e-4, on the bases on
which all rows learned every task)."""


def summarize(seeds: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per training set: the mean, standard deviation and range over the valid seeds of its score and
    training time; and the goals, judged on the means, with the seeds' paired differences (that all
    rows and Kaizen learned every task is asked of every seed, the invalid ones too)."""
    every = seeds
    invalid = [r for r in seeds if r.get("valid") is False]
    seeds = [r for r in seeds if r.get("valid") is not False]
    if not seeds:
        return {"invalid_seeds": [r["seed"] for r in invalid]}, []
    names = [n for n in SETS if all(n in r["runs"] for r in seeds)]
    summary = {
        n: {
            "score": _spread([r["runs"][n]["score"] for r in seeds]),
            "score_on_hard_words": _spread([r["runs"][n]["score_on_hard_words"] for r in seeds]),
            "train_time_s": _spread([r["runs"][n]["train_time_s"] for r in seeds]),
            "rows": _spread([r["runs"][n]["rows"] for r in seeds]),
            "least_learned": _spread([min(r["runs"][n]["learned_scores"]) for r in seeds]),
            "valid_runs": sum(bool(r["runs"][n]["valid"]) for r in seeds),
            "runs": len(seeds),
        }
        for n in names
    }
    summary["invalid_seeds"] = [r["seed"] for r in invalid]
    if "all" not in summary or "kaizen" not in summary:
        return summary, []
    a, c = summary["all"], summary["kaizen"]
    diffs = [r["runs"]["kaizen"]["score"] - r["runs"]["all"]["score"] for r in seeds]
    compared = ("all", "kaizen")  # random is a reference: ~30 % of its rows are poor, and it learns them
    goals = [
        {
            "goal": f"all and Kaizen taught each task to {VALID_SCORE} where the assistant answered right, every seed",
            "measured": min(min(r["runs"][n]["learned_scores"]) for r in every for n in compared),
            "target": f">= {VALID_SCORE}",
            "passed": all(r["runs"][n]["valid"] for r in every for n in compared),
        },
        {
            "goal": "Kaizen's selection scores at least as well as all (mean over seeds)",
            "measured": c["score"]["mean"],
            "target": f">= {a['score']['mean']:.3f}",
            "passed": c["score"]["mean"] >= a["score"]["mean"],
            "per_seed_difference": diffs,
            "seeds_at_least_as_good": sum(d >= 0 for d in diffs),
        },
        {
            "goal": "in at most a tenth of the training time (mean over seeds)",
            "measured": c["train_time_s"]["mean"],
            "target": f"<= {a['train_time_s']['mean'] / 10:.1f} s (all {a['train_time_s']['mean']:.1f} s / 10)",
            "passed": c["train_time_s"]["mean"] <= a["train_time_s"]["mean"] / 10,
        },
    ]
    if max(summary[n]["score"]["max"] for n in names) < 0.1:  # nothing learned: a "pass" would mean nothing
        for g in goals:
            g["passed"], g["not_measured"] = None, "no training set taught the tasks (every held-out score < 0.1)"
    return summary, goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "data_selection")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions, each with its own base (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="the first repetition's seed (default 0)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="change one of the benchmark's Options (e.g. quality_neighbours=0); repeatable",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds that a stopped run with these options and sets finished in --output; run the others",
    )
    args = parser.parse_args()
    sets = tuple(n for n in SETS if n in args.sets.split(","))
    if not sets or args.seeds < 1:
        parser.error("--sets needs at least one of all,random,kaizen and --seeds at least 1")
    try:
        o, s = settings(args.quick, args.set)
        if args.seed is not None:
            o = replace(o, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    quiet_process()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), flush=True)
    started = time.perf_counter()
    output = args.output or RESULTS / "data_selection.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "data_selection", "quick": args.quick, "options": asdict(o), "sets": sets}
    seeds = [o.seed + i for i in range(args.seeds)]
    result["seeds"], result["base_models"] = [], []
    bases: dict[int, dict[str, Any]] = {}  # seed -> its base model, listed in the seeds' order on writing
    if args.resume:
        try:
            finished = finished_seeds(output, "data_selection", "seeds", seeds, asdict(o))
        except ValueError as exc:
            parser.error(str(exc))
        prior = json.loads(output.read_text()) if finished else {}
        for run in finished:
            if set(run["runs"]) != set(sets):
                parser.error(
                    f"{output}: seed {run['seed']} trained {', '.join(run['runs'])}, this run {', '.join(sets)}"
                )
            result["seeds"].append(run)
            bases[run["seed"]] = prior["base_models"][prior["seeds"].index(run)]
    ray_started = False
    with work_folder(args.keep, "kaizen-data-selection-") as work:
        for seed in seeds:
            if any(r["seed"] == seed for r in result["seeds"]):
                print(f"seed {seed}: finished in {output}, kept", flush=True)
                continue
            # Each seed pre-trains its own base (or reuses it from --base-cache) and fine-tunes from it.
            base_dir, base = ensure_base_model(
                work, args.base_cache, replace(s, seed=seed), required=() if args.quick else REQUIRED_ABILITIES
            )
            bases[seed] = {**base, "path": str(base_dir)}
            if not ray_started:
                start_local_ray()
                ray_started = True
            run = run_seed(replace(o, seed=seed), base_dir, work / f"seed-{seed}", sets)
            all_rows = run["runs"].get("all")
            run["valid"] = all_rows is None or all_rows["valid"]
            for name, x in run["runs"].items():
                if not x["valid"]:
                    print(
                        f"INVALID seed {seed} {name}: a task below {VALID_SCORE} where the assistant answered right "
                        f"({' '.join(f'{v:.2f}' for v in x['learned_scores'])})",
                        flush=True,
                    )
            result["seeds"].append(run)
            result["seeds"].sort(key=lambda r: r["seed"])
            result["base_models"] = [bases[r["seed"]] for r in result["seeds"]]
            # The seeds done so far, so that a run stopped part-way keeps them (``complete`` says which).
            output.write_text(json.dumps({**result, "complete": False}, default=str))
    result["base_models"] = [bases[r["seed"]] for r in result["seeds"]]
    result["complete"] = True
    result["summary"], result["goals"] = summarize(result["seeds"])
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print_table(
        ("seed", "training set", "rows", "held-out score", "per task", "where it erred", "where right", "train s"),
        [
            (
                r["seed"],
                n,
                x["rows"],
                f"{x['score']:.3f}",
                " ".join(f"{v:.2f}" for v in x["scores"]),
                f"{x['score_on_hard_words']:.3f}",
                " ".join(f"{v:.2f}" for v in x["learned_scores"]) + ("" if x["valid"] else " INVALID"),
                f"{x['train_time_s']:.1f}",
            )
            for r in result["seeds"]
            for n, x in r["runs"].items()
        ],
    )
    print_table(
        ("training set", "rows", "score mean", "sd", "min-max", "where it erred", "train s mean", "valid runs"),
        [
            (
                n,
                f"{x['rows']['mean']:.0f}",
                f"{x['score']['mean']:.3f}",
                f"{x['score']['sd']:.3f}",
                f"{x['score']['min']:.3f}-{x['score']['max']:.3f}",
                f"{x['score_on_hard_words']['mean']:.3f}",
                f"{x['train_time_s']['mean']:.1f}",
                f"{x['valid_runs']}/{x['runs']}",
            )
            for n, x in result["summary"].items()
            if n != "invalid_seeds"
        ],
    )
    if result["summary"].get("invalid_seeds"):
        print(f"INVALID seeds, left out of the means: {result['summary']['invalid_seeds']}")
    if result["goals"]:
        print_table(
            ("goal ((c) vs (a), same seeds)", "measured", "target", "result"),
            [
                (
                    g["goal"],
                    f"{g['measured']:.3f}",
                    g["target"],
                    "NOT MEASURED" if g["passed"] is None else "PASS" if g["passed"] else "FAIL",
                )
                for g in result["goals"]
            ],
        )
    output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
