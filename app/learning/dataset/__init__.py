"""Training-dataset building: the options, the stages of ``jobs/build_dataset.py``, and the writer.

Every stage is a plain function on a batch (a ``dict`` of equal-length NumPy arrays, Ray Data's
``numpy`` batch format; :mod:`.batch`) or, where it holds a connection or a model, a callable
class; the job chains them, and the tests call them without Ray. One module per stage, in the
job's order:

1. :mod:`.read`: :class:`ReadInteractions` (store connection): ids to flat rows with the score,
   the project context and the tool calls (the nested parts as JSON strings, so Arrow never
   unifies them), and the user's verdict on the answer (a correction; whether it was turned down);
   :mod:`.preferences`: :func:`apply_corrections`: a correction becomes the row's answer (the
   model's answer is kept as the rejected side of a preference pair), and on the driver
   :func:`drop_rejected` removes the answers turned down without a correction;
2. :mod:`.classification`: :func:`classify`: domain (language from code fences, else the
   project's technologies, else the prompt; frameworks from the technologies and the code's
   imports; task type from the prompt) and complexity (code lines and cyclomatic complexity,
   radon for Python; prompt length);
3. :mod:`.filter`: :func:`filter_quality`: keeps rows at or above
   :class:`~app.quality.thresholds.ThresholdManager`'s inclusion threshold for their domain (the
   language) and complexity (a correction passes);
4. :mod:`.dedup`: :func:`fingerprint`: a hash of the normalised text and a MinHash signature of
   its shingles; then on the driver, over everything at once, :func:`drop_exact_duplicates` and
   :func:`drop_near_duplicates` (MinHash LSH, ``datasketch``);
5. :mod:`.balancing`: on the driver, :func:`balance` (no group of domain, task and complexity
   above a share);
6. :mod:`.chatml`: :func:`format_chatml`: the OpenAI / ChatML ``messages`` (system, user, the
   tool calls as assistant ``tool_calls`` and ``tool`` messages, the answer), the seed's columns;
7. :mod:`.features`: :class:`EmbedBatch` (MiniLM): an embedding of each request;
   :func:`encode_features`;
7c. :mod:`.plausibility` (with ``dataset.loss_filter_ratio``): a probe, a short LoRA fine-tune of
   the base model on the pool run as a Ray task (in rounds, until the pool's median answer loss
   says it has learned what most answers say), measures each answer's loss, and
   :func:`~.plausibility.drop_implausible` removes the answers far above the median (the assistant's
   mistakes that users rated well; never a correction); imported from its module (it loads torch);
8. :mod:`.select`: on the driver, :func:`select_diverse` (k-center greedy or k-means over the
   embeddings, weighted by quality measured against similar requests, :func:`relative_quality`)
   and :func:`assign_split` (a hash of the id);
9. :mod:`.write`: :func:`to_table`, :func:`to_preference_table` and :func:`write_dataset`
   (``train.parquet``, ``validation.parquet``, ``train.jsonl``, ``validation.jsonl``, the
   preference pairs of each split as ``<split>_preferences.parquet`` and, in OpenAI's preference
   format, ``<split>_preferences.jsonl``; ``manifest.json``).

The options are :class:`DatasetConfig` (:mod:`.options`). The names below (``__all__``) can be
imported from the package as well as from their modules; the job imports each stage from its
own module.
"""

from __future__ import annotations

from app.learning.dataset.balancing import balance
from app.learning.dataset.batch import batch_to_rows, rows_to_batch, take
from app.learning.dataset.chatml import chat_template_messages, format_chatml, interaction_messages
from app.learning.dataset.classification import (
    COMPLEXITIES,
    TASKS,
    Classification,
    classify,
    classify_interaction,
    task_of,
)
from app.learning.dataset.dedup import drop_exact_duplicates, drop_near_duplicates, fingerprint, normalize_text
from app.learning.dataset.features import EmbedBatch, decode_features, encode_features
from app.learning.dataset.filter import filter_quality
from app.learning.dataset.options import DatasetConfig, InsufficientDataError, new_dataset_id, threshold_manager
from app.learning.dataset.preferences import (
    CORRECTION_QUALITY,
    SOURCE_CORRECTION,
    Verdict,
    apply_corrections,
    drop_rejected,
    feedback_verdict,
)
from app.learning.dataset.read import ReadInteractions, interaction_row
from app.learning.dataset.select import (
    NEIGHBOUR_REFERENCE_ROWS,
    assign_split,
    diverse_indices,
    relative_quality,
    select_diverse,
    selection_size,
    split_fraction,
)
from app.learning.dataset.write import (
    DATASET_SCHEMA,
    PREFERENCE_SCHEMA,
    DatasetManifest,
    Funnel,
    QualityHistogram,
    QueryInfo,
    content_hash,
    count_rows,
    dataset_uri,
    openai_preference,
    preference_split,
    quality_histogram,
    to_preference_table,
    to_table,
    write_dataset,
)

__all__ = [
    "COMPLEXITIES",
    "CORRECTION_QUALITY",
    "DATASET_SCHEMA",
    "NEIGHBOUR_REFERENCE_ROWS",
    "PREFERENCE_SCHEMA",
    "SOURCE_CORRECTION",
    "TASKS",
    "Classification",
    "DatasetConfig",
    "DatasetManifest",
    "EmbedBatch",
    "Funnel",
    "InsufficientDataError",
    "QualityHistogram",
    "QueryInfo",
    "ReadInteractions",
    "Verdict",
    "apply_corrections",
    "assign_split",
    "balance",
    "batch_to_rows",
    "chat_template_messages",
    "classify",
    "classify_interaction",
    "content_hash",
    "count_rows",
    "dataset_uri",
    "decode_features",
    "diverse_indices",
    "drop_exact_duplicates",
    "drop_near_duplicates",
    "drop_rejected",
    "encode_features",
    "feedback_verdict",
    "filter_quality",
    "fingerprint",
    "format_chatml",
    "interaction_messages",
    "interaction_row",
    "new_dataset_id",
    "normalize_text",
    "openai_preference",
    "preference_split",
    "quality_histogram",
    "relative_quality",
    "rows_to_batch",
    "select_diverse",
    "selection_size",
    "split_fraction",
    "take",
    "task_of",
    "threshold_manager",
    "to_preference_table",
    "to_table",
    "write_dataset",
]
