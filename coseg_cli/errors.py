"""Typed errors: the CLI turns every CosegError into one red line and exit code 1."""


class CosegError(Exception):
    """Base of every error a user can cause (bad input, bad config, missing weights)."""


class InputError(CosegError):
    """An input file or folder is missing, unreadable or unusable."""


class ConfigError(CosegError):
    """A configuration value is out of range or unknown."""


class WeightsError(CosegError):
    """Model weights could not be found, verified or loaded."""


class TrainingError(CosegError):
    """Fine-tuning diverged (NaN/inf loss) or could not run."""


class OutputError(CosegError):
    """An output or cache file could not be written (disk full, read-only, not a folder)."""


class LockedError(CosegError):
    """Another coseg run is writing the same output folder."""
