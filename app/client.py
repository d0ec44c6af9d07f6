"""``KaizenClient``: the agent-side recorder. ``record_*`` only enqueues and returns at once.

A background thread sends batches to ``POST /v1/events``; it retries with exponential backoff and
full jitter, spools batches to local JSONL files while the server cannot be reached and replays
them once it can, and records per-event rejections in ``rejected.jsonl`` beside the spool. Event
ids make every resend idempotent, so replaying a batch the server already committed is harmless.
Recording never raises into the agent's code, ``flush(timeout)`` returns by its deadline, and the
client flushes (then spools what is left) at interpreter exit. Each ``record_*`` call is timed
against a budget (``performance.max_collection_overhead_ms`` through :meth:`KaizenClient.from_config`):
calls over it are counted in ``stats["over_budget"]`` and logged.

Example::

    client = KaizenClient("http://127.0.0.1:8000")  # or KaizenClient.from_config(url, load_config(...))
    iid = client.record_interaction("session-1", "Reverse a list in Python", "Use reversed(xs)")
    client.record_feedback(iid, rating=5, accepted=True)
    client.flush(timeout=2.0)
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import random
import ssl
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from app.config import KaizenConfig

__all__ = ["KaizenClient", "wait_until_ready"]

log = logging.getLogger("kaizen.client")
# 404: the Serve proxy answers it while the app is not (yet) deployed; /v1/events always exists.
_RETRYABLE_STATUS = {404, 408, 425, 429, 500, 502, 503, 504}
_OVER_BUDGET_LOG_EVERY_S = 60.0  # a slow agent machine must not flood its own log


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def wait_until_ready(base_url: str, timeout_s: float = 120.0, verify: ssl.SSLContext | bool = True) -> bool:
    """Poll ``GET /readyz`` until the server and its store answer, or ``timeout_s`` passes
    (``verify``: an HTTPS endpoint's CA bundle, as httpx takes it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url.rstrip('/')}/readyz", timeout=2.0, verify=verify).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _never_raises(method: Callable[..., str | None]) -> Callable[..., str | None]:
    """Recording must never break the agent: an error is counted in ``stats`` and None returned.
    The call is timed against the client's overhead budget."""

    @functools.wraps(method)
    def wrapper(self: KaizenClient, *args: Any, **kwargs: Any) -> str | None:
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.stats["errors"] += 1
            return None
        finally:
            self._check_overhead(time.perf_counter() - started)

    return wrapper


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _put_nonempty(body: dict[str, Any], **sections: Any) -> None:
    """Add the sections that carry something (the server rejects nothing for absent ones)."""
    body.update({k: v for k, v in sections.items() if v})


class KaizenClient:
    """Non-blocking, batched recorder for a Kaizen server (see the module docstring).

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8000``.
        api_key: Sent as ``Authorization: Bearer``; None when the server needs none.
        batch_size: Most events per request.
        flush_interval_s: Longest an event waits in memory before its batch is sent.
        timeout_s: HTTP timeout of one request.
        max_retries: Tries of one batch before it is spooled to disk.
        backoff_base_s, backoff_max_s: Exponential backoff with full jitter between tries.
        probe_interval_s: While the server is down, how often a spooled batch is tried again.
        spool_dir: Where batches wait while the server is down (default: a per-user temp folder).
        max_queue: Events held in memory; beyond it batches go straight to the spool.
        exit_timeout_s: How long the interpreter-exit flush may take.
        on_delivered: Called on the sender thread with each batch the server answered and its
            per-event results (for delivery acknowledgements and metrics); must be quick.
        max_overhead_ms: Budget of one ``record_*`` call; calls over it are counted in
            ``stats["over_budget"]`` and logged (at most once a minute). None: no budget.
        verify: An SSL context trusting an HTTPS server's CA (a self-signed certificate is its own), or True for
            the system's.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        batch_size: int = 200,
        flush_interval_s: float = 0.05,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        probe_interval_s: float = 1.0,
        spool_dir: str | os.PathLike[str] | None = None,
        max_queue: int = 100_000,
        exit_timeout_s: float = 5.0,
        on_delivered: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None] | None = None,
        max_overhead_ms: float | None = None,
        verify: ssl.SSLContext | bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size: must be at least 1")
        self.max_overhead_ms = max_overhead_ms
        self._over_budget_logged_at = -_OVER_BUDGET_LOG_EVERY_S
        self.base_url = base_url.rstrip("/")
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_retries = max(0, max_retries)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.probe_interval_s = probe_interval_s
        self.max_queue = max_queue
        self.exit_timeout_s = exit_timeout_s
        self.on_delivered = on_delivered
        self.spool_dir = Path(spool_dir or Path(tempfile.gettempdir()) / f"kaizen-spool-{os.getuid()}")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, verify=verify)
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._current: list[dict[str, Any]] | None = None
        self._down_until = 0.0  # while the server is down: next time a send is tried
        self.stats: dict[str, int] = {
            "recorded": 0,
            "sent": 0,
            "accepted": 0,
            "duplicate": 0,
            "rejected": 0,
            "excluded": 0,
            "spooled": 0,
            "replayed": 0,
            "retries": 0,
            "errors": 0,
            "over_budget": 0,
        }
        self._reclaim_orphans()
        self._thread = threading.Thread(target=self._run, name="kaizen-client-sender", daemon=True)
        self._thread.start()
        # A weak reference, so an unused client can still be garbage-collected.
        ref = weakref.ref(self)
        atexit.register(lambda: (c := ref()) is not None and c.close(c.exit_timeout_s))

    @classmethod
    def from_config(cls, base_url: str, cfg: KaizenConfig, api_key: str | None = None, **options: Any) -> KaizenClient:
        """A client with the config's ``performance.batch_size`` (events per POST) and
        ``performance.max_collection_overhead_ms`` (the budget of one ``record_*`` call); ``options``
        are the other constructor arguments, and win over the config."""
        options.setdefault("batch_size", cfg.performance.batch_size)
        options.setdefault("max_overhead_ms", cfg.performance.max_collection_overhead_ms)
        options.setdefault("verify", cfg.tls_verify())
        return cls(base_url, api_key, **options)

    # --- recording (the agent's hot path) --------------------------------------------------------

    def _check_overhead(self, elapsed_s: float) -> None:
        """Count (and now and then log) a ``record_*`` call that took longer than its budget."""
        if self.max_overhead_ms is None or elapsed_s * 1000.0 <= self.max_overhead_ms:
            return
        self.stats["over_budget"] += 1
        now = time.monotonic()
        if now - self._over_budget_logged_at >= _OVER_BUDGET_LOG_EVERY_S:
            self._over_budget_logged_at = now
            log.warning(
                "kaizen client: recording took %.2f ms, over its %g ms budget "
                "(performance.max_collection_overhead_ms); %d calls over it so far",
                elapsed_s * 1000.0,
                self.max_overhead_ms,
                self.stats["over_budget"],
            )

    @_never_raises
    def record_event(
        self, type: str, body: dict[str, Any], *, id: str | None = None, timestamp: str | None = None
    ) -> str | None:
        """Enqueue one event envelope; returns its id (None only if recording itself failed)."""
        return self._enqueue(type, body, id, timestamp)

    def _enqueue(self, type: str, body: dict[str, Any], id: str | None, timestamp: str | None) -> str:
        """What every ``record_*`` ends with (timed once, by the public method that called it)."""
        event_id = id or uuid.uuid4().hex
        self._queue.append({"id": event_id, "type": type, "timestamp": timestamp or _now_iso(), "body": body})
        self.stats["recorded"] += 1
        if len(self._queue) >= self.batch_size:
            self._wake.set()
        return event_id

    @_never_raises
    def record_interaction(
        self,
        session_id: str,
        prompt: str,
        response: str,
        *,
        id: str | None = None,
        timestamp: str | None = None,
        input_type: str = "prompt",
        intent: str | None = None,
        complexity: str | None = None,
        processed_prompt: str | None = None,
        output_format: str = "markdown",
        generation_time_ms: float | None = None,
        token_count: int | None = None,
        streaming: bool = False,
        metadata: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        feedback: dict[str, Any] | None = None,
        outcome: dict[str, Any] | None = None,
        user_id: str | None = None,
        sequence_number: int = 0,
    ) -> str | None:
        """Record a prompt and its response (nested context, tool calls, feedback, outcome optional).

        Returns:
            The interaction id, to attach feedback, tool usage and outcomes to later.
        """
        body: dict[str, Any] = {
            "session_id": session_id,
            "sequence_number": sequence_number,
            "input": _drop_none(
                {
                    "raw": prompt,
                    "processed": processed_prompt,
                    "type": input_type,
                    "intent": intent,
                    "complexity": complexity,
                }
            ),
            "output": _drop_none(
                {
                    "content": response,
                    "format": output_format,
                    "generation_time_ms": generation_time_ms,
                    "token_count": token_count,
                    "streaming": streaming,
                }
            ),
        }
        if user_id is not None:
            body["user_id"] = user_id
        _put_nonempty(
            body, metadata=metadata, context=context, tool_calls=tool_calls, feedback=feedback, outcome=outcome
        )
        return self._enqueue("interaction", body, id, timestamp)

    @_never_raises
    def record_feedback(
        self,
        interaction_id: str,
        *,
        rating: int | None = None,
        thumbs: str | None = None,
        comment: str | None = None,
        correction: str | None = None,
        accepted: bool | None = None,
        modified: bool | None = None,
        abandoned: bool | None = None,
        time_to_acceptance_s: float | None = None,
        time_to_first_use_s: float | None = None,
        usage_time_s: float | None = None,
        return_visits: int | None = None,
        copy_events: int | None = None,
        id: str | None = None,
        timestamp: str | None = None,
    ) -> str | None:
        """Record what the user did with an answer (before or after its interaction arrives)."""
        body: dict[str, Any] = {"interaction_id": interaction_id}
        explicit = _drop_none({"rating": rating, "thumbs": thumbs, "comment": comment, "correction": correction})
        implicit = _drop_none(
            {
                "accepted": accepted,
                "modified": modified,
                "abandoned": abandoned,
                "time_to_acceptance_s": time_to_acceptance_s,
            }
        )
        temporal = _drop_none(
            {
                "time_to_first_use_s": time_to_first_use_s,
                "usage_time_s": usage_time_s,
                "return_visits": return_visits,
                "copy_events": copy_events,
            }
        )
        _put_nonempty(body, explicit=explicit, implicit=implicit, temporal=temporal)
        return self._enqueue("feedback", body, id, timestamp)

    @_never_raises
    def record_tool_usage(
        self,
        interaction_id: str,
        tool_name: str,
        *,
        parameters: dict[str, Any] | None = None,
        invocation_order: int = 0,
        id: str | None = None,
        timestamp: str | None = None,
        **fields: Any,
    ) -> str | None:
        """Record one tool invocation; ``fields`` are the other :class:`app.schemas.ToolUsage` fields
        (start_time, end_time, duration_ms, success, retry_count, output, error, exit_code, ...)."""
        body = {
            "interaction_id": interaction_id,
            "tool_name": tool_name,
            "invocation_order": invocation_order,
            "parameters_raw": parameters or {},
            **_drop_none(fields),
        }
        return self._enqueue("tool_usage", body, id, timestamp)

    @_never_raises
    def record_outcome(self, interaction_id: str, *, id: str | None = None, **metrics: bool | None) -> str | None:
        """Record outcome metrics (code_compiles, tests_pass, lint_passes, type_check_passes,
        deployment_success, no_runtime_errors)."""
        return self._enqueue("outcome", {"interaction_id": interaction_id, **_drop_none(metrics)}, id, None)

    # --- flushing ------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events in memory not yet answered by the server."""
        return len(self._queue) + self._in_flight

    def spooled_events(self) -> int:
        """Events waiting in this client's spool files."""
        total = 0
        for path in self._spool_files(include_claimed=True):
            try:
                with open(path, "rb") as f:
                    total += sum(1 for _ in f)
            except OSError:
                continue
        return total

    def flush(self, timeout: float = 5.0) -> bool:
        """Send what is queued (and replay the spool) until done or ``timeout`` seconds pass.

        Returns:
            True when nothing is left in memory or in the spool; False at the deadline otherwise.
            Never raises, never waits past the deadline by more than one send attempt's check.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while True:
                if self.pending == 0 and self._idle.is_set() and not self._spool_files(include_claimed=True):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._wake.set()
                time.sleep(min(0.01, remaining))
        except Exception:
            return False

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, stop the sender, and spool whatever is still in memory. Idempotent."""
        if self._stop.is_set():
            return True
        ok = self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(0.1, timeout))
        leftover = []
        current = self._current
        if self._thread.is_alive() and current:
            # A send still in flight may never finish before exit: keep a copy (a resend is idempotent).
            leftover.extend(current)
        while self._queue:
            leftover.append(self._queue.popleft())
        if leftover:
            self._spool(leftover)
        try:
            self._http.close()
        except Exception:
            pass
        return ok and not leftover

    def __enter__(self) -> KaizenClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the sender thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self._drain()
            except Exception as exc:  # the sender must survive anything
                self.stats["errors"] += 1
                log.exception("kaizen client sender error: %s", exc)

    def _drain(self) -> None:
        while self._queue and not self._stop.is_set():
            batch = []
            with self._lock:
                self._idle.clear()  # before popping, so flush() never sees an empty, idle client early
                while self._queue and len(batch) < self.batch_size:
                    batch.append(self._queue.popleft())
                self._in_flight = len(batch)
                self._current = batch
            try:
                down = time.monotonic() < self._down_until or len(self._queue) > self.max_queue
                if down or not self._send_with_retries(batch):
                    self._spool(batch)
            finally:
                self._current = None
                self._in_flight = 0
                self._idle.set()
        # Replay the spool while the server is up and new events are not waiting behind it.
        budget = time.monotonic() + 0.5
        while (
            self._down_until <= time.monotonic() < budget
            and len(self._queue) < self.batch_size
            and not self._stop.is_set()
            and self._replay_one()
        ):
            pass

    def _send_with_retries(self, batch: list[dict[str, Any]]) -> bool:
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
                if self._stop.wait(random.uniform(0, cap)):
                    return False
            outcome = self._send(batch)
            if outcome == "ok":
                self._down_until = 0.0
                return True
            if outcome == "fatal":
                return False
        self._down_until = time.monotonic() + self.probe_interval_s
        return False

    def _send(self, batch: list[dict[str, Any]]) -> str:
        """One POST; 'ok' (answered per event), 'retry', or 'fatal' (spool and wait)."""
        try:
            resp = self._http.post(
                "/v1/events", content=json.dumps({"events": batch}, separators=(",", ":"), default=str)
            )
        except httpx.HTTPError as exc:
            log.debug("kaizen server unreachable: %s", exc)
            return "retry"
        if resp.status_code in (200, 207):
            self._account(batch, resp.json().get("results", []))
            return "ok"
        if resp.status_code == 413 and len(batch) > 1:
            half = len(batch) // 2
            a, b = self._send(batch[:half]), self._send(batch[half:])
            return "ok" if a == b == "ok" else ("retry" if "retry" in (a, b) else "fatal")
        if resp.status_code in _RETRYABLE_STATUS:
            return "retry"
        # 401/403 (a key problem an operator can fix) and other 4xx: keep the batch, stop hammering.
        log.error("kaizen server refused a batch: HTTP %s %s", resp.status_code, resp.text[:500])
        self._down_until = time.monotonic() + max(self.probe_interval_s, 5.0)
        return "fatal"

    def _account(self, batch: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
        self.stats["sent"] += len(batch)
        rejected = []
        for event, result in zip(batch, results):
            status = result.get("status")
            if status in self.stats:
                self.stats[status] += 1
            elif status == "sampled_out":
                self.stats["excluded"] += 1
            if status == "rejected":
                rejected.append({"event": event, "field": result.get("field"), "reason": result.get("reason")})
        if rejected:
            log.warning(
                "kaizen rejected %d event(s), e.g. %s: %s (kept in %s)",
                len(rejected),
                rejected[0]["field"],
                rejected[0]["reason"],
                self.spool_dir / "rejected.jsonl",
            )
            self._append_lines(self.spool_dir / "rejected.jsonl", rejected)
        if self.on_delivered is not None:
            try:
                self.on_delivered(batch, results)
            except Exception:
                log.exception("kaizen client: on_delivered callback failed")

    # --- the spool -------------------------------------------------------------------------------

    def _spool_files(self, include_claimed: bool = False) -> list[Path]:
        try:
            files = sorted(self.spool_dir.glob("spool-*.jsonl"))
            if include_claimed:
                files += sorted(self.spool_dir.glob(f"replaying-{os.getpid()}-*.jsonl"))
            return files
        except OSError:
            return []

    @staticmethod
    def _append_lines(path: Path, items: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(item, separators=(",", ":"), default=str) + "\n" for item in items)
        with open(path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _spool(self, batch: list[dict[str, Any]]) -> None:
        # One file per batch, named so that replay goes oldest first.
        name = f"spool-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        try:
            self._append_lines(self.spool_dir / name, batch)
            self.stats["spooled"] += len(batch)
        except OSError as exc:
            # Disk full or unwritable: keep the events in memory rather than lose them.
            log.error("kaizen client cannot spool to %s: %s", self.spool_dir, exc)
            self._queue.extendleft(reversed(batch))
            self._down_until = time.monotonic() + self.probe_interval_s

    def _replay_one(self) -> bool:
        """Replay the oldest spool file; True if it was delivered whole."""
        files = self._spool_files()
        if not files:
            return False
        claimed = self.spool_dir / f"replaying-{os.getpid()}-{files[0].name}"
        try:
            os.rename(files[0], claimed)  # atomic: another process replaying the same spool skips it
        except OSError:
            return True  # someone else took it; try the next one
        try:
            with open(claimed, encoding="utf-8") as f:
                events = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as exc:
            log.error("kaizen client: unreadable spool file %s: %s", claimed, exc)
            os.replace(claimed, claimed.with_suffix(".corrupt"))
            return True
        for start in range(0, len(events), self.batch_size):
            chunk = events[start : start + self.batch_size]
            if self._send(chunk) != "ok":
                self._down_until = time.monotonic() + self.probe_interval_s
                self._append_lines(files[0], events[start:])  # back under its old name, oldest first
                claimed.unlink(missing_ok=True)
                return False
            self.stats["replayed"] += len(chunk)
        claimed.unlink(missing_ok=True)
        return True

    def _reclaim_orphans(self) -> None:
        """Spool files a crashed process was replaying go back into the spool."""
        for path in self.spool_dir.glob("replaying-*.jsonl"):
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid == os.getpid() or not _pid_alive(pid):
                original = path.name.split("-", 2)[2]
                try:
                    os.rename(path, self.spool_dir / original)
                except OSError:
                    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
