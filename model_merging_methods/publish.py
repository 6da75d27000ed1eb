"""Publishing outputs so that a crash, a signal or a full disk never leaves a half-written or foreign-looking output.

* :func:`check_output_path` refuses, before anything is read or written, an output that exists and is not a folder,
  an existing folder without ``overwrite``, an existing folder this toolkit did not write (``overwrite`` only ever
  replaces the toolkit's own outputs), over-long names, a parent that is a file, and a read-only or unwritable
  parent folder.
* :func:`atomic_output_dir` writes into a temporary folder next to the target, named
  ``.<name>.tmp-<pid>-<token>`` and marked as the toolkit's (:data:`~model_merging_methods.paths.OWNER_MARKER`), and
  renames it into place only when the body completes. On an exception, Ctrl-C, SIGTERM or SIGHUP the temporary
  folder and any parent folders it created are removed; SIGKILL cannot be caught, so the next run for the same
  target removes temporary folders whose process is gone (:func:`remove_stale_temporaries`). Folders get ordinary
  permissions (the umask applies, unlike ``tempfile.mkdtemp``'s 0700).
* :func:`atomic_write_text` / :func:`write_json` write one file through a temporary file and an atomic rename, with
  the umask's permissions (unlike ``mkstemp``'s 0600).
* Operating-system errors (no space left, read-only file system, permission denied, name too long) become one
  :class:`~model_merging_methods.errors.MergeError` line naming the path (:func:`os_error_message`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model_merging_methods.errors import MergeError, Terminated, raise_terminated
from model_merging_methods.paths import MANIFEST, OWNER_MARKER, is_toolkit_output, write_owner_marker

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

NAME_MAX = 255  # bytes per path component on Linux file systems (os.pathconf refines it where it can)
PATH_MAX = 4096
HANDLED_SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None
)
_STEM_BYTES = 100  # the target's name is shortened to this in temporary names, so they never get too long
_umask_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process's umask (read from /proc where possible, which does not change it even for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        old = os.umask(0o022)
        os.umask(old)
    return old


def os_error_message(exc: OSError, path: PathLike | None = None, action: str = "write") -> str:
    """One line for an operating-system error: what could not be done to which path, and why."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename not in (None, "") else path
    if where is None:
        return f"cannot {action}: {reason}"
    return f"cannot {action} {os.fsdecode(where)}: {reason}"


def pid_alive(pid: int) -> bool:
    """False only when no process ``pid`` exists (a process of another user counts as alive)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _stem(name: str) -> str:
    """``name``, or a short, unique stand-in for it when it is long (temporary names must stay valid names)."""
    raw = os.fsencode(name)
    if len(raw) <= _STEM_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:10]
    return raw[:60].decode("utf-8", "ignore") + "~" + digest


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents (the umask applies); returns the folders created, outermost
    first, so that a failed run can remove exactly those (:func:`remove_created`)."""
    missing: list[Path] = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue
            created.append(d)
    except BaseException:
        remove_created(created)
        raise
    return created


