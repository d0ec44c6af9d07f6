"""The stages of ``jobs/build_dataset.py``, without Ray: options, reading, classification, the
quality filter, exact and near duplicates, balance, the diverse selection, ChatML (rendered by the
real Qwen2.5 tokenizer), the split, and the files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import app.learning.dataset as dataset_module
from app.config import ConfigError, section_options
from app.learning.dataset import (
    DATASET_SCHEMA,
    DatasetConfig,
    DatasetManifest,
    EmbedBatch,
    Funnel,
    QueryInfo,
    assign_split,
    balance,
    chat_template_messages,
    classify,
    classify_interaction,
    content_hash,
    count_rows,
    decode_features,
    diverse_indices,
    drop_exact_duplicates,
    drop_near_duplicates,
    encode_features,
    filter_quality,
    fingerprint,
    format_chatml,
    interaction_row,
    quality_histogram,
    relative_quality,
    rows_to_batch,
    select_diverse,
    selection_size,
    split_fraction,
    take,
    task_of,
    threshold_manager,
    to_table,
    write_dataset,
)

PY_PROMPT = "Write a Python function `parse_port(value)` that returns the port of a URL, or None."
PY_ANSWER = """Here you go:

```python
from urllib.parse import urlsplit

from fastapi import FastAPI


def parse_port(value):
    return urlsplit(value).port
```
"""
TS_PROMPT = """My React component crashes with TypeError: Cannot read properties of undefined. Can you fix it?

```tsx
export function Price({ item }) {
  return <span>{item.price.toFixed(2)}</span>;
}
```
"""
TS_ANSWER = """The item can be missing while it loads; guard it:

