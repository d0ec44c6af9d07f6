"""The collector's HTTP API over real HTTP (uvicorn, real SQLite): good and bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

NOW = datetime.now(UTC)


def event(i: int | str, type: str = "interaction", body: dict | None = None, ts: datetime | None = None) -> dict:
    body = (
        body
        if body is not None
        else {
            "session_id": "sess-1",
            "input": {"raw": f"request {i}"},
            "output": {"content": f"```python\nprint({i})\n```"},
        }
    )
    return {"id": f"ev-{i}", "type": type, "timestamp": (ts or NOW).isoformat(), "body": body}


@pytest.fixture
def http(local_server) -> httpx.Client:
    with httpx.Client(base_url=local_server.url, timeout=10) as client:
        yield client


def test_batch_answers_per_event_and_bad_events_do_not_spoil_it(http: httpx.Client) -> None:
    events = [
        event(1),
        event(2, body={"session_id": "s", "input": {"raw": "x"}}),  # no output
        event(3, type="click"),
        event(4, ts=NOW + timedelta(hours=2)),
        "not an object",
        {"id": "ev-6", "type": "feedback", "timestamp": NOW.isoformat(), "body": {"explicit": {"rating": 9}}},
        event(7, body={"session_id": "s", "input": {"raw": "x", "type": "chat"}, "output": {"content": "y"}}),
        event(1),  # repeated inside the batch
    ]
    r = http.post("/v1/events", json={"events": events})
    assert r.status_code == 207
    results = r.json()["results"]
    assert [x["status"] for x in results] == [
        "accepted",
        "rejected",
        "rejected",
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "duplicate",
    ]
    assert results[1]["field"] == "body.output" and "missing" in results[1]["reason"]
    assert results[2]["field"] == "type" and "unknown event type" in results[2]["reason"]
    # A clock far ahead: kept with the time it arrived, and the answer says so.
    assert "future" in results[3]["reason"] and "time it was received" in results[3]["reason"]
    assert "JSON object" in results[4]["reason"]
    assert results[5]["field"].startswith("body.") and results[5]["id"] == "ev-6"
    assert results[6]["field"] == "body.input.type"
    # Only the good one was stored, and a retry of the whole batch stores nothing new.
    assert http.get("/v1/interactions/ev-1").status_code == 200
    again = http.post("/v1/events", json={"events": [event(1)]}).json()
    assert again["results"][0]["status"] == "duplicate"


def test_all_good_batch_is_200_and_round_trips(http: httpx.Client) -> None:
    iid = "it-round-trip"
    body = {
        "session_id": "s",
        "input": {"raw": "email me: a.b@example.org"},
        "output": {"content": "ok"},
        "tool_calls": [{"tool_name": "shell", "parameters_raw": {"cmd": "ls /home/alice"}}],
    }
    events = [
        {
            "id": "fb-early",
            "type": "feedback",
            "timestamp": NOW.isoformat(),
            "body": {"interaction_id": iid, "implicit": {"accepted": True}},
        },
        {"id": iid, "type": "interaction", "timestamp": NOW.isoformat(), "body": body},
        {
            "id": "oc-1",
            "type": "outcome",
            "timestamp": NOW.isoformat(),
            "body": {"interaction_id": iid, "tests_pass": True},
        },
    ]
    r = http.post("/v1/events", json={"events": events})
    assert r.status_code == 200 and r.json()["counts"] == {"accepted": 3}
    got = http.get(f"/v1/interactions/{iid}").json()
    assert "a.b@example.org" not in got["input_raw"] and "[REDACTED:email]" in got["input_raw"]
    assert "alice" not in str(got["tool_usage"][0]["parameters_raw"])
    assert got["feedback"][0]["accepted"] is True and got["outcome"]["tests_pass"] is True


def test_convenience_endpoints(http: httpx.Client) -> None:
    r = http.post(
        "/v1/interactions",
        json={"id": "conv-1", "sessionId": "s", "input": {"raw": "q"}, "output": {"content": "a", "generationTime": 5}},
    )
    assert r.status_code == 201 and r.json() == {"id": "conv-1", "status": "accepted"}
    assert (
        http.post(
            "/v1/interactions",
            json={"id": "conv-1", "session_id": "s", "input": {"raw": "q"}, "output": {"content": "a"}},
        ).status_code
        == 200
    )
    assert http.post("/v1/feedback", json={"interaction_id": "conv-1", "explicit": {"rating": 5}}).status_code == 201
    assert http.post("/v1/tool-usage", json={"interaction_id": "conv-1", "tool_name": "grep"}).status_code == 201
    assert http.post("/v1/outcomes", json={"interaction_id": "conv-1", "code_compiles": True}).status_code == 201
    got = http.get("/v1/interactions/conv-1").json()
    assert got["generation_time_ms"] == 5 and got["feedback"][0]["rating"] == 5
    assert got["tool_usage"][0]["tool_name"] == "grep" and got["outcome"]["code_compiles"] is True
    bad = http.post("/v1/feedback", json={"interaction_id": "conv-1", "explicit": {"rating": 0}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "explicit.rating"
    missing = http.post("/v1/tool-usage", json={"tool_name": "grep"})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "interaction_id"


@pytest.mark.parametrize(
    "content, status, field",
    [
        (b"{not json", 400, "body"),
        (b'{"events": "nope"}', 422, "events"),
        (b"[1, 2]", 422, "events"),
    ],
)
def test_malformed_requests_get_clear_4xx(http: httpx.Client, content: bytes, status: int, field: str) -> None:
    r = http.post("/v1/events", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"]["field"] == field and r.json()["error"]["reason"]


def test_oversized_bodies_and_batches_are_413(http: httpx.Client, local_server) -> None:
    limit = local_server.cfg.collection.max_body_bytes
    r = http.post("/v1/events", content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    too_many = local_server.cfg.collection.max_events_per_batch + 1
    r = http.post("/v1/events", json={"events": [{}] * too_many})
    assert r.status_code == 413 and r.json()["error"]["field"] == "events"


def test_queries_health_and_openapi(http: httpx.Client) -> None:
    http.post("/v1/events", json={"events": [event(i) for i in range(5)]})
    listed = http.get("/v1/interactions", params={"session_id": "sess-1", "limit": 3}).json()
    assert listed["count"] == 3
    assert http.get("/v1/interactions", params={"min_quality": 2}).status_code == 422
    assert http.get("/v1/interactions/missing").status_code == 404
    stats = http.get("/v1/stats").json()
    assert stats["engine"] == "sqlite" and stats["interactions"] == 5
    assert http.get("/healthz").json()["status"] == "ok"
    assert http.get("/readyz").status_code == 200
    spec = http.get("/openapi.json").json()
    assert "/v1/events" in spec["paths"] and "/v1/interactions/{interaction_id}" in spec["paths"]


def test_api_keys_roles_rate_limits_and_audit(tmp_path, monkeypatch) -> None:
    from app.config import KaizenConfig
    from app.security.keys import KeyStore
    from tests.conftest import LocalServer

    monkeypatch.setenv("TEST_AGENT_KEY", "agent-secret")
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "k.db")},
            "security": {
                "api_keys": [{"key_env": "TEST_AGENT_KEY", "role": "agent"}],
                "rate_limit_per_s": 0.2,
                "rate_limit_burst": 3,
            },
        }
    )
    server = LocalServer(cfg).start()
    try:
        keys = KeyStore(server.service.store)
        _, operator = keys.create("dashboard", "operator", actor="test", rate_per_s=1000)
        _, admin = keys.create("security team", "admin", actor="test", rate_per_s=1000)
        with httpx.Client(base_url=server.url) as http:
            assert http.post("/v1/events", json={"events": []}).status_code == 401
            wrong = http.get("/v1/stats", headers={"authorization": "Bearer " + operator[:-2] + "xx"})
            assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "authorization"
            agent = {"authorization": "Bearer agent-secret"}
            assert http.post("/v1/events", json={"events": [event(1)]}, headers=agent).status_code == 200
            denied = http.get("/v1/stats", headers=agent)
            assert denied.status_code == 403 and "operator" in denied.json()["error"]["reason"]
            assert http.post("/v1/events", json={"events": []}, headers=agent).status_code == 200
            # The agent key's burst (3, the refused request counted) is spent: the next waits for the rate.
            limited = http.post("/v1/events", json={"events": []}, headers=agent)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            assert http.get("/v1/stats", headers={"x-api-key": operator}).status_code == 200
            assert http.get("/v1/interactions/ev-1", headers={"x-api-key": operator}).status_code == 200
            assert http.get("/v1/audit", headers={"x-api-key": operator}).status_code == 403
            audit = http.get("/v1/audit", headers={"x-api-key": admin}).json()["entries"]
            assert http.get("/healthz").status_code == 200
    finally:
        server.stop()
    actions = [a["action"] for a in audit]
    assert actions.count("auth.failure") == 4 and actions.count("key.create") == 2 and "data.read" in actions
    failures = [a for a in audit if a["action"] == "auth.failure"]
    assert {f["details"]["reason"] for f in failures} >= {"missing API key", "unknown or revoked API key"}
    assert all("agent-secret" not in str(a) and operator not in str(a) for a in audit)
    read = next(a for a in audit if a["action"] == "data.read")
    assert read["actor"].startswith("key:") and read["details"]["ids"] == ["ev-1"]


def test_exclusion_and_sampling(tmp_path) -> None:
    from app.config import KaizenConfig
    from tests.conftest import LocalServer

    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "k.db")},
            "collection": {"exclude_patterns": ["TOP-SECRET-PROJECT"], "capture_rate": 0.5},
        }
    )
    server = LocalServer(cfg).start()
    try:
        with httpx.Client(base_url=server.url) as http:
            secret = event(
                "x", body={"session_id": "s", "input": {"raw": "about TOP-SECRET-PROJECT"}, "output": {"content": "ok"}}
            )
            assert http.post("/v1/events", json={"events": [secret]}).json()["results"][0]["status"] == "excluded"
            statuses = []
            for i in range(40):
                body = {"session_id": f"session-{i}", "input": {"raw": "q"}, "output": {"content": "a"}}
                statuses.append(
                    http.post("/v1/events", json={"events": [event(f"s{i}", body=body)]}).json()["results"][0]["status"]
                )
            assert 5 < statuses.count("sampled_out") < 35 and statuses.count("accepted") > 5
            assert http.get("/v1/stats").json()["interactions"] == statuses.count("accepted")
    finally:
        server.stop()


def test_store_failure_is_503_and_nothing_is_acknowledged(local_server) -> None:
    with httpx.Client(base_url=local_server.url) as http:
        local_server.service.store.close()  # the database goes away under the server
        r = http.post("/v1/events", json={"events": [event("lost-1")]})
        assert r.status_code == 503 and "retry" in r.json()["error"]["reason"]
        assert http.get("/readyz").status_code == 503


def test_the_api_on_postgres(tmp_path, pg_dsn) -> None:
    from app.config import KaizenConfig
    from tests.conftest import LocalServer

    cfg = KaizenConfig.model_validate({"store": {"engine": "postgres", "postgres_dsn": pg_dsn}})
    server = LocalServer(cfg).start()
    try:
        with httpx.Client(base_url=server.url) as http:
            events = [event(i) for i in range(3)] + [event(9, type="nope")]
            r = http.post("/v1/events", json={"events": events})
            assert r.status_code == 207 and r.json()["counts"] == {"accepted": 3, "rejected": 1}
            assert http.post("/v1/events", json={"events": [event(0)]}).json()["counts"] == {"duplicate": 1}
            assert http.get("/v1/interactions/ev-2").json()["input_raw"] == "request 2"
            assert http.get("/v1/stats").json()["engine"] == "postgres"
    finally:
        server.stop()


def test_quality_assess_endpoint(http: httpx.Client) -> None:
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    r = http.post(
        "/v1/quality/assess", json={"prompt": "add(1, 2) -> 3. Write add.", "response": good, "generation_time_ms": 500}
    )
    assert r.status_code == 200
    body = r.json()
    assert 0.8 < body["overall"] <= 1 and "functional_correctness" in body["components"] and body["confidence"] > 0
    bad = http.post("/v1/quality/assess", json={"prompt": "x", "response": good, "bogus": 1})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "bogus"
    empty = http.post("/v1/quality/assess", json={"prompt": "x", "response": ""})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "response"


def test_review_queue_and_ratings(http: httpx.Client, local_server) -> None:
    from app.quality.service import QualityService

    events = [
        event(
            i,
            body={
                "session_id": "s",
                "input": {"raw": f"Write f{i} in Python"},
                "output": {"content": f"```python\ndef f{i}(x):\n    return x + {i}\n```"},
            },
        )
        for i in range(3)
    ]
    assert http.post("/v1/events", json={"events": events}).status_code == 200
    QualityService(local_server.service.store).score_pending()
    queue = http.get("/v1/review", params={"max_confidence": 1.0}).json()
    assert queue["count"] == 3 and queue["max_confidence"] == 1.0
    default = http.get("/v1/review").json()
    assert default["max_confidence"] == local_server.cfg.quality.review_confidence_below
    first = queue["interactions"][0]["id"]
    r = http.post(f"/v1/review/{first}", json={"rating": 4, "rater": "ana", "dimensions": {"code_quality": 5}})
    assert r.status_code == 201 and r.json()["rating"] == 0.75
    assert first not in {i["id"] for i in http.get("/v1/review", params={"max_confidence": 1.0}).json()["interactions"]}
    (stored,) = local_server.service.store.ratings(first)
    assert stored["rater"] == "ana" and stored["dimensions"] == {"code_quality": 1.0}
    # Bad ratings name the field.
    for body, field in [
        ({"rating": 6}, "rating"),
        ({"rating": 3, "dimensions": {"speed": 3}}, "dimensions.speed"),
        ({"rating": 3, "dimensions": {"efficiency": 0}}, "dimensions.efficiency"),
        ({}, "rating"),
    ]:
        bad = http.post(f"/v1/review/{first}", json=body)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.json()
    missing = http.post("/v1/review/nope", json={"rating": 3})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "interaction_id"


def test_streaming_assessment_over_http_and_websocket(http: httpx.Client, local_server) -> None:
    from websockets.sync.client import connect

    text = "Here:\n```typescript\nexport function add(a: number, b: number): number {\n  return a + b;\n}\n```\n"
    chunks = [text[i : i + 9] for i in range(0, len(text), 9)]
    r = http.post(
        "/v1/quality/stream",
        json={"prompt": "Add two numbers in TypeScript", "chunks": chunks, "context": {"technologies": ["typescript"]}},
    )
    assert r.status_code == 200
    windows = r.json()["windows"]
    window = local_server.cfg.quality.stream_window_chars
    assert len(windows) == len(text) // window + 1 and windows[-1]["final"] and windows[-1]["chars"] == len(text)
    assert windows[-1]["checks"]["syntax"] == 1.0 and windows[-1]["checks"]["language"] == 1.0
    bad = http.post("/v1/quality/stream", json={"prompt": "x", "chunks": "not a list"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "chunks"

    ws_url = local_server.url.replace("http://", "ws://") + "/v1/quality/stream"
    secret = "key = 'AKIAIOSFODNN7EXAMPLE'\n" * 3 + "x" * window
    with connect(ws_url) as ws:
        ws.send(json.dumps({"prompt": "Show the S3 client setup"}))
        got = []
        for i in range(0, len(secret), 50):
            ws.send(json.dumps({"chunk": secret[i : i + 50]}))
        ws.send(json.dumps({"done": True}))
        while True:
            message = json.loads(ws.recv(timeout=30))
            got.append(message)
            if message.get("final"):
                break
    assert [m["window"] for m in got] == list(range(1, len(got) + 1)) and len(got) == len(secret) // window + 1
    assert "secret:aws_key" in got[0]["flags"] and all(m["provisional"] <= 0.2 for m in got)
    with connect(ws_url) as ws:  # a bad first message is answered with the field, then closed
        ws.send(json.dumps({"chunk": "no prompt first"}))
        err = json.loads(ws.recv(timeout=10))
        assert err["error"]["field"] == "prompt"


@pytest.mark.parametrize(
    "real_time, async_processing, handed_off, awaited",
    [(True, True, True, False), (True, False, False, True), (False, True, False, False), (False, False, False, False)],
)
def test_committed_interactions_reach_the_scorer_as_configured(
    tmp_path, real_time: bool, async_processing: bool, handed_off: bool, awaited: bool
) -> None:
    """quality.real_time: hand committed interactions to the scorer at all; performance.async_processing:
    after the answer (fire and forget) or before it (the answer waits for the scores)."""
    import asyncio

    from app.config import KaizenConfig
    from app.serve.api import CollectorService

    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "k.db")},
            "privacy": {"hmac_key": "k"},
            "quality": {"real_time": real_time},
            "performance": {"async_processing": async_processing},
        }
    )
    fired: list[list[str]] = []
    scored: list[list[str]] = []

    async def score_now(ids: list[str]) -> None:
        await asyncio.sleep(0.05)  # the answer must wait for this
        scored.append(ids)

    service = CollectorService(cfg, on_committed=fired.append, score_now=score_now)
    results = asyncio.run(service.ingest([event(1), event(2)]))
    assert [r.status for r in results] == ["accepted", "accepted"]
    assert fired == ([["ev-1", "ev-2"]] if handed_off else [])
    assert scored == ([["ev-1", "ev-2"]] if awaited else [])
    service.store.close()
