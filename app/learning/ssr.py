"""Self-Synthesized Rehearsal (SSR; Huang et al., ACL 2024): the options and the pure stages.

SSR protects what a model already does from being forgotten when it is fine-tuned on new data,
without replaying the old data itself. For each earlier domain:

1. a small real sample (about 1 %) gives demonstrations (:func:`sample_demonstrations`);
2. the *base* model continues 2-shot prompts (a task description, two ``Input: … Output: …``
   demonstrations and a trailing ``Input:``, :func:`build_prompt`) to write new inputs, which are
   cut at the next ``Output:`` (:func:`parse_input`) and filtered (:func:`filter_inputs`);
3. the inputs are embedded and clustered with k-means; each cluster gets a share of the rehearsal
   instances proportional to its size, filled with the inputs nearest its centroid
   (:func:`select_by_clusters`);
4. the *latest* model (the base with the champion adapter) answers them greedily, and the answers
   are checked (:func:`check_output`).

The generation, embedding and writing live in ``jobs/synthesize.py``; everything here is plain
Python on lists and arrays, tested without Ray or a model. So is what makes a rehearsal set one
(its manifest, :data:`DATA_FILE`, :func:`content_hash`, :func:`is_rehearsal_set`); where it lives
and how it is published are :mod:`app.artifacts`' (kind ``rehearsal``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from app.artifacts import Location, locate
from app.learning import check_folder_id
from app.quality.code import check_syntax, extract_code_blocks

__all__ = [
    "DATA_FILE",
    "DEFAULT_TASK_DESCRIPTION",
    "GENERAL_DOMAIN",
    "ClusterSelection",
    "DomainReport",
    "RehearsalManifest",
    "SSRConfig",
    "build_prompt",
    "check_code",
    "check_input",
    "check_output",
    "cluster_quotas",
    "content_hash",
    "demonstration_pairs",
    "demonstration_text",
    "filter_inputs",
    "group_by_domain",
    "is_rehearsal_set",
    "nearest_to_centroids",
    "normalize",
    "parse_input",
    "plan_prompts",
    "primary_domain",
    "sample_demonstrations",
    "sample_size",
    "select_by_clusters",
]

GENERAL_DOMAIN = "general"
"""The domain of a row whose ``domain`` list is empty."""

DEFAULT_TASK_DESCRIPTION = (
    "The following are requests that developers sent to an AI coding assistant in the domain "
    '"{domain}", each followed by the assistant\'s answer. Every request is self-contained.'
)


class SSRConfig(BaseModel):
    """Options of ``jobs/synthesize.py``; on its command line each is ``ssr.<key>=<value>``.

    The sampling defaults are the paper's (top-p 0.6, temperature 0.9, repetition penalty 1.2 and
    top-k 50 in its code, a 1 % sample, 20 clusters, 200 rehearsal instances per domain).
    """

    model_config = ConfigDict(extra="forbid")

    rehearsal_id: str | None = Field(
        None, description="Name of the output folder <storage_root>/rehearsal/<id>; default a fresh ssr-<time>-<hex>."
    )
    domains: list[str] | None = Field(
        None, description="The earlier domains to rehearse (primary domains of the source rows); None: all of them."
    )
    carry_over: str | None = Field(
        None,
        description=(
            "An earlier rehearsal set (its id under <storage_root>/rehearsal, or its folder's path or URI) whose rows "
            "are kept for every domain it has that the source has not: as in the paper, a domain's instances are "
            "synthesized once, with the model that has just learned it, and rehearsed at every later stage (a later "
            "model that has begun to forget the domain would write worse answers). None: the source's domains only."
        ),
    )
    sample_fraction: float = Field(
        0.01, gt=0, le=1, description="Share of a domain's real rows drawn as demonstrations."
    )
    min_demonstrations: int = Field(
        4,
        ge=2,
        description=(
            "Fewest demonstrations per domain, whatever the fraction gives (a domain with fewer rows uses all)."
        ),
    )
    max_demonstration_chars: int = Field(
        2000, gt=0, description="A demonstration's input and output are each cut to this many characters in a prompt."
    )
    task_description: str = Field(
        DEFAULT_TASK_DESCRIPTION,
        min_length=1,
        description="First paragraph of every synthesis prompt; '{domain}' is replaced by the domain.",
    )
    prompts_per_domain: int = Field(
        96, ge=1, description="2-shot prompts per domain (distinct ordered demonstration pairs, cycled when fewer)."
    )
    samples_per_prompt: int = Field(4, ge=1, description="Continuations sampled from each prompt.")
    max_input_tokens: int = Field(256, ge=1, description="Most tokens the base model writes per synthetic input.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of input synthesis.")
    top_p: float = Field(0.6, gt=0, le=1, description="Nucleus (top-p) mass of input synthesis.")
    top_k: int = Field(
        50,
        ge=0,
        description="Only the k likeliest tokens are sampled from (0: all); the paper's code had "
        "Hugging Face's default, 50.",
    )
    repetition_penalty: float = Field(1.2, gt=0, description="Repetition penalty of input synthesis (1.0: none).")
    min_input_chars: int = Field(16, ge=1, description="Shorter synthetic inputs are dropped.")
    max_input_chars: int = Field(4000, ge=1, description="Longer synthetic inputs are dropped.")
    check_code: bool = Field(
        True, description="Drop inputs and outputs whose fenced code does not parse (or whose fence is unclosed)."
    )
    num_clusters: int = Field(20, ge=1, description="k of k-means (fewer when there are fewer inputs).")
    rehearsal_instances_per_domain: int = Field(
        200, ge=1, description="Instances selected per domain, shared among clusters in proportion to their sizes."
    )
    max_output_tokens: int = Field(1024, ge=1, description="Most tokens the latest model writes per answer.")
    answer_before_selecting: bool = Field(
        False,
        description=(
            "The latest model answers every filtered input, and its answers are checked, before the k-means "
            "selection (the paper's order: refinement, then selection): the clusters' quotas are then filled with "
            "rows that pass the checks, rather than shrinking by the answers dropped after it. Costs an answer per "
            "candidate instead of one per selected input."
        ),
    )
    min_output_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "Answers the latest model gives with a lower geometric-mean token probability are dropped: an input "
            "outside what the earlier domain taught gets a guess, and rehearsing guesses teaches them (0: keep all)."
        ),
    )
    sample_confidence_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "A threshold calibrated per domain and model: the latest model also answers the real sample's inputs (in "
            "the domain by construction), and an answer less sure than this share of its least sure answer to them is "
            "dropped as 'unsure' (1: at least as sure as on every real input; 0: off). Unlike min_output_confidence, "
            "it follows how sure the model is of the domain at all; the higher of the two applies."
        ),
    )
    min_output_chars: int = Field(1, ge=1, description="Shorter answers are dropped.")
    max_output_chars: int = Field(16000, ge=1, description="Longer answers are dropped.")
    drop_truncated_outputs: bool = Field(
        True, description="Drop answers that ran out of max_output_tokens before the end-of-turn token."
    )
    actors: int = Field(1, ge=1, description="Generation actors per stage (each loads the model once).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor (torch threads on a CPU).")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per generation actor; None: 1 where the Ray cluster has GPUs, else 0."
    )
    seed: int = Field(0, description="Seed of the sample, the demonstration pairs, the sampling and k-means.")

    @field_validator("rehearsal_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return check_folder_id(value)

    @model_validator(mode="after")
    def _bounds(self) -> SSRConfig:
        if self.max_input_chars < self.min_input_chars:
            raise ValueError(
                f"max_input_chars ({self.max_input_chars}) is below min_input_chars ({self.min_input_chars})"
            )
        if self.max_output_chars < self.min_output_chars:
            raise ValueError(
                f"max_output_chars ({self.max_output_chars}) is below min_output_chars ({self.min_output_chars})"
            )
        return self


# --- stage 1: demonstrations and prompts -------------------------------------------------------


def primary_domain(row: Mapping[str, Any]) -> str:
    """A row's first domain, or :data:`GENERAL_DOMAIN` when it has none."""
    domains = row.get("domain")
    if isinstance(domains, str):
        domains = [domains]
    for domain in domains or []:
        if domain and str(domain).strip():
            return str(domain).strip()
    return GENERAL_DOMAIN


