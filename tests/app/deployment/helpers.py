"""What the deployment tests share: a store of either engine, measured evidence written through
the real ingestion path, a clock the tests move, and the serving probe's test double."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app.config import KaizenConfig
from app.deployment.probe import loaded_everywhere
from app.deployment.state import DeploymentStore
from app.ingest import IngestPipeline
from app.model.adapters import AdapterManifest
from app.registry import AdapterRegistry
from app.store import InteractionStore
from tests.conftest import free_port

BASE_MODEL = "tiny"
_PIPELINE = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "k"}}))


def make_cfg(strategy: str = "staged", **deploy: Any) -> KaizenConfig:
    """A config with the deploy settings the tests use (small samples, short windows)."""
    settings = {"min_interactions_per_arm": 20, "max_canary_minutes": 30, "watch_minutes": 10, "smoke_timeout_s": 60}
    settings.update(deploy)
    return KaizenConfig.model_validate(
        {
            "privacy": {"hmac_key": "k"},
            "model": {"base_model": BASE_MODEL, "deployment_strategy": strategy},
            "deploy": settings,
        }
    )


class Clock:
    """The deployer's clock: real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, minutes: float) -> None:
        self.offset += timedelta(minutes=minutes)


class ReplicaProbe:
    """The serving probe with the real replica check (the heartbeats in the store, which the test
    writes as a Generator replica would) and a smoke test whose outcome the test sets: a test
    double of the HTTP endpoint, which HttpProbe's own tests cover against a real HTTP server."""

    def __init__(self, store: InteractionStore) -> None:
        self.deployments = DeploymentStore(store)
        self.smoke_ok = True
        self.smoke_calls: list[str] = []

    def loaded_everywhere(self, adapter_id: str) -> tuple[bool, str]:
        return loaded_everywhere(self.deployments, adapter_id, max_age_s=60)

    def smoke_test(self, adapter_id: str) -> tuple[bool, str]:
        self.smoke_calls.append(adapter_id)
        if self.smoke_ok:
            return True, "answered 2 characters: 'OK'"
        return False, "answered 500: adapter weights missing"

    def replica_loads(self, *adapter_ids: str, replica: str = "replica-1") -> None:
        """A Generator replica's heartbeat: it has these adapters loaded."""
        self.deployments.heartbeat(replica, list(adapter_ids))


def register(store: InteractionStore, *adapter_ids: str) -> AdapterRegistry:
    registry = AdapterRegistry(store)
    for day, adapter_id in enumerate(adapter_ids, start=1):
        manifest = AdapterManifest(
            adapter_id=adapter_id,
            base_model=BASE_MODEL,
            created_at=datetime(2025, 1, day, 12, tzinfo=UTC),
            peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
            files={"adapter_config.json": "0" * 64, "adapter_model.safetensors": "1" * 64},
        )
        registry.register(manifest, f"/adapters/{adapter_id}", actor="learn-job")
    return registry


def make_champion(store: InteractionStore, adapter_id: str) -> None:
    registry = AdapterRegistry(store)
    registry.set_alias("champion", adapter_id, "test", "the champion before the test")
    registry.set_status(adapter_id, "champion", "test", "the champion before the test")


def validate(store: InteractionStore, adapter_id: str, verdict: str = "production") -> dict[str, Any]:
    AdapterRegistry(store).set_status(adapter_id, "validated", "validate-job", f"verdict {verdict}")
    return DeploymentStore(store).record_validation(
        adapter_id, "champion", verdict, {"accuracy_change": 0.01}, actor="validate-job"
    )


def serve(
    store: InteractionStore,
    n: int,
    *,
    model: str,
    arm: str | None = None,
    deployment_id: str | None = None,
    quality: float | None = 0.8,
    sd: float = 0.05,
    latency_ms: float = 100.0,
    feedback: Mapping[str, Any] | None = None,
    at: datetime | None = None,
    seed: int = 0,
) -> list[str]:
    """Record ``n`` completions answered by ``model`` (as the Generator records them: through the
    ingestion pipeline, with the serving arm and deployment), then score them as the scorer does:
    quality drawn around ``quality`` with spread ``sd`` (None: left unscored)."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        body: dict[str, Any] = {
            "session_id": f"session-{seed}-{i}",
            "input": {"raw": f"write function number {i}"},
            "output": {
                "content": f"def f{i}():\n    return {i}\n",
                "generation_time_ms": latency_ms * rng.uniform(0.9, 1.1),
            },
            "metadata": {"model_version": model, "serving_arm": arm, "deployment_id": deployment_id},
        }
        if feedback is not None:
            body["feedback"] = dict(feedback)
        events.append(
            {
                "id": f"it-{uuid.uuid4().hex[:12]}",
                "type": "interaction",
                "timestamp": (at or datetime.now(UTC)).isoformat(),
                "body": body,
            }
        )
    prepared = _PIPELINE.prepare(events)
    results = prepared.finish(store.write(prepared.to_commit))
    assert all(r.status == "accepted" for r in results), results
    if quality is not None:
        for event in events:
            store.set_quality(event["id"], min(1.0, max(0.0, rng.gauss(quality, sd))), 0.9)
    return [e["id"] for e in events]


def fail(
    store: InteractionStore, n: int, *, adapter_id: str | None, arm: str | None, deployment_id: str | None
) -> None:
    """Record ``n`` requests the Generator could not answer."""
    deployments = DeploymentStore(store)
    for _ in range(n):
        deployments.record_failure(
            model="champion",
            adapter_id=adapter_id,
            serving_arm=arm,
            deployment_id=deployment_id,
            status=500,
            reason="CUDA error: device-side assert triggered",
        )


class Endpoint:
    """``POST /v1/chat/completions`` on a real socket, answering what the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"choices": [{"message": {"role": "assistant", "content": "OK"}}]}
        self.requests: list[tuple[dict[str, str], Any]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                endpoint.requests.append(
                    ({k.lower(): v for k, v in self.headers.items()}, json.loads(self.rfile.read(length)))
                )
                payload = endpoint.body if isinstance(endpoint.body, bytes) else json.dumps(endpoint.body).encode()
                self.send_response(endpoint.status if self.path == "/v1/chat/completions" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
