"""``jobs/synthesize.py``: SSR end to end on the tiny model, and its stages without Ray.

The tiny model is random, so what it writes is gibberish: the filters are set loose and the
checks are on the mechanics (files, schema, provenance, counts, which model answered).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.artifacts import REHEARSAL_PROVENANCE_SCHEMA, TRAINING_ROW_SCHEMA, manifest_hash
from app.config import KaizenConfig
from app.learning.ssr import RehearsalManifest, SSRConfig, content_hash, is_rehearsal_set
from jobs import synthesize
from tests.conftest import train_answer_adapter

REPO = Path(__file__).resolve().parents[2]
SOURCE_SCHEMA = pa.schema(
    [
        ("interaction_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("quality_score", pa.float64()),
        ("domain", pa.list_(pa.string())),
        ("complexity", pa.string()),
        ("learning_type", pa.string()),
        ("project_context", pa.string()),
        ("features", pa.string()),
        ("messages", pa.string()),
    ]
)
ANSWER = "Use a context manager."
PROMPTS = [
    {
        "prompt_id": 0,
        "domain": "python",
        "prompt": "Requests.\n\nInput: a\nOutput: b\n\nInput: c\nOutput: d\n\nInput:",
        "demonstration_ids": ["p-0", "p-1"],
    },
    {
        "prompt_id": 1,
        "domain": "go",
        "prompt": "More.\n\nInput: e\nOutput: f\n\nInput: g\nOutput: h\n\nInput:",
        "demonstration_ids": ["g-0", "g-1"],
    },
]


def _write_source(directory: Path, domains: dict[str, int]) -> Path:
    """A dataset folder as jobs/build_dataset.py writes it: train.parquet and manifest.json."""
    from datetime import UTC, datetime

    rows = []
    for domain, n in domains.items():
        for i in range(n):
            instruction = f"In {domain}, how do I handle case {i} of reading a file safely?"
            output = f"Open it in a with-block ({i})."
            rows.append(
                {
                    "interaction_id": f"{domain}-{i}",
                    "timestamp": datetime(2025, 1, 1, tzinfo=UTC),
                    "instruction": instruction,
                    "input": "",
                    "output": output,
                    "quality_score": 0.9,
                    "domain": [domain, "files"],
                    "complexity": "simple",
                    "learning_type": "new_knowledge",
                    "project_context": "{}",
                    "features": "{}",
                    "messages": json.dumps(
                        [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
                    ),
                }
            )
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), directory / "train.parquet")
    (directory / "manifest.json").write_text(json.dumps({"rows": len(rows)}))
    return directory


def _config(tmp_path: Path, root: Path) -> KaizenConfig:
    return KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "k.db")},
            "privacy": {"hmac_key": "k"},
            "model": {"base_model": "tiny", "storage_root": str(root)},
            "ray": {"num_cpus": 2},
        }
    )


def _loose(**overrides) -> SSRConfig:
    """Filters that let a random model's text through, and little generation."""
    return SSRConfig(
        **{
            "prompts_per_domain": 3,
            "samples_per_prompt": 2,
            "max_input_tokens": 24,
            "max_output_tokens": 24,
            "min_input_chars": 1,
            "check_code": False,
            "drop_truncated_outputs": False,
            "rehearsal_instances_per_domain": 3,
            "num_gpus": 0,
            **overrides,
        }
    )


def test_the_stages_without_ray(model_root: Path) -> None:
    opts = _loose()
    prompts = pa.Table.from_pylist(PROMPTS)
    stage = synthesize.SynthesizeInputs("tiny", str(model_root), opts.model_dump())
    out = stage(prompts)
    assert out.num_rows == 4  # samples_per_prompt for each prompt
    assert out.column("domain").to_pylist() == ["python", "python", "go", "go"]
    assert out.column("demonstration_ids").to_pylist()[2] == ["g-0", "g-1"]
    assert all(isinstance(t, str) for t in out.column("input").to_pylist())
    raw = out.column("raw").to_pylist()
    assert raw[0] != raw[1]  # two samples of one prompt
    assert stage(prompts).column("raw").to_pylist() == raw  # seeded per batch

    refine = synthesize.RefineOutputs("tiny", str(model_root), None, opts.model_dump())
    answered = refine(pa.table({"input": ["How do I read a file?", "Explain generators."]}))
    assert answered.column_names == ["input", "output", "truncated", "output_confidence"]
    again = refine(answered.select(["input"]))
    assert answered.column("output").to_pylist() == again.column("output").to_pylist()
    sure = answered.column("output_confidence").to_pylist()
    assert all(0 < p < 0.5 for p in sure)  # a random model's greedy tokens are far from sure
    assert sure == pytest.approx(again.column("output_confidence").to_pylist())