def remove_created(folders: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, innermost first, where they are still empty."""
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(d)


# ----------------------------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _set_handlers(handler, signals) -> dict[int, Any]:
    old = {}
    for s in signals:
        previous = signal.getsignal(s)
        signal.signal(s, handler)
        old[s] = signal.SIG_DFL if previous is None else previous
    return old


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While the body runs (in the main thread), SIGTERM and SIGHUP raise
    :class:`~model_merging_methods.errors.Terminated` like Ctrl-C raises ``KeyboardInterrupt``."""
    if not _in_main_thread():
        yield
        return
    old = _set_handlers(raise_terminated, HANDLED_SIGNALS)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP while the body runs (a rename, a clean-up) and raise them after it."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):  # noqa: ARG001 - signal handler signature
        pending.append(signum)

    old = _set_handlers(hold, (signal.SIGINT, *HANDLED_SIGNALS))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if pending:
        if pending[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(pending[0])


# ----------------------------------------------------------------------------------------------------------------
# output folders
# ----------------------------------------------------------------------------------------------------------------


def _check_location(target: Path) -> Path:
    """Name lengths, and the folder that will hold ``target``: it must be a writable folder on a writable file
    system. Returns the nearest existing ancestor."""
    ancestor = _existing_ancestor(target)
    if len(os.fsencode(str(target))) >= PATH_MAX:
        raise MergeError(f"output path {str(target)[:80]}... is longer than the limit of {PATH_MAX} bytes")
    limit = _name_max(ancestor if ancestor.is_dir() else ancestor.parent)
    for part in target.parts[1:]:
        n = len(os.fsencode(part))
        if n > limit:
            raise MergeError(
                f"cannot write {target.parent if part == target.name else target}: the name {part[:40]}... is "
                f"{n} bytes long, more than the file system's limit of {limit}"
            )
    return ancestor


def _check_writable(target: Path, folder: Path) -> None:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise MergeError(f"cannot write {target}: {folder} is on a read-only file system")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write {target}: permission denied in {folder}")


def check_output_path(target: PathLike, overwrite: bool = False) -> Path:
    """The absolute output path, after refusing everything that cannot or must not be written (see the module
    docstring). Reads and writes nothing."""
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    ancestor = _check_location(target)
    if os.path.lexists(target):
        if target.is_symlink():
            if not overwrite and target.is_dir():
                raise MergeError(f"output path {target} already exists (a symbolic link)")
            raise MergeError(
                f"output path {target} is a symbolic link; give the folder itself, or another path"
            )
        if not target.is_dir():
            raise MergeError(f"output path {target} exists and is not a folder")
        if not overwrite:
            raise MergeError(f"output path {target} already exists (pass --overwrite to replace it)")
        if not is_toolkit_output(target):
            raise MergeError(
                f"refusing to replace {target}: it was not written by this toolkit (it has no {OWNER_MARKER} or "
                f"{MANIFEST}); remove it yourself or choose another output path"
            )
        _check_writable(target, target.parent)
    else:
        if not ancestor.is_dir():
            raise MergeError(f"cannot create {target}: {ancestor} is not a folder")
        _check_writable(target, ancestor)
    return target


def check_output_folder(folder: PathLike) -> Path:
    """Like :func:`check_output_path` for a folder that may already exist and is written into (a results folder
    shared by several runs): it must be a folder, or creatable, on a writable file system."""
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    ancestor = _check_location(folder)
    if not ancestor.is_dir():
        what = (
            "exists and is not a folder"
            if ancestor == folder
            else f"cannot be created: {ancestor} is not a folder"
        )
        raise MergeError(f"output folder {folder} {what}")
    _check_writable(folder, ancestor)
    return folder


def _temp_path(target: Path, tag: str) -> Path:
    return target.parent / f".{_stem(target.name)}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def temporary_pattern(target: Path) -> re.Pattern[str]:
    """Names of the temporary (``tmp``) and replaced (``old``) folders of ``target``; group 1 is the tag, 2 the
    pid of the process that made them."""
    return re.compile(rf"^\.{re.escape(_stem(target.name))}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / OWNER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _is_empty_dir(folder: Path) -> bool:
    try:
        return not any(os.scandir(folder))
    except OSError:
        return False


def remove_stale_temporaries(target: PathLike) -> list[str]:
    """Remove what killed runs for ``target`` left behind: temporary folders of processes that are gone (only when
    they carry the toolkit's marker, or are empty), and a replaced ``old`` copy (restored to ``target`` when the
    replacement never arrived). Returns one line per action (also logged)."""
    target = Path(os.path.abspath(os.fspath(target)))
    pattern = temporary_pattern(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    done: list[str] = []
    host = socket.gethostname()
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            continue
        tag, pid = m.group(1), int(m.group(2))
        if pid_alive(pid):
            continue
        path = Path(entry.path)
        marker = _marker(path)
        if marker is not None and marker.get("host") not in (None, host):
            continue  # made on another machine sharing this file system: its process may be alive there
        try:
            if tag == "tmp" and (is_toolkit_output(path) or _is_empty_dir(path)):
                shutil.rmtree(path)
                done.append(f"removed the stale temporary folder {path} (its process {pid} is gone)")
            elif tag == "old" and is_toolkit_output(path):
                if not os.path.lexists(target):
                    os.rename(path, target)
                    done.append(f"restored {target} from {path} (process {pid} died while replacing it)")
                else:
                    shutil.rmtree(path)
                    done.append(f"removed the stale replaced copy {path} (its process {pid} is gone)")
        except OSError as exc:
            done.append(f"could not remove the stale folder {path}: {exc.strerror or exc}")
    for line in done:
        logger.info(line)
    return done


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    check_output_path(target, overwrite)  # something may have appeared at the target meanwhile
    if os.path.lexists(target):
        old = _temp_path(target, "old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


@contextlib.contextmanager
def atomic_output_dir(
    target: PathLike,
    overwrite: bool = False,
    *,
    kind: str = "output",
    housekeeping: list[str] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; when the body completes, rename it to ``target``.

    ``target`` is checked first (:func:`check_output_path`): an existing folder is replaced only with ``overwrite``
    and only when this toolkit wrote it, and only after the new folder is complete. Stale temporary folders of
    killed runs for the same target are removed first (the lines go to ``housekeeping`` when given). The temporary
    folder carries :data:`~model_merging_methods.paths.OWNER_MARKER` (``kind``, pid, host), which stays in the
    published folder. On any exception, Ctrl-C, SIGTERM or SIGHUP the temporary folder and the parent folders made
    for it are removed and the target is untouched; operating-system errors become one-line ``MergeError``s.
    """
    # stale folders first: a replaced output whose replacement never arrived is restored, and then checked
    lines = remove_stale_temporaries(Path(os.path.abspath(os.path.expanduser(os.fspath(target)))))
    if housekeeping is not None:
        housekeeping.extend(lines)
    target = check_output_path(target, overwrite)
    created: list[Path] = []
    tmp: Path | None = None
    try:
        with signals_as_exceptions():
            created = make_parents(target.parent)
            for _ in range(100):
                candidate = _temp_path(target, "tmp")
                try:
                    os.mkdir(candidate)  # 0o777 minus the umask, like any other folder
                except FileExistsError:
                    continue
                tmp = candidate
                break
            else:  # pragma: no cover - 100 random collisions
                raise MergeError(f"cannot create a temporary folder next to {target}")
            write_owner_marker(tmp, kind, pid=os.getpid(), host=socket.gethostname(), target=str(target))
            yield tmp
            with deferred_signals():
                _publish(tmp, target, overwrite)
                tmp = None
                created = []
    except OSError as exc:
        raise MergeError(os_error_message(exc, target)) from exc
    finally:
        if tmp is not None or created:
            with deferred_signals():
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                remove_created(created)


# ----------------------------------------------------------------------------------------------------------------
# single files
# ----------------------------------------------------------------------------------------------------------------


def _stale_file_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(_stem(path.name))}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _remove_stale_files(path: Path) -> None:
    pattern = _stale_file_pattern(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder (fsynced) and an atomic rename; the
    file gets the umask's permissions. Missing parent folders are created (and removed again on failure); an
    operating-system error is one ``MergeError`` line naming the path, and leaves no temporary file."""
    path = Path(path)
    created: list[Path] = []
    tmp: str | None = None
    try:
        created = make_parents(path.parent)
        _remove_stale_files(path)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{_stem(path.name)}.{os.getpid()}.", suffix=".tmp"
        )
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        remove_created(created)
        if isinstance(exc, OSError):
            # name the file the caller asked for, not the temporary one
            shown = exc if exc.filename not in (None, tmp) else OSError(exc.errno, exc.strerror)
            raise MergeError(os_error_message(shown, path)) from exc
        raise
    return path


@contextlib.contextmanager
def staged_files(folder: PathLike) -> Iterator[Path]:
    """Yield a temporary folder inside ``folder`` (created if needed) for a set of result files; when the body
    completes, every file in it is moved into ``folder`` (replacing files of the same name), so a run that fails
    half-way leaves none of its files behind. Stale staging folders of killed runs are removed first."""
    folder = check_output_folder(folder)
    remove_stale_temporaries(folder / "staging")
    created: list[Path] = []
    tmp: Path | None = None
    try:
        with signals_as_exceptions():
            created = make_parents(folder)
            tmp = _temp_path(folder / "staging", "tmp")
            os.mkdir(tmp)
            write_owner_marker(tmp, "staged result files", pid=os.getpid(), host=socket.gethostname())
            yield tmp
            with deferred_signals():
                for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
                    if entry.name != OWNER_MARKER:
                        os.replace(entry.path, folder / entry.name)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = None
                created = []
    except OSError as exc:
        raise MergeError(os_error_message(exc, folder)) from exc
    finally:
        if tmp is not None or created:
            with deferred_signals():
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                remove_created(created)


def write_json(path: PathLike, obj: Any, indent: int = 4) -> Path:
    """Atomically write ``obj`` as indented JSON (UTF-8, non-ASCII kept)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
