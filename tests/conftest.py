"""Shared test set-up: import the project's modules from the repo root, and run its scripts as a user would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / 'tests' / 'data'
sys.path.insert(0, str(ROOT))


def run_script(*argv, timeout=600, env=None, module=False):
    """Run ``python <script> argv...`` (or ``python -m <module> ...``) from the repo root; returns the
    CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    cmd = [sys.executable] + (['-m'] if module else []) + [str(a) for a in argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def script():
    return run_script

