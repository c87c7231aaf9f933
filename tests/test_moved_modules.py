"""Scripts written against the flat layout (e.g. ../shared/cases/*/repro.sh) still import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from wherefrom import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_name_is_the_new_module(old):
    new = importlib.import_module(f"wherefrom.{MOVED[old]}")
    with pytest.warns(DeprecationWarning, match=f"wherefrom.{old} moved to wherefrom.{MOVED[old]}"):
        sys.modules.pop(f"wherefrom.{old}", None)
        moved = importlib.import_module(f"wherefrom.{old}")
    assert moved is new


def test_flat_layout_script_runs_in_a_fresh_interpreter():
    """The imports the shared robustness cases use, in a new process (nothing imported before)."""
    script = (
        "from wherefrom.api import AttributionConfig, Attributor\n"
        "from wherefrom.data import Record\n"
        "from wherefrom.tiny import save_tiny, tiny_llama, tiny_tokenizer, with_lora\n"
        "from wherefrom.groundtruth.retrain import FunctionRetrainer\n"
        "import wherefrom.engine.api, wherefrom.studies.groundtruth.retrain as r\n"
        "assert Attributor is wherefrom.engine.api.Attributor and FunctionRetrainer is r.FunctionRetrainer\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
