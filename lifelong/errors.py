"""The harness's error types, free of torch and Avalanche so the command line can catch them
before anything heavy is imported. `lifelong` exits with status 2 on a ConfigError, StreamError or
CheckpointError (a mistake in what was given) and 3 on TrainingDiverged."""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem in what the user configured; the CLI prints it and exits with status 2."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or not ours."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run stops at its last good checkpoint.

    `step` is the optimizer step that would have applied it, `experience` the experience index;
    `run_dir` is set by the run session so the message can name the last good checkpoint.
    """

    def __init__(self, message: str, step: int = 0, experience: int = 0):
        super().__init__(message)
        self.step, self.experience = step, experience
        self.run_dir = None


def check_positive(section: str, **values: float) -> None:
    """ConfigError naming `section.name` for the first of `values` that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


def check_non_negative(section: str, **values: float) -> None:
    """ConfigError naming `section.name` for the first of `values` that is negative."""
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {value!r}")