def group_by_domain(
    rows: Iterable[Mapping[str, Any]], domains: Sequence[str] | None = None
) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by their primary domain, domains sorted; only ``domains`` when given."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(primary_domain(row), []).append(row)
    wanted = sorted(groups) if domains is None else [d for d in domains if d in groups]
    return {d: groups[d] for d in sorted(wanted)}


def sample_size(n: int, fraction: float, minimum: int) -> int:
    """How many of ``n`` rows to draw: ``fraction`` of them (rounded), at least ``minimum``,
    at most ``n``."""
    return min(n, max(minimum, round(n * fraction)))


def sample_demonstrations(
    rows: Sequence[Mapping[str, Any]], opts: SSRConfig, rng: random.Random
) -> list[Mapping[str, Any]]:
    """The real sample of one domain that demonstrations are drawn from (in the rows' order)."""
    k = sample_size(len(rows), opts.sample_fraction, opts.min_demonstrations)
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), k))]


def demonstration_text(row: Mapping[str, Any]) -> tuple[str, str]:
    """A training row as a demonstration: (input, output). The input is the instruction, with the
    row's ``input`` (its context, e.g. code) after a blank line when it has one."""
    instruction = str(row.get("instruction") or "").strip()
    extra = str(row.get("input") or "").strip()
    text = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    return text, str(row.get("output") or "").strip()


