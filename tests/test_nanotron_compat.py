"""The nanotron 0.4 compatibility patches: each still applies, each is still needed, and they step aside on a
CUDA + NCCL machine. Every probe runs in a fresh interpreter (patches and the import cycle are per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mixlab.training.nanotron_compat import PATCHES, NanotronCompatError, ensure_nanotron, steps_aside


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_applies_and_is_still_needed(patch):
    probe = "from mixlab.training import nanotron_compat as c; c.run_probe({name!r}, skip={skip!r}); print('PROBE OK')"
    patched = _run(probe.format(name=patch.name, skip=[]))
    assert patched.returncode == 0 and "PROBE OK" in patched.stdout, (
        f"patch {patch.name!r} no longer makes its probe pass ({patch.works_around}):\n{patched.stderr[-3000:]}")
    unpatched = _run(probe.format(name=patch.name, skip=[patch.name]))
    assert unpatched.returncode != 0, (
        f"the probe of {patch.name!r} passes without the patch: nanotron no longer needs it "
        f"({patch.works_around}); remove it from training/nanotron_compat.py")
    assert patch.symptom in unpatched.stderr, (
        f"without {patch.name!r} the probe fails, but not with the symptom {patch.symptom!r}:\n"
        f"{unpatched.stderr[-3000:]}")


def test_patches_step_aside_on_cuda_with_nccl():
    assert steps_aside(cuda=True, nccl=True)
    assert not steps_aside(cuda=True, nccl=False) and not steps_aside(cuda=False, nccl=True)
    code = ("import torch, torch.distributed as d\n"
            "torch.cuda.is_available = lambda: True\n"
            "d.is_nccl_available = lambda: True\n"
            "from mixlab.training import nanotron_compat as c\n"
            "print(sorted(c.ensure_nanotron()))\n"
            "from nanotron.parallel.context import ParallelContext\n"
            "print(getattr(ParallelContext.__init__, '_mixlab_compat', False))\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted(p.name for p in PATCHES if not p.cpu_only)
    assert result.stdout.split("\n")[:2] == [str(expected), "False"]


def test_unknown_patch_name_is_refused():
    with pytest.raises(NanotronCompatError, match="no compat patch named"):
        ensure_nanotron(skip=["no-such-patch"])
