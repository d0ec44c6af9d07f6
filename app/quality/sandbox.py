"""Run untrusted Python from a response, with its tests, in a sandboxed subprocess.

Layers, each cheap and each tested:
- a fresh temporary working directory, removed afterwards; the interpreter in isolated mode
  (``-I``: no user site, no ``PYTHON*`` variables, the cwd not on the path);
- resource limits: address space, CPU seconds, file size, open files; a new session, so the
  whole process group is killed hard on timeout;
- no network: a new network namespace where the kernel allows one (root, as in CI), and in every
  case an audit hook in the child that refuses ``socket.connect``/``bind`` and name lookups;
- no writes outside the temporary directory: the same audit hook refuses ``open`` for writing,
  ``os.remove``/``rename``/``mkdir``/..., anywhere else, and refuses starting processes and
  loading native libraries (``ctypes``). Audit hooks cannot be removed once installed (PEP 578).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SandboxResult", "run_sandboxed"]

# The child's harness: install the guard, exec the solution, run each test, print one JSON line.
_HARNESS = r"""
import json, os, sys, time
ROOT = os.path.realpath(os.getcwd())
_WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                 "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "os.replace"}
_DENY = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
         "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "ctypes.dlopen", "ctypes.cdata", "os.kill", "os.killpg", "sys.setrecursionlimit"}

def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else ROOT)
    except (TypeError, ValueError):
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)

def _guard(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args:
        path, mode = args[0], args[1] if len(args) > 1 else "r"
        flags = args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox is not allowed")
    elif event in _WRITE_EVENTS and args:
        for p in args[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")

spec = json.loads(open("spec.json").read())
# Limits and the network namespace first, while this is still our code (and before the guard
# forbids ctypes).
import resource
mem = spec["memory_mb"] * 2**20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
netns = False
if spec["isolate_network"]:
    try:
        import ctypes
        netns = ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # CLONE_NEWNET
    except Exception:
        netns = False
sys.addaudithook(_guard)
ns = {"__name__": "solution"}
result = {"passed": 0, "failed": 0, "errors": [], "setup_error": None, "netns": netns}
try:
    exec(compile(spec["code"], "solution.py", "exec"), ns)
except BaseException as exc:
    result["setup_error"] = f"{type(exc).__name__}: {exc}"[:500]
else:
    for i, test in enumerate(spec["tests"]):
        try:
            exec(compile(test, f"test_{i}", "exec"), dict(ns))
            result["passed"] += 1
        except BaseException as exc:
            result["failed"] += 1
            result["errors"].append(f"test {i}: {type(exc).__name__}: {exc}"[:300])
sys.stdout.write("\nKAIZEN-RESULT " + json.dumps(result) + "\n")
sys.stdout.flush()
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    failed: int
    timed_out: bool
    setup_error: str | None = None
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    network_namespace: bool = False

    @property
    def pass_rate(self) -> float | None:
        total = self.passed + self.failed
        return None if total == 0 else self.passed / total


def run_sandboxed(
    code: str,
    tests: Sequence[str],
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 512,
    isolate_network: bool = True,
) -> SandboxResult:
    """Execute ``code``, then each test snippet against its namespace, in the sandbox.

    Returns:
        Counts of passing and failing tests; ``timed_out`` when the process group was killed.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kaizen-sandbox-") as tmp:
        spec = {
            "code": code,
            "tests": list(tests),
            "memory_mb": memory_mb,
            "cpu_s": max(1, int(timeout_s) + 1),
            "isolate_network": isolate_network,
        }
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        Path(tmp, "harness.py").write_text(_HARNESS)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "harness.py"],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole on timeout
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
    duration = time.perf_counter() - start
    marker = out.decode("utf-8", "replace").rpartition("KAIZEN-RESULT ")[2].strip()
    if timed_out or not marker.startswith("{"):
        reason = "timed out" if timed_out else (err.decode("utf-8", "replace").strip()[-300:] or "no result")
        return SandboxResult(0, len(tests), timed_out, reason, [], duration, False)
    data = json.loads(marker)
    failed = data["failed"] if data["setup_error"] is None else len(tests)
    return SandboxResult(
        data["passed"], failed, False, data["setup_error"], data["errors"], duration, bool(data.get("netns"))
    )
