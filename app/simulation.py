"""A simulated population of agent users, and a watch on what Kaizen's loop does meanwhile.

:class:`Population` talks to a running Kaizen only through its HTTP API, as agents do: chat
completions for ``champion`` with the official ``openai`` client, each user in a session of their
own (``X-Kaizen-Session``: the canary's sticky split), and the user's feedback on every answer with
the Kaizen client (accepted when right, else corrected with the right answer; a poisoning user
corrects every answer with a wrong one). :class:`Watcher` polls the store for the training runs,
deployments and the champion alias, each change with its time.

``kaizen traffic`` drives a running ``kaizen up`` with them (the loop's demonstration), and so do
``benchmarks/closed_loop.py`` and the loop's end-to-end test.
"""

from __future__ import annotations

import random
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Family", "Population", "Request", "Watcher", "ack_family", "normalize_answer", "run_traffic"]

_WORDS = ("apple", "river", "stone", "cloud", "table", "window", "orange", "silver", "music", "planet")


def normalize_answer(text: str) -> str:
    """What a user compares: whitespace collapsed, case folded, a trailing period dropped."""
    return " ".join(text.split()).casefold().rstrip(".")


@dataclass(frozen=True)
class Family:
    """A kind of request: ``ask(rng)`` draws a prompt and its right answer."""

    name: str
    ask: Callable[[random.Random], tuple[str, str]]


@dataclass
class Request:
    """One request as a user saw it."""

    t: float
    phase: int
    family: str
    session: str
    honest: bool
    interaction_id: str | None = None
    correct: bool | None = None
    base_correct: bool | None = None
    failed: str | None = None