```typescript
import React from "react";
import { z } from "zod";

const Item = z.object({ price: z.number() });

export function Price({ item }: { item?: { price: number } }): JSX.Element {
  if (!item) {
    return <span>-</span>;
  }
  return <span>{item.price.toFixed(2)}</span>;
}
```
"""
BRANCHY = "\n".join(
    ["def route(kind, value):"]
    + [f"    {'if' if i == 0 else 'elif'} kind == {i} and value > {i}:\n        return {i}" for i in range(12)]
    + ["    return None"]
)


def _batch(**columns) -> dict[str, np.ndarray]:
    out = {}
    for name, values in columns.items():
        if values and isinstance(values[0], float):
            out[name] = np.asarray(values, dtype=np.float64)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
    return out


def _rows(n: int, **overrides) -> dict[str, np.ndarray]:
    base = {
        "interaction_id": [f"id-{i:02d}" for i in range(n)],
        "timestamp": ["2025-01-02T03:04:05.123456+00:00"] * n,
        "input": [f"Write a function number {i}" for i in range(n)],
        "output": [f"```python\ndef f{i}():\n    return {i}\n```" for i in range(n)],
        "system_prompt": [""] * n,
        "quality_score": [0.8] * n,
        "quality_confidence": [0.9] * n,
        "context_json": ["{}"] * n,
        "tool_usage_json": ["[]"] * n,
    }
    base.update(overrides)
    return _batch(**base)


# --- options --------------------------------------------------------------------------------------


def test_options_name_the_bad_key() -> None:
    assert section_options("dataset", base={}).keep_fraction == 0.5
    with pytest.raises(ConfigError) as err:
        section_options("dataset", base={"keep_fraction": 2, "bogus": 1})
    text = str(err.value)
    assert "dataset.keep_fraction" in text and "dataset.bogus: unknown key" in text
    with pytest.raises(ConfigError, match="until .* must be after since"):
        section_options("dataset", base={"since": "2025-02-01", "until": "2025-01-01"})
    with pytest.raises(ConfigError, match="dataset.dataset_id"):
        section_options("dataset", base={"dataset_id": "../escape"})


def test_interaction_row_flattens_a_stored_interaction() -> None:
    record = {
        "id": "a1",
        "timestamp": "2025-01-02T03:04:05+00:00",
        "input_raw": "raw",
        "input_processed": None,
        "output_content": "answer",
        "system_prompt": "Be brief.",
        "quality_score": 0.8,
        "quality_confidence": None,
        "context": {"technologies": ["python"]},
        "tool_usage": [
            {
                "tool_name": "read_file",
                "invocation_order": 0,
                "parameters_raw": {"path": "a.py"},
                "success": True,
                "output": "x = 1",
                "error": None,
                "exit_code": 0,
                "duration_ms": 3.0,
            }
        ],
    }
    row = interaction_row(record)
    assert row["input"] == "raw" and row["system_prompt"] == "Be brief." and np.isnan(row["quality_confidence"])
    assert json.loads(row["tool_usage_json"])[0]["parameters_raw"] == {"path": "a.py"}
    assert interaction_row({**record, "input_processed": "sent"})["input"] == "sent"
    assert interaction_row({**record, "quality_score": None}) is None
    assert interaction_row({**record, "output_content": "  "}) is None


# --- classification -------------------------------------------------------------------------------


def test_classifies_a_python_generation_request() -> None:
    found = classify_interaction(PY_PROMPT, PY_ANSWER, {"technologies": ["python", "pytest"]})
    assert found.language == "python"
    assert found.frameworks == ("fastapi", "pytest")  # an import and a project technology
    assert found.task == "generation"
    assert found.complexity == "simple"
    assert found.domain == ["python", "generation", "fastapi", "pytest"]
    branchy = classify_interaction("Implement the router.", f"```python\n{BRANCHY}\n```")
    assert branchy.cyclomatic >= 13 and branchy.complexity in ("complex", "expert")


def test_classifies_a_typescript_debugging_request() -> None:
    found = classify_interaction(TS_PROMPT, TS_ANSWER, {"technologies": ["typescript", "nestjs"]})
    assert found.language == "typescript"
    assert found.frameworks == ("nestjs", "react", "zod")
    assert found.task == "debugging"
    assert found.complexity in ("simple", "moderate")
    # No code anywhere: the project's technologies, then the language the prompt names.
    go = classify_interaction("What is a closure?", "A function with its scope.", {"technologies": ["go"]})
    assert (go.language, go.task) == ("go", "explanation")
    node = classify_interaction("How does the event loop work in Node.js?", "It runs callbacks.")
    assert node.language == "javascript"
    assert classify_interaction("Hello", "Hi").language == "general"


@pytest.mark.parametrize(
    ("prompt", "task"),
    [
        ("Write unit tests for parse_config with pytest.", "testing"),
        ("Refactor this function to make it more readable.", "refactoring"),
        ("Explain what this regular expression does.", "explanation"),
        ("The build fails with ModuleNotFoundError: No module named 'yaml'.", "debugging"),
        ("Implement an LRU cache.\n```python\n# fix: tests fail, explain the bug\n```", "generation"),
        ("How do I implement `bisect_left` in Python?", "generation"),
    ],
)
def test_task_type_comes_from_the_prose_of_the_prompt(prompt: str, task: str) -> None:
    assert task_of(prompt) == task


def test_classify_stage_adds_columns() -> None:
    batch = _rows(2, input=[PY_PROMPT, TS_PROMPT], output=[PY_ANSWER, TS_ANSWER])
    out = classify(batch)
    assert list(out["language"]) == ["python", "typescript"]
    assert list(out["task"]) == ["generation", "debugging"]
    assert out["frameworks"][1] == "react,zod" and out["code_lines"].dtype == np.int64


# --- quality filter -----------------------------------------------------------------------------------


def test_filter_keeps_rows_at_or_above_their_domain_and_complexity_threshold() -> None:
    manager = threshold_manager(0.70, {"rust": 0.05})
    batch = _rows(
        5,
        language=["python", "python", "python", "python", "rust"],
        complexity=["simple", "complex", "complex", "expert", "moderate"],
        quality_score=[0.65, 0.74, 0.75, 0.79, 0.74],
    )
    out = filter_quality(batch, manager)
    assert list(out["interaction_id"]) == ["id-00", "id-02"]  # 0.65 >= 0.65, 0.75 >= 0.75
    assert list(out["threshold"]) == [0.65, 0.75]


# --- duplicates -------------------------------------------------------------------------------------------

LONG = " ".join(f"word{i}" for i in range(200))


def test_exact_duplicates_compare_normalised_text_and_keep_the_best() -> None:
    batch = _rows(
        3,
        input=["Sort a list", "  SORT   a list ", "Sort a dict"],
        output=["Use sorted().", "use SORTED().", "Use sorted()."],
        quality_score=[0.8, 0.9, 0.8],
    )
    kept, dropped = drop_exact_duplicates(fingerprint(batch, num_perm=64))
    assert dropped == 1
    assert sorted(kept["interaction_id"]) == ["id-01", "id-02"]  # the better of the pair


def test_near_duplicates_by_minhash_lsh() -> None:
    near = LONG.replace("word100", "changed")  # one word of 200: Jaccard of 5-shingles ~0.95
    other = " ".join(f"other{i}" for i in range(200))
    batch = _rows(
        4, input=["q"] * 4, output=[LONG, near, other, LONG[: len(LONG) // 2]], quality_score=[0.8, 0.9, 0.7, 0.95]
    )
    batch = fingerprint(batch, num_perm=128, shingle_size=5, seed=3)
    kept, dropped = drop_near_duplicates(batch, threshold=0.8, num_perm=128, seed=3)
    # id-01 (better) keeps over id-00; half of the text (Jaccard ~0.5) and an unrelated one stay.
    assert dropped == 1
    assert sorted(kept["interaction_id"]) == ["id-01", "id-02", "id-03"]
    kept, dropped = drop_near_duplicates(batch, threshold=0.4, num_perm=128, seed=3)
    assert dropped == 2 and sorted(kept["interaction_id"]) == ["id-02", "id-03"]


# --- balance --------------------------------------------------------------------------------------------


def test_balance_caps_each_groups_share_keeping_its_best_rows() -> None:
    languages = ["python"] * 8 + ["typescript"] * 2 + ["go"] * 2
    scores = [0.70 + 0.01 * i for i in range(8)] + [0.8] * 4
    batch = _rows(12, language=languages, quality_score=scores)
    kept, dropped, info = balance(batch, max_share=0.5, by=["language"])
    assert (dropped, info["cap"]) == (4, 4)
    python = [i for i, lang in zip(kept["interaction_id"], kept["language"]) if lang == "python"]
    assert sorted(python) == ["id-04", "id-05", "id-06", "id-07"]  # the four best
    assert info["groups"] == {"go": 2, "python": 8, "typescript": 2}

    # A share below 1/k acts as 1/k; one group, or a share of 1, is left alone.
    kept, dropped, info = balance(batch, max_share=0.1, by=["language"])
    assert dropped == 6 and info["effective_share"] == pytest.approx(1 / 3, abs=1e-5)
    assert balance(_rows(5, language=["python"] * 5), max_share=0.2, by=["language"])[1] == 0
    assert balance(batch, max_share=1.0, by=["language"])[1] == 0


# --- selection ---------------------------------------------------------------------------------------


def _clusters(sizes: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.eye(8)[: len(sizes)]
    points = np.concatenate([c + 0.01 * rng.standard_normal((n, 8)) for c, n in zip(centers, sizes)])
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["k_center", "k_means"])
def test_selection_covers_every_cluster_with_its_best_row(method: str) -> None:
    x = _clusters([10, 5, 5])
    quality = np.full(20, 0.75)
    best = [3, 12, 17]  # the best row of each cluster
    quality[best] = 0.95
    picked = diverse_indices(x, quality, 3, method=method, seed=0)
    assert sorted(picked.tolist()) == best


@pytest.mark.parametrize("method", ["k_center", "k_means"])
def test_selection_prefers_scores_backed_by_evidence(method: str) -> None:
    x = _clusters([10, 5, 5])
    quality = np.full(20, 0.9)
    quality[[0, 10, 15]] = 0.95  # the best guesses, inferred without evidence
    confidence = np.full(20, 0.45)
    sure = [4, 12, 18]  # rated by their users: a little lower, but known
    confidence[sure] = 0.62
    confidence[1] = np.nan  # unknown: counts as 1 only when weighed
    assert sorted(diverse_indices(x, quality, 3, method=method, seed=0).tolist()) == [0, 10, 15]
    picked = diverse_indices(x, quality, 3, method=method, seed=0, confidence=confidence, confidence_weight=4)
    assert sorted(picked.tolist()) == [1, 12, 18]


def _two_kinds(
    clusters: int = 8, per_kind: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Requests of two kinds in each of ``clusters`` topics, each kind a little apart from the
    other; half of each kind's answers good. The scorer is stingier with kind B: its good answers
    score below kind A's poor ones."""
    rng = np.random.default_rng(seed)
    dim = clusters + 2
    points, kind_b, good = [], [], []
    for c in range(clusters):
        for b in (False, True):
            offset = np.eye(dim)[clusters + int(b)] * 0.15
            for i in range(per_kind):
                points.append(np.eye(dim)[c] + offset + 0.01 * rng.standard_normal(dim))
                kind_b.append(b)
                good.append(i % 2 == 0)
    kind_b, good = np.array(kind_b), np.array(good)
    quality = np.where(kind_b, np.where(good, 0.80, 0.67), np.where(good, 0.95, 0.82))
    x = np.array(points)
    return x / np.linalg.norm(x, axis=1, keepdims=True), quality, kind_b, good


