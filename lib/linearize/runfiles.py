"""Files of a run folder that must survive kills, disk-full errors and concurrent use.

* ``atomic_save`` / ``load_verified``: ``torch.save`` to a temporary sibling, fsync, rename,
  and a ``<file>.sha256`` record beside it that ``load_verified`` checks before loading, so a
  truncated or bit-flipped checkpoint is refused with its name and the fix instead of loading
  silently (and turning the loss NaN later).
* ``hold_lock``: one process at a time per run folder (and per ``outputs/`` study), with the
  holder's PID in the refusal. The lock is ``filelock``'s ``flock``: the kernel drops it when
  its process dies, so a lock left by a killed run is taken over without any clean-up.
* ``remove_stale_temp_files``: ``.<name>.tmp-<PID>`` files of processes that no longer run
  (what a kill during ``atomic_save`` leaves: up to 2 GB each).
* ``read_jsonl`` / ``repair_jsonl_tail``: a torn last line of ``metrics.jsonl`` (what a kill or
  a full disk during an append leaves) is dropped with a warning, and cut off before the next
  append; a damaged line elsewhere is an error naming the file and line.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

_TMP = re.compile(r"^\..+\.tmp-(\d+)$")
_CHUNK = 1 << 20


class RunFileError(RuntimeError):
    """A run file that is corrupt, missing, locked or could not be written."""


class RunLockedError(RunFileError):
    """Another live process holds the lock of a run folder or study."""


class DiskFullError(RunFileError, OSError):
    """The disk filled up while a run file was written; the previous version is intact."""


# ---------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------
def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_record(path: Path, accepted: list[dict]) -> None:
    record = checksum_path(path)
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"file": path.name, "accepted": accepted}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, record)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_record(path: Path) -> list[dict] | None:
    record = checksum_path(path)
    if not record.exists():
        return None
    try:
        return list(json.loads(record.read_text(encoding="utf-8"))["accepted"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunFileError(
            f"{record} (the checksum of {path.name}) is damaged ({err}). Delete {path} and {record.name} "
            "to redo what wrote it."
        ) from None


def is_disk_full(err: BaseException, path: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a failed write as a RuntimeError without errno
    # ("[enforce fail at inline_container.cc:...] ... file write failed"): blame the disk only
    # when it is (nearly) full.
    if isinstance(err, RuntimeError) and "inline_container" in str(err):
        try:
            return shutil.disk_usage(path.parent).free < (256 << 20)
        except OSError:
            return False
    return False


def disk_full_error(err: BaseException, path: Path) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"disk full while writing {path}: free space on {path.parent} (run folders' checkpoints take up to "
        f"~2 GB each) and run the same command again; the previous version of the file is intact "
        f"({type(err).__name__}: {str(err).strip()[:200]})",
    )


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path``, with a sha256
    record: a kill at any point leaves the old file or the new one, each matching its record.

    The record first accepts both the old and the new digest, then (after the rename) only the
    new one, so no kill between the two renames makes an intact file look corrupt."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            new = _digest(tmp)
            try:
                old = _read_record(path) if path.exists() else None
            except RunFileError:
                old = None  # a damaged record of the old file: the new one replaces both
            _write_record(path, [new, *(old or [])])  # the old file is one of these
            os.replace(tmp, path)
            _write_record(path, [new])
        except (OSError, RuntimeError) as err:
            if is_disk_full(err, tmp):
                raise disk_full_error(err, path) from err
            raise
    finally:
        if tmp.exists():
            tmp.unlink()


def verify(path: str | os.PathLike, fix: str) -> None:
    """Check ``path`` against its sha256 record (files written before records existed have none
    and pass); RunFileError naming the file and ``fix`` when it is missing or differs."""
    path = Path(path)
    if not path.exists():
        raise RunFileError(f"{path} is missing. {fix}")
    accepted = _read_record(path)
    if accepted is None:
        return
    actual = _digest(path)
    if not any(actual == a for a in accepted):
        sizes = sorted({a["size"] for a in accepted})
        what = (f"truncated or padded: {actual['size']} bytes, {sizes[0]} written" if actual["size"] not in sizes
                else "its bytes changed after it was written (sha256 differs)")
        raise RunFileError(f"{path} is corrupt ({what}). {fix}")


def load_verified(path: str | os.PathLike, fix: str, **load_kwargs):
    """``torch.load`` of a file written by ``atomic_save``, after checking its checksum; any
    failure to read it is a RunFileError naming the file and ``fix``."""
    import torch

    path = Path(path)
    verify(path, fix)
    try:
        return torch.load(path, **load_kwargs)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise RunFileError(f"{path} cannot be read ({type(err).__name__}: {str(err).strip()[:200]}). {fix}") from err


# ---------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # lock path -> [FileLock, depth]: re-entrant within this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its PID yet)"
    cmd = ""
    try:
        cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
    except OSError:
        pass
    return f"process {pid}" + (f" ({cmd[:160]})" if cmd else "")


@contextmanager
def hold_lock(folder: str | os.PathLike, what: str, name: str = ".lock"):
    """Hold ``folder/name`` for the block; RunLockedError naming the holder's PID if a live
    process holds it. Re-entrant within one process (nested calls share one lock)."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = (folder / name).resolve()
    key = str(lock_path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return

    def write_pid(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid()}).encode(), 0)

    lock = FileLock(lock_path, blocking=False, on_acquired=write_pid, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(
            f"{what} is in use by {_holder(lock_path)}. Wait for it to finish (or stop it), or use another "
            "run_name / outputs folder: two processes on one folder would log every step twice and overwrite "
            f"each other's files. (The lock {lock_path} frees itself when that process ends; never delete it.)"
        ) from None
    _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


# ---------------------------------------------------------------------------------------
# Clean-up
# ---------------------------------------------------------------------------------------
def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.tmp-<PID>`` files (from ``atomic_save`` and friends) under ``folder``
    whose process no longer runs; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp-*"):
        m = _TMP.match(path.name)
        if m and path.is_file() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file. An unreadable *last* line (a torn append) is dropped
    with a warning; an unreadable line before it is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes().split(b"\n")
    records, bad = [], None
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        if bad is not None:
            n, err = bad
            raise RunFileError(
                f"{path}:{n} is not valid JSON ({err}), and lines follow it, so it is not a torn last "
                f"append. Repair or delete that line (every line is one record)."
            )
        try:
            records.append(json.loads(line))
        except (ValueError, UnicodeDecodeError) as err:
            bad = (i + 1, err)
    if bad is not None:
        warnings.warn(f"{path}: dropped the unreadable last line {bad[0]} (a torn append from a kill or a "
                      "full disk); it is cut off before the next append.", stacklevel=2)
    return records


def repair_jsonl_tail(path: str | os.PathLike) -> bool:
    """Cut a torn last line (one without its newline, or not valid JSON) off ``path``, so the
    next append starts on a line of its own. Returns whether anything was cut."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data:
        return False
    body = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    last_start = body.rstrip(b"\n").rfind(b"\n") + 1
    last = body[last_start:].strip()
    if last:
        try:
            json.loads(last)
        except (ValueError, UnicodeDecodeError):
            body = body[:last_start]
    if len(body) == len(data):
        return False
    with open(path, "r+b") as fh:
        fh.truncate(len(body))
    warnings.warn(f"{path}: cut off a torn last line ({len(data) - len(body)} bytes) before appending.",
                  stacklevel=2)
    return True
