"""Self-Synthesized Rehearsal: write rehearsal data for the earlier domains of a training dataset.

    python -m jobs.synthesize --config configs/default.yaml --source <dataset dir or parquet>
        [ssr.key=value ...] [section.key=value ...]

SSR as in Huang et al. (ACL 2024, "Mitigating Catastrophic Forgetting in Large Language Models
with Self-Synthesized Rehearsal"): the base model (``model.base_model``, no adapter) writes new
inputs from 2-shot demonstrations drawn from a small real sample of each domain; the inputs are
filtered, embedded with MiniLM and clustered with k-means, and the ones nearest each centroid are
kept in proportion to cluster size; the latest model (the base with the registry's ``champion``
adapter, or the base alone) answers them greedily. The rows are written with the training rows'
columns plus their provenance to ``<model.storage_root>/rehearsal/<rehearsal_id>/`` as
``rehearsal.parquet`` and ``manifest.json``, published at once (:func:`app.artifacts.publish`).
Options: :class:`app.learning.ssr.SSRConfig`.

The chain (the pure stages are in :mod:`app.learning.ssr`):

1. read the source and plan the prompts, on the driver (a training set is small);
2. ``SynthesizeInputs`` actors continue the prompts with the base model (Ray Data actor pool);
3. filter the inputs, on the driver: duplicates are found across a whole domain;
4. ``EmbedInputs`` embeds them (MiniLM, CPU), on the driver: faster than starting actors;
5. k-means and the quotas per domain, on the driver;
6. ``RefineOutputs`` actors answer them with the latest model;
7. check the answers; with ``ssr.sample_confidence_ratio`` the latest model also answers the real
   sample's inputs, and its least sure answer to them sets the domain's confidence floor (with
   ``ssr.answer_before_selecting``, 6 and 7 come before 4 and 5, as in the paper: every filtered
   input is answered and checked, and k-means chooses among the rows that passed, so that
   dropped answers do not leave the quotas short);
8. with ``ssr.carry_over``, add an earlier rehearsal set's rows of every domain not synthesized
   now, as they were written (the paper's rehearsal pool: a domain is synthesized once, by the
   model that has just learned it, and rehearsed at every later stage); write the Parquet file
   and its manifest.

A source directory is read as ``train.parquet`` or ``train/`` when it has one (demonstrations
come from the training split only), else every Parquet file under it but its validation and test
files (:func:`app.artifacts.find_split`); its ``manifest.json`` (for a file, the one beside it) is
hashed into the rehearsal manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.artifacts import (
    MANIFEST_FILE,
    REHEARSAL_PROVENANCE_SCHEMA,
    TRAINING_ROW_SCHEMA,
    artifact_exists,
    artifact_uri,
    conform,
    file_sha256,
    find_split,
    is_uri,
    new_id,
    publish,
)
from app.config import KaizenConfig
from app.job_cli import job_parser, run_job
from app.learning.ssr import (
    DATA_FILE,
    DomainReport,
    RehearsalManifest,
    SSRConfig,
    check_output,
    confidence_floor,
    content_hash,
    demonstration_text,
    filter_inputs,
    group_by_domain,
    is_rehearsal_set,
    parse_input,
    plan_prompts,
    sample_demonstrations,
    select_by_clusters,
)
from app.ray_setup import start_ray
from app.registry import champion_adapter

__all__ = [
    "DATA_FILE",
    "EmbedInputs",
    "RefineOutputs",
    "SynthesizeInputs",
    "cli",
    "latest_adapter",
    "main",
    "read_source",
]

log = logging.getLogger("kaizen.synthesize")


# --- the actors ------------------------------------------------------------------------------------


class SynthesizeInputs:
    """Stage 2 (an actor per pool slot): the base model continues 2-shot prompts as raw text, no
    chat template (the paper prompts the base LLM), sampling ``samples_per_prompt`` inputs each.
    Generation is :class:`app.generation.GenerationEngine`'s, with SSR's sampling
    (:class:`app.generation.TopKSampling`)."""

    def __init__(self, base_model: str, storage_root: str, options: dict[str, Any]) -> None:
        from app.generation import GenerationEngine

        self.engine = GenerationEngine.load(base_model, root=storage_root)  # loaded once per actor
        self.opts = SSRConfig.model_validate(options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from app.generation import Prompt, TopKSampling

        rows = batch.to_pylist()
        opts = self.opts
        continuations = self.engine.generate(
            # A continuation ends where the model starts the output, as parse_input reads it.
            [Prompt(self.engine.encode(r["prompt"]), opts.max_input_tokens, stop=("Output:",)) for r in rows],
            TopKSampling(opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty),
            samples=opts.samples_per_prompt,
            # Seeded per batch from its prompts, so a rerun with the same seed samples the same inputs.
            seed=opts.seed * 1_000_003 + min(r["prompt_id"] for r in rows),
        )
        out: dict[str, list[Any]] = {"prompt_id": [], "domain": [], "demonstration_ids": [], "raw": [], "input": []}
        for k, continuation in enumerate(continuations):
            row = rows[k // opts.samples_per_prompt]
            out["prompt_id"].append(row["prompt_id"])
            out["domain"].append(row["domain"])
            out["demonstration_ids"].append(row["demonstration_ids"])
            out["raw"].append(continuation.raw_text)  # the stop string kept: parse_input cuts it
            out["input"].append(parse_input(continuation.raw_text))
        return pa.table(out, schema=_CANDIDATE_SCHEMA)


_CANDIDATE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("domain", pa.string()),
        ("demonstration_ids", pa.list_(pa.string())),
        ("raw", pa.string()),
        ("input", pa.string()),
    ]
)


class EmbedInputs:
    """Stage 4: MiniLM embeddings (unit vectors) of the synthetic inputs, on a CPU (a callable
    class like the other stages, so that it can run on an actor pool where the inputs are many)."""

    def __init__(self) -> None:
        from app.quality.relevance import get_embedder

        self.embedder = get_embedder()  # loaded once per actor

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.embedder.embed(batch.column("input").to_pylist())
        return batch.append_column("embedding", pa.array(list(vectors.astype("float32")), pa.list_(pa.float32())))


class RefineOutputs:
    """Stage 6: the latest model (base + champion adapter, or the base) answers each input
    greedily, the input as the user's turn of the chat template, with how sure it was."""

    def __init__(self, base_model: str, storage_root: str, adapter_id: str | None, options: dict[str, Any]) -> None:
        from app.generation import GenerationEngine

        self.engine = GenerationEngine.load(base_model, root=storage_root, adapter_id=adapter_id)
        self.opts = SSRConfig.model_validate(options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from app.generation import Prompt

        # The rendered prompt is encoded as text (a control token spelled out in an input is
        # read as that token), as SSR always has: the same input gives the same answer.
        prompts = [
            Prompt(
                self.engine.encode(self.engine.chat_text([{"role": "user", "content": text}])),
                self.opts.max_output_tokens,
            )
            for text in batch.column("input").to_pylist()
        ]
        answers = self.engine.generate(prompts, confidence=True)
        batch = batch.append_column("output", pa.array([a.text.strip() for a in answers], pa.string()))
        batch = batch.append_column("truncated", pa.array([a.truncated for a in answers], pa.bool_()))
        return batch.append_column("output_confidence", pa.array([a.confidence for a in answers], pa.float64()))


# --- the recipe ----------------------------------------------------------------------------------


def main(cfg: KaizenConfig, opts: SSRConfig, source: Path) -> RehearsalManifest:
    """Synthesize rehearsal data for the domains of ``source`` and write it under the storage
    root; Ray is started here unless the caller already has it.

    Raises:
        FileNotFoundError: no Parquet source at ``source``.
        FileExistsError: a rehearsal set named ``opts.rehearsal_id`` exists already.
        ValueError: the champion adapter was trained on another base model.
    """
    rehearsal_id = opts.rehearsal_id or new_id("rehearsal")
    uri = artifact_uri(cfg.model.storage_root, "rehearsal", rehearsal_id)
    if artifact_exists(uri):  # refused before any work, not after it
        raise FileExistsError(_already_there(uri))
    table, source_manifest_hash = read_source(source)
    carry_uri, carried_table = _carried_set(cfg, opts)
    adapter_id = latest_adapter(cfg)

    # 1. Demonstrations and prompts, per domain.
    groups = group_by_domain(table.to_pylist(), opts.domains)
    skipped = {d: "not in the source" for d in opts.domains or [] if d not in groups}
    reports: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[str]] = {}  # the real sample's inputs, per domain
    prompts: list[dict[str, Any]] = []
    for domain, rows in groups.items():
        if len(rows) < 2:
            skipped[domain] = f"{len(rows)} row: two demonstrations need at least 2"
            continue
        rng = random.Random(f"{opts.seed}:{domain}")  # per domain: independent of which others exist
        sample = sample_demonstrations(rows, opts, rng)
        samples[domain] = [demonstration_text(r)[0] for r in sample]
        planned = plan_prompts(domain, sample, opts, rng)
        prompts.extend(planned)
        reports[domain] = {
            "source_rows": len(rows),
            "demonstrations": [str(r["interaction_id"]) for r in sample],
            "prompts": len(planned),
        }
    for i, prompt in enumerate(prompts):
        prompt["prompt_id"] = i

    start_ray(cfg)
    num_gpus = _gpus_per_actor(opts)
    # 2. The base model writes inputs.
    candidates = _run_stage(
        prompts, SynthesizeInputs, (cfg.model.base_model, cfg.model.storage_root, opts.model_dump()), opts, num_gpus
    )
    # In prompt order, whatever order the actors finished in: which duplicate is kept and where
    # k-means starts depend on it (stable: a prompt's samples keep their order).
    candidates.sort(key=lambda c: c["prompt_id"])
    # 3. Filters, per domain (duplicates are a property of the whole domain).
    kept: list[dict[str, Any]] = []
    for domain, report in reports.items():
        mine = [c for c in candidates if c["domain"] == domain]
        real = [demonstration_text(r)[0] for r in groups[domain]]
        indices, dropped = filter_inputs([c["input"] for c in mine], real, opts)
        kept.extend(mine[i] for i in indices)
        report.update(generated=len(mine), inputs_kept=len(indices), inputs_dropped=dict(sorted(dropped.items())))
    # 4-7. k-means selection and the latest model's checked answers, in the configured order.
    refine_args = (cfg.model.base_model, cfg.model.storage_root, adapter_id, opts.model_dump())
    if opts.answer_before_selecting:
        answered = _answer_and_check(kept, samples, refine_args, opts, num_gpus, reports)
        accepted = _select(answered, opts, reports)
    else:
        accepted = _answer_and_check(_select(kept, opts, reports), samples, refine_args, opts, num_gpus, reports)
    refined_by = adapter_id or cfg.model.base_model
    out = _rehearsal_table(accepted, table.schema, rehearsal_id, cfg.model.base_model, refined_by)
    carried = Counter()
    if carried_table is not None:
        # 8. The earlier set's rows of the domains not synthesized now, as they were written.
        kept_rows = _carry_over(carried_table, out.schema, set(reports), opts, carry_uri)
        carried = Counter(kept_rows.column("source_domain").to_pylist())
        out = pa.concat_tables([out, kept_rows])
    counts = Counter(out.column("source_domain").to_pylist())
    manifest_fields = {
        "rehearsal_id": rehearsal_id,
        "created_at": datetime.now(UTC),
        "synthesized_by": cfg.model.base_model,
        "refined_by": refined_by,
        "source": str(Path(source).resolve()),
        "source_manifest_hash": source_manifest_hash,
        "source_rows": table.num_rows,
        "rows": out.num_rows,
        "counts": {d: counts.get(d, 0) for d in [*reports, *(d for d in carried if d not in reports)]},
        "domains": {d: DomainReport(**r, rows=counts.get(d, 0)) for d, r in reports.items()},
        "skipped_domains": skipped,
        "carried_from": carry_uri,
        "carried": dict(sorted(carried.items())),
        "options": opts.model_dump(mode="json") | {"rehearsal_id": rehearsal_id},
        "content_hash": content_hash(out),
    }
    manifest = _publish(uri, out, manifest_fields)
    log.info("rehearsal %s: %d rows (%s) at %s", rehearsal_id, out.num_rows, dict(counts), uri)
    return manifest


