"""The harness's error types load without torch or Avalanche, and the one shared value check."""

import subprocess
import sys

import pytest

from lifelong.errors import CheckpointError, ConfigError, TrainingDiverged, check_non_negative, check_positive


def test_errors_are_value_errors_except_divergence():
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)
    err = TrainingDiverged("loss is nan", step=3, experience=1)
    assert (err.step, err.experience, err.run_dir, str(err)) == (3, 1, None, "loss is nan")


def test_check_positive_names_the_first_bad_setting():
    check_positive("train", lr=1e-3, batch_size=1)
    with pytest.raises(ConfigError, match=r"^train.batch_size must be > 0, got 0$"):
        check_positive("train", lr=1e-3, batch_size=0, epochs=-1)


def test_check_non_negative_accepts_zero_and_names_a_negative_setting():
    check_non_negative("growth", warmup_steps=0, max_growths=3)
    with pytest.raises(ConfigError, match=r"^growth.max_growths must be >= 0, got -1$"):
        check_non_negative("growth", warmup_steps=0, max_growths=-1)


def test_importing_the_errors_loads_neither_torch_nor_avalanche():
    code = "import sys, lifelong.errors; print(any(m.split('.')[0] in ('torch', 'avalanche') for m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
