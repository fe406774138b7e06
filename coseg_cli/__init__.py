"""coseg: instance co-segmentation of a folder of photos (DeepCO3, CVPR 2019)."""

__version__ = "0.1.0"

from .config import PRESETS, CosegConfig, preset_config
from .errors import ConfigError, CosegError, InputError

__all__ = [
    "PRESETS",
    "ConfigError",
    "CosegConfig",
    "CosegError",
    "InputError",
    "__version__",
    "preset_config",
]


def __getattr__(name: str):  # lazy: importing torch-heavy stages only when asked for
    if name == "cosegment":
        from .pipeline import cosegment

        return cosegment
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    raise AttributeError(name)
