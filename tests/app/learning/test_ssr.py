"""``app/learning/ssr.py``: SSR's pure stages (prompts, parsing, filters, k-means selection) and what
makes a rehearsal set one (its data file, its content hash)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.config import ConfigError, section_options
from app.learning.ssr import (
    DATA_FILE,
    GENERAL_DOMAIN,
    SSRConfig,
    build_prompt,
    check_output,
    cluster_quotas,
    confidence_floor,
    content_hash,
    demonstration_pairs,
    demonstration_text,
    filter_inputs,
    group_by_domain,
    is_rehearsal_set,
    nearest_to_centroids,
    parse_input,
    plan_prompts,
    sample_demonstrations,
    sample_size,
    select_by_clusters,
)


def _rows(domain: str, n: int) -> list[dict]:
    return [
        {
            "interaction_id": f"{domain}-{i}",
            "instruction": f"Task {i} in {domain}",
            "input": "",
            "output": f"Answer {i}",
            "domain": [domain, "other"],
        }
        for i in range(n)
    ]


# --- options --------------------------------------------------------------------------------------


def test_every_option_is_described_and_unknown_ones_are_refused() -> None:
    assert all(f.description for f in SSRConfig.model_fields.values())
    with pytest.raises(ConfigError, match=r"ssr\.bogus: unknown key"):
        section_options("ssr", ["ssr.bogus=1"])
    with pytest.raises(ConfigError, match=r"ssr\.top_p: .*less than or equal to 1"):
        section_options("ssr", ["ssr.top_p=1.5"])
    with pytest.raises(ConfigError, match="max_input_chars"):
        section_options("ssr", ["ssr.min_input_chars=10", "ssr.max_input_chars=5"])
    with pytest.raises(ConfigError, match=r"ssr\.rehearsal_id"):
        section_options("ssr", ["ssr.rehearsal_id=../x"])
    opts = section_options("ssr", ["ssr.samples_per_prompt=2", "ssr.domains=[python, go]"])
    assert opts.samples_per_prompt == 2 and opts.domains == ["python", "go"]
    assert (opts.top_p, opts.temperature, opts.num_clusters) == (0.6, 0.9, 20)  # the paper's


# --- demonstrations and prompts ---------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [(10_000, 100), (1000, 10), (250, 4), (50, 4), (3, 3), (4, 4)])
def test_sample_is_about_one_percent_with_a_minimum(n: int, expected: int) -> None:
    assert sample_size(n, 0.01, 4) == expected


def test_sample_demonstrations_draws_that_many_real_rows_reproducibly() -> None:
    rows = _rows("python", 1000)
    opts = SSRConfig()
    sample = sample_demonstrations(rows, opts, random.Random("0:python"))
    assert len(sample) == 10 and len({r["interaction_id"] for r in sample}) == 10
    assert all(r in rows for r in sample)
    assert sample == sample_demonstrations(rows, opts, random.Random("0:python"))
    assert len(sample_demonstrations(rows[:7], opts, random.Random(1))) == 4


def test_group_by_primary_domain() -> None:
    rows = _rows("python", 2) + _rows("go", 1) + [{"interaction_id": "x", "domain": []}]
    groups = group_by_domain(rows)
    assert list(groups) == sorted(["python", "go", GENERAL_DOMAIN])
    assert [r["interaction_id"] for r in groups["python"]] == ["python-0", "python-1"]
    assert list(group_by_domain(rows, ["python", "rust"])) == ["python"]


def test_prompt_is_the_description_two_demonstrations_and_a_trailing_input() -> None:
    prompt = build_prompt("Describe.", [("in one", "out one"), ("in two\nmore", "out two")])
    assert prompt == "Describe.\n\nInput: in one\nOutput: out one\n\nInput: in two\nmore\nOutput: out two\n\nInput:"

    rows = _rows("python", 6)
    opts = SSRConfig(prompts_per_domain=40, task_description="About {domain}:", max_demonstration_chars=8)
    prompts = plan_prompts("python", rows, opts, random.Random(0))
    assert len(prompts) == 40
    for p in prompts:
        assert p["domain"] == "python" and p["prompt"].startswith("About python:\n\n")
        assert p["prompt"].count("Input:") == 3 and p["prompt"].count("Output:") == 2
        assert p["prompt"].endswith("\n\nInput:")
        first, second = p["demonstration_ids"]
        assert first != second
        assert f"Input: {demonstration_text(rows[int(first.split('-')[1])])[0][:8]}\n" in p["prompt"]
    # 6 rows give 30 ordered pairs: all of them before any repeats.
    assert len({tuple(p["demonstration_ids"]) for p in prompts[:30]}) == 30


def test_demonstration_pairs_are_distinct_and_cycle() -> None:
    pairs = demonstration_pairs(3, 10, random.Random(0))
    assert len(pairs) == 10 and all(i != j for i, j in pairs)
    assert set(pairs[:6]) == {(i, j) for i in range(3) for j in range(3) if i != j}
    with pytest.raises(ValueError):
        demonstration_pairs(1, 1, random.Random(0))


def test_demonstration_input_joins_instruction_and_context() -> None:
    assert demonstration_text({"instruction": "Fix it.", "input": "x = 1", "output": "ok"}) == (
        "Fix it.\n\nx = 1",
        "ok",
    )
    assert demonstration_text({"instruction": "Fix it.", "input": None, "output": None}) == ("Fix it.", "")


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("continuation", "expected"),
    [
        (" Write a parser.\nOutput: def parse(): ...\n\nInput: next", "Write a parser."),
        (" Fix this:\n\n```python\nx = 1\n```\nOutput: done", "Fix this:\n\n```python\nx = 1\n```"),
        (" Sort a list. Output: sorted(x)", "Sort a list."),
        ("\nExplain closures.\nInput: another one", "Explain closures."),
        (" Rename a variable.\n\nThen something else entirely", "Rename a variable."),
        (" just text to the end", "just text to the end"),
        ("Output: nothing first", ""),
        ("   \n\n", ""),
    ],
)
def test_parse_cuts_at_output_next_input_or_blank_line(continuation: str, expected: str) -> None:
    assert parse_input(continuation) == expected


# --- filters ------------------------------------------------------------------------------------


def test_filters_drop_short_long_duplicates_and_broken_code() -> None:
    opts = SSRConfig(min_input_chars=10, max_input_chars=60)
    texts = [
        "Write a function that adds two numbers.",  # kept
        "short",  # too short
        "x" * 61,  # too long
        "write a  function that adds TWO numbers.",  # duplicate of the first, up to case and spaces
        "Task 3 in python",  # a real input
        "Fix:\n```python\ndef f(:\n```",  # broken Python
        "Fix:\n```python\nx = 1",  # unclosed fence
        "Fix:\n```python\ndef f():\n    return 1\n```",  # kept: valid code
        "",  # empty
    ]
    kept, dropped = filter_inputs(texts, [demonstration_text(r)[0] for r in _rows("python", 5)], opts)
    assert kept == [0, 7]
    assert dropped == {
        "too_short": 1,
        "too_long": 1,
        "duplicate": 1,
        "duplicate_of_real": 1,
        "broken_code": 2,
        "empty": 1,
    }
    kept, dropped = filter_inputs(texts[5:7], [], SSRConfig(min_input_chars=1, check_code=False))
    assert kept == [0, 1] and not dropped


def test_output_checks() -> None:
    opts = SSRConfig(min_output_chars=3, max_output_chars=20)
    assert check_output("A fine answer.", False, opts) is None
    assert check_output("  ", False, opts) == "empty"
    assert check_output("A fine answer.", True, opts) == "truncated"
    assert check_output("A fine answer.", True, SSRConfig(drop_truncated_outputs=False)) is None
    assert check_output("ab", False, opts) == "too_short"
    assert check_output("a" * 21, False, opts) == "too_long"
    assert check_output("```python\ndef (\n```", False, SSRConfig()) == "broken_code"
    # The latest model's confidence in its answer: a guess is not rehearsed.
    sure = SSRConfig(min_output_confidence=0.9)
    assert check_output("A fine answer.", False, sure, 0.95) is None
    assert check_output("A fine answer.", False, sure, 0.5) == "unsure"
    assert check_output("A fine answer.", False, sure, None) is None  # not measured
    assert check_output("A fine answer.", False, opts, 0.01) is None  # 0: every answer kept


def test_the_confidence_floor_follows_the_real_sample() -> None:
    # Calibrated: a share of the latest model's least sure answer to the domain's real inputs.
    calibrated = SSRConfig(sample_confidence_ratio=0.9)
    assert confidence_floor(calibrated, [0.99, 0.8, 0.95]) == pytest.approx(0.72)
    assert confidence_floor(calibrated, []) == 0.0  # nothing to calibrate on
    # The higher of the two thresholds applies.
    both = SSRConfig(sample_confidence_ratio=1.0, min_output_confidence=0.9)
    assert confidence_floor(both, [0.5, 0.7]) == 0.9
    assert confidence_floor(both, [0.97, 0.99]) == 0.97
    assert confidence_floor(SSRConfig(), [0.9]) == 0.0  # both off
    # A model sure of its real answers drops a guess that an absolute 0.9 would keep, and a model
    # unsure of the whole domain keeps answers that the same absolute threshold would drop.
    floor = confidence_floor(SSRConfig(sample_confidence_ratio=1.0), [0.998, 0.996])
    assert check_output("glass", False, calibrated, 0.95, floor) == "unsure"
    assert check_output("glass", False, SSRConfig(min_output_confidence=0.9), 0.95) is None
    floor = confidence_floor(SSRConfig(sample_confidence_ratio=1.0), [0.7, 0.8])
    assert check_output("glass", False, calibrated, 0.75, floor) is None
    assert check_output("glass", False, SSRConfig(min_output_confidence=0.9), 0.75) == "unsure"


# --- k-means selection ----------------------------------------------------------------------------


def test_quotas_are_proportional_and_sum_to_the_target() -> None:
    assert cluster_quotas([60, 30, 10], 10) == [6, 3, 1]
    assert cluster_quotas([5, 5, 5], 4) == [2, 1, 1]  # the remainder to the earliest of equal clusters
    assert cluster_quotas([3, 1], 10) == [3, 1]  # fewer rows than the target: all of them
    assert cluster_quotas([0, 4], 2) == [0, 2]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=rng.integers(1, 21)).tolist()
        target = int(rng.integers(1, 300))
        quotas = cluster_quotas(sizes, target)
        assert sum(quotas) == min(target, sum(sizes))
        assert all(0 <= q <= s for q, s in zip(quotas, sizes))
        n = sum(sizes)
        if n:  # largest remainders: each quota is its exact share rounded down or up
            assert all(abs(q - target * s / n) < 1 for q, s in zip(quotas, sizes) if target <= n)


def test_nearest_to_centroid_members_are_chosen() -> None:
    points = np.array([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    labels = [0, 0, 0, 1, 1]
    centroids = np.array([[0.9, 0.0], [10.0, 10.5]])
    indices, clusters = nearest_to_centroids(points, labels, centroids, [2, 1])
    assert indices == [2, 0, 3] and clusters == [0, 0, 1]


def test_kmeans_selection_on_synthetic_2d_blobs() -> None:
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    sizes = [30, 20, 10]
    points = np.concatenate([c + rng.normal(scale=1.0, size=(n, 2)) for c, n in zip(centers, sizes)])
    blob = np.repeat(np.arange(3), sizes)

    choice = select_by_clusters(points, total=12, num_clusters=3, seed=0)
    assert len(choice.indices) == 12 and len(set(choice.indices)) == 12
    assert sorted(choice.sizes) == [10, 20, 30]
    assert sum(choice.quotas) == 12
    by_size = dict(zip(choice.sizes, choice.quotas))
    assert by_size == {30: 6, 20: 4, 10: 2}
    for b, n in enumerate(sizes):
        members = np.flatnonzero(blob == b)
        mean = points[members].mean(axis=0)  # k-means' centroid of a well-separated blob
        nearest = members[np.argsort(np.linalg.norm(points[members] - mean, axis=1))[: by_size[n]]]
        chosen = [i for i in choice.indices if blob[i] == b]
        assert chosen == nearest.tolist()
    # The chosen rows of one cluster share its label.
    assert all(
        blob[i] == blob[choice.indices[choice.clusters.index(c)]] for i, c in zip(choice.indices, choice.clusters)
    )


def test_kmeans_uses_fewer_clusters_than_inputs_and_handles_tiny_sets() -> None:
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [6.0, 5.0]])
    choice = select_by_clusters(points, total=3, num_clusters=20)
    assert len(choice.sizes) == 5 and len(choice.indices) == 3 and len(set(choice.indices)) == 3
    assert select_by_clusters(points[:1], total=3).indices == [0]
    assert select_by_clusters(np.zeros((0, 2)), total=3).indices == []
    same = select_by_clusters(np.ones((6, 2)), total=4, num_clusters=3)  # fewer distinct points than k
    assert len(same.indices) == 4


def _rehearsal_rows(**columns) -> pa.Table:
    return pa.table(
        {
            "interaction_id": ["ssr-1", "ssr-2"],
            "source_domain": ["go", "python"],
            "instruction": ["Write a server.", "Read a file."],
            "output": ["Here.", "Use with."],
            **columns,
        }
    )


def test_content_hash_is_of_the_rows_ids_domains_inputs_and_outputs_in_order() -> None:
    rows = _rehearsal_rows()
    expected = hashlib.sha256()
    for row in rows.to_pylist():
        expected.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    assert content_hash(rows) == expected.hexdigest()
    # Other columns, their order and their types do not count; the rows' order and text do.
    other = _rehearsal_rows(cluster=[3, 4]).select(
        ["output", "cluster", "instruction", "source_domain", "interaction_id"]
    )
    assert content_hash(other) == content_hash(rows)
    assert content_hash(rows.take([1, 0])) != content_hash(rows)
    assert content_hash(_rehearsal_rows().set_column(3, "output", pa.array(["Here!", "Use with."]))) != content_hash(
        rows
    )


def test_a_rehearsal_set_is_a_folder_holding_its_data_file(tmp_path: Path) -> None:
    folder = tmp_path / "rehearsal" / "ssr-1"
    assert not is_rehearsal_set(folder)  # nothing there
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    assert not is_rehearsal_set(folder)  # a manifest alone is no set
    pq.write_table(_rehearsal_rows(), folder / DATA_FILE)
    assert DATA_FILE == "rehearsal.parquet"
    assert is_rehearsal_set(folder) and is_rehearsal_set(str(folder)) and is_rehearsal_set(folder.as_uri())
    assert not is_rehearsal_set(folder / DATA_FILE)  # the file is not the set
