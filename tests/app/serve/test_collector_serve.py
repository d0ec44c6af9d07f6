"""The collector through real Ray Serve on CPU: HTTP in, group commit, client end to end, and a
replica killed in the middle of a load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest

from app.client import KaizenClient, wait_until_ready
from app.config import KaizenConfig
from app.store.sqlite import SQLiteStore
from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kaizen(ray_session, tmp_path_factory):
    from ray import serve

    from app.serve.build import build_app

    db = tmp_path_factory.mktemp("serve") / "kaizen.db"
    port = free_port()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "serve-test"},
            "serve": {
                "port": port,
                "app_name": "kaizen-test",
                "collector": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"sweep_interval_s": 1.0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "generator": {"enabled": False},
            },  # tests/app/serve/test_generator_serve.py serves it
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="kaizen-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert wait_until_ready(url, timeout_s=60)
    store = SQLiteStore(db)
    yield url, store
    store.close()
    serve.shutdown()  # the next module starts Serve on its own port


def now() -> str:
    return datetime.now(UTC).isoformat()


def ev(i: str, session: str = "s") -> dict:
    return {
        "id": i,
        "type": "interaction",
        "timestamp": now(),
        "body": {"session_id": session, "input": {"raw": f"q {i}"}, "output": {"content": f"a {i}"}},
    }


def test_http_through_serve_good_and_bad(kaizen) -> None:
    url, store = kaizen
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/events", json={"events": [ev("serve-1"), {"id": "bad", "type": "x"}]})
        assert r.status_code == 207
        assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]
        # 2xx means committed: the row is in the database file the moment the answer arrives.
        assert store.get_interaction("serve-1") is not None
        assert http.get("/v1/interactions/serve-1").json()["input_raw"] == "q serve-1"
        assert http.post("/v1/events", content=b"{oops").status_code == 400
        assert http.get("/openapi.json").status_code == 200


def test_concurrent_requests_are_group_committed(kaizen) -> None:
    url, store = kaizen

    def post(k: int) -> int:
        with httpx.Client(base_url=url, timeout=30) as http:
            return http.post("/v1/events", json={"events": [ev(f"gc-{k}-{j}") for j in range(20)]}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, range(48)))
    assert codes == [200] * 48
    ids = [f"gc-{k}-{j}" for k in range(48) for j in range(20)]
    assert store.existing_ids(ids) == set(ids)


def test_client_survives_a_killed_replica(kaizen, tmp_path) -> None:
    import ray

    url, store = kaizen
    client = KaizenClient(
        url,
        batch_size=50,
        flush_interval_s=0.02,
        max_retries=8,
        backoff_base_s=0.1,
        backoff_max_s=1.0,
        probe_interval_s=0.5,
        spool_dir=tmp_path / "spool",
    )
    ids: list[str] = []
    done = threading.Event()

    def agent() -> None:
        k = 0
        while not done.is_set():
            ids.append(client.record_interaction(f"s{k % 10}", f"prompt {k}", f"answer {k}"))
            k += 1
            time.sleep(0.002)

    thread = threading.Thread(target=agent)
    thread.start()
    time.sleep(1.0)
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "Collector" in a["name"]
    ]
    assert replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    time.sleep(1.5)
    done.set()
    thread.join()
    assert client.flush(timeout=90), client.stats
    stored = store.existing_ids(ids)
    assert len(ids) > 100 and stored == set(ids)
    client.close()


def test_committed_interactions_are_scored_by_the_scorer(kaizen) -> None:
    url, store = kaizen
    body = {
        "session_id": "s",
        "input": {"raw": "Write add. add(1, 2) -> 3"},
        "output": {"content": "```python\ndef add(a, b):\n    return a + b\n```", "generation_time_ms": 400},
    }
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post(
            "/v1/events", json={"events": [{"id": "to-score", "type": "interaction", "timestamp": now(), "body": body}]}
        )
        assert r.status_code == 200
        deadline = time.monotonic() + 90  # the first scoring loads the embedding model
        while time.monotonic() < deadline:
            record = store.get_interaction("to-score")
            if record["quality_status"] == "scored":
                break
            time.sleep(0.5)
        assert record["quality_status"] == "scored" and record["quality_score"] > 0.5
        assessed = http.post("/v1/quality/assess", json={"prompt": "Write add", "response": body["output"]["content"]})
        assert assessed.status_code == 200 and "context_relevance" in assessed.json()["components"]


def test_pending_interactions_missed_by_the_hand_off_are_swept(kaizen) -> None:
    from app.ingest import IngestPipeline

    _url, store = kaizen
    # Written straight into the store, as if the scorer had been down when they were committed.
    pipeline = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "serve-test"}}))
    prepared = pipeline.prepare([ev(f"missed-{i}") for i in range(3)])
    store.write(prepared.to_commit)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(store.get_interaction(f"missed-{i}")["quality_status"] == "scored" for i in range(3)):
            break
        time.sleep(0.5)
    assert all(store.get_interaction(f"missed-{i}")["quality_status"] == "scored" for i in range(3))
