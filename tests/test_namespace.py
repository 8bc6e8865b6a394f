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


def test_the_cli_builds_only_the_command_it_runs_and_lists_every_one():
    """`mixlab --help` and `mixlab curate` do not import what other commands' defaults come from (torch: seconds
    for every curation subprocess); the lazily built parser lists the same commands as the complete one."""
    from mixlab.pipelines.cli import COMMANDS, build_parser

    probe = ("import sys; from mixlab.pipelines.cli import build_parser; "
             "args = build_parser('curate').parse_args(['curate', '--raw', 'r', '--out', 'o', '--tasks', '3']); "
             "print(args.func.__name__, args.tasks, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["cmd_curate", "3", "False"], result.stderr
    listing = subprocess.run([sys.executable, "-m", "mixlab.pipelines.cli", "--help"], capture_output=True,
                             text=True, timeout=300)
    assert listing.returncode == 0 and all(f"    {name} " in listing.stdout or f"    {name}\n" in listing.stdout
                                           for name in COMMANDS), listing.stdout

    def commands(parser):
        action = parser._subparsers._group_actions[0]
        return {choice.dest: choice.help for choice in action._choices_actions}

    assert commands(build_parser()) == commands(build_parser("")) and len(commands(build_parser())) == len(COMMANDS)
    # every command's --help says what it does above its options
    parsers = build_parser()._subparsers._group_actions[0].choices
    assert all(len(parsers[name].description or "") > 20 for name in COMMANDS), [
        name for name in COMMANDS if not parsers[name].description]
