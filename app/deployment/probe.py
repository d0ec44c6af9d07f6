"""Whether an adapter is ready to take traffic: loaded on every Generator replica, and answering
through the real endpoint.

The deployer moves no traffic until both hold (:class:`ServingProbe`). Which adapters a replica
has loaded comes from the replicas' own heartbeats in the store
(:meth:`~app.deployment.state.DeploymentStore.replicas`); the smoke test is one short chat
completion sent the way an agent sends it (:class:`HttpProbe`), so it crosses the HTTP proxy, the
API-key check, the router and the multiplexed adapter loader.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from app.deployment.state import HEARTBEAT_S, DeploymentStore
from app.security.keys import KeyStore
from app.serve.headers import RECORD_HEADER
from app.store.base import InteractionStore

if TYPE_CHECKING:
    from app.config import KaizenConfig

__all__ = ["SMOKE_PROMPT", "SMOKE_SESSION", "HttpProbe", "ServingProbe", "loaded_everywhere", "smoke_test_key"]

SMOKE_PROMPT = "Reply with the word OK."
SMOKE_SESSION = "kaizen-deployer-smoke-test"
"""The session the smoke test's completion is recorded under (sent as ``X-Kaizen-Session``)."""


class ServingProbe(Protocol):
    """What the deployer asks before traffic moves to an adapter."""

    def loaded_everywhere(self, adapter_id: str) -> tuple[bool, str]:
        """Whether every live Generator replica has ``adapter_id`` loaded; and what was seen."""
        ...

    def smoke_test(self, adapter_id: str) -> tuple[bool, str]:
        """Whether ``adapter_id`` answers a completion; and what happened."""
        ...


def loaded_everywhere(deployments: DeploymentStore, adapter_id: str, max_age_s: float) -> tuple[bool, str]:
    """From the replicas' heartbeats of the last ``max_age_s``: True when there is at least one
    replica and each lists ``adapter_id`` as loaded."""
    replicas = deployments.replicas(max_age_s)
    if not replicas:
        return False, f"no Generator replica has reported its adapters in the last {max_age_s:g} s"
    missing = sorted(r for r, adapters in replicas.items() if adapter_id not in adapters)
    if missing:
        return False, f"{len(missing)} of {len(replicas)} replicas have not loaded it yet: {', '.join(missing)}"
    return True, f"loaded on all {len(replicas)} replicas"


def smoke_test_key(cfg: KaizenConfig) -> str | None:
    """The first API key named by environment variable that has a value (the smoke test is a chat
    completion, which any role may ask for); None when the config names none."""
    for entry in cfg.security.api_keys:
        key = os.environ.get(entry.key_env)
        if key:
            return key
    return None


class HttpProbe:
    """:class:`ServingProbe` of a running Kaizen: heartbeats from the store, the smoke test over
    HTTP.

    Args:
        base_url: where the Kaizen API answers (``http://host:port`` plus the route prefix).
        api_key: sent as a bearer token when the API requires keys (None: no key).
        store: the interaction store the Generator replicas heartbeat into.
        max_heartbeat_age_s: a replica not heard from for this long counts as gone.
        timeout_s: longest the smoke test's completion may take.
        verify: an SSL context trusting the endpoint's CA (``KaizenConfig.tls_verify``), or True for the system's.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        store: InteractionStore,
        *,
        max_heartbeat_age_s: float = 3 * HEARTBEAT_S,
        timeout_s: float = 60.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.keys = KeyStore(store)
        self.deployments = DeploymentStore(store)
        self.max_heartbeat_age_s = max_heartbeat_age_s
        self.timeout_s = timeout_s
        self.verify = verify

    @classmethod
    def for_config(cls, cfg: KaizenConfig, store: InteractionStore) -> HttpProbe:
        """The probe of the Kaizen that ``cfg`` describes (:meth:`KaizenConfig.api_url`,
        :func:`smoke_test_key`)."""
        return cls(cfg.api_url(), smoke_test_key(cfg), store, verify=cfg.tls_verify())

    def loaded_everywhere(self, adapter_id: str) -> tuple[bool, str]:
        return loaded_everywhere(self.deployments, adapter_id, self.max_heartbeat_age_s)

    def smoke_test(self, adapter_id: str) -> tuple[bool, str]:
        """POST a short chat completion naming ``adapter_id`` to ``/v1/chat/completions``; passes
        on a 200 whose first choice has non-empty content."""
        # Not recorded: a smoke test's answer is no interaction of a user's to learn from.
        headers = {"X-Kaizen-Session": SMOKE_SESSION, RECORD_HEADER: "false"}
        temporary = None
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self.keys.list(include_revoked=False):
            # The API takes the store's keys and none is named for the probe: an agent key for
            # this one test, revoked after it (both audited); the key is never written down.
            temporary, key = self.keys.create(f"smoke test of {adapter_id}", "agent", actor="deployer")
            headers["Authorization"] = f"Bearer {key}"
        try:
            return self._post(adapter_id, headers)
        finally:
            if temporary is not None:
                self.keys.revoke(temporary["id"], actor="deployer", reason="smoke test done")

    def _post(self, adapter_id: str, headers: dict[str, str]) -> tuple[bool, str]:
        body = {
            "model": adapter_id,
            "messages": [{"role": "user", "content": SMOKE_PROMPT}],
            "max_tokens": 16,
            "temperature": 0,
        }
        url = f"{self.base_url}/v1/chat/completions"
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=self.timeout_s, verify=self.verify)
        except httpx.HTTPError as exc:
            return False, f"POST {url} failed: {type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return False, f"POST {url} answered {response.status_code}: {response.text[:300]}"
        try:
            content = _content(response.json())
        except ValueError as exc:
            return False, f"POST {url} answered 200 with an unreadable body: {exc}"
        if not content.strip():
            return False, f"POST {url} answered 200 with empty content"
        return True, f"answered {len(content)} characters: {content[:80]!r}"


def _content(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"no choices[0].message.content ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, not text")
    return content
