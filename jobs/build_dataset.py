"""Build a training dataset from the scored interactions in the store, as a Ray Data chain.

    python -m jobs.build_dataset --config configs/default.yaml [dataset.key=value ...] [--json]

For example ``dataset.keep_fraction=0.3 dataset.since=2025-01-01 dataset.validation_fraction=0.2``;
every option is a field of :class:`app.learning.dataset.options.DatasetConfig` (a ``dataset:`` section in
the config file works too), other dotted keys override the Kaizen config as everywhere. Submit it
to a cluster with ``ray job submit --working-dir . -- python -m jobs.build_dataset --config
configs/postgres.yaml``.

The chain, each stage in its module of :mod:`app.learning.dataset`:

1. the ids of the scored interactions in the window, a page at a time (driver);
2. ``read.ReadInteractions`` actors (each with its own store connection; the user's correction and
   whether the answer was turned down) → ``preferences.apply_corrections`` (a correction becomes
   the answer, the model's answer the rejected side of a preference pair) →
   ``classification.classify`` → ``filter.filter_quality`` (the threshold manager's inclusion
   threshold per domain and complexity; corrections pass) → ``dedup.fingerprint``
   (normalised-text hash, MinHash signature);
3. on the driver, over the whole pool: the answers turned down without a correction
   (``preferences.drop_rejected``: never a training target), exact duplicates, near duplicates
   (MinHash LSH; ``dedup``), the balance across domain, task and complexity groups (``balancing``);
4. ``chatml.format_chatml`` → ``features.EmbedBatch`` actors (MiniLM) → ``features.encode_features``;
   with ``dataset.loss_filter_ratio``, a probe (a short LoRA fine-tune of the base model on the pool,
   the ``finetune`` section's recipe, as a Ray task with one training worker's resources, until the
   pool's median answer loss says it has learned it) and the answers whose loss it finds over that
   multiple of the median dropped (``plausibility``);
5. on the driver: the diverse, quality-weighted selection and the split by a hash of the id
   (``select``), and the files (``write``) under ``<model.storage_root>/datasets/<dataset_id>/``:
   ``train.parquet``, ``validation.parquet`` (the seed's schema plus ``messages``), ``train.jsonl``,
   ``validation.jsonl`` (OpenAI chat format), the preference pairs of the corrected rows of each
   split, ``train_preferences.parquet`` and ``validation_preferences.parquet`` (``prompt``,
   ``chosen``, ``rejected``) with ``train_preferences.jsonl`` and ``validation_preferences.jsonl``
   (OpenAI's preference fine-tuning format), and ``manifest.json``.

It stops with the count and the threshold when too few interactions are left (``dataset.min_examples``).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.config import KaizenConfig
from app.job_cli import job_parser, run_job
from app.learning.dataset.balancing import balance
from app.learning.dataset.batch import batch_to_rows, num_rows, rows_to_batch, take
from app.learning.dataset.chatml import format_chatml
from app.learning.dataset.classification import COMPLEXITIES, classify
from app.learning.dataset.dedup import drop_exact_duplicates, drop_near_duplicates, fingerprint
from app.learning.dataset.features import EmbedBatch, encode_features
from app.learning.dataset.filter import filter_quality
from app.learning.dataset.options import DatasetConfig, InsufficientDataError, new_dataset_id, threshold_manager
from app.learning.dataset.preferences import apply_corrections, drop_rejected
from app.learning.dataset.read import ReadInteractions
from app.learning.dataset.select import assign_split, select_diverse, selection_size
from app.learning.dataset.write import (
    DatasetManifest,
    Funnel,
    LossFilterInfo,
    QueryInfo,
    count_rows,
    dataset_uri,
    quality_histogram,
    to_preference_table,
    to_table,
    write_dataset,
)
from app.ray_setup import start_ray

__all__ = ["cli", "main", "select_ids", "summary"]

QUALITY_STATUS = "scored"


def select_ids(cfg: KaizenConfig, opts: DatasetConfig) -> list[str]:
    """Stage 1: the ids of the scored interactions in the window, walked a page at a time."""
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        return store.all_interaction_ids(since=opts.since, until=opts.until, quality_status=QUALITY_STATUS)
    finally:
        store.close()


def _window(opts: DatasetConfig) -> str:
    parts = [f"{name} {value.isoformat()}" for name, value in (("since", opts.since), ("until", opts.until)) if value]
    return f" ({', '.join(parts)})" if parts else ""


def _collect(ds: Any) -> dict[str, np.ndarray]:
    return rows_to_batch(ds.take_all())


def _loss_filter(
    cfg: KaizenConfig, opts: DatasetConfig, batch: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], LossFilterInfo]:
    """Stage 7c: a probe trained on the pool (a Ray task with one fine-tuning worker's resources),
    then the rows whose answer it finds implausible dropped (:mod:`app.learning.dataset.plausibility`)."""
    import ray

    from app.config import job_options
    from app.learning.dataset.plausibility import answer_losses, drop_implausible, probe_options
    from app.learning.ray_trainer import check_requirements, worker_spec

    probe = probe_options(job_options(cfg, "finetune"), opts.loss_filter_max_steps, opts.seed)
    check_requirements(cfg, probe)
    spec = worker_spec(cfg, probe, ["train"])
    task = ray.remote(answer_losses).options(num_cpus=probe.cpus_per_worker, num_gpus=1 if probe.use_gpu else 0)
    losses, final = ray.get(
        task.remote(spec, [str(m) for m in batch["messages"]], opts.loss_filter_steps, opts.loss_filter_learned_loss)
    )
    return drop_implausible(batch, losses, final, opts.loss_filter_ratio, opts.loss_filter_max_share)


def main(cfg: KaizenConfig, opts: DatasetConfig | None = None) -> DatasetManifest:
    """Build and write one dataset; Ray is started here unless the caller already has it.

    Raises:
        InsufficientDataError: fewer than ``opts.min_examples`` rows would be left; the message
            names the count, the threshold and where the rows went.
        FileExistsError: ``opts.dataset_id`` is already taken.
    """
    import ray

    opts = opts or DatasetConfig()
    started = time.perf_counter()
    created_at = datetime.now(UTC)
    dataset_id = opts.dataset_id or new_dataset_id(created_at)
    base = opts.threshold if opts.threshold is not None else cfg.quality.threshold
    thresholds = threshold_manager(base, opts.domain_adjustments)
    engine = cfg.store.engine
    uri = dataset_uri(cfg.model.storage_root, dataset_id)
    if "://" not in uri and Path(uri).exists():  # fail before the work; the writer checks again
        raise FileExistsError(f"dataset_id {dataset_id!r} is already stored at {uri}")

    ids = select_ids(cfg, opts)
    if not ids:
        raise InsufficientDataError(
            f"no scored interactions in the {engine} store{_window(opts)}, so no dataset "
            f"(threshold {base:.2f}); score pending ones with `python -m jobs.score`"
        )
    start_ray(cfg)

    # Read, classify, filter and fingerprint in parallel; the readers wait on the database, not a CPU.
    candidates = _collect(
        ray.data.from_items([{"id": i} for i in ids])
        .map_batches(
            ReadInteractions,
            fn_constructor_args=(cfg.store.model_dump(mode="json"),),
            compute=ray.data.ActorPoolStrategy(size=opts.read_actors),
            num_cpus=0.25,
            batch_size=opts.batch_size,
        )
        .map_batches(apply_corrections, fn_kwargs={"use_corrections": opts.corrections}, batch_size=opts.batch_size)
        .map_batches(classify, batch_size=opts.batch_size)
        .map_batches(filter_quality, fn_kwargs={"thresholds": thresholds}, batch_size=opts.batch_size)
        .map_batches(
            fingerprint,
            fn_kwargs={"num_perm": opts.num_perm, "shingle_size": opts.shingle_size, "seed": opts.seed},
            batch_size=opts.batch_size,
        )
    )
    above = num_rows(candidates)
    languages = sorted({str(x) for x in candidates.get("language", [])})
    applied = {
        f"{lang}/{c}": round(thresholds.threshold(None if lang == "*" else lang, c), 6)
        for lang in ["*", *languages]
        for c in COMPLEXITIES
    }

    # Rejected answers, duplicates and balance: on the driver, over every row at once.
    pool, rejected = drop_rejected(candidates)
    pool, exact = drop_exact_duplicates(pool)
    pool, near = drop_near_duplicates(pool, opts.near_duplicate_threshold, opts.num_perm, opts.seed)
    pool, capped, balance_info = balance(pool, opts.max_group_share, opts.balance_by)
    planned = selection_size(num_rows(pool), opts.keep_fraction, opts.max_rows)
    if planned < opts.min_examples:
        raise InsufficientDataError(
            f"only {planned} interactions would be left, fewer than dataset.min_examples={opts.min_examples}: "
            f"{len(ids)} scored in the {engine} store{_window(opts)}, {above} at or above the inclusion "
            f"threshold {base:.2f} ({min(applied.values()):.2f}-{max(applied.values()):.2f} by domain and "
            f"complexity), {above - rejected} after removing the answers users turned down, "
            f"{above - rejected - exact - near} after removing duplicates, {num_rows(pool)} after balancing, and "
            f"dataset.keep_fraction={opts.keep_fraction} of those"
            + (f" (at most dataset.max_rows={opts.max_rows})" if opts.max_rows else "")
            + "; lower the threshold or min_examples, "
            "widen the window, or collect more interactions"
        )
    pool.pop("minhash", None)

    # Format and embed what is left; the embedding actors load MiniLM once each.
    embedded = _collect(
        ray.data.from_items(batch_to_rows(pool))
        .map_batches(
            format_chatml,
            fn_kwargs={
                "include_tool_calls": opts.include_tool_calls,
                "max_tool_output_chars": opts.max_tool_output_chars,
            },
            batch_size=opts.batch_size,
        )
        .map_batches(
            EmbedBatch,
            compute=ray.data.ActorPoolStrategy(size=opts.embed_actors),
            num_cpus=opts.embed_num_cpus,
            batch_size=opts.batch_size,
        )
        .map_batches(encode_features, batch_size=opts.batch_size)
    )

    loss_filter = None
    if opts.loss_filter_ratio:
        embedded, loss_filter = _loss_filter(cfg, opts, embedded)

    chosen = select_diverse(
        embedded,
        opts.keep_fraction,
        opts.selection,
        opts.quality_weight,
        opts.seed,
        max_rows=opts.max_rows,
        confidence_weight=opts.confidence_weight,
        quality_neighbours=opts.quality_neighbours,
    )
    chosen = assign_split(chosen, opts.validation_fraction)
    in_validation = chosen["split"] == "validation"
    train, validation = to_table(take(chosen, ~in_validation)), to_table(take(chosen, in_validation))
    counts = count_rows(to_table(chosen))
    counts["split"] = {"train": train.num_rows, "validation": validation.num_rows}
    manifest = DatasetManifest(
        dataset_id=dataset_id,
        created_at=created_at,
        uri=uri,
        rows=0,  # the writer fills in rows, content_hash, files and columns
        content_hash="",
        files={},
        columns={},
        funnel=Funnel(
            scored=len(ids),
            above_threshold=above,
            rejected=rejected,
            exact_duplicates=exact,
            near_duplicates=near,
            over_group_cap=capped,
            implausible=loss_filter.dropped if loss_filter else 0,
            not_selected=num_rows(embedded) - num_rows(chosen),
            selected=num_rows(chosen),
            train=train.num_rows,
            validation=validation.num_rows,
        ),
        counts=counts,
        balance=balance_info,
        quality_histogram=quality_histogram(chosen["quality_score"]),
        query=QueryInfo(
            engine=engine,
            quality_status=QUALITY_STATUS,
            since=opts.since,
            until=opts.until,
            threshold=base,
            domain_adjustments=opts.domain_adjustments,
            thresholds=applied,
        ),
        loss_filter=loss_filter,
        options=opts.model_dump(mode="json"),
        seconds=round(time.perf_counter() - started, 2),
    )
    pairs = {
        "train": to_preference_table(take(chosen, ~in_validation)),
        "validation": to_preference_table(take(chosen, in_validation)),
    }
    return write_dataset(cfg.model.storage_root, train, validation, manifest, pairs)


def summary(manifest: DatasetManifest) -> str:
    """A few lines for people: the funnel, the mix, where it was written."""
    f = manifest.funnel

    def mix(name: str) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(manifest.counts.get(name, {}).items(), key=lambda kv: -kv[1]))

    head = (
        f"dataset {manifest.dataset_id}: {f.selected} rows (train {f.train}, validation {f.validation}) "
        f"from the {manifest.query.engine} store, threshold {manifest.query.threshold:.2f}, in {manifest.seconds:.1f} s"
    )
    funnel = (
        f"  scored {f.scored} -> at or above threshold {f.above_threshold} -> turned down -{f.rejected}"
        f" -> exact duplicates -{f.exact_duplicates}"
        f" -> near duplicates -{f.near_duplicates} -> group cap -{f.over_group_cap}"
        + (f" -> implausible -{f.implausible}" if manifest.loss_filter else "")
        + f" -> not selected -{f.not_selected}"
    )
    return "\n".join(
        [
            head,
            funnel,
            f"  domains: {mix('domain')}",
            f"  tasks: {mix('task')}",
            f"  complexity: {mix('complexity')}",
            f"  targets: {mix('learning_type')}; preference pairs: train {f.train_pairs}, "
            f"validation {f.validation_pairs}",
            f"  quality: mean {manifest.quality_histogram.mean}, min {manifest.quality_histogram.min}",
            *([_describe_filter(manifest.loss_filter)] if manifest.loss_filter else []),
            f"  written to {manifest.uri}",
        ]
    )


def _describe_filter(f: LossFilterInfo) -> str:
    if f.loss_fell is False:
        return f"  loss filter: the probe's loss did not fall in {f.steps} steps, so it judged nothing"
    learned = {True: "learned the pool", False: "did not reach the learned loss", None: ""}[f.learned]
    return (
        f"  loss filter: probe {f.steps} steps on {f.rows} rows ({f.train_time_s:.1f} s{', ' if learned else ''}"
        f"{learned}), median answer loss {f.median_loss}, {f.over_limit} over {f.limit}, {f.dropped} dropped"
    )


def _run(args: argparse.Namespace, cfg: KaizenConfig, opts: DatasetConfig) -> str:
    manifest = main(cfg, opts)
    return manifest.model_dump_json(indent=2) if args.json else summary(manifest)


def cli(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1: too few interactions, 2: a bad option)."""
    parser = job_parser(
        "jobs.build_dataset", __doc__, overrides_help="dataset.key=value options and dotted config overrides"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    return run_job(parser, _run, argv, section="dataset", not_done=(InsufficientDataError,))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