def test_relative_quality_compares_a_row_with_the_requests_most_like_it(monkeypatch: pytest.MonkeyPatch) -> None:
    x, quality, kind_b, good = _two_kinds()
    assert quality[kind_b & good].max() < quality[~kind_b & ~good].min()  # raw: kind beats answer
    relative = relative_quality(x, quality, 5)
    assert relative[good].min() > relative[~good].max()  # against its neighbours, the answer counts
    # A row is not its own neighbour: identical requests, each against the other two.
    same = np.ones((3, 4)) / 2.0
    assert np.allclose(relative_quality(same, np.array([0.6, 0.5, 0.4]), 2), [0.65, 0.5, 0.35])
    assert np.array_equal(relative_quality(same, np.array([0.6, 0.5, 0.4]), 0), [0.6, 0.5, 0.4])
    # A large pool looks for neighbours in a seeded sample of it.
    monkeypatch.setattr(dataset_module, "NEIGHBOUR_REFERENCE_ROWS", 40)
    sampled = relative_quality(x, quality, 3, seed=1)
    assert np.array_equal(sampled, relative_quality(x, quality, 3, seed=1))
    assert sampled[good].mean() - sampled[~good].mean() > 0.1
    assert sampled[kind_b & good].mean() > sampled[~kind_b & ~good].mean()


