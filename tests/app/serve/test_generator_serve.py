"""The generator through Ray Serve and real HTTP, spoken to with the official ``openai`` client:
the base model, an adapter by id and by alias, streaming, the model list, bad requests, each
completion recorded as an interaction, and a new adapter registered under load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest

from app.client import wait_until_ready
from app.config import KaizenConfig
from app.model.adapters import AdapterStore
from app.registry import AdapterRegistry
from app.store.sqlite import SQLiteStore
from tests.conftest import free_port, train_answer_adapter, wait_for

pytestmark = pytest.mark.integration

ANSWER = "The answer is 42."
PROMPTS = ("hi", "What is 2+2?")


@pytest.fixture(scope="module")
def kaizen(ray_session, model_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from app.serve.build import build_app

    adapters = AdapterStore(model_root)
    manifest = train_answer_adapter(model_root, adapters, "answer-42", ANSWER, PROMPTS)
    db = tmp_path_factory.mktemp("gen") / "kaizen.db"
    store = SQLiteStore(db)
    store.migrate()
    registry = AdapterRegistry(store)
    registry.register(manifest, adapters.uri("answer-42"), actor="test")
    registry.set_alias("champion", "answer-42", actor="test", reason="the only adapter")

    serve.shutdown()  # another module's Serve would keep its own HTTP port
    port = free_port()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "gen-test"},
            "model": {"base_model": "tiny", "storage_root": str(model_root)},
            "serve": {
                "port": port,
                "app_name": "kaizen-gen-test",
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"enabled": False},
                "generator": {"num_cpus": 1, "max_adapters": 2, "default_max_tokens": 16},
            },
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="kaizen-gen-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert wait_until_ready(url, timeout_s=120)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, store, registry, adapters
    store.close()
    serve.shutdown()


def _ask(client: openai.OpenAI, model: str, prompt: str = "hi", max_tokens: int = 12, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens, **kw
    )


def test_base_adapter_and_alias_answer_through_the_openai_client(kaizen) -> None:
    client, store, _, _ = kaizen
    base = _ask(client, "tiny", presence_penalty=2.0)
    assert base.object == "chat.completion" and base.model == "tiny"
    assert (
        base.usage.completion_tokens > 0
        and base.usage.total_tokens == base.usage.prompt_tokens + base.usage.completion_tokens
    )
    by_id = _ask(client, "answer-42")
    by_alias = _ask(client, "champion")
    assert by_id.choices[0].message.content == by_alias.choices[0].message.content == ANSWER
    assert by_id.choices[0].finish_reason == "stop"
    assert base.choices[0].message.content != ANSWER

    # Each completion is recorded as an interaction, its id the completion's, after the reply.
    deadline = time.time() + 30
    while time.time() < deadline and store.get_interaction(by_alias.id) is None:
        time.sleep(0.2)
    recorded = store.get_interaction(by_alias.id)
    assert recorded is not None and recorded["model_version"] == "answer-42"
    assert recorded["output_content"] == ANSWER and recorded["generation_time_ms"] > 0
    assert recorded["token_count"] == by_alias.usage.completion_tokens


def test_streaming_joins_into_the_plain_answer(kaizen) -> None:
    client, _, _, _ = kaizen
    plain = _ask(client, "tiny", "def fib(n):", presence_penalty=2.0).choices[0].message.content
    stream = _ask(
        client, "tiny", "def fib(n):", presence_penalty=2.0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_models_lists_base_adapters_and_aliases(kaizen) -> None:
    client, _, _, _ = kaizen
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "answer-42", "champion"} <= ids


def test_bad_requests_get_clear_4xx(kaizen) -> None:
    client, _, _, _ = kaizen
    with pytest.raises(openai.NotFoundError) as unknown:
        _ask(client, "no-such-model")
    assert unknown.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as n:
        _ask(client, "tiny", n=2)
    assert n.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as temperature:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert temperature.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10**7)
    assert too_long.value.body["param"] == "max_tokens"


def test_registering_and_loading_an_adapter_under_load_fails_nothing(kaizen, model_root: Path) -> None:
    client, _, registry, adapters = kaizen
    failures: list[BaseException] = []
    answers: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answers.append(_ask(client, "champion", max_tokens=8).choices[0].message.content)
            except BaseException as exc:  # any failure counts
                failures.append(exc)
                return

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    manifest = train_answer_adapter(model_root, adapters, "answer-7", "Seven.", PROMPTS)
    registry.register(manifest, adapters.uri("answer-7"), actor="test")
    assert _ask(client, "answer-7").choices[0].message.content == "Seven."
    registry.set_alias("challenger", "answer-7", actor="test", reason="canary")
    assert _ask(client, "challenger").choices[0].message.content == "Seven."
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join(timeout=60)
    assert failures == [] and len(answers) > 0 and set(answers) == {ANSWER}


def _recorded(store, completion_id: str, timeout_s: float = 30.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        row = store.get_interaction(completion_id)
        if row is not None:
            return row
        time.sleep(0.2)
    raise AssertionError(f"{completion_id} was not recorded")


def test_a_canary_answers_its_sticky_share_of_champion_sessions_and_is_recorded_by_arm(
    kaizen, model_root: Path
) -> None:
    from app.deployment.state import DeploymentStore

    client, store, registry, adapters = kaizen
    if registry.get("answer-7") is None:
        manifest = train_answer_adapter(model_root, adapters, "answer-7", "Seven.", PROMPTS)
        registry.register(manifest, adapters.uri("answer-7"), actor="test")
    deployments = DeploymentStore(store)
    deployment = deployments.create("answer-7", "staged", "preloading", actor="test", reason="canary test")
    # Every replica preloads the active deployment's adapter and says so.
    deadline = time.time() + 60
    while time.time() < deadline and not any("answer-7" in a for a in deployments.replicas().values()):
        time.sleep(0.5)
    assert deployments.replicas() and all("answer-7" in a for a in deployments.replicas().values())

    registry.set_alias("challenger", "answer-7", actor="test", reason="canary")
    deployment = deployments.transition(
        deployment, "canary", actor="test", decision="canary", reason="smoke test passed", share=0.5
    )
    try:
        arms: dict[str, set[str]] = {}
        for i in range(16):
            for _ in range(2):  # the second request of a session lands on the same arm
                got = client.chat.completions.create(
                    model="champion",
                    messages=[{"role": "user", "content": "hi"}],
                    temperature=0,
                    max_tokens=8,
                    extra_headers={"X-Kaizen-Session": f"session-{i}"},
                )
                arms.setdefault(f"session-{i}", set()).add(got.choices[0].message.content)
                row = _recorded(store, got.id)
                expected = (
                    ("challenger", "answer-7")
                    if got.choices[0].message.content == "Seven."
                    else (
                        "champion",
                        "answer-42",
                    )
                )
                assert (row["serving_arm"], row["model_version"]) == expected
                assert row["deployment_id"] == deployment.id
        assert all(len(a) == 1 for a in arms.values())  # sticky
        answers = {next(iter(a)) for a in arms.values()}
        assert answers == {ANSWER, "Seven."}  # both arms served some of the 16 sessions
        # A request that names an adapter is never split, and records no arm.
        named = _ask(client, "answer-42", max_tokens=8)
        assert named.choices[0].message.content == ANSWER
        assert _recorded(store, named.id)["serving_arm"] is None
    finally:
        deployments.transition(
            deployments.get(deployment.id), "cancelled", actor="test", decision="cancel", reason="test over", share=0
        )
        registry.set_alias("challenger", None, actor="test", reason="test over")


def test_a_registered_adapter_that_will_not_load_fails_as_the_server_and_is_counted(
    kaizen, model_root: Path, tmp_path: Path
) -> None:
    from app.deployment.state import DeploymentStore

    client, store, registry, adapters = kaizen
    manifest = train_answer_adapter(model_root, adapters, "answer-broken", "Nine.", PROMPTS)
    registry.register(manifest, adapters.uri("answer-broken"), actor="test")
    weights = next(adapters.local_path("answer-broken").glob("*.safetensors"))
    weights.write_bytes(b"not a tensor file")
    with pytest.raises(openai.APIStatusError) as failed:
        _ask(client, "answer-broken", max_tokens=4)
    assert failed.value.status_code == 503 and "Traceback" not in str(failed.value.body)
    deadline = time.time() + 30
    while time.time() < deadline and not DeploymentStore(store).failures(adapter_id="answer-broken"):
        time.sleep(0.2)
    (row,) = DeploymentStore(store).failures(adapter_id="answer-broken")
    assert row["status"] == 503 and row["model"] == "answer-broken" and row["serving_arm"] is None


def test_a_replica_shut_down_takes_itself_off_the_replica_list(kaizen) -> None:
    """Last in the module (it deletes the app): a Generator replica shut down gracefully leaves the
    list of replicas the deployer reads at once, instead of after its heartbeat ages out."""
    from ray import serve

    from app.deployment.state import DeploymentStore

    _, store, _, _ = kaizen
    deployments = DeploymentStore(store)
    wait_for("the replica's heartbeat", lambda: len(deployments.replicas()) == 1)
    serve.delete("kaizen-gen-test")
    assert deployments.replicas() == {}
