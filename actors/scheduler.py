"""The scheduler actor: :class:`app.scheduling.scheduler.Scheduler` on a timer, as a named Ray actor.

``kaizen up`` starts it detached (:func:`start_scheduler`), so it outlives the command that started
it, as ``kaizen-scheduler`` in the configured namespace (``ray.namespace``); the CLI and the HTTP
API reach it by that name (:func:`scheduler_handle`). It restarts by itself when it dies
(``max_restarts=-1``): the cycles and decisions are in the store, and a cycle it started goes on
without it (a Ray job, or a process in a session of its own), so a restarted scheduler reads the
running cycle's end back as the one that started it would have. It needs no CPU of its own
(``num_cpus=0``): every ``training.check_interval_s`` it reads the store and
``ray.available_resources()``.

A cycle is ``python -m jobs.learn --config <its config> --json dataset.until=<data cut-off>``
(:class:`JobLauncher`): submitted to the cluster's job server (``JobSubmissionClient``) when the
cluster has one, else run as a process on this node joined to the same cluster (``RAY_ADDRESS``),
with its output in ``<model.checkpoint_dir>/cycles/<run id>.log``.

The logic is all in the plain class; this module only builds it from the config, runs its ``tick``
in a thread, and forwards the operators' calls. The same thread runs retention once a day
(:mod:`app.privacy.retention`; the last run is read from the audit log, so a restart does not
repeat it).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import yaml

from actors.named import find_actor, start_actor, stop_actor
from app.config import KaizenConfig
from app.privacy.retention import retention_due, run_retention
from app.scheduling.launcher import CycleOutcome, cycle_arguments, outcome_from_log, shell_command
from app.scheduling.scheduler import Scheduler
from app.scheduling.state import SCHEDULER_ACTOR, TrainingRun
from app.store import open_store

__all__ = [
    "ACTOR_NAME",
    "JobLauncher",
    "RayResources",
    "SchedulerActor",
    "scheduler_handle",
    "start_scheduler",
    "stop_scheduler",
]

ACTOR_NAME = SCHEDULER_ACTOR
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SUBMIT_RETRY_S = 60.0
"""How long a submission is retried while the job server says it has no agent yet (a new head)."""
LOG_TAIL_BYTES = 4 * 1024 * 1024
"""How much of the end of a cycle's output is read back for its record and its last words."""

WORKER_ONLY_ENV = frozenset({"RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_CLIENT_MODE", "RAY_LD_PRELOAD_ON_WORKERS"})
"""What Ray sets in a worker's environment about that worker, which a driver must not inherit."""

log = logging.getLogger("kaizen.scheduler")


class RayResources:
    """The cluster's free resources as Ray reports them (beside Serve's replicas and running work)."""

    def available(self) -> Mapping[str, float]:
        return ray.available_resources()


def discover_job_server() -> str | None:
    """The URL of the cluster's job server (the dashboard's), or None when the cluster runs none
    (``kaizen up`` on one machine starts Ray without it)."""
    try:
        # Where `ray job submit` finds it too; Ray has no public call for it from inside a worker.
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        value = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    except Exception:
        return None
    return f"http://{value.decode()}" if value else None