@pytest.mark.parametrize("method", ["k_center", "k_means"])
def test_selection_takes_the_best_answers_of_every_kind(method: str) -> None:
    x, quality, kind_b, good = _two_kinds()
    raw = diverse_indices(x, quality, 8, method=method, quality_weight=4, seed=0)
    assert not kind_b[raw].any()  # raw scores: kind A only, its poor answers included
    picked = diverse_indices(x, quality, 8, method=method, quality_weight=4, seed=0, quality_neighbours=5)
    assert good[picked].all() and 0 < kind_b[picked].sum() < 8


def test_selection_keeps_the_fraction_and_weighs_quality() -> None:
    x = _clusters([10, 5, 5])
    batch = _rows(20, quality_score=list(np.linspace(0.7, 0.9, 20)))
    batch["embedding"] = x.astype(np.float32)
    assert selection_size(20, 0.5) == 10 and selection_size(21, 0.5) == 11 and selection_size(3, 0.01) == 1
    chosen = select_diverse(batch, keep_fraction=0.5)
    assert len(chosen["interaction_id"]) == 10 and len(set(chosen["interaction_id"])) == 10
    # max_rows caps what the fraction gives, never raises it.
    assert selection_size(20, 0.5, max_rows=4) == 4 and selection_size(20, 0.1, max_rows=4) == 2
    capped = select_diverse(batch, keep_fraction=1.0, max_rows=6)
    assert set(capped["interaction_id"]) < set(select_diverse(batch, keep_fraction=1.0)["interaction_id"])
    assert len(capped["interaction_id"]) == 6
    # Equidistant candidates: the better one wins; with quality_weight 0 the first (lowest index).
    y = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert diverse_indices(y, np.array([0.9, 0.6, 0.8]), 2).tolist() == [0, 2]
    assert diverse_indices(y, np.array([0.9, 0.6, 0.8]), 2, quality_weight=0.0).tolist() == [0, 1]
    # The result does not depend on the order the rows came in.
    order = np.random.default_rng(1).permutation(20)
    again = select_diverse(take(batch, order), keep_fraction=0.5)
    assert sorted(again["interaction_id"]) == sorted(chosen["interaction_id"])


