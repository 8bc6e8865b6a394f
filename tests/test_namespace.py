"""mixlab installs under one namespace: `mixlab.<stage>` resolves to this checkout's stage folders, and a user's
own `training/` or `pipelines/` folder in the working directory neither shadows them nor is shadowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("curation", "mixtures", "training", "ablations", "pipelines")


def test_every_stage_imports_under_the_mixlab_namespace():
    import importlib

    for stage in STAGES:
        module = importlib.import_module(f"mixlab.{stage}")
        assert Path(module.__file__).resolve().parent == REPO_ROOT / stage
    from mixlab.pipelines.cli import main  # the console script's entry point
    assert callable(main)


def test_a_users_own_stage_folders_neither_shadow_nor_are_shadowed(tmp_path):
    for stage in ("training", "pipelines", "curation"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "__init__.py").write_text(f"WHO = 'user {stage}'\n")
    probe = (
        "import training, pipelines, curation\n"
        "import mixlab.training, mixlab.pipelines.cli, mixlab.curation\n"
        "print(training.WHO, pipelines.WHO, curation.WHO)\n"
        "print(mixlab.training.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    users, ours = result.stdout.strip().splitlines()
    assert users == "user training user pipelines user curation"
    assert Path(ours).resolve() == REPO_ROOT / "training" / "__init__.py"