def test_the_stages_generate_what_the_engine_generates(model_root: Path) -> None:
    """The Ray Data stages are thin: the same inputs through the engine give the same rows."""
    from app.generation import GenerationEngine, Prompt, TopKSampling

    opts = _loose(seed=3)
    engine = GenerationEngine.load("tiny", root=model_root)
    direct = engine.generate(
        [Prompt(engine.encode(p["prompt"]), opts.max_input_tokens, stop=("Output:",)) for p in PROMPTS],
        TopKSampling(opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty),
        samples=opts.samples_per_prompt,
        seed=opts.seed * 1_000_003 + 0,  # the batch's first prompt_id
    )
    stage = synthesize.SynthesizeInputs("tiny", str(model_root), opts.model_dump())
    assert stage(pa.Table.from_pylist(PROMPTS)).column("raw").to_pylist() == [c.raw_text for c in direct]

    inputs = ["How do I read a file?", "Explain generators."]
    chats = [engine.chat_text([{"role": "user", "content": x}]) for x in inputs]
    answers = engine.generate([Prompt(engine.encode(c), opts.max_output_tokens) for c in chats], confidence=True)
    refine = synthesize.RefineOutputs("tiny", str(model_root), None, opts.model_dump())
    refined = refine(pa.table({"input": inputs}))
    assert refined.column("output").to_pylist() == [a.text.strip() for a in answers]
    assert refined.column("truncated").to_pylist() == [a.truncated for a in answers]
    assert refined.column("output_confidence").to_pylist() == [a.confidence for a in answers]


def test_rehearsal_columns_follow_the_source_schema() -> None:
    source = pa.schema([("interaction_id", pa.string()), ("timestamp", pa.string()), ("split", pa.string())])
    row = {"domain": "go", "input": "Write a server.", "output": "Here.", "cluster": 2, "demonstration_ids": ["a", "b"]}
    table = synthesize._rehearsal_table([row], source, "ssr-x", "tiny", "adp-1")
    assert table.schema.names[:3] == ["interaction_id", "timestamp", "split"]  # the source's, in its order
    assert table.schema.names[3:] == [
        *(c for c in TRAINING_ROW_SCHEMA.names if c not in source.names),
        *REHEARSAL_PROVENANCE_SCHEMA.names,
    ]
    (out,) = table.to_pylist()
    assert isinstance(out["timestamp"], str) and out["split"] is None  # the source's type; unknown: null
    assert out["instruction"] == "Write a server." and out["domain"] == ["go"] and out["refined_by"] == "adp-1"
    assert synthesize._rehearsal_table([], source, "ssr-x", "tiny", "tiny").num_rows == 0
    # A column the source lacks has the training row's type (a timestamp: UTC in ns, as datasets hold it).
    bare = synthesize._rehearsal_table([row], pa.schema([("interaction_id", pa.string())]), "ssr-x", "tiny", "tiny")
    assert bare.schema == pa.schema([*TRAINING_ROW_SCHEMA, *REHEARSAL_PROVENANCE_SCHEMA])


def test_read_source_prefers_the_train_split(tmp_path: Path) -> None:
    table = pa.table({"interaction_id": ["a"], "domain": [["x"]]})
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "validation").mkdir()
    pq.write_table(table, tmp_path / "d" / "train" / "part-0.parquet")
    pq.write_table(
        pa.table({"interaction_id": ["v"], "domain": [["x"]]}), tmp_path / "d" / "validation" / "part-0.parquet"
    )
    (tmp_path / "d" / "manifest.json").write_text("{}")
    rows, digest = synthesize.read_source(tmp_path / "d")
    assert rows.column("interaction_id").to_pylist() == ["a"]
    assert digest == hashlib.sha256(b"{}").hexdigest()
    rows, digest = synthesize.read_source(tmp_path / "d" / "validation" / "part-0.parquet")
    assert rows.column("interaction_id").to_pylist() == ["v"] and digest is None
    with pytest.raises(FileNotFoundError, match="no Parquet"):
        synthesize.read_source(tmp_path / "missing")