# --- ChatML ---------------------------------------------------------------------------------------------

TOOLS = [
    {
        "tool_name": "run_tests",
        "invocation_order": 1,
        "parameters_raw": {"command": "pytest -q"},
        "success": False,
        "output": "",
        "error": "1 failed",
        "exit_code": 1,
    },
    {
        "tool_name": "read_file",
        "invocation_order": 0,
        "parameters_raw": {"path": "src/port.py"},
        "success": True,
        "output": "def parse_port(value): ...",
        "error": None,
        "exit_code": 0,
    },
]


def test_chatml_messages_with_tool_calls() -> None:
    batch = _rows(
        1,
        input=[PY_PROMPT],
        output=[PY_ANSWER],
        system_prompt=["You are a coding assistant."],
        tool_usage_json=[json.dumps(TOOLS)],
        context_json=[
            json.dumps(
                {
                    "project_type": "cli",
                    "technologies": ["python"],
                    "git": {"branch": "main"},
                    "build": {"system": "hatch"},
                }
            )
        ],
    )
    out = format_chatml(batch)
    messages = json.loads(out["messages"][0])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "src/port.py"}'}}
    ]
    assert messages[3] == {"role": "tool", "tool_call_id": "call_0", "content": "def parse_port(value): ..."}
    assert messages[5]["content"] == "error: 1 failed (exit code 1)"
    assert messages[-1] == {"role": "assistant", "content": PY_ANSWER}
    assert out["instruction"][0] == PY_PROMPT and out["input"][0] == "" and out["tool_calls"][0] == 2
    assert json.loads(out["project_context"][0]) == {
        "build_system": "hatch",
        "project_type": "cli",
        "technologies": ["python"],
    }
    plain = json.loads(format_chatml(batch, include_tool_calls=False)["messages"][0])
    assert [m["role"] for m in plain] == ["system", "user", "assistant"]
    cut = json.loads(format_chatml(batch, max_tool_output_chars=3)["messages"][0])
    assert cut[3]["content"].startswith("def\n[... ")


@pytest.fixture(scope="module")
def tokenizer(model_root: Path):
    from app.model import load_tokenizer

    return load_tokenizer(model_root / "models" / "qwen2.5-tokenizer")


