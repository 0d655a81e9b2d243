"""Writing outputs safely: complete or absent, one writer at a time, failures as one clear line.

Every hgc writer goes through this module:

- :func:`safe_name` turns an identifier (slide, fold, patient) into one file-name component, so
  an id never acts as a path (``a/b`` or ``..`` stay inside the output folder, reversibly);
- :func:`output_lock` holds a lock beside an output (``.<name>.lock``) for the whole command
  (exclusive to write, shared to read), names the holder when a writer is refused, and removes
  the temporary files an earlier, killed writer of that output left behind;
- :func:`atomic_file` / :func:`atomic_dir` write under a temporary name beside the target and rename
  it into place only once complete (files are fsynced first), so a kill, a full disk or an error
  leaves the previous output or nothing, never a half-written one;
- :func:`check_writable` and :func:`require_free_space` run before the work starts;
- :func:`os_error_message` words a write failure (full disk, read-only folder, no permission) as a
  sentence naming the path; the CLI prints it as one line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from .errors import InputError

log = logging.getLogger(__name__)

#: errno values that mean "this path cannot be written here", with the words for each.
WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file exceeds the size this system allows (disk or quota limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the file name is too long for this file system",
}
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_H5_ERRNO = re.compile(r"errno = (\d+)")


def output_path(path: str | Path) -> Path:
    """The real, absolute path an output will have: symbolic links resolved (so the temporary file,
    the lock and the free-space check are on the target's file system, and two spellings of one
    output share one lock), ``.`` and ``..`` removed. The file system root is refused."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    if not real.name:
        raise InputError(f"cannot write an output at {real}: choose a file or folder below it")
    return real


