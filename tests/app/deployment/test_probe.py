"""The serving probe: which replicas have an adapter loaded (from their heartbeats in the store),
and the smoke test's HTTP request against a real local HTTP server standing in for Kaizen's
endpoint (the end-to-end smoke test through Ray Serve belongs to the Serve integration tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from app.config import KaizenConfig
from app.deployment.probe import SMOKE_SESSION, HttpProbe, smoke_test_key
from app.deployment.state import DeploymentStore
from app.store import InteractionStore
from tests.app.deployment.helpers import Endpoint
from tests.conftest import free_port


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    yield server
    server.close()


def test_loaded_everywhere_reads_the_replicas_heartbeats(store: InteractionStore) -> None:
    probe = HttpProbe("http://127.0.0.1:9", None, store)
    ok, detail = probe.loaded_everywhere("adp-new")
    assert not ok and "no Generator replica" in detail
    deployments = DeploymentStore(store)
    deployments.heartbeat("replica-a", ["adp-old", "adp-new"])
    deployments.heartbeat("replica-b", ["adp-old"])
    ok, detail = probe.loaded_everywhere("adp-new")
    assert not ok and "1 of 2 replicas" in detail and "replica-b" in detail
    deployments.heartbeat("replica-b", ["adp-new"])
    assert probe.loaded_everywhere("adp-new") == (True, "loaded on all 2 replicas")
    deployments.forget_replica("replica-b")
    assert probe.loaded_everywhere("adp-new") == (True, "loaded on all 1 replicas")
    # A replica that has not beaten within the age limit is taken as gone.
    quiet = HttpProbe("http://127.0.0.1:9", None, store, max_heartbeat_age_s=0.0).loaded_everywhere("adp-new")
    assert quiet == (False, "no Generator replica has reported its adapters in the last 0 s")


def test_smoke_test_posts_a_completion_for_the_adapter(endpoint: Endpoint, store: InteractionStore) -> None:
    probe = HttpProbe(endpoint.url + "/", "secret-key", store)
    ok, detail = probe.smoke_test("adp-new")
    assert ok and "'OK'" in detail
    headers, body = endpoint.requests[-1]
    assert body["model"] == "adp-new" and body["messages"][0]["role"] == "user"
    assert headers["authorization"] == "Bearer secret-key" and headers["x-kaizen-session"] == SMOKE_SESSION
    assert headers["x-kaizen-record"] == "false"  # a smoke test is not learned from
    assert "authorization" not in _headers_of(HttpProbe(endpoint.url, None, store), endpoint)


def _headers_of(probe: HttpProbe, endpoint: Endpoint) -> dict[str, str]:
    probe.smoke_test("adp-new")
    return endpoint.requests[-1][0]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, {"error": {"message": "adapter weights missing"}}, "answered 500: "),
        (200, {"choices": [{"message": {"content": "  "}}]}, "empty content"),
        (200, {"choices": []}, "unreadable body"),
        (200, b"not json", "unreadable body"),
    ],
)
def test_smoke_test_fails_on_a_bad_answer(
    endpoint: Endpoint, store: InteractionStore, status: int, body: Any, expected: str
) -> None:
    endpoint.status, endpoint.body = status, body
    ok, detail = HttpProbe(endpoint.url, None, store).smoke_test("adp-new")
    assert not ok and expected in detail


def test_smoke_test_fails_when_nothing_answers(store: InteractionStore) -> None:
    ok, detail = HttpProbe(f"http://127.0.0.1:{free_port()}", None, store, timeout_s=2).smoke_test("adp-new")
    assert not ok and "ConnectError" in detail


def test_base_url_and_key_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = KaizenConfig.model_validate(
        {
            "serve": {"host": "0.0.0.0", "port": 8123, "route_prefix": "/kaizen/"},
            "security": {"api_keys": [{"key_env": "KAIZEN_TEST_UNSET_KEY"}, {"key_env": "KAIZEN_TEST_KEY"}]},
        }
    )
    assert cfg.api_url() == "http://127.0.0.1:8123/kaizen"
    assert smoke_test_key(cfg) is None
    monkeypatch.setenv("KAIZEN_TEST_KEY", "k-123")
    assert smoke_test_key(cfg) == "k-123"
