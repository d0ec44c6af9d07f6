"""The ``kaizen`` CLI as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_config_check_prints_errors_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "check", str(ROOT / "configs/default.yaml")]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("collection:\n  capture_rate: 2\n  retention_days: 0\ntraining:\n  min_interactions: 3\n")
    assert main(["config", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error: collection.capture_rate: must be between 0.0 and 1.0" in out
    assert "error: collection.retention_days: must be at least 1" in out
    assert "warning: training.min_interactions" in out
    assert main(["config", "check", str(bad), "collection.capture_rate=1", "collection.retention_days=7"]) == 0
    assert main(["config", "check", str(tmp_path / "missing.yaml")]) == 1


def test_config_check_lists_every_key_with_secrets_masked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from app.config import load_config
    from app.config_keys import config_keys

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "training:\n  interval_hours: 12\nprivacy:\n  hmac_key: very-secret\n  encryption: true\n"
        "store:\n  postgres_dsn: postgresql://kaizen:pw123@db:5432/kaizen\n"
    )
    assert main(["config", "check", "--list", str(cfg_file), "finetune.lora_rank=4"]) == 0
    out = capsys.readouterr().out
    assert "nothing reads it" not in out  # every key does what it says
    listed = [line.split(" = ")[0] for line in out.splitlines() if " = " in line and not line.startswith(" ")]
    assert listed == [k.key for k in config_keys(load_config(cfg_file, ["finetune.lora_rank=4"]))]
    assert "training.interval_hours = 12.0   (default 24.0)" in out and "finetune.lora_rank = 4   (default 8)" in out
    assert "quality.real_time = true\n    Score interactions as they are committed" in out
    assert "very-secret" not in out and "pw123" not in out and 'privacy.hmac_key = "***"' in out

    assert main(["config", "check", "--markdown", str(ROOT / "configs/default.yaml")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(table) == len(config_keys(load_config())) and table[0].startswith("| `enabled` | `true` | ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("collection:\n  capture_rate: 2\n")
    assert main(["config", "check", "--list", str(bad)]) == 1
    assert "listed once the errors are fixed" in capsys.readouterr().out


def test_status_reads_the_store(local_server, capsys: pytest.CaptureFixture) -> None:
    import httpx

    events = [
        {
            "id": f"st-{i}",
            "type": "interaction",
            "timestamp": "2026-11-01T10:00:00Z",
            "body": {"session_id": "s", "input": {"raw": f"mail x{i}@example.com"}, "output": {"content": "ok"}},
        }
        for i in range(3)
    ]
    httpx.post(local_server.url + "/v1/events", json={"events": events}).raise_for_status()
    db = local_server.cfg.store.sqlite_path
    assert main(["status", f"store.sqlite_path={db}", "ray.address=127.0.0.1:1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["store"]["engine"] == "sqlite" and report["store"]["interactions"] == 3
    assert report["store"]["per_day"] == [{"day": "2026-11-01", "interactions": 3}]
    assert report["store"]["redactions"]["email"] == 3
    assert main(["status", f"store.sqlite_path={db}", "ray.address=127.0.0.1:1"]) == 0
    text = capsys.readouterr().out
    assert "2026-11-01" in text and "email" in text and "serve: not running" in text


def test_seed_sends_realistic_samples_through_the_client(local_server, capsys: pytest.CaptureFixture) -> None:
    assert main(["seed", "--count", "40", "--url", local_server.url]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert sent["interactions"] == 40 and sent["delivered"] == 1 and sent["server_rejected"] == 0
    stats = local_server.service.store.stats()
    assert stats["interactions"] == 40 and stats["feedback"] == sent["feedback"]
    assert stats["tool_usage"] == sent["tool_usage"] and 0 < sent["poor"] < 40


@pytest.mark.integration
@pytest.mark.slow
def test_kaizen_up_serves_seeds_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "kaizen.db"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "up",
            "--seed-if-empty",
            "--seed-count",
            "30",
            f"store.sqlite_path={db}",
            f"serve.port={port}",
            "ray.num_cpus=2",
            "serve.app_name=kaizen-up-test",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "Press Ctrl-C" in out, out
        assert f"POST http://127.0.0.1:{port}/v1/events" in out
        assert "seeding 30 sample interactions" in out
        import httpx

        stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=10).json()
        assert stats["interactions"] == 30
        # The generator serves the tiny model beside the collector and the scorer.
        assert f"POST http://127.0.0.1:{port}/v1/chat/completions" in out
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=120,
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert reply.status_code == 200 and reply.json()["object"] == "chat.completion", reply.text
        # champion before there is one: the base model; the deployer (an actor) runs beside Serve.
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=120,
            json={"model": "champion", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"], reply.text
        deployments = httpx.get(f"http://127.0.0.1:{port}/v1/deployments", timeout=10).json()
        assert deployments["strategy"] == "staged" and deployments["active"] is None
        training = httpx.get(f"http://127.0.0.1:{port}/v1/training", timeout=30).json()
        assert training["scheduler"]["running"] and training["running"] is None, training
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "Stopped." in rest


def test_calibrate_and_adapter_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import random
    from datetime import UTC, datetime

    from app.quality.service import QualityService
    from app.registry import AdapterRegistry
    from app.sample import sample_interactions
    from app.store.sqlite import SQLiteStore
    from tests.conftest import ingest_samples

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"store:\n  sqlite_path: {tmp_path / 'k.db'}\nprivacy:\n  hmac_key: k\n")
    store = SQLiteStore(tmp_path / "k.db")
    store.migrate()
    ids = ingest_samples(store, 40)
    QualityService(store).score_pending()

    assert main(["calibrate", "--config", str(cfg_file)]) == 0
    assert "kept the seed's weights: 0 rated interactions" in capsys.readouterr().out
    rng = random.Random(0)
    for sample, interaction_id in zip(sample_interactions(40, seed=5), ids):
        store.add_rating(interaction_id, 0.0 if sample.poor else rng.choice([0.75, 1.0]), rater="t")
    assert main(["calibrate", "--config", str(cfg_file), "--min-ratings", "20", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ratings"] == 40 and report["test"] == 10 and set(report["seed"]) == {"spearman", "pearson"}
    assert store.active_calibration() is None  # --dry-run stores nothing

    registry = AdapterRegistry(store)
    manifest = {
        "adapter_id": "adp-cli-1",
        "base_model": "tiny",
        "created_at": datetime.now(UTC).isoformat(),
        "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_dropout": 0.0},
        "files": {"adapter_model.safetensors": "0" * 64},
    }
    registry.register(manifest, "file:///tmp/adp-cli-1", actor="test")
    assert (
        main(
            [
                "adapters",
                "alias",
                "champion",
                "adp-cli-1",
                "--config",
                str(cfg_file),
                "--actor",
                "ana",
                "--reason",
                "first",
            ]
        )
        == 0
    )
    assert "champion: (none) -> adp-cli-1" in capsys.readouterr().out
    assert main(["adapters", "list", "--config", str(cfg_file)]) == 0
    assert "adp-cli-1" in (listing := capsys.readouterr().out) and "champion" in listing
    assert main(["adapters", "alias", "canary", "adp-cli-1", "--config", str(cfg_file)]) == 1
    assert main(["adapters", "alias", "champion", "--clear", "--config", str(cfg_file)]) == 0
    (history,) = [h for h in registry.alias_history("champion") if h["actor"] == "ana"]
    assert history["reason"] == "first" and registry.aliases() == {}

    # An operator's deployment: promote starts one (preloading, finished by the deployer's tick),
    # rollback before it served cancels it; both audited with the actor and the reason.
    deploy = ["--config", str(cfg_file), "--actor", "ana"]
    assert main(["deploy", "promote", "adp-cli-1", "--reason", "reviewed by hand", *deploy]) == 0
    assert "is preloading" in capsys.readouterr().out
    assert main(["deploy", "status", "--config", str(cfg_file), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["active"]["adapter_id"] == "adp-cli-1" and status["decisions"][0]["actor"] == "ana"
    assert main(["deploy", "pause", "--reason", "not a canary", *deploy]) == 2
    assert "only a canary can be paused" in capsys.readouterr().err
    assert main(["deploy", "rollback", "--reason", "changed my mind", *deploy]) == 0
    assert "is cancelled" in capsys.readouterr().out
    assert registry.get("adp-cli-1")["status"] == "rejected"
    assert main(["deploy", "rollback", "--reason", "again", *deploy]) == 2  # nothing active
    assert main(["training", "status", "--config", str(cfg_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is None
    store.close()


def test_the_readme_lists_every_config_key_as_config_check_prints_them() -> None:
    """The README's key table is `kaizen config check --markdown configs/default.yaml`: a key added,
    removed or redescribed without the README following fails here."""
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "config", "check", "--markdown", "configs/default.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    table = [line for line in out.splitlines() if line.startswith("| `")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(table) > 150
    missing = [line.split(" | ")[0] for line in table if line not in readme]
    assert not missing, f"README.md's key table differs from config check for {missing[:5]}"