def safe_name(identifier: str) -> str:
    """``identifier`` as a single, reversible file-name component (``urllib.parse.unquote`` undoes it).

    Letters, digits and ``_.-~`` are kept, everything else (``/``, spaces, ``%``...) is
    percent-encoded, and a leading ``.`` too, so ``.``, ``..`` and hidden names cannot occur.
    Ordinary ids (``B4``, ``TENX95``, ``patient-C``) are unchanged.
    """
    name = quote(str(identifier), safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if not name:
        raise InputError("an empty identifier cannot name a file")
    return name


def os_error_message(exc: Exception, path: str | Path | None = None, writing: bool = True) -> str | None:
    """One sentence for a file-system failure hgc can explain (full disk, read-only, permissions,
    name too long), else None. ``writing=False`` when it is not known to come from a write: then a
    permission error says "cannot access", not "cannot write".

    h5py reports HDF5 write failures as an OSError (or RuntimeError) whose text holds
    ``errno = N``; that number is used when ``exc.errno`` is unset.
    """
    code = getattr(exc, "errno", None)
    if code is None:
        found = _H5_ERRNO.search(str(exc))
        code = int(found.group(1)) if found else None
    if code not in WRITE_ERRORS:
        return None
    where = path or getattr(exc, "filename", None) or "the output"
    if code in _SPACE_ERRORS:
        return f"cannot write {where}: {WRITE_ERRORS[code]}; free some space or choose another output folder"
    if code == errno.ENAMETOOLONG:
        return f"cannot create {where}: {WRITE_ERRORS[code]} (slide and fold ids become file names; shorten them)"
    if writing or code == errno.EROFS:
        return f"cannot write {where}: {WRITE_ERRORS[code]}; choose a folder you may write to"
    return f"cannot access {where}: {WRITE_ERRORS[code]}; check the permissions of the file and its folders"


def _write_error(exc: OSError, path: Path) -> InputError:
    return InputError(os_error_message(exc, path) or f"cannot write {path}: {exc}")


def _reraise_write_error(exc: Exception, path: Path) -> None:
    """Raise a failure to write ``path`` (or its temporary) as a one-line InputError; leave others.

    An error that names another file (e.g. an input read inside the block) is not a write error
    of this output and passes unchanged.
    """
    named = getattr(exc, "filename", None)
    if named is not None and not str(os.path.abspath(named)).startswith(str(path.parent)):
        return
    message = os_error_message(exc, path)
    if message:
        raise InputError(message) from exc


def check_writable(path: str | Path) -> Path:
    """Fail now, with one line, if ``path`` (a file or folder to create) cannot be written.

    Creates the missing parent folders and a probe file in the parent, so read-only file
    systems, missing permissions and completely full disks are found before any work is done.
    """
    path = output_path(path)
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise InputError(f"{path} exists and is neither a file nor a folder")
    parent = path.parent
    probe = parent / f".{safe_name(path.name)}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"hgc")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _write_error(exc, parent) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"cannot write {path}: permission denied")
    return path


def check_replaceable_folder(path: str | Path, ours: Callable[[Path], bool], what: str) -> Path:
    """``path`` if a new ``what`` (e.g. "hgc run") may replace it: absent, empty, or ``ours(path)``.

    A folder that holds anything else is refused; files a user added to one of hgc's folders are
    carried over when it is replaced (see :func:`atomic_dir`).
    """
    path = output_path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; an {what} is written to a folder")
    if path.is_dir() and any(path.iterdir()) and not ours(path):
        raise InputError(f"{path} is a folder that does not hold an {what}; choose a new or empty folder "
                         f"(hgc replaces an earlier {what} there, and keeps files it did not write)")
    return check_writable(path)


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def require_free_space(path: str | Path, nbytes: int, what: str, one_file: bool = True) -> None:
    """Refuse to start writing ``nbytes`` at ``path`` if the file system has less free (with a
    10% + 64 KiB margin), or, for ``one_file``, if this process may not write a file that large
    (``ulimit -f``, common on clusters)."""
    folder = output_path(path).parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = int(nbytes * 1.1) + (1 << 16)
    if free < need:
        raise InputError(
            f"cannot write {what} ({path}): it needs about {_size(need)} and the disk has "
            f"{_size(free)} free; free some space or choose another output folder"
        )
    limit = _file_size_limit() if one_file else None
    if limit is not None and limit < need:
        raise InputError(
            f"cannot write {what} ({path}): it needs about {_size(need)}, but this process may "
            f"write files of at most {_size(limit)} (ulimit -f); raise the limit"
        )


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


# --- temporary names, and cleaning what a killed writer left --------------------------------------

def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{_temp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_TEMPORARY = re.compile(r"(\..+\.tmp-\d+-[0-9a-f]{8}|.+\.tmp\d+)$")  # ours, and hgc <= 0.1's


def is_temporary(name: str) -> bool:
    """Whether a file name is one of hgc's temporary names (of any output)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files and folders earlier writers of ``path`` left (call under its lock).

    Also removes the ``<name>.tmp<pid>`` files of hgc versions before the lock existed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    legacy = re.compile(re.escape(path.name) + r"\.tmp\d+")
    stale = [p for p in path.parent.iterdir()
             if (p.name.startswith(_temp_prefix(path)) and is_temporary(p.name)) or legacy.fullmatch(p.name)]
    for p in stale:
        log.info("removing %s, left by an interrupted hgc run", p)
        _remove(p)
    return stale


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some platforms
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(folder)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path to write; it replaces ``path`` only if the block completes.

    The temporary file sits beside ``path`` (same file system, so the rename is atomic) and is
    fsynced before the rename; on any failure it is deleted and ``path`` is untouched.
    """
    path = output_path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as exc:
        _reraise_write_error(exc, path)
        raise
    finally:
        _remove(tmp)


#: HDF5 files up to this size are assembled in memory and written in one piece (see :func:`atomic_h5`).
IN_MEMORY_H5_BYTES = 1 << 30


@contextlib.contextmanager
def atomic_h5(path: str | Path, nbytes: int) -> Iterator["h5py.File"]:  # noqa: F821
    """An HDF5 file open for writing that appears at ``path`` only once complete (:func:`atomic_file`).

    ``nbytes`` estimates its size: the disk (and ``ulimit -f``) must have room for it first. Files
    up to :data:`IN_MEMORY_H5_BYTES` are built in memory (HDF5's ``core`` driver) and written at
    close: when the disk fills during a direct write, HDF5's cleanup can crash the process, while a
    failed write of the finished image is an ordinary error.
    """
    import h5py

    path = output_path(path)
    require_free_space(path, nbytes, f"the file {path.name}")
    in_memory = {"driver": "core", "backing_store": True} if nbytes <= IN_MEMORY_H5_BYTES else {}
    with atomic_file(path) as tmp:
        try:
            with h5py.File(tmp, "w", **in_memory) as f:
                yield f
        except RuntimeError as exc:  # HDF5 reports a failed write at close as RuntimeError
            _reraise_write_error(exc, path)
            raise


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_file`)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep: Callable[[Path], list[Path]] | None = None) -> Iterator[Path]:
    """A temporary folder to fill; it replaces the folder ``path`` only if the block completes.

    ``keep(old_folder)`` names entries of the folder being replaced that hgc did not write (a
    user's figure, notes): they are copied into the new folder first, so replacing an output
    never loses them. The old folder is then renamed aside, the new one renamed into place, and
    the old one deleted: at every moment ``path`` is the complete old output, the complete new
    one, or (for an instant, if killed between the two renames) absent.
    """
    path = output_path(path)
    tmp = _temp_name(path)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(exc, tmp) from None
    try:
        yield tmp
        if keep is not None and path.is_dir():
            for entry in keep(path):
                if (tmp / entry.name).exists():
                    log.warning("%s: not keeping %s, the new output has an entry of that name", path, entry)
                elif entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = _temp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            _remove(old)
    except OSError as exc:
        _reraise_write_error(exc, path)
        raise
    finally:
        if tmp.exists():
            _remove(tmp)


# --- one writer at a time ---------------------------------------------------------------------------

_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (fd, depth): re-entrant within one process


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _holder(lock: Path) -> tuple[str, str]:
    """(what the holder does: "written"/"read", who it is) from the lock file's record."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return info.get("mode", "written"), f"`{info['command']}` (process {info['pid']} on {info['host']}, started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "written", "another hgc process"


@contextlib.contextmanager
def output_lock(path: str | Path, command: str, shared: bool = False) -> Iterator[None]:
    """Hold the lock of output ``path`` for the block: exclusive to write it, ``shared`` to read it.

    The lock is an advisory ``flock`` on ``.<name>.lock`` beside ``path``, released by the
    operating system even if the process is killed; it is re-entrant within one process. Readers
    (``hgc predict`` reading a run) share it, so they see one version of the output while a writer
    waits; a writer is refused while anyone holds it, with one line naming the holder. On entry a
    writer deletes the temporary files of earlier, interrupted writers of ``path``: while the lock
    is held no one else can be writing them. On systems without ``fcntl`` (Windows) there is no lock.
    """
    path = output_path(path)
    lock = _lock_path(path)
    key = str(lock)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _write_error(exc, lock) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        doing, who = _holder(lock)
        raise InputError(f"{path} is being {doing} by {who}; wait for it to finish, or choose another output") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time(),
                "mode": "read" if shared else "written"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = (fd, 1)
        if not shared:
            remove_stale_temporaries(path)
        yield
    finally:
        _HELD.pop(key, None)
        if not shared:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)


def command_line() -> str:
    """The running command, for lock holders and records (``hgc fit ...`` or the script name)."""
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    return " ".join(argv)[:200]
