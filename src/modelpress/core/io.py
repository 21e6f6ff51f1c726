"""Atomic file writes: a failed or killed run never leaves a half-written file behind.

Every artifact and report modelpress writes goes through :func:`atomic_path`: the bytes go to
a temporary file next to the target (``.NAME.XXXX.tmp``), are flushed to disk, and the
temporary file is renamed over the target. A crash at any moment leaves either the previous
file or the new one, never a mixture; a SIGKILL can leave a stale ``.tmp`` file, which
:func:`remove_stale_temps` (called when a run folder is resumed) deletes.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
    >>> _ = write_json(p, {"a": 1})
    >>> open(p).read()
    '{\\n  "a": 1\\n}\\n'
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"
KILL_ENV = "MODELPRESS_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """Test-only fault injection: SIGKILL this process when ``$MODELPRESS_TEST_KILL_AT == name``.

    The reliability tests use it to kill a run at exact points (``stage-1-saved``,
    ``rename:model.safetensors`` ...) and check that it resumes to the same result. Never
    set the variable outside tests.
    """
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, racy with threads)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The permission bits ``path`` should get: those of the file it replaces, else 0666 - umask
    (what ``open(path, "w")`` would give; mkstemp's 0600 would hide results from other users)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` (if it existed) is untouched.
    The new file keeps the permissions of the file it replaces (else the umask's default).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:  # created inside the try: a Ctrl-C right after mkstemp still removes it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, _final_mode(path))
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        kill_point(f"rename:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary folder next to ``path``; on success it becomes ``path``.

    The folder's files are flushed to disk, then the folder is renamed into place; a folder
    already at ``path`` is moved aside first and deleted after, so a failure at any moment
    leaves the previous folder or the new one, never a mixture (a SIGKILL between the two
    renames leaves the previous one as ``.NAME.XXXX.old.tmp``). On an exception the temporary
    folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
        yield tmp
        mask = _umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.chmod(f, 0o666 & ~mask)  # what open() gives: writers that use mkstemp leave 0600
            elif f.is_dir():
                os.chmod(f, 0o777 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old" + TEMP_SUFFIX, dir=path.parent))
            os.replace(path, old)  # onto an empty folder: rename(2) allows it
        try:
            kill_point(f"rename:{path.name}")
            os.replace(tmp, path)
            tmp = None
        except BaseException:
            if old is not None and not path.exists():  # put the previous folder back
                os.replace(old, path)
                old = None
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_path` left under ``folder``; returns them."""
    removed = []
    for p in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
