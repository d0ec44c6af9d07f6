"""The sandbox runs tests against response code and contains what it runs."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from app.quality.sandbox import run_sandboxed

ADD = "def add(a, b):\n    return a + b\n"


def test_counts_passing_and_failing_tests() -> None:
    result = run_sandboxed(ADD, ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add('a', 'b') == 'ab'"])
    assert (result.passed, result.failed, result.timed_out) == (2, 1, False)
    assert result.pass_rate == pytest.approx(2 / 3) and "AssertionError" in result.errors[0]


def test_code_that_fails_to_run_fails_every_test() -> None:
    result = run_sandboxed("raise RuntimeError('boom')", ["assert True", "assert True"])
    assert result.failed == 2 and "RuntimeError: boom" in result.setup_error


def test_cannot_outlive_its_timeout() -> None:
    start = time.monotonic()
    result = run_sandboxed("import time\nwhile True:\n    time.sleep(0.01)", ["assert True"], timeout_s=1.0)
    assert result.timed_out and time.monotonic() - start < 3.0


def test_cannot_write_outside_its_directory(tmp_path: Path) -> None:
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.makedirs({str(tmp_path / 'newdir')!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        "import os\nos.remove('/etc/hostname')",
    ):
        result = run_sandboxed(code, [])
        assert result.setup_error and "PermissionError" in result.setup_error
    assert not target.exists() and not (tmp_path / "newdir").exists()
    inside = run_sandboxed("open('mine.txt', 'w').write('ok')", ["assert open('mine.txt').read() == 'ok'"])
    assert inside.passed == 1


@pytest.mark.parametrize("isolate_network", [True, False])
def test_cannot_reach_the_network(isolate_network: bool) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
        result = run_sandboxed(code, [], isolate_network=isolate_network)
        assert result.setup_error is not None  # refused by the guard (and by the namespace, where there is one)
    finally:
        server.close()


def test_cannot_start_processes_or_load_native_code() -> None:
    for code in (
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import ctypes\nctypes.CDLL('libc.so.6')",
    ):
        result = run_sandboxed(code, [])
        assert result.setup_error and "not allowed" in result.setup_error


def test_memory_is_limited() -> None:
    result = run_sandboxed("x = bytearray(4 * 1024 ** 3)", [], memory_mb=256)
    assert result.setup_error and "MemoryError" in result.setup_error
