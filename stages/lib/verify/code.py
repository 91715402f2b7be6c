"""Code answers: the problem's tests run on the answer's code in a subprocess sandbox.

Tests come in two forms: a list of `{"input": stdin, "output": expected stdout}` cases (CodeForces style:
each case its own process, outputs compared token by token) or a string of Python (`assert f(2) == 4`,
MBPP/HumanEval style: appended to the code, one process, exit status 0 passes). The answer's code is the
last fenced ```python block of the reply (`extract.code_block`), else the whole reply.

The sandbox, per process (`Limits`):
- `resource.setrlimit` in the child before exec: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file
  size (RLIMIT_FSIZE), no core files; a new session, so a timeout kills the whole process group;
- a wall-clock timeout (a program that sleeps uses no CPU);
- a fresh scratch folder as the working directory and HOME, removed afterwards;
- a scrubbed environment (PATH, LANG, HOME, TMPDIR only: no API key, no proxy, no PYTHONPATH) and Python in
  isolated mode without site packages (`-I -S`: the standard library only, no PYTHON* variables);
- no network: the child enters new user and network namespaces (`unshare(CLONE_NEWUSER | CLONE_NEWNET)`, the
  syscall itself, no extra process), where only a loopback device exists, and it is down. Where the kernel
  refuses (user namespaces disabled, some containers), `isolation()` says `network: open` and every verdict
  carries it in `detail`; `Limits(require_no_network=True)` then refuses to run instead.

The number of processes is not limited (RLIMIT_NPROC counts all of the user's processes, not the child's):
children the program forks share its process group and die with it at the timeout, unless they leave it.

This is a sandbox against mistakes and runaway programs (an infinite loop, a memory bomb, a stray write,
a call home), not against an attacker: the child can still read what the user can read. Run untrusted code
in a container or VM as well (open-r1 uses E2B, Morph or Piston; curator `bespokelabs-sandbox`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

from stages.lib.verify import Verdict
from stages.lib.verify.extract import code_block

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
OUTPUT_LIMIT = 1 << 20  # bytes of stdout kept per case


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 2.0
    """CPU seconds per process (RLIMIT_CPU; SIGXCPU, then SIGKILL)."""
    wall_s: float = 5.0
    """Wall-clock seconds per process, then the process group is killed."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS), in MiB."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), in MiB."""
    require_no_network: bool = False
    """Refuse to run where the network cannot be cut off (no user/network namespaces)."""


@lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@lru_cache(maxsize=1)
def isolation() -> dict:
    """How this machine isolates a child: {"network": "namespace" | "open", "flags": the unshare flags}; probed
    once with a child process."""
    for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):
        code = f"import ctypes,ctypes.util,sys;sys.exit(ctypes.CDLL(ctypes.util.find_library('c')).unshare({flags}))"
        try:
            r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, timeout=10,
                               env=_clean_env(tempfile.gettempdir()))
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return {"network": "namespace", "flags": flags}
    return {"network": "open", "flags": 0}


def _clean_env(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
            "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _preexec(limits: Limits, flags: int):
    mem = limits.memory_mb << 20
    cpu = max(1, int(limits.cpu_s + 0.999))
    fsize = limits.file_mb << 20
    unshare = _libc().unshare if flags else None  # loaded here, in the parent

    def run():  # in the child, between fork and exec: async-signal-safe work only
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if unshare is not None:
            unshare(flags)

    return run


@dataclass
class Run:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def run_python(source: str, stdin: str = "", limits: Limits = Limits(), python: str | None = None) -> Run:
    """Run `source` with `python` (default: this interpreter) in the sandbox, `stdin` fed to it."""
    iso = isolation()
    if limits.require_no_network and iso["network"] != "namespace":
        raise RuntimeError("code sandbox: this machine cannot cut a child off the network (no user or network "
                           "namespaces); run in a container, or set require_no_network: false")
    scratch = tempfile.mkdtemp(prefix="stillhouse-sandbox-")
    try:
        path = os.path.join(scratch, "solution.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        start = time.monotonic()
        proc = subprocess.Popen([python or sys.executable, "-I", "-S", path], cwd=scratch, env=_clean_env(scratch),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_preexec(limits, iso["flags"]), close_fds=True)
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        seconds = time.monotonic() - start
        _kill_group(proc)  # anything it left behind in its session
        return Run(proc.returncode, out[:OUTPUT_LIMIT].decode("utf-8", "replace"),
                   err[-4000:].decode("utf-8", "replace"), seconds, timed_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _failure(run: Run, limits: Limits) -> str | None:
    """Why a run failed (None: it exited 0 in time)."""
    if run.timed_out:
        return "time_limit"
    if run.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and run.seconds >= min(limits.cpu_s, limits.wall_s) * 0.9:
        return "time_limit"
    if "MemoryError" in run.stderr or "Cannot allocate memory" in run.stderr:
        return "memory_limit"
    if run.returncode == -signal.SIGXFSZ or "File too large" in run.stderr:
        return "output_limit"
    if run.returncode != 0:
        return "runtime_error"
    return None


def same_output(got: str, expected: str) -> bool:
    """Token by token, as CodeForces' default checker compares: whitespace and line breaks do not matter."""
    return got.split() == str(expected).split()


def run_tests(code: str, tests, limits: Limits = Limits()) -> Verdict:
    """Run `tests` (stdin/stdout cases, or a string of Python asserts) on `code`; every case must pass. The
    first failing case stops the run."""
    iso = isolation()
    detail: dict = {"network": iso["network"], "limits": asdict(limits)}
    if isinstance(tests, str):
        run = run_python(code + "\n\n" + tests + "\n", "", limits)
        why = _failure(run, limits)
        detail.update(tests_run=1, tests_passed=int(why is None), seconds=round(run.seconds, 4))
        if why is not None:
            detail["stderr"] = run.stderr[-500:]
            return Verdict(False, "wrong_answer" if "AssertionError" in run.stderr else why, code, None, detail=detail)
        return Verdict(True, "passed", code, None, detail=detail)
    cases = list(tests or [])
    if not cases:
        return Verdict(False, "bad_gold", code, None, detail={**detail, "error": "no tests"})
    passed, seconds = 0, 0.0
    for i, case in enumerate(cases):
        run = run_python(code, str(case.get("input", "")), limits)
        seconds += run.seconds
        why = _failure(run, limits)
        if why is None and not same_output(run.stdout, case.get("output", "")):
            why = "wrong_answer"
        if why is not None:
            detail.update(tests_run=i + 1, tests_passed=passed, seconds=round(seconds, 4), failed_case=i,
                          stderr=run.stderr[-500:])
            return Verdict(False, why, code, None, detail=detail)
        passed += 1
    detail.update(tests_run=len(cases), tests_passed=passed, seconds=round(seconds, 4))
    return Verdict(True, "passed", code, None, detail=detail)


def verify_code(answer: str, tests, limits: Limits | None = None, language: str = "python") -> Verdict:
    """The reply's code (its last fenced block) against the problem's tests."""
    return run_tests(code_block(answer, language), tests, limits or Limits())
