"""manifest.json: the typed record of one finished run, and the only code that turns it into JSON
or reads it back.

`coseg run` writes it last, so its presence marks a complete output folder (`export.write_manifest`
writes `Manifest.to_json()`); `coseg report` and `coseg merge` read it with `read_manifest`, and
`coseg run --config` replays its config with `read_config`. A file that is not what this module
writes is one InputError naming the file and the key; nothing is guessed or filled in."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import CosegConfig
from .errors import ConfigError, InputError
from .records import TrainReport, WeightsInfo
from .runtime import read_json

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class InputFile:
    """One input image as the run read it.

    Attributes:
        name: path relative to the input folder (posix). sha1: hex digest of the file bytes.
        bytes: file size, or None for an image given as an array. height, width: in pixels.
    """

    name: str
    sha1: str
    bytes: int | None
    height: int
    width: int


@dataclass(frozen=True)
class Counts:
    """What the run found, per image in input order.

    Attributes:
        images: number of input images. instances: number of instances, over all images.
        instances_per_image: instances of each image.
        cosaliency_mean: mean co-saliency of each image in [0, 1] (the report's outlier check;
            the cosaliency/ PNGs hold only 8-bit JET colours).
    """

    images: int
    instances: int
    instances_per_image: tuple[int, ...]
    cosaliency_mean: tuple[float, ...]


@dataclass(frozen=True)
class Manifest:
    """Everything needed to audit or replay one run (`coseg run --config manifest.json`).

    The JSON object also holds `seed` and `prior` at its top level, copies of `config.seed` and
    `config.prior` kept for readers of the file; `from_json` checks that they agree.

    Attributes:
        config: the run's config. category: the category name written to instances.json.
        input_folder: the folder the images came from. inputs: one entry per image.
        environment: versions and machine facts (`runtime.environment_record`; display only).
        weights: where the starting VGG-16 weights came from (None: not recorded).
        prior_trained: whether the saliency prior was trained on saliency labels.
        cache_hits: stage → entries taken from the stage cache.
        train: what fine-tuning did (None: not recorded).
        timings_s: stage → seconds. counts: what the run found.
        started_at: when the run started (timezone-aware). skipped_files: inputs skipped
            (`--skip-bad`), one message each. seconds: the run's wall time.
    """

    config: CosegConfig
    category: str
    input_folder: str
    inputs: tuple[InputFile, ...]
    environment: dict[str, Any]
    weights: WeightsInfo | None
    prior_trained: bool
    cache_hits: dict[str, int]
    train: TrainReport | None
    timings_s: dict[str, float]
    counts: Counts
    started_at: datetime
    skipped_files: tuple[str, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The JSON object of manifest.json (json.dumps-ready; keys in their documented order)."""
        return {
            "config": self.config.to_dict(),
            "category": self.category,
            "input_folder": self.input_folder,
            "inputs": [asdict(i) for i in self.inputs],
            "environment": dict(self.environment),
            "seed": self.config.seed,
            "weights": None if self.weights is None else asdict(self.weights),
            "prior": self.config.prior,
            "prior_trained": self.prior_trained,
            "cache_hits": dict(self.cache_hits),
            "train": None if self.train is None else asdict(self.train),
            "timings_s": dict(self.timings_s),
            "counts": {"images": self.counts.images, "instances": self.counts.instances,
                       "instances_per_image": list(self.counts.instances_per_image),
                       "cosaliency_mean": list(self.counts.cosaliency_mean)},
            "started_at": self.started_at.isoformat(),
            "skipped_files": list(self.skipped_files),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Manifest:
        """Validate and type a parsed manifest.json.

        Args:
            data: the parsed JSON value. source: the file it came from, for messages.

        Raises:
            InputError: not an object, a key missing, unknown or of the wrong type, or values
                that disagree (counts against inputs, `seed`/`prior` against the config).
        """
        top = _object(data, source, "the manifest", _TOP_KEYS)
        try:
            config = CosegConfig.from_dict(_object(top["config"], source, "config"))
        except ConfigError as exc:
            raise InputError(f"{source}: config: {exc}") from None
        for key, value in (("seed", config.seed), ("prior", config.prior)):
            if top[key] != value:
                raise InputError(f"{source}: {key} {top[key]!r} disagrees with config.{key} "
                                 f"{value!r}")
        get = _getter(source, "")
        inputs = tuple(_input_file(v, source, f"inputs[{i}]")
                       for i, v in enumerate(get(top, "inputs", _is_list, "a list")))
        counts = _counts(top["counts"], source)
        if counts.images != len(inputs):
            raise InputError(f"{source}: counts.images is {counts.images} but inputs lists "
                             f"{len(inputs)} image(s)")
        started = get(top, "started_at", _is_str, "an ISO 8601 time")
        try:
            started_at = datetime.fromisoformat(started)
        except ValueError:
            started_at = None
        if started_at is None or started_at.tzinfo is None:
            raise InputError(f"{source}: started_at must be an ISO 8601 time with a timezone, "
                             f"got {_short(started)}")
        return cls(
            config=config,
            category=get(top, "category", _is_str, "a string"),
            input_folder=get(top, "input_folder", _is_str, "a string"),
            inputs=inputs,
            environment=get(top, "environment", _is_dict_of(_is_scalar),
                            "an object of strings, numbers, booleans or nulls"),
            weights=None if top["weights"] is None else WeightsInfo(
                **_fields_of(WeightsInfo, top["weights"], source, "weights")),
            prior_trained=get(top, "prior_trained", _is_bool, "true or false"),
            cache_hits=get(top, "cache_hits", _is_dict_of(_is_count), "an object of counts"),
            train=None if top["train"] is None else _train(top["train"], source),
            timings_s=get(top, "timings_s", _is_dict_of(_is_seconds),
                          "an object of seconds (finite numbers >= 0)"),
            counts=counts,
            started_at=started_at,
            skipped_files=tuple(get(top, "skipped_files", _is_list_of(_is_str),
                                    "a list of strings")),
            seconds=float(get(top, "seconds", _is_seconds, "a finite number >= 0")),
        )


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of one output folder.

    Raises:
        InputError: OUT/manifest.json missing, unreadable or not a coseg manifest.
    """
    path = Path(out_dir) / MANIFEST_NAME
    return Manifest.from_json(read_json(path, "manifest"), str(path))


def read_config(path: Path) -> CosegConfig:
    """The config to replay (`coseg run --config`): a manifest's `config`, or a file that holds
    only a config object. Only the config is read, so a hand-written `{"config": {...}}` works.

    Raises:
        InputError: the file is missing, unreadable or holds no config object.
        ConfigError: the config itself is invalid (unknown key, wrong type or range).
    """
    data = read_json(Path(path), "config")
    if isinstance(data, dict) and "config" in data:
        data = data["config"]
    if not isinstance(data, dict):
        raise InputError(f"config {path} must be a JSON object (a manifest or its config), got "
                         f"{_short(data)}")
    return CosegConfig.from_dict(data)


# --------------------------------------------------------------------------- validation

_TOP_KEYS = ("config", "category", "input_folder", "inputs", "environment", "seed", "weights",
             "prior", "prior_trained", "cache_hits", "train", "timings_s", "counts",
             "started_at", "skipped_files", "seconds")
_COUNTS_KEYS = ("images", "instances", "instances_per_image", "cosaliency_mean")
Check = Callable[[Any], bool]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _object(value: Any, source: str, label: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """`value` as a JSON object; with `keys`, it must hold exactly those."""
    if not isinstance(value, dict):
        raise InputError(f"{source}: {label} must be a JSON object, got {_short(value)}")
    if keys:
        missing = [k for k in keys if k not in value]
        unknown = sorted(str(k) for k in value if k not in keys)
        if missing or unknown:
            where = "" if label == "the manifest" else f" in {label}"
            problem = f"missing key(s) {missing}" if missing else f"unknown key(s) {unknown}"
            raise InputError(f"{source}: {problem}{where}")
    return value


def _getter(source: str, prefix: str) -> Callable[[dict[str, Any], str, Check, str], Any]:
    """A reader of checked values: get(obj, key, check, want) → obj[key], or an InputError
    "<source>: <prefix><key> must be <want>, got <value>"."""
    def get(obj: dict[str, Any], key: str, check: Check, want: str) -> Any:
        value = obj[key]
        if not check(value):
            raise InputError(f"{source}: {prefix}{key} must be {want}, got {_short(value)}")
        return value
    return get


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_number(v: Any) -> bool:
    """A JSON number that converts to a float (NaN and ±inf included, huge integers not)."""
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)
                                    and abs(v) < 1e300)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_seconds(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v) and v >= 0


def _is_fraction(v: Any) -> bool:
    return _is_number(v) and 0.0 <= v <= 1.0


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _is_list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _is_dict_of(check: Check) -> Check:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


def _fields_of(record: type, value: Any, source: str, label: str) -> dict[str, Any]:
    """The fields of a record of strings (WeightsInfo) from a JSON object holding exactly them."""
    names = tuple(f.name for f in fields(record))
    obj = _object(value, source, label, names)
    get = _getter(source, f"{label}.")
    return {name: get(obj, name, _is_str, "a string") for name in names}


def _input_file(value: Any, source: str, label: str) -> InputFile:
    obj = _object(value, source, label, tuple(f.name for f in fields(InputFile)))
    get = _getter(source, f"{label}.")
    return InputFile(name=get(obj, "name", _is_str, "a string"),
                     sha1=get(obj, "sha1", _is_str, "a string"),
                     bytes=get(obj, "bytes", lambda v: v is None or _is_count(v),
                               "a count or null"),
                     height=get(obj, "height", _is_count, "a count"),
                     width=get(obj, "width", _is_count, "a count"))


def _counts(value: Any, source: str) -> Counts:
    obj = _object(value, source, "counts", _COUNTS_KEYS)
    get = _getter(source, "counts.")
    counts = Counts(
        images=get(obj, "images", _is_count, "a count"),
        instances=get(obj, "instances", _is_count, "a count"),
        instances_per_image=tuple(get(obj, "instances_per_image", _is_list_of(_is_count),
                                      "a list of counts")),
        cosaliency_mean=tuple(float(v) for v in get(obj, "cosaliency_mean",
                                                    _is_list_of(_is_fraction),
                                                    "a list of numbers in [0, 1]")))
    for key in ("instances_per_image", "cosaliency_mean"):
        if len(getattr(counts, key)) != counts.images:
            raise InputError(f"{source}: counts.{key} has {len(getattr(counts, key))} "
                             f"entries for {counts.images} image(s)")
    if sum(counts.instances_per_image) != counts.instances:
        raise InputError(f"{source}: counts.instances is {counts.instances} but "
                         f"counts.instances_per_image sums to {sum(counts.instances_per_image)}")
    return counts


def _train(value: Any, source: str) -> TrainReport:
    obj = _object(value, source, "train", tuple(f.name for f in fields(TrainReport)))
    get = _getter(source, "train.")
    history = get(obj, "history", _is_list_of(
        lambda h: _is_dict_of(_is_number)(h) and "total" in h),
        "a list of objects of loss terms, each with a total")
    return TrainReport(history=[dict(h) for h in history],
                       steps=get(obj, "steps", _is_count, "a count"),
                       seconds=float(get(obj, "seconds", _is_seconds, "a finite number >= 0")),
                       device=get(obj, "device", _is_str, "a string"),
                       cached=get(obj, "cached", _is_bool, "true or false"),
                       cache_path=get(obj, "cache_path", lambda v: v is None or _is_str(v),
                                      "a string or null"))


__all__ = ["MANIFEST_NAME", "Counts", "InputFile", "Manifest", "read_config", "read_manifest"]
