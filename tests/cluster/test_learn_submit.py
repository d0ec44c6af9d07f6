"""``kaizen learn --address``: a cycle submitted as a Ray job to a Ray cluster with a job server
(a head node of its own, started here), its output followed until it ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from app.config import ConfigError
from jobs import learn
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def _start_head(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str | None]:
    """``ray start --head --block`` on ports of its own; the process and its job server's URL, or
    None for the URL when the process exited first (its output is in ``log``)."""
    port, dashboard = free_port(), free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                shutil.which("ray", path=env["PATH"]),
                "start",
                "--head",
                "--block",
                "--num-cpus=1",
                f"--port={port}",
                f"--dashboard-port={dashboard}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                "--disable-usage-stats",
                # Ports of its own: the session's Ray (and any other) holds the fixed defaults.
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            return process, None
        time.sleep(1)
    _stop(process)
    pytest.fail(f"the job server did not come up in 90 s; ray start said:\n{_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    """Stop ``ray start`` and what it started (its process group, which outlives a ``ray start``
    that exited half-way)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=5)  # `ray start --block` often outwaits this: its node is killed as a group
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def head(tmp_path: Path):
    """A Ray head node with the dashboard (the job server), stopped with its process group.

    A port chosen free can be taken before Ray binds it (by this suite's other servers, or by Ray's
    own processes picking ports of their own), and ``ray start`` then exits: it is started again
    on other ports, up to three times, and a failure shows what it said."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    previous = current.read_text() if current.exists() else None
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    process = url = None
    try:
        for attempt in range(3):
            log = tmp_path / f"ray-start-{attempt}.log"
            process, url = _start_head(env, log)
            if url is not None:
                break
        else:
            pytest.fail(f"ray start exited three times; the last said:\n{_tail(log)}")
        yield url
    finally:
        if process is not None:
            _stop(process)
        # `ray start` left its address for bare ray.init() calls to find: put back what was there.
        if previous is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(previous)


def test_a_submitted_cycle_runs_on_the_cluster_and_its_output_is_followed(head: str, tmp_path: Path) -> None:
    output: list[str] = []
    overrides = [
        f"store.sqlite_path={tmp_path / 'empty.db'}",
        f"model.storage_root={tmp_path / 'root'}",
        f"model.checkpoint_dir={tmp_path / 'checkpoints'}",
        "privacy.hmac_key=k",
    ]
    job_id, status = learn.submit(head, None, overrides, output=output.append)
    text = "".join(output)
    # The store is empty: the job runs the cycle on the cluster and stops at the dataset stage.
    assert job_id.startswith("kaizen-learn-") and status == "FAILED"
    assert "python -m jobs.learn --config configs/default.yaml" in text
    assert "[1/6] dataset" in text and "not enough data for a cycle" in text


def test_relative_paths_and_outside_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.sqlite_path: 'data/kaizen\.db' is relative"):
        learn.submit("http://127.0.0.1:1", None, [])
    outside = tmp_path / "c.yaml"
    outside.write_text("privacy:\n  hmac_key: k\n")
    with pytest.raises(ConfigError, match="must lie inside"):
        learn.submit("http://127.0.0.1:1", str(outside), [])