class Population:
    """``threads`` workers send requests for ``champion`` one after another, each for a user drawn
    from ``users`` sessions; the families of the current phase are drawn with equal weight for
    the old ones and ``new_share`` for the newest. Every answer gets its user's feedback: accepted
    with thumbs up when right, else a correction with the right answer (a poisoning user corrects
    every answer with a wrong one). ``paired`` also asks the base model, unrecorded."""

    def __init__(
        self,
        url: str,
        base_model: str,
        *,
        users: int,
        threads: int,
        seed: int,
        poison_share: float = 0.0,
        max_tokens: int = 8,
        pause_s: float = 0.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        import httpx
        import openai

        from app.client import KaizenClient

        self.url, self.base_model, self.max_tokens, self.pause_s = url, base_model, max_tokens, pause_s
        self.sessions = [f"user-{seed}-{i}" for i in range(users)]
        self.poisoners = set(random.Random(f"poison:{seed}").sample(self.sessions, round(poison_share * users)))
        self.openai = openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120, http_client=httpx.Client(verify=verify)
        )
        # A spool of its own: another client's undelivered events are not this population's.
        spool = tempfile.mkdtemp(prefix="kaizen-loop-spool-")
        self.feedback = KaizenClient(url, batch_size=32, spool_dir=spool, verify=verify)
        self.requests: list[Request] = []
        self.rng = random.Random(seed)
        self.threads = threads
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.phase, self.families, self.new_share, self.paired = 0, [], 0.0, False

    def set_phase(self, phase: int, families: Sequence[Family], new_share: float, *, paired: bool = False) -> None:
        with self._lock:
            self.phase, self.families, self.new_share, self.paired = phase, list(families), new_share, paired

    def run(self, until: Callable[[], bool], timeout_s: float) -> bool:
        """Send requests until ``until()`` is true (checked between requests) or ``timeout_s``;
        False on the timeout."""
        stop, deadline = threading.Event(), time.monotonic() + timeout_s

        def work(k: int) -> None:
            rng = random.Random(f"{self.rng.random()}:{k}")
            while not stop.is_set():
                self._one(rng)
                if self.pause_s:
                    time.sleep(self.pause_s)

        workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(self.threads)]
        for w in workers:
            w.start()
        met = False
        try:
            while time.monotonic() < deadline:
                if until():
                    met = True
                    break
                time.sleep(0.5)
        finally:  # Ctrl-C too: the workers finish their request and stop
            stop.set()
            for w in workers:
                w.join(timeout=180)
        return met

    def _draw(self, rng: random.Random) -> tuple[Family, int]:
        with self._lock:
            families, share, phase = self.families, self.new_share, self.phase
        if share > 0 and len(families) > 1 and rng.random() < share:
            return families[-1], phase
        old = families[:-1] if share > 0 and len(families) > 1 else families
        return rng.choice(old), phase

    def _one(self, rng: random.Random) -> None:
        family, phase = self._draw(rng)
        session = rng.choice(self.sessions)
        prompt, right = family.ask(rng)
        honest = session not in self.poisoners
        request = Request(time.monotonic() - self.started, phase, family.name, session, honest)
        try:
            raw = self.openai.chat.completions.with_raw_response.create(
                model="champion",
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=self.max_tokens,
                extra_headers={"X-Kaizen-Session": session},
            )
            if raw.status_code != 200:
                request.failed = f"{raw.status_code}: {raw.text[:200]}"
            else:
                completion = raw.parse()
                answer = completion.choices[0].message.content or ""
                request.interaction_id = completion.id
                request.correct = normalize_answer(answer) == normalize_answer(right)
                self._feedback(completion.id, request.correct, right, honest, rng)
                if self.paired:
                    request.base_correct = self._ask_base(prompt, right)
        except Exception as exc:  # every failure counts; none is retried
            request.failed = f"{type(exc).__name__}: {str(exc)[:200]}"
        with self._lock:
            self.requests.append(request)

    def _feedback(self, interaction_id: str, correct: bool, right: str, honest: bool, rng: random.Random) -> None:
        if not honest:
            wrong = right
            while normalize_answer(wrong) == normalize_answer(right):
                wrong = " ".join(rng.choice(_WORDS) for _ in right.split())
            self.feedback.record_feedback(interaction_id, thumbs="down", accepted=False, correction=wrong)
        elif correct:
            self.feedback.record_feedback(interaction_id, thumbs="up", accepted=True)
        else:
            self.feedback.record_feedback(interaction_id, thumbs="down", accepted=False, correction=right)

    def _ask_base(self, prompt: str, right: str) -> bool | None:
        raw = self.openai.chat.completions.with_raw_response.create(
            model=self.base_model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=self.max_tokens,
            extra_headers={"X-Kaizen-Record": "false"},
        )
        if raw.status_code != 200:
            return None
        return normalize_answer(raw.parse().choices[0].message.content or "") == normalize_answer(right)

    def close(self) -> bool:
        delivered = self.feedback.flush(timeout=120.0)
        self.feedback.close()
        return delivered

    def count(self, phase: int | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if phase is None or r.phase == phase)


# --- the loop, watched -------------------------------------------------------------------------