def test_messages_render_through_qwens_chat_template(tokenizer) -> None:
    batch = _rows(
        1,
        input=["Is the port parsed?"],
        output=["Yes."],
        system_prompt=["Be brief."],
        tool_usage_json=[json.dumps(TOOLS[1:])],
    )
    messages = format_chatml(batch)["messages"][0]
    text = tokenizer.apply_chat_template(chat_template_messages(messages), tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nIs the port parsed?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "read_file", "arguments": {"path": "src/port.py"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\ndef parse_port(value): ...\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    # Without a system prompt the template puts in Qwen's default one.
    plain = format_chatml(_rows(1, input=["Hi"], output=["Hello."]))["messages"][0]
    ids = tokenizer.apply_chat_template(chat_template_messages(plain), tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 151644 and ids[-2:] == [151645, 198]  # <|im_start|> ... <|im_end|>\n
    assert "You are Qwen" in tokenizer.decode(ids)


# --- split, features, files ---------------------------------------------------------------------------


def test_split_is_a_deterministic_hash_of_the_id() -> None:
    batch = _rows(400)
    split = assign_split(batch, 0.25)["split"]
    share = float(np.mean(split == "validation"))
    assert 0.18 < share < 0.32
    shuffled = take(batch, np.random.default_rng(0).permutation(400))
    again = dict(zip(shuffled["interaction_id"], assign_split(shuffled, 0.25)["split"]))
    assert all(again[i] == s for i, s in zip(batch["interaction_id"], split))
    assert all((s == "validation") == (split_fraction(i) < 0.25) for i, s in zip(batch["interaction_id"], split))
    # A small set still gets one validation row; a fraction of 0 gets none.
    tiny = assign_split(_rows(3), 0.01)["split"]
    assert list(tiny).count("validation") == 1
    assert "validation" not in set(assign_split(_rows(3), 0.0)["split"])


class FakeEmbedder:
    def embed(self, texts):
        return np.stack([np.eye(4)[len(t) % 4] for t in texts]).astype(np.float32)


def _prepared(n: int) -> dict[str, np.ndarray]:
    batch = classify(_rows(n, context_json=['{"technologies": ["python", "click"]}'] * n))
    batch = filter_quality(batch, threshold_manager(0.7))
    batch = EmbedBatch(FakeEmbedder())(format_chatml(batch))
    return encode_features(batch)


def test_features_round_trip() -> None:
    batch = _prepared(2)
    features = decode_features(batch["features"][0])
    assert features["language"] == "python" and features["frameworks"] == ["click"]
    assert features["code_lines"] == 2 and features["quality_confidence"] == 0.9
    assert np.allclose(features["embedding"], batch["embedding"][0])


def test_table_and_files(tmp_path: Path) -> None:
    batch = assign_split(_prepared(6), 0.3)
    table = to_table(batch)
    assert table.schema == DATASET_SCHEMA
    assert table.column("interaction_id").to_pylist() == sorted(batch["interaction_id"])
    assert table.column("domain").to_pylist()[0] == ["python", "generation", "click"]
    assert table.column("timestamp")[0].as_py() == datetime(2025, 1, 2, 3, 4, 5, 123456)
    assert table.column("learning_type").to_pylist() == ["interaction"] * 6
    assert content_hash(table) == content_hash(to_table(take(batch, np.arange(6)[::-1])))
    assert count_rows(table)["complexity"] == {"simple": 6}

    val = batch["split"] == "validation"
    train, validation = to_table(take(batch, ~val)), to_table(take(batch, val))
    manifest = DatasetManifest(
        dataset_id="ds-unit",
        created_at="2025-01-01T00:00:00Z",
        uri="",
        rows=0,
        content_hash="",
        files={},
        columns={},
        funnel=Funnel(
            scored=6,
            above_threshold=6,
            exact_duplicates=0,
            near_duplicates=0,
            over_group_cap=0,
            not_selected=0,
            selected=6,
            train=train.num_rows,
            validation=validation.num_rows,
        ),
        counts=count_rows(table),
        balance={},
        quality_histogram=quality_histogram(batch["quality_score"]),
        query=QueryInfo(
            engine="sqlite",
            quality_status="scored",
            since=None,
            until=None,
            threshold=0.7,
            domain_adjustments={},
            thresholds={},
        ),
        options=DatasetConfig().model_dump(mode="json"),
        seconds=0.0,
    )
    written = write_dataset(str(tmp_path), train, validation, manifest)
    folder = tmp_path / "datasets" / "ds-unit"
    assert written.uri == str(folder) and written.rows == 6
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "train.jsonl",
        "train.parquet",
        "validation.jsonl",
        "validation.parquet",
    ]
    assert DatasetManifest.model_validate_json((folder / "manifest.json").read_text()) == written
    assert pq.read_table(folder / "train.parquet").equals(train)
    assert written.content_hash == content_hash(train, validation)
    lines = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert [line["messages"] for line in lines] == [json.loads(m) for m in train.column("messages").to_pylist()]
    assert written.quality_histogram.counts[16] == 6  # 0.80 lies in [0.80, 0.85)
    with pytest.raises(FileExistsError):
        write_dataset(str(tmp_path), train, validation, manifest)


def test_rows_round_trip_through_batches() -> None:
    batch = fingerprint(_rows(3), num_perm=16)
    rows = [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(3)]
    again = rows_to_batch(rows)
    assert again["minhash"].shape == (3, 16) and again["minhash"].dtype == np.uint64
    assert again["quality_score"].dtype == np.float64 and list(again["interaction_id"]) == list(batch["interaction_id"])