# --- helpers ---------------------------------------------------------------------------------------


def read_source(source: str | os.PathLike[str]) -> tuple[pa.Table, str | None]:
    """The training rows of a dataset (a Parquet file, or a folder's ``train`` split:
    :func:`app.artifacts.find_split`) and the SHA-256 of the dataset's ``manifest.json`` (None
    without one).

    Raises:
        FileNotFoundError: no Parquet training rows there.
    """
    try:
        split = find_split(source, "train")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no Parquet training rows at {source} (a .parquet file or a folder holding them)"
        ) from None
    return split.read(), split.manifest_hash


def latest_adapter(cfg: KaizenConfig) -> str | None:
    """The adapter that makes the latest model: the registry's champion
    (:func:`app.registry.champion_adapter`), or None (the base).

    Raises:
        ValueError: the champion was trained on another base model than ``model.base_model``.
    """
    adapter_id = champion_adapter(cfg)
    if adapter_id is not None:
        from app.model.adapters import AdapterStore  # torch and transformers: not for a bad option's error

        base = AdapterStore(cfg.model.storage_root).manifest(adapter_id).base_model
        if base != cfg.model.base_model:
            raise ValueError(
                f"the champion adapter {adapter_id!r} was trained on {base!r}, but model.base_model is "
                f"{cfg.model.base_model!r}: SSR needs the latest model of the same base"
            )
    return adapter_id