def test_read_source_without_a_train_split_leaves_out_validation_and_test(tmp_path: Path) -> None:
    """Demonstrations come from training rows only: a folder without a train split gives its
    other Parquet files, never its validation or test files (these fed SSR before app/artifacts)."""
    (tmp_path / "d" / "part").mkdir(parents=True)
    pq.write_table(pa.table({"interaction_id": ["a"]}), tmp_path / "d" / "part" / "0.parquet")
    pq.write_table(pa.table({"interaction_id": ["v"]}), tmp_path / "d" / "validation.parquet")
    pq.write_table(pa.table({"interaction_id": ["t"]}), tmp_path / "d" / "test.parquet")
    rows, digest = synthesize.read_source(tmp_path / "d")
    assert rows.column("interaction_id").to_pylist() == ["a"] and digest is None
    (tmp_path / "d" / "part" / "0.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no Parquet training rows"):
        synthesize.read_source(tmp_path / "d")


@pytest.mark.integration
def test_rehearsal_for_two_domains_refined_by_the_champion(tmp_path: Path, model_root: Path, ray_session) -> None:
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    cfg = _config(tmp_path, model_root)
    source = _write_source(tmp_path / "dataset", {"python": 12, "typescript": 6, "rust": 1})
    assert synthesize.latest_adapter(cfg) is None  # no champion yet: the base model answers

    adapters = AdapterStore(model_root)
    manifest = train_answer_adapter(
        model_root,
        adapters,
        "adp-ssr-champion",
        ANSWER,
        ["How do I read a file?", "Explain generators.", "Fix my loop."],
    )
    store = open_store(cfg.store)
    registry = AdapterRegistry(store)
    registry.register(manifest, adapters.uri(manifest.adapter_id), actor="test")
    registry.set_alias("champion", manifest.adapter_id, actor="test", reason="ssr test")
    store.close()

    opts = _loose(rehearsal_id="ssr-e2e")
    result = synthesize.main(cfg, opts, source)

    folder = model_root / "rehearsal" / "ssr-e2e"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rehearsal.parquet"]
    written = RehearsalManifest.model_validate_json((folder / "manifest.json").read_text())
    assert written == result
    assert manifest_hash(str(folder)) == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert is_rehearsal_set(folder) and not is_rehearsal_set(tmp_path)

    table = pq.read_table(folder / "rehearsal.parquet")
    assert table.schema.names == [*SOURCE_SCHEMA.names, *REHEARSAL_PROVENANCE_SCHEMA.names]
    for field in SOURCE_SCHEMA:
        assert table.schema.field(field.name).type == field.type
    assert table.schema.field("cluster").type == pa.int64()
    assert table.schema.field("demonstration_ids").type == pa.list_(pa.string())
    rows = table.to_pylist()
    assert rows, "nothing was written"

    # Counts per domain: at most the target, as the manifest says; the one-row domain is skipped.
    counts = {d: sum(r["source_domain"] == d for r in rows) for d in ("python", "typescript")}
    assert all(n <= 3 for n in counts.values())
    assert result.counts == counts and result.rows == len(rows) == table.num_rows
    assert result.skipped_domains == {"rust": "1 row: two demonstrations need at least 2"}
    assert set(result.domains) == {"python", "typescript"}
    python = result.domains["python"]
    assert len(python.demonstrations) == 4 and python.prompts == 3 and python.generated == 6
    assert python.inputs_kept + sum(python.inputs_dropped.values()) == python.generated
    assert python.selected == min(3, python.inputs_kept)
    assert python.rows + sum(python.outputs_dropped.values()) == python.selected

    # Provenance.
    assert {r["learning_type"] for r in rows} == {"rehearsal"}
    assert {r["synthesized_by"] for r in rows} == {"tiny"}
    assert {r["refined_by"] for r in rows} == {"adp-ssr-champion"} == {result.refined_by}
    for r in rows:
        domain = r["source_domain"]
        assert r["domain"] == [domain]
        assert len(r["demonstration_ids"]) == 2 and set(r["demonstration_ids"]) <= set(
            result.domains[domain].demonstrations
        )
        assert r["cluster"] >= 0 and r["interaction_id"].startswith("ssr-")
        assert 0 < r["output_confidence"] <= 1
        assert r["quality_score"] is None and r["input"] == ""
        assert json.loads(r["messages"]) == [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        # The champion was trained to give one answer: it, not the random base, wrote the outputs.
        assert r["output"].startswith(ANSWER[:10])
    assert len({r["interaction_id"] for r in rows}) == len(rows)

    # The manifest: options, hashes.
    assert result.source_manifest_hash == hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    assert result.files == {
        "rehearsal.parquet": hashlib.sha256((folder / "rehearsal.parquet").read_bytes()).hexdigest()
    }
    assert result.options["samples_per_prompt"] == 2 and result.synthesized_by == "tiny"
    assert result.content_hash == content_hash(table)

    with pytest.raises(FileExistsError, match="ssr.rehearsal_id"):
        synthesize.main(cfg, opts, source)

    # The next stage: a source of a new domain and of python again, the set above carried over.
    # python is synthesized anew; typescript's rows are kept as they were written.
    later = _write_source(tmp_path / "later", {"go": 6, "python": 4})
    carried = synthesize.main(cfg, _loose(rehearsal_id="ssr-next", carry_over="ssr-e2e"), later)
    assert carried.carried_from == str(folder) and carried.carried == {"typescript": counts["typescript"]}
    assert set(carried.domains) == {"go", "python"}
    new_rows = pq.read_table(model_root / "rehearsal" / "ssr-next" / "rehearsal.parquet").to_pylist()
    assert {r["interaction_id"]: r for r in new_rows if r["source_domain"] == "typescript"} == {
        r["interaction_id"]: r for r in rows if r["source_domain"] == "typescript"
    }
    assert carried.counts == {d: sum(r["source_domain"] == d for r in new_rows) for d in ("go", "python", "typescript")}
    assert not {r["interaction_id"] for r in new_rows if r["source_domain"] == "python"} & {
        r["interaction_id"] for r in rows
    }
    with pytest.raises(FileNotFoundError, match="ssr.carry_over: no rehearsal set"):
        synthesize.main(cfg, _loose(rehearsal_id="ssr-x", carry_over="ssr-missing"), later)

    # The paper's order: every input answered and checked first, k-means choosing among the rows
    # that passed, so that a confidence threshold does not leave the quota short. The same seed
    # samples the same inputs as the first run above, whose least sure python answer is dropped.
    threshold = sorted(r["output_confidence"] for r in rows if r["source_domain"] == "python")[1]
    early = synthesize.main(
        cfg, _loose(rehearsal_id="ssr-early", answer_before_selecting=True, min_output_confidence=threshold), source
    )
    report = early.domains["python"]
    passed = report.inputs_kept - report.outputs_dropped.get("unsure", 0)
    assert report.outputs_dropped.get("unsure", 0) >= 1
    assert report.selected == report.rows == min(3, passed) == early.counts["python"]
    # Never fewer than the first run's order keeps with this threshold: its rows that pass are
    # among the candidates that pass here. (Whether strictly more depends on the tiny model's
    # sampled inputs, which differ between CPUs: on one machine 3 against 2, on another 2 and 2.)
    assert report.rows >= sum(r["output_confidence"] >= threshold for r in rows if r["source_domain"] == "python")
    early_rows = pq.read_table(model_root / "rehearsal" / "ssr-early" / "rehearsal.parquet").to_pylist()
    assert all(r["output_confidence"] >= threshold and r["cluster"] >= 0 for r in early_rows)

    # Calibrated per domain: the floor is the champion's least sure answer to the domain's real
    # sample inputs (its demonstrations), measured here without Ray.
    calibrated = synthesize.main(
        cfg, _loose(rehearsal_id="ssr-calibrated", domains=["typescript"], sample_confidence_ratio=1.0), source
    )
    report = calibrated.domains["typescript"]
    real = [
        r["instruction"]
        for r in pq.read_table(source / "train.parquet").to_pylist()
        if r["interaction_id"] in report.demonstrations
    ]
    refine = synthesize.RefineOutputs("tiny", str(model_root), "adp-ssr-champion", _loose().model_dump())
    sure = refine(pa.table({"input": real})).column("output_confidence").to_pylist()
    assert len(real) == 4 and report.confidence_floor == pytest.approx(min(sure), rel=1e-3)
    written = pq.read_table(model_root / "rehearsal" / "ssr-calibrated" / "rehearsal.parquet").to_pylist()
    assert all(r["output_confidence"] >= report.confidence_floor for r in written)
    assert report.rows + sum(report.outputs_dropped.values()) == report.selected
    assert early.domains["python"].confidence_floor == threshold and result.domains["python"].confidence_floor is None


def test_the_command_line_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.synthesize", "--source", str(tmp_path), "ssr.bogus=1", "ssr.top_p=2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert "ssr.bogus: unknown key" in out.stderr and "ssr.top_p" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "jobs.synthesize"], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "--source" in missing.stderr
    # A bad input is named, not a traceback.
    assert synthesize.cli(["--source", str(tmp_path / "nowhere"), f"model.storage_root={tmp_path}"]) == 2
    assert "no Parquet training rows" in capsys.readouterr().err
    source = _write_source(tmp_path / "dataset", {"python": 4})
    assert synthesize.cli(["--source", str(source), f"model.storage_root={tmp_path}", "ssr.carry_over=gone"]) == 2
    assert "ssr.carry_over: no rehearsal set" in capsys.readouterr().err