class Watcher:
    """Polls the store each second for what the loop did: training runs, validations, deployments,
    the champion alias; keeps each change with its time (seconds since the population started)."""

    def __init__(self, cfg: Any, started: float) -> None:
        from app.store import open_store

        self.store = open_store(cfg.store)
        self.started = started
        self.events: list[dict[str, Any]] = []
        self._seen: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self, key: str, value: str, **info: Any) -> None:
        if self._seen.get(key) != value:
            self._seen[key] = value
            self.events.append({"t": round(time.monotonic() - self.started, 1), "what": key, "value": value, **info})

    def _run(self) -> None:
        from app.deployment.state import DeploymentStore
        from app.registry import AdapterRegistry
        from app.scheduling.state import TrainingRunStore

        while not self._stop.wait(1.0):
            try:
                for run in TrainingRunStore(self.store).list(limit=10):
                    self._note(f"run {run.id}", run.status, reason=run.metrics.get("reason"), adapter=run.adapter_id)
                for d in DeploymentStore(self.store).list(limit=10):
                    self._note(f"deployment {d.id}", d.state, adapter=d.adapter_id)
                self._note("champion", AdapterRegistry(self.store).champion() or "(base model)")
            except Exception as exc:  # a busy store: the next poll sees it
                self._note("watch error", type(exc).__name__)

    def promoted_after(self, t0: float) -> bool:
        """A deployment completed (promoted and watched to its end) whose adapter's cycle started
        at or after ``t0``: it learned from data of that time (a cycle started before holds none)."""
        started = {e["what"]: e["t"] for e in self.events if e["what"].startswith("run") and e["value"] == "running"}
        cycle_of = {e["adapter"]: e["what"] for e in self.events if e["what"].startswith("run") and e.get("adapter")}
        return any(
            e["what"].startswith("deployment")
            and e["value"] == "completed"
            and started.get(cycle_of.get(e.get("adapter")), -1.0) >= t0
            for e in self.events
        )

    def settled_after(self, t0: float) -> bool:
        """The last deployment that started after ``t0`` ended, or a cycle after ``t0`` failed."""
        ended = {"completed", "rolled_back", "failed", "cancelled"}
        deployments = [e for e in self.events if e["what"].startswith("deployment") and e["t"] >= t0]
        if deployments and deployments[-1]["value"] in ended:
            return True
        runs = [e for e in self.events if e["what"].startswith("run") and e["t"] >= t0]
        # A cycle that failed, or produced no production verdict, ends the phase's learning too; a
        # scheduled one cancelled before it started (its triggers stopped firing) does not.
        return (bool(runs) and runs[-1]["value"] == "failed") or self._rejected_after(t0)

    def _rejected_after(self, t0: float) -> bool:
        rows = self.store._fetch("SELECT verdict, created_at FROM validations ORDER BY created_at DESC LIMIT 1")
        if not rows or rows[0]["verdict"] == "production":
            return False
        runs = [e for e in self.events if e["what"].startswith("run") and e["t"] >= t0 and e["value"] == "succeeded"]
        return bool(runs)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.store.close()


def ack_family(answer: str = "ok") -> Family:
    """Requests ``ack: <three words>`` whose right answer is always ``answer``: what the embedded
    default's tiny model does not write until it learns it from the users' corrections."""

    def ask(rng: random.Random) -> tuple[str, str]:
        return f"ack: {' '.join(rng.sample(_WORDS, 3))}", answer

    return Family("ack", ask)


def run_traffic(
    cfg: Any,
    url: str,
    *,
    minutes: float,
    users: int = 12,
    threads: int = 2,
    pause_s: float = 0.2,
    answer: str = "ok",
    every_s: float = 15.0,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``kaizen traffic``: users of :func:`ack_family` against the running Kaizen at ``url`` for
    ``minutes``, printing every ``every_s`` the requests so far, the acceptance of the last ones,
    and what the loop did (from ``cfg``'s store); returns the totals."""
    population = Population(
        url, cfg.model.base_model, users=users, threads=threads, seed=0, pause_s=pause_s, verify=cfg.tls_verify()
    )
    watcher = Watcher(cfg, population.started)
    population.set_phase(1, [ack_family(answer)], 0.0)
    shown, deadline = 0, time.monotonic() + minutes * 60
    try:
        while time.monotonic() < deadline:
            end = min(deadline, time.monotonic() + every_s)
            population.run(lambda end=end: time.monotonic() >= end, timeout_s=every_s + 1)
            recent = [r.correct for r in population.requests[-50:] if r.correct is not None]
            failed = sum(1 for r in population.requests if r.failed)
            rate = f"{sum(recent) / len(recent):.0%}" if recent else "-"
            out(
                f"{time.monotonic() - population.started:6.0f} s  {len(population.requests)} requests, "
                f"{failed} failed; accepted (last {len(recent)}): {rate}"
            )
            for event in watcher.events[shown:]:
                out(f"{event['t']:6.0f} s    {event['what']}: {event['value']}")
            shown = len(watcher.events)
    finally:
        population.close()
        watcher.close()
    answered = [r.correct for r in population.requests if r.correct is not None]
    return {
        "requests": len(population.requests),
        "failed": sum(1 for r in population.requests if r.failed),
        "accepted": sum(answered),
        "events": watcher.events,
    }
