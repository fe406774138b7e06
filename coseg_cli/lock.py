"""One `coseg run` per output folder at a time.

Two runs writing the same folder would interleave files from different runs under one manifest.
Each run therefore holds OUT/.coseg.lock while it works: created atomically (O_CREAT | O_EXCL),
holding the owner's pid, host and start time, removed on every exit (success, error, Ctrl-C,
SIGTERM). A lock left by a killed run (SIGKILL, power loss) names a process that no longer exists
on this host; it is taken over. A lock from another host cannot be checked and is respected.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import LockedError

LOCK_NAME = ".coseg.lock"
# A lock file that holds no owner yet is being written (create and write are two steps); one
# still unreadable after this long was left by a process killed between them.
UNREADABLE_GRACE_S = 10.0


@dataclass(frozen=True)
class HeldLock:
    """A lock this process holds; `created_folder` says whether acquiring it made the folder."""

    path: Path
    token: str
    created_folder: bool


def _owner_record(token: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
            "started": datetime.now(UTC).isoformat(timespec="seconds")}


def _read_owner(path: Path) -> tuple[bytes, dict[str, Any] | None] | None:
    """(raw bytes, parsed owner or None when not a valid record); None if the file is gone."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(raw)
    except ValueError:
        return raw, None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) \
        and isinstance(owner.get("host"), str)
    return raw, owner if ok else None


def _process_gone(owner: dict[str, Any]) -> bool:
    """True only when the owner ran on this host and its pid no longer exists."""
    if owner["host"] != socket.gethostname() or owner["pid"] <= 0:
        return False
    if owner["pid"] == os.getpid():
        return False  # ourselves: never stale
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _take_over(path: Path, stale: bytes) -> None:
    """Remove a stale lock, safe against another process doing the same at the same moment:
    the lock is renamed to a private name first, and put back if it was no longer the stale
    one (another run had already taken it over)."""
    private = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, private)
    except FileNotFoundError:
        return  # someone else removed it: just try again
    try:
        if private.read_bytes() != stale:
            with suppress(FileExistsError):
                os.link(private, path)  # a live lock: put it back (fails if a newer one exists)
    finally:
        private.unlink(missing_ok=True)


def _locked_message(folder: Path, path: Path, owner: dict[str, Any] | None) -> str:
    if owner is None:
        return (f"{folder} is locked by another coseg run ({path} names no owner yet); if no "
                f"run is writing there, delete {path}")
    since = f", started {owner['started']}" if isinstance(owner.get("started"), str) else ""
    return (f"{folder} is in use by another coseg run (pid {owner['pid']} on host "
            f"{owner['host']}{since}); wait for it to finish, or delete {path} if that run is "
            "gone")


def acquire(folder: Path) -> HeldLock:
    """Take OUT/.coseg.lock, creating `folder` if needed.

    Raises:
        LockedError: a live run (or one on another host) holds it; the message names its pid and
            host.
        OSError: `folder` cannot be created or written (the caller reports that as usual).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _acquire_in(folder, created)
    except OSError:
        if created:
            with suppress(OSError):
                folder.rmdir()
        raise


def _acquire_in(folder: Path, created: bool) -> HeldLock:
    path = folder / LOCK_NAME
    token = uuid.uuid4().hex
    record = json.dumps(_owner_record(token)).encode()
    for _ in range(10):  # each retry follows a lock that vanished or was stale
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = _read_owner(path)
            if seen is None:
                continue
            raw, owner = seen
            if owner is None:
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < UNREADABLE_GRACE_S:
                    raise LockedError(_locked_message(folder, path, None)) from None
            elif not _process_gone(owner):
                raise LockedError(_locked_message(folder, path, owner)) from None
            _take_over(path, raw)
            continue
        try:
            os.write(fd, record)
        except OSError:  # disk full: leave no ownerless lock behind
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return HeldLock(path, token, created)
    seen = _read_owner(path)
    raise LockedError(_locked_message(folder, path, seen[1] if seen else None))


def release(lock: HeldLock) -> None:
    """Remove the lock if it is still ours, then the folder if acquiring made it and it stayed
    empty (a run that failed before writing anything leaves no empty OUT behind)."""
    seen = _read_owner(lock.path)
    if seen is not None and seen[1] is not None and seen[1].get("token") == lock.token:
        with suppress(OSError):
            lock.path.unlink()
    if lock.created_folder:
        with suppress(OSError):
            lock.path.parent.rmdir()


@contextmanager
def hold(folders: list[Path]) -> Iterator[list[HeldLock]]:
    """Hold the lock of every folder for the duration of the block, all or none.

    A folder that cannot be created or written gets no lock: the run reports that folder's error
    itself, as it would without locking.

    Raises:
        LockedError: some folder is locked by another run (the locks taken so far are released).
    """
    held: list[HeldLock] = []
    try:
        for folder in folders:
            try:
                held.append(acquire(folder))
            except OSError:
                continue
        yield held
    finally:
        for lock in reversed(held):
            release(lock)
