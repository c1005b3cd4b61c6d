"""Files written whole or not at all: embeddings, checkpoints, saved models, metrics.

A file is written as `.<name>.tmp-<pid>` in the target's directory, flushed and fsync'ed, renamed over the target
with os.replace (atomic on POSIX), and the directory is fsync'ed so the rename survives a crash. A kill at any
moment leaves the old file or the new one, never a torn one. A failed write removes its temporary and raises
OSError naming the path (and saying "disk full" for ENOSPC / EDQUOT): the caller's old file is untouched. The
temporary is created like any new file (mode 0666 minus the umask). Temporaries of processes that died (SIGKILL,
power loss) are removed by `remove_stale_temporaries`, which runs before the next write to a directory.
"""
from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` files in `directory` whose process is gone; returns the paths removed."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path, e: BaseException) -> OSError:
    """An OSError for a failed write of `path` that says what happened in one line (disk full, or the cause)."""
    code = getattr(e, "errno", None)
    if code in _FULL:
        err = OSError(f"disk full: cannot write {path} ({os.strerror(code)}); the previous file, if any, is "
                      "unchanged; free some space and rerun")
    else:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        err = OSError(f"cannot write {path}: {why}")
    err.errno = code
    return err


class _Recorder:
    """A binary file that remembers the first OSError of a write: torch.save and safetensors report a failed
    write as an unrelated error ("unexpected pos") after the fact, and this keeps the real cause."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


@contextmanager
def atomic_write(path):
    """Write `path` atomically: `with atomic_write(p) as f: f.write(...)` (f is a binary file object with write and
    flush). On an exception inside the block (or while finishing), the temporary is removed, `path` is untouched,
    and a failed write raises the OSError of `write_error` (other exceptions pass through unchanged)."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    remove_stale_temporaries(directory)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)  # a leftover of a process that had our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _Recorder(f)
            yield rec
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = rec.error if rec is not None and rec.error is not None else e
        if not isinstance(cause, OSError):  # not a failed write (KeyboardInterrupt, a caller's bug): as it is
            raise
        raise write_error(path, cause) from e
    _fsync_dir(directory)


__all__ = ["atomic_write", "remove_stale_temporaries", "write_error"]