def build_prompt(task_description: str, demonstrations: Sequence[tuple[str, str]]) -> str:
    """The in-context prompt: the task description, the demonstrations as ``Input: …`` /
    ``Output: …`` paragraphs, and a trailing ``Input:`` for the model to continue."""
    parts = [task_description.strip()]
    parts += [f"Input: {inp}\nOutput: {out}" for inp, out in demonstrations]
    parts.append("Input:")
    return "\n\n".join(parts)


def demonstration_pairs(n: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """``count`` ordered pairs of distinct indices below ``n``: every pair once in random order,
    cycled (reshuffled) when ``count`` asks for more pairs than there are."""
    if n < 2:
        raise ValueError(f"two demonstrations need at least 2 rows, got {n}")
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    chosen: list[tuple[int, int]] = []
    while len(chosen) < count:
        rng.shuffle(pairs)
        chosen.extend(pairs[: count - len(chosen)])
    return chosen


def plan_prompts(
    domain: str, sample: Sequence[Mapping[str, Any]], opts: SSRConfig, rng: random.Random
) -> list[dict[str, Any]]:
    """The synthesis prompts of one domain: ``{domain, prompt, demonstration_ids}`` each."""
    description = opts.task_description.replace("{domain}", domain)
    cut = opts.max_demonstration_chars
    texts = [demonstration_text(row) for row in sample]
    prompts = []
    for i, j in demonstration_pairs(len(sample), opts.prompts_per_domain, rng):
        demos = [(texts[k][0][:cut], texts[k][1][:cut]) for k in (i, j)]
        prompts.append(
            {
                "domain": domain,
                "prompt": build_prompt(description, demos),
                "demonstration_ids": [str(sample[i]["interaction_id"]), str(sample[j]["interaction_id"])],
            }
        )
    return prompts


# --- stage 2: parsing and filtering synthetic inputs --------------------------------------------

_OUTPUT_MARK = re.compile(r"Output:")
_NEXT_INPUT = re.compile(r"^[ \t]*Input:", re.M)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def parse_input(continuation: str) -> str:
    """The synthetic input in the base model's continuation of a prompt's trailing ``Input:``.

    It ends where the model starts the output (``Output:``) or a new demonstration (an
    ``Input:`` line). A continuation with neither wandered off without finishing the pair: it is
    cut at its first blank line. Returns the input stripped ("" for nothing usable).
    """
    text = continuation.lstrip()
    ends = [m.start() for m in (_OUTPUT_MARK.search(text), _NEXT_INPUT.search(text)) if m]
    if ends:
        text = text[: min(ends)]
    else:
        blank = _BLANK_LINE.search(text)
        text = text[: blank.start()] if blank else text
    return text.strip()


def normalize(text: str) -> str:
    """The key duplicates are found by: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def check_code(text: str) -> str | None:
    """None when every fenced code block in ``text`` is closed and parses (or has no parser
    here); else why not."""
    for block in extract_code_blocks(text):
        if not block.closed:
            return f"unclosed {block.language or 'code'} block"
        if block.language:
            result = check_syntax(block.language, block.code)
            if result is not None and not result.parses:
                return f"{block.language}: {result.error}"
    return None


def check_input(text: str, opts: SSRConfig) -> str | None:
    """The reason to drop one synthetic input on its own (``empty``, ``too_short``,
    ``too_long``, ``broken_code``), or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < opts.min_input_chars:
        return "too_short"
    if len(text) > opts.max_input_chars:
        return "too_long"
    if opts.check_code and check_code(text) is not None:
        return "broken_code"
    return None


def filter_inputs(texts: Sequence[str], real_inputs: Iterable[str], opts: SSRConfig) -> tuple[list[int], Counter[str]]:
    """Which synthetic inputs of one domain to keep: those that pass :func:`check_input`, are
    not a duplicate of an earlier one (``duplicate``) and do not repeat a real input of the
    domain (``duplicate_of_real``), duplicates compared by :func:`normalize`.

    Returns:
        The indices kept, in order, and the count of each reason for dropping.
    """
    real = {normalize(t) for t in real_inputs}
    seen: set[str] = set()
    kept: list[int] = []
    dropped: Counter[str] = Counter()
    for i, text in enumerate(texts):
        reason = check_input(text, opts)
        key = normalize(text)
        if reason is None and key in real:
            reason = "duplicate_of_real"
        elif reason is None and key in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(key)
            kept.append(i)
        else:
            dropped[reason] += 1
    return kept, dropped


# --- stage 3: k-means selection -----------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSelection:
    """What :func:`select_by_clusters` chose: indices into its input with their clusters."""

    indices: list[int]
    """Chosen rows, cluster by cluster, nearest to the centroid first."""
    clusters: list[int]
    """The cluster of each chosen row."""
    sizes: list[int]
    """Rows per cluster."""
    quotas: list[int]
    """Rows chosen per cluster."""


def cluster_quotas(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` (at most ``sum(sizes)`` of it) among clusters in proportion to their sizes.

    Largest remainders: each cluster gets the floor of its exact share, and the units left over
    go to the largest fractional parts (ties to the larger, then the earlier cluster), so the
    quotas sum to the total exactly and never exceed a cluster's size.
    """
    n = sum(sizes)
    total = min(total, n)
    if total <= 0:
        return [0] * len(sizes)
    exact = [total * s / n for s in sizes]
    quotas = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - quotas[c]), -sizes[c], c))
    for c in order[: total - sum(quotas)]:
        quotas[c] += 1
    return quotas


def nearest_to_centroids(
    embeddings: np.ndarray, labels: Sequence[int], centroids: np.ndarray, quotas: Sequence[int]
) -> tuple[list[int], list[int]]:
    """For each cluster, its ``quotas[c]`` members nearest to ``centroids[c]`` (Euclidean).

    Returns:
        ``(indices, clusters)``: cluster by cluster, nearest first.
    """
    labels = np.asarray(labels)
    distances = np.linalg.norm(embeddings - centroids[labels], axis=1)
    indices: list[int] = []
    clusters: list[int] = []
    for c, quota in enumerate(quotas):
        members = np.flatnonzero(labels == c)
        # A stable sort: equally near members keep their order, so the choice is reproducible.
        chosen = members[np.argsort(distances[members], kind="stable")[:quota]]
        indices.extend(int(i) for i in chosen)
        clusters.extend([c] * len(chosen))
    return indices, clusters


def select_by_clusters(embeddings: np.ndarray, total: int, num_clusters: int = 20, seed: int = 0) -> ClusterSelection:
    """SSR's selection: k-means on the embeddings (k = ``num_clusters``, or the number of rows
    when fewer), a quota per cluster proportional to its size summing to ``total`` (or every row
    when there are fewer), filled with the members nearest the centroid."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    n = len(embeddings)
    if n == 0:
        return ClusterSelection([], [], [], [])
    k = min(num_clusters, n)
    if k == 1:
        labels = np.zeros(n, dtype=int)
        centroids = embeddings.mean(axis=0, keepdims=True)
    else:
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            # Fewer distinct points than k (repeated inputs) leaves clusters empty: quota 0.
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embeddings)
        labels, centroids = kmeans.labels_, kmeans.cluster_centers_
    sizes = np.bincount(labels, minlength=k).tolist()
    quotas = cluster_quotas(sizes, total)
    indices, clusters = nearest_to_centroids(embeddings, labels, centroids, quotas)
    return ClusterSelection(indices, clusters, sizes, quotas)


# --- stage 4: checking the latest model's answers -----------------------------------------------


def confidence_floor(opts: SSRConfig, sample_confidences: Sequence[float]) -> float:
    """The confidence below which a domain's answers are dropped: ``min_output_confidence``, or
    ``sample_confidence_ratio`` of the latest model's least sure answer to the domain's real
    sample inputs when that is higher."""
    calibrated = opts.sample_confidence_ratio * min(sample_confidences) if sample_confidences else 0.0
    return max(opts.min_output_confidence, calibrated)


def check_output(
    text: str, truncated: bool, opts: SSRConfig, confidence: float | None = None, floor: float | None = None
) -> str | None:
    """The reason to drop an answer (``empty``, ``truncated``, ``unsure``, ``too_short``,
    ``too_long``, ``broken_code``), or None to keep it. ``confidence``: the latest model's
    geometric-mean token probability of the answer (None: not measured); ``floor``: the lowest
    accepted (default ``min_output_confidence``; see :func:`confidence_floor`)."""
    if not text.strip():
        return "empty"
    if truncated and opts.drop_truncated_outputs:
        return "truncated"
    if confidence is not None and confidence < (opts.min_output_confidence if floor is None else floor):
        return "unsure"
    if len(text) < opts.min_output_chars:
        return "too_short"
    if len(text) > opts.max_output_chars:
        return "too_long"
    if opts.check_code and check_code(text) is not None:
        return "broken_code"
    return None


# --- the rehearsal set ---------------------------------------------------------------------------

DATA_FILE = "rehearsal.parquet"
"""A rehearsal set's rows, beside its ``manifest.json`` (:class:`RehearsalManifest`)."""


def is_rehearsal_set(location: str | os.PathLike[str] | Location) -> bool:
    """Whether ``location`` (a local path or a URI) is a folder holding a rehearsal set's
    :data:`DATA_FILE`."""
    return locate(location).child(DATA_FILE).is_file()


def content_hash(table: pa.Table) -> str:
    """:attr:`RehearsalManifest.content_hash` of a rehearsal set's rows: SHA-256 of each row's
    ``interaction_id``, ``source_domain``, ``instruction`` and ``output`` as a JSON line, in order, so
    that the same rows give the same hash however Parquet encodes them."""
    digest = hashlib.sha256()
    for row in table.select(["interaction_id", "source_domain", "instruction", "output"]).to_pylist():
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


class DomainReport(BaseModel):
    """What happened to one domain, stage by stage."""

    model_config = ConfigDict(extra="forbid")

    source_rows: int = Field(description="Real rows of the domain in the source.")
    demonstrations: list[str] = Field(description="interaction_id of each row of the real sample.")
    prompts: int = Field(description="2-shot prompts given to the base model.")
    generated: int = Field(description="Continuations sampled.")
    inputs_kept: int = Field(description="Synthetic inputs that passed the filters.")
    inputs_dropped: dict[str, int] = Field(description="Synthetic inputs dropped, by reason.")
    clusters: int = Field(description="k of the domain's k-means.")
    selected: int = Field(
        description="Instances chosen by k-means: inputs for the latest model to answer, or (answer_before_selecting) "
        "answered rows that passed the checks."
    )
    confidence_floor: float | None = Field(
        None,
        description="The confidence below which answers were dropped (the higher of min_output_confidence and "
        "the sample-calibrated threshold); None: no threshold.",
    )
    outputs_dropped: dict[str, int] = Field(description="Answers dropped, by reason.")
    rows: int = Field(description="Rehearsal rows written.")


class RehearsalManifest(BaseModel):
    """``manifest.json`` of a rehearsal set, beside its ``rehearsal.parquet``."""

    model_config = ConfigDict(extra="forbid")

    rehearsal_id: str = Field(description="The set's id, also its folder name.")
    created_at: datetime = Field(description="When it was written, in UTC.")
    synthesized_by: str = Field(description="The base model that wrote the inputs.")
    refined_by: str = Field(description="The adapter id that wrote the outputs, or the base model's name.")
    source: str = Field(description="The dataset the demonstrations came from.")
    source_manifest_hash: str | None = Field(
        description="SHA-256 of the source dataset's manifest.json, when it has one."
    )
    source_rows: int = Field(description="Rows read from the source.")
    rows: int = Field(description="Rehearsal rows written.")
    counts: dict[str, int] = Field(description="Rehearsal rows per source domain.")
    domains: dict[str, DomainReport] = Field(description="Per domain, what each stage did.")
    skipped_domains: dict[str, str] = Field(description="Domains not rehearsed, with the reason.")
    carried_from: str | None = Field(
        None, description="The earlier rehearsal set rows were kept from (ssr.carry_over)."
    )
    carried: dict[str, int] = Field(
        default_factory=dict, description="Rows kept from it, per domain (part of counts); their provenance is theirs."
    )
    options: dict[str, Any] = Field(description="The SSRConfig used.")
    files: dict[str, str] = Field(description="SHA-256 of each data file, by name.")
    content_hash: str = Field(
        description=(
            "SHA-256 of the rows' ids, domains, inputs and outputs in order (independent of the Parquet encoding; "
            "content_hash)."
        )
    )
