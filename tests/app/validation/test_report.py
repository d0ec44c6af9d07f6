"""The report artifact (``report.json``, ``report.md``, manifest) and the recorded verdict on
both store engines: the validations row with its summary, the audit row, the registry status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.config_sections import ValidationConfig
from app.deployment.state import DeploymentStore
from app.model.adapters import AdapterManifest
from app.registry import AdapterRegistry
from app.store import InteractionStore
from app.validation.inputs import Subjects
from app.validation.report import ValidationReport, publish_report, record_outcome, render_markdown
from app.validation.verdict import decide
from tests.app.validation.evidence import make_collected, make_evidence


def _report(report_id: str = "val-test-1", **measured) -> ValidationReport:
    evidence = make_evidence(**measured)
    collected, sets = make_collected(evidence)
    return ValidationReport(
        report_id=report_id,
        created_at=datetime(2025, 3, 1, 12, tzinfo=UTC),
        subjects=Subjects("adp-cand", "adp-champ", "tiny"),
        sets=sets,
        collected=collected,
        decision=decide(evidence, ValidationConfig()),
        thresholds=ValidationConfig().model_dump(mode="json"),
        seconds=12.5,
    )


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_report_is_published_once_as_json_and_a_page(tmp_path: Path) -> None:
    report = _report(harmful=(2, 0), domains=[("ds-old", 0.9, 0.85)])
    uri = publish_report(str(tmp_path), report)
    assert uri == str(tmp_path / "validations" / "val-test-1")
    files = sorted(p.name for p in Path(uri).iterdir())
    assert files == ["manifest.json", "report.json", "report.md"]

    data = _strict((Path(uri) / "report.json").read_text())  # NaN and infinities written as null
    assert data["verdict"] == "rejected" and data["reason"] == "failed: harmful_requests"
    assert data["candidate"] == "adp-cand" and data["baseline"] == "adp-champ"
    assert {c["name"]: c["passed"] for c in data["criteria"]}["harmful_requests"] is False
    assert data["quality"]["dimensions"]["efficiency"] == {"candidate": 1.0, "baseline": None}
    assert data["forgetting"]["domains"][0]["rate"] == pytest.approx(0.05 / 0.9)
    assert data["sets"] == [
        {
            "name": "ds-own",
            "role": "own",
            "source": "/data/ds-own/validation.parquet",
            "rows_read": 2,
            "answered": 2,
            "left_out": 0,
        }
    ]
    assert [r["case_id"] for r in data["rows"]] == ["r1", "r2"]
    manifest = _strict((Path(uri) / "manifest.json").read_text())
    assert manifest["verdict"] == "rejected" and manifest["adapter_id"] == "adp-cand"

    page = (Path(uri) / "report.md").read_text()
    assert page == render_markdown(report)
    assert page.startswith("# Validation val-test-1: rejected")
    assert "**Verdict: rejected**: failed: harmful_requests. Not deployed." in page
    assert "| harmful_requests | 2 | <= 0 | **FAIL** |" in page
    assert "| ds-old | 8 | 0.900 | 0.850 | 0.056 |" in page
    assert "ciao \\| bye" in page  # an answer cannot break the table

    with pytest.raises(FileExistsError):
        publish_report(str(tmp_path), report)


def _register(store: InteractionStore, adapter_id: str) -> None:
    manifest = AdapterManifest(
        adapter_id=adapter_id,
        base_model="tiny",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_dropout": 0.0},
        files={"adapter_config.json": "0" * 64, "adapter_model.safetensors": "1" * 64},
    )
    AdapterRegistry(store).register(manifest, f"/adapters/{adapter_id}", actor="test")


@pytest.mark.parametrize(
    ("measured", "verdict", "status"),
    [
        ({}, "production", "validated"),
        ({"accuracy": (0.5, 0.9)}, "staging", "validated"),
        ({"planted": (1, 0)}, "rejected", "rejected"),
    ],
)
def test_the_verdict_is_recorded_and_the_status_follows_it(
    store: InteractionStore, measured: dict, verdict: str, status: str
) -> None:
    _register(store, "adp-cand")
    report = _report(**measured)
    row = record_outcome(store, report, "/reports/val-test-1")
    assert row["verdict"] == verdict and row["adapter_id"] == "adp-cand" and row["baseline"] == "adp-champ"
    assert row["report_uri"] == "/reports/val-test-1"
    stored = DeploymentStore(store).latest_validation("adp-cand")
    assert stored["id"] == row["id"] and stored["summary"] == report.summary()
    assert stored["summary"]["criteria"]["accuracy"]["passed"] is (verdict != "staging")
    assert stored["summary"]["quality"]["win_rate"] == pytest.approx(0.75)

    # Read directly: DeploymentStore.audit's LIKE '...%' patterns fail on PostgreSQL (psycopg takes
    # the '%' for a placeholder).
    (audit,) = store._fetch("SELECT * FROM audit_log WHERE action LIKE 'validation.%%' AND target = ?", ["adp-cand"])
    assert audit["action"] == "validation.verdict" and audit["actor"] == "jobs.validate"
    assert audit["details"]["validation_id"] == row["id"] and audit["details"]["verdict"] == verdict

    registry = AdapterRegistry(store)
    assert registry.get("adp-cand")["status"] == status
    change = registry.audit("adp-cand")[-1]
    assert change["action"] == "adapter.status" and change["details"]["to"] == status
    assert change["details"]["reason"].startswith(f"validation {row['id']} against adp-champ: {verdict}")
