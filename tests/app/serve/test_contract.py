"""The HTTP contract, held by schemathesis against the real Serve app (collector, quality scorer
and generator on the tiny model, an admin key required): every operation of ``/openapi.json`` is
generated for, with every check on (``tests/app/serve/schemathesis.toml``), in a bounded, seeded
run. It must find no server error and no contract failure (a request without the key refused
among them), and no error body of the run may carry the server's insides."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from app.client import wait_until_ready
from app.config import KaizenConfig
from app.security.keys import KeyStore
from app.store import open_store
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(900)

CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 4
SEED = 20

# What a server's insides look like in an answer: a traceback, a source file, a process or actor
# id, an address, a file system path, an exception's class name.
INSIDES = re.compile(
    r"Traceback|File \"|line \d+, in |\.py\b|\bpid=|\bip=|ray::|ActorID|actor_id|/site-packages/|"
    r"(?<![\w.])/(?:tmp|home|work|usr|opt|root|var)/|\b(?:\d{1,3}\.){3}\d{1,3}\b|"
    r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
)


@pytest.fixture(scope="module")
def kaizen_url(ray_session, model_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from app.serve.build import build_app

    serve.shutdown()  # another module's Serve would keep its own HTTP port
    port = free_port()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path_factory.mktemp("contract") / "kaizen.db")},
            "privacy": {"hmac_key": "contract-test"},
            "model": {"base_model": "tiny", "storage_root": str(model_root)},
            "serve": {
                "port": port,
                "app_name": "kaizen-contract-test",
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "generator": {"num_cpus": 1, "max_adapters": 1, "default_max_tokens": 8},
            },
            "security": {"rate_limit_per_s": 0},
        }
    )
    # With a key, the API demands one: the run sends it, and schemathesis checks that a request
    # without it is refused (ignored_auth). No rate limit: the run sends thousands of requests.
    store = open_store(cfg.store)
    _, key = KeyStore(store).create("contract test", "admin", actor="test")
    store.close()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="kaizen-contract-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert wait_until_ready(url, timeout_s=180)
    yield url, key
    serve.shutdown()


def leaks(entry: dict[str, Any]) -> list[str]:
    """The markers of the server's insides in one HAR entry's error answer, less what the request
    itself carried (an answer may name the client's own input back)."""
    response = entry["response"]
    if response["status"] < 400:
        return []
    body = response.get("content", {}).get("text") or ""
    sent = entry["request"]["url"] + (entry["request"].get("postData", {}).get("text") or "")
    return [m.group(0) for m in INSIDES.finditer(body) if m.group(0) not in sent]


def test_the_markers_find_a_ray_traceback() -> None:
    """The scan itself: the answer the assess route once gave (issue 20) is caught."""
    entry = {
        "request": {"url": "http://h/v1/quality/assess", "postData": {"text": '{"prompt": "", "response": ""}'}},
        "response": {
            "status": 422,
            "content": {
                "text": '{"error":{"reason":"ray::ServeReplica:kaizen:Scorer.assess() (pid=4242, ip=10.0.0.7, '
                'actor_id=ab12) File \\"/work/app/quality/calibration.py\\", line 106, in score ValueError"}}'
            },
        },
    }
    found = leaks(entry)
    assert {"ray::", "pid=", "ip=", "10.0.0.7", "ValueError"} <= set(found)
    assert leaks({**entry, "response": {"status": 422, "content": {"text": '{"error":{"reason":"not empty"}}'}}}) == []


def test_schemathesis_finds_no_server_error_and_no_contract_failure(kaizen_url, tmp_path: Path) -> None:
    url, key = kaizen_url
    report = tmp_path / "report"
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "2",  # the server answers one while the next is generated: both cores busy
        "--no-color",
        "--report",
        "json,har",
        "--report-dir",
        str(report),
    ]
    env = {**os.environ, "KAIZEN_CONTRACT_KEY": key}
    run = subprocess.run(command, capture_output=True, text=True, timeout=840, check=False, cwd=tmp_path, env=env)
    (summary_path,) = report.glob("json-*.json")
    (har_path,) = report.glob("har-*.json")
    summary = json.loads(summary_path.read_text())
    failures = summary["failures"]
    assert summary["complete"] and summary["operations"]["tested"] == summary["operations"]["selected"] >= 20
    assert summary["test_cases"]["generated"] > 500
    assert failures == [] and summary["errors"] == [], run.stdout[-6000:]
    assert run.returncode == 0, run.stdout[-3000:]

    entries = json.loads(har_path.read_text())["log"]["entries"]
    statuses = [e["response"]["status"] for e in entries]
    assert not [s for s in statuses if s >= 500]
    errors = [e for e in entries if e["response"]["status"] >= 400]
    assert len(errors) > 100  # the run did send bad requests
    leaked = {e["request"]["method"] + " " + e["request"]["url"]: leaks(e) for e in errors if leaks(e)}
    assert leaked == {}
    print(
        f"schemathesis: {summary['test_cases']['generated']} test cases over {summary['operations']['tested']} "
        f"operations, {len(entries)} requests, {len(errors)} error answers scanned; failures 0, server errors 0"
    )


def test_the_official_openai_client_still_works(kaizen_url) -> None:
    url, key = kaizen_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=4
    )
    assert answer.object == "chat.completion" and answer.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="not-a-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