class JobLauncher:
    """Starts a cycle as a Ray job when a job server answers, else as a process; reads its end back.

    Args:
        cfg: the configuration the cycle runs with (written to ``<checkpoint_dir>/cycles/<run id>.yaml``).
        job_server: the job server's URL; None: the cluster's own, if it runs one.
        python: the interpreter that runs the cycle (this one's by default: the same environment).
    """

    def __init__(self, cfg: KaizenConfig, *, job_server: str | None = None, python: str = sys.executable) -> None:
        self.cfg = cfg
        self.folder = Path(cfg.model.checkpoint_dir).expanduser().resolve() / "cycles"
        self.python = python
        self.job_server = job_server
        self._client: Any = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def _jobs(self) -> Any:
        """A job client for the job server, or None when none answers."""
        if self._client is None:
            url = self.job_server or discover_job_server()
            if url is None:
                return None
            try:
                from ray.job_submission import JobSubmissionClient

                self._client = JobSubmissionClient(url)
            except Exception as exc:
                log.warning("the job server at %s does not answer (%s); cycles run as processes", url, exc)
                return None
        return self._client

    def launch(self, run: TrainingRun) -> Mapping[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / f"{run.id}.yaml"
        config.write_text(
            f"# python -m jobs.learn --config {config}   (training run {run.id}, written by the scheduler)\n"
            + yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
        )
        command = shell_command(self.python, cycle_arguments(str(config), run))
        client = self._jobs()
        if client is not None:
            job_id = self._submit(client, run, command)
            return {"via": "ray_job", "job_id": job_id, "config": str(config), "command": command}
        logfile, status = self.folder / f"{run.id}.log", self.folder / f"{run.id}.exit"
        # The shell writes the exit status beside the log, so that a restarted scheduler (another
        # process, not this one's child) still learns how the cycle ended.
        script = (
            f"{command} > {shlex.quote(str(logfile))} 2>&1; echo $? > {shlex.quote(str(status))}.tmp && "
            f"mv {shlex.quote(str(status))}.tmp {shlex.quote(str(status))}"
        )
        process = subprocess.Popen(
            ["/bin/sh", "-c", script], cwd=PROJECT_ROOT, env=self._environment(), start_new_session=True
        )
        self._processes[run.id] = process
        return {
            "via": "process",
            "pid": process.pid,
            "host": socket.gethostname(),
            "log": str(logfile),
            "exit_status": str(status),
            "config": str(config),
            "command": command,
        }

    def _submit(self, client: Any, run: TrainingRun, command: str) -> str:
        deadline = time.monotonic() + SUBMIT_RETRY_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=f"cd {shlex.quote(str(PROJECT_ROOT))} && {command}",
                    submission_id=f"kaizen-{run.id}",
                    runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}},
                    metadata={"kaizen": "learn", "run_id": run.id},
                )
            except RuntimeError as exc:
                # A head that has just started answers "No available agent ... try again later".
                if "try again later" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def _environment(self) -> dict[str, str]:
        # The cycle is a driver of its own that joins this cluster: this worker's identity stays
        # here; the cluster's settings (its authentication mode among them) go with it.
        env = {k: v for k, v in os.environ.items() if k not in WORKER_ONLY_ENV}
        env.update(
            RAY_ADDRESS=ray.get_runtime_context().gcs_address,
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        return env

    def outcome(self, run: TrainingRun) -> CycleOutcome | None:
        launch = run.config.get("launch") or {}
        if launch.get("via") == "ray_job":
            return self._job_outcome(launch["job_id"])
        if launch.get("via") == "process":
            return self._process_outcome(run.id, launch)
        return CycleOutcome("failed", f"unknown launch {launch!r}")

    def _job_outcome(self, job_id: str) -> CycleOutcome | None:
        from ray.job_submission import JobStatus

        client = self._jobs()
        if client is None:
            raise RuntimeError(f"Ray job {job_id}: the job server does not answer; asking again at the next check")
        status = client.get_job_status(job_id)
        if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return None
        logs = client.get_job_logs(job_id)[-LOG_TAIL_BYTES:]
        if status == JobStatus.STOPPED:
            return CycleOutcome("failed", f"Ray job {job_id} was stopped")
        return outcome_from_log(0 if status == JobStatus.SUCCEEDED else 1, logs)

    def _process_outcome(self, run_id: str, launch: Mapping[str, Any]) -> CycleOutcome | None:
        status = Path(launch["exit_status"])
        process = self._processes.get(run_id)
        if process is not None:
            process.poll()  # reaps it once it has ended
        if status.exists():
            self._processes.pop(run_id, None)
            return outcome_from_log(int(status.read_text().strip() or 1), _tail(Path(launch["log"])))
        if launch.get("host") != socket.gethostname():
            raise RuntimeError(
                f"cycle {run_id} runs as a process on {launch.get('host')}, not on this node; its exit status "
                f"will be in {status}"
            )
        if _alive(int(launch["pid"])):
            return None
        return CycleOutcome("failed", f"the cycle's process ended without an exit status (log: {launch['log']})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor:
    """Ticks a :class:`Scheduler` every ``training.check_interval_s`` and forwards operators' calls
    to it (its methods hold one lock, so a call and a tick never interleave)."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = KaizenConfig.model_validate(config)
        self.cfg = cfg
        self.store = open_store(cfg.store)
        self.scheduler = Scheduler(cfg, self.store, JobLauncher(cfg), resources=RayResources())
        self.interval_s = cfg.training.check_interval_s
        self.ticks = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler-tick", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._tick()
            self._retention()
            self._stop.wait(self.interval_s)

    def _retention(self) -> None:
        """The daily retention run (:mod:`app.privacy.retention`), when one is due."""
        try:
            if retention_due(self.store, datetime.now(UTC)):
                result = run_retention(self.cfg, self.store, actor="scheduler")
                log.info("retention: %s", result.to_json())
        except Exception:  # tried again at the next tick; the cycle loop goes on meanwhile
            log.exception("retention run failed")

    def _tick(self) -> TrainingRun | None:
        try:
            run = self.scheduler.tick()
            self.last_error = None
            return run
        except Exception as exc:  # the store away for a moment, a bug: said in status, tried again
            log.exception("scheduler tick failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            self.ticks += 1

    def status(self) -> dict[str, Any]:
        """:meth:`Scheduler.status` with the actor's own health."""
        out = self.scheduler.status()
        out["scheduler"] = {
            "ticks": self.ticks,
            "check_interval_s": self.interval_s,
            "last_error": self.last_error,
            "running": self._thread.is_alive(),
            "pid": os.getpid(),
        }
        return out

    def tick(self) -> dict[str, Any] | None:
        """One check now (besides the timer's); the cycle running or scheduled after it."""
        run = self.scheduler.tick()
        return run.to_json() if run else None

    def request(self, actor: str, reason: str) -> dict[str, Any]:
        """An operator's request for a cycle (:meth:`Scheduler.request`), then a check at once, so
        that it starts now when nothing holds it; the run as it is after that check."""
        run = self.scheduler.request(actor, reason)
        self._tick()
        return self.scheduler.runs.get(run.id).to_json()

    def stop(self) -> None:
        """Stop the timer and close the store (before the actor is killed for good); a running
        cycle goes on, and the next scheduler reads its end."""
        self._stop.set()
        self._thread.join(timeout=max(30.0, 2 * self.interval_s))
        self.store.close()


def start_scheduler(cfg: KaizenConfig, *, detached: bool = True) -> Any:
    """The scheduler actor of ``cfg.ray.namespace``, started if it is not running (Ray must be up:
    :func:`app.ray_setup.start_ray`). ``detached``: it outlives the driver that started it (what
    ``kaizen up`` wants); stop it with :func:`stop_scheduler`. Returns its handle."""
    return start_actor(SchedulerActor, ACTOR_NAME, cfg, detached=detached)


def scheduler_handle(namespace: str) -> Any | None:
    """The running scheduler actor of ``namespace``, or None."""
    return find_actor(ACTOR_NAME, namespace)


def stop_scheduler(namespace: str, timeout_s: float = 60.0) -> bool:
    """Stop and remove the scheduler actor of ``namespace`` (no restart); False if none was running.
    A cycle it started goes on (a Ray job, or a process of its own)."""
    return stop_actor(ACTOR_NAME, namespace, timeout_s)