def _gpus_per_actor(opts: SSRConfig) -> float:
    import ray

    if opts.num_gpus is not None:
        return opts.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _run_stage(
    rows: list[dict[str, Any]], stage: type, args: tuple, opts: SSRConfig, num_gpus: float
) -> list[dict[str, Any]]:
    """One model stage on an actor pool over ``rows``; its output rows. The stages run one after
    the other, so that one pool's actors never wait for CPUs that another pool holds."""
    import ray

    if not rows:
        return []
    ds = ray.data.from_items(rows).map_batches(
        stage,
        fn_constructor_args=args,
        batch_size=opts.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=opts.actors),
        num_cpus=opts.num_cpus,
        num_gpus=num_gpus,
    )
    # Arrow list columns come back as numpy arrays: plain lists travel through the next stage as lists.
    return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()} for row in ds.take_all()]


def _select(rows: list[dict[str, Any]], opts: SSRConfig, reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per domain, the rows that k-means chooses: ``rehearsal_instances_per_domain`` shared among
    the clusters of the inputs' embeddings in proportion to their sizes, nearest to each centroid."""
    # MiniLM embeds a few thousand short inputs in seconds on a CPU, less than an actor pool takes to start.
    embedded = EmbedInputs()(pa.Table.from_pylist(rows)).to_pylist() if rows else []
    selected: list[dict[str, Any]] = []
    for domain, report in reports.items():
        mine = [c for c in embedded if c["domain"] == domain]
        choice = select_by_clusters(
            [c["embedding"] for c in mine], opts.rehearsal_instances_per_domain, opts.num_clusters, opts.seed
        )
        for index, cluster in zip(choice.indices, choice.clusters):
            row = {k: v for k, v in mine[index].items() if k not in ("embedding", "raw")}
            selected.append({**row, "cluster": cluster})
        report.update(clusters=len(choice.sizes), selected=len(choice.indices))
    return selected


def _answer_and_check(
    rows: list[dict[str, Any]],
    samples: dict[str, list[str]],
    refine_args: tuple,
    opts: SSRConfig,
    num_gpus: float,
    reports: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """The latest model's greedy answer to each row's input, and the rows whose answers pass
    :func:`check_output`; what was dropped is counted per domain in ``reports``. With
    ``sample_confidence_ratio``, it also answers each domain's real sample inputs (``samples``)
    to calibrate the domain's confidence floor."""
    calibrate = opts.sample_confidence_ratio > 0
    items = [{"key": i, "input": r["input"]} for i, r in enumerate(rows)]
    present = {r["domain"] for r in rows} if calibrate else set()
    real = [(d, x) for d, inputs in samples.items() if d in present for x in inputs]
    items += [{"key": -1 - j, "input": x} for j, (_, x) in enumerate(real)]
    answers = {a["key"]: a for a in _run_stage(items, RefineOutputs, refine_args, opts, num_gpus)}
    accepted: list[dict[str, Any]] = []
    for domain, report in reports.items():
        sure = [answers[-1 - j]["output_confidence"] for j, (d, _) in enumerate(real) if d == domain]
        floor = confidence_floor(opts, sure)
        dropped = Counter()
        for i, row in enumerate(rows):
            if row["domain"] != domain:
                continue
            answer = answers[i]
            row = {
                **row,
                "output": answer["output"],
                "truncated": answer["truncated"],
                "output_confidence": answer["output_confidence"],
            }
            reason = check_output(row["output"], row["truncated"], opts, row["output_confidence"], floor)
            if reason is None:
                accepted.append(row)
            else:
                dropped[reason] += 1
        report.update(outputs_dropped=dict(sorted(dropped.items())), confidence_floor=floor or None)
    return accepted


def _rehearsal_table(
    rows: list[dict[str, Any]], source_schema: pa.Schema, rehearsal_id: str, synthesized_by: str, refined_by: str
) -> pa.Table:
    """The rehearsal rows: every column of the source (its types; unknown ones null), the
    training row's columns it lacks (:data:`app.artifacts.TRAINING_ROW_SCHEMA`'s types), then the
    provenance columns."""
    now = datetime.now(UTC)
    types = {f.name: f.type for f in [*TRAINING_ROW_SCHEMA, *source_schema]}  # the source's types win
    names = [*source_schema.names, *(c for c in TRAINING_ROW_SCHEMA.names if c not in source_schema.names)]
    values: dict[str, list[Any]] = {
        "interaction_id": [_row_id(rehearsal_id, r["domain"], r["input"]) for r in rows],
        "timestamp": [now if pa.types.is_timestamp(types["timestamp"]) else now.isoformat() for _ in rows],
        "instruction": [r["input"] for r in rows],
        "input": ["" for _ in rows],
        "output": [r["output"] for r in rows],
        "domain": [[r["domain"]] for r in rows],
        "learning_type": ["rehearsal" for _ in rows],
        "messages": [_messages(r["input"], r["output"]) for r in rows],
        "source_domain": [r["domain"] for r in rows],
        "synthesized_by": [synthesized_by for _ in rows],
        "refined_by": [refined_by for _ in rows],
        "cluster": [r["cluster"] for r in rows],
        "demonstration_ids": [[str(i) for i in r["demonstration_ids"]] for r in rows],
        "output_confidence": [r.get("output_confidence") for r in rows],
    }
    # quality_score, complexity, project_context, features and any other source column stay null:
    # nothing measured them for a synthetic row, and a made-up value would pass for a real one.
    columns, fields = [], []
    for name, dtype in [*((n, types[n]) for n in names), *((f.name, f.type) for f in REHEARSAL_PROVENANCE_SCHEMA)]:
        try:
            columns.append(pa.array(values.get(name, [None] * len(rows)), type=dtype))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"rehearsal column {name!r} cannot hold its values as the source's {dtype}: {exc}"
            ) from exc
        fields.append(pa.field(name, dtype))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _carried_set(cfg: KaizenConfig, opts: SSRConfig) -> tuple[str | None, pa.Table | None]:
    """The location and rows of the ``ssr.carry_over`` set (None, None without one).

    Raises:
        FileNotFoundError: no rehearsal set there.
        ValueError: an id that no rehearsal set may have.
    """
    if opts.carry_over is None:
        return None, None
    name = opts.carry_over
    try:
        uri = name if "/" in name else artifact_uri(cfg.model.storage_root, "rehearsal", name)
    except ValueError as exc:
        raise ValueError(f"ssr.carry_over: {exc}") from None
    if not is_rehearsal_set(uri):
        raise FileNotFoundError(f"ssr.carry_over: no rehearsal set at {uri} (no {DATA_FILE})")
    # The manifest's carried_from: a local folder by its resolved path, as the source is.
    return (uri if is_uri(uri) else str(Path(uri).resolve())), find_split(uri, "rehearsal").read()


def _carry_over(
    carried: pa.Table, schema: pa.Schema, synthesized: set[str], opts: SSRConfig, origin: str | None
) -> pa.Table:
    """The carried set's rows of every domain not ``synthesized`` now (and among ``ssr.domains``
    when given), as they were written, with the new rows' ``schema``.

    Raises:
        ValueError: a column of theirs cannot be read as the new rows' type.
    """
    keep = [
        d not in synthesized and (opts.domains is None or d in opts.domains)
        for d in carried.column("source_domain").to_pylist()
    ]
    try:
        return conform(carried.filter(pa.array(keep, type=pa.bool_())), schema, origin=str(origin))
    except ValueError as exc:
        raise ValueError(f"ssr.carry_over: {exc}") from exc


def _messages(user: str, assistant: str) -> str:
    return json.dumps(
        [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], ensure_ascii=False
    )


def _row_id(rehearsal_id: str, domain: str, text: str) -> str:
    digest = hashlib.sha256(f"{rehearsal_id}\0{domain}\0{text}".encode()).hexdigest()[:20]
    return f"ssr-{digest}"


def _already_there(uri: str) -> str:
    return f"a rehearsal set already exists at {uri}; choose another ssr.rehearsal_id"


def _publish(uri: str, table: pa.Table, fields: dict[str, Any]) -> RehearsalManifest:
    """Publish the set at ``uri`` with :func:`app.artifacts.publish` (no reader sees it
    half-written; on an object store the manifest goes last); its manifest."""

    def write(staging: Path) -> RehearsalManifest:
        pq.write_table(table, staging / DATA_FILE)
        manifest = RehearsalManifest(**fields, files={DATA_FILE: file_sha256(staging / DATA_FILE)})
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return manifest

    try:
        return publish(uri, write)
    except FileExistsError as exc:  # a racing run published the same id first
        raise FileExistsError(_already_there(uri)) from exc


def _run(args: argparse.Namespace, cfg: KaizenConfig, opts: SSRConfig) -> str:
    return main(cfg, opts, args.source).model_dump_json(indent=2)


def cli(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: a bad option or input)."""
    parser = job_parser(
        "jobs.synthesize", __doc__, overrides_help="ssr.key=value (SSR options) and section.key=value (config)"
    )
    parser.add_argument("--source", required=True, type=Path, help="the training dataset: a folder or a .parquet file")
    return run_job(parser, _run, argv, section="ssr")


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
