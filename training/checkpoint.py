"""Checkpoints that resume a run exactly, whatever wrapped the model when it was saved.

One directory per step, `<checkpoint_dir>/step_{N:08d}/`:

    model.pt      plain model state dict, canonical names (no `module.` / `_orig_mod.` wrapper prefixes)
    optimizer.pt  optimizer state keyed by parameter *name*, not by position, so another layout can load it
    rng.pt        torch (and cuda) generator states
    state.json    step (the LR schedule is a pure function of it), trainer counters, the sampler's state_dict,
                  numpy/python RNG states, model and train configs (human-readable; written last)

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash never leaves a
half-written `step_*` directory; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from mixlab.curation import outside_problem
from mixlab.training.errors import CheckpointError

CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / FSDP wrappers, torch.compile
CHECKPOINT_FILES = ("state.json", "model.pt", "optimizer.pt", "rng.pt")  # all a checkpoint reads: fixed names


def canonical_name(name: str) -> str:
    """Parameter name without wrapper prefixes, anywhere in the dotted path."""
    parts = [p for p in name.split(".") if p + "." not in _WRAPPER_PREFIXES]
    return ".".join(parts)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(k): v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state with parameter names in place of positions (layout-independent)."""
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    state, groups = {}, []
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        groups.append({k: v for k, v in group.items() if k not in ("params", "param_names")} | {"param_names": group_names})
        for p, name in zip(group["params"], group_names, strict=True):
            if p in optimizer.state:
                state[name] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    hyper_by_name = {n: g for g in saved["param_groups"] for n in g["param_names"]}
    current = optimizer.state_dict()
    new_state, new_groups, index = {}, [], 0
    for group, current_group in zip(optimizer.param_groups, current["param_groups"], strict=True):
        group_names = [names[id(p)] for p in group["params"]]
        missing = [n for n in group_names if n not in hyper_by_name]
        if missing:
            raise CheckpointError(f"optimizer.pt has no state for parameters {missing[:5]}: it was saved for "
                                  "another model; resume with the run's model config")
        saved_group = hyper_by_name[group_names[0]]
        new_groups.append({**saved_group, "params": current_group["params"], "param_names": group_names})
        for name in group_names:
            if name in saved["state"]:
                new_state[index] = saved["state"][name]
            index += 1
    optimizer.load_state_dict({"state": new_state, "param_groups": new_groups})


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    plain = {
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def step_dir(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:08d}"


def _refuse_outside(root: Path, path: Path) -> None:
    if problem := outside_problem(root, path):
        raise CheckpointError(f"{path}: {problem}; a checkpoint is read, replaced and pruned in place, so it must be "
                              f"a real directory inside {root}: delete the symlink (training resumes from the "
                              "previous checkpoint)")


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. A step_* entry that resolves (a symlink) outside `checkpoint_dir` is
    refused (CheckpointError naming it), before any of it is read."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if _STEP_DIR.match(p.name)]
    for path in steps:
        _refuse_outside(root, path)
    found = [p for p in steps if (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint from what a user names: a `step_*` directory, a checkpoints directory (its latest), or a run
    directory (the latest of its `checkpoints/`)."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    for candidate in (path, path / "checkpoints"):
        if (found := latest_checkpoint(candidate)) is not None:
            return found
    raise CheckpointError(f"{path}: no checkpoint here (expected a step_* directory, a checkpoints directory or a run "
                          "directory with checkpoints/); train the parent run first or point at one of its checkpoints")


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    sampler_state: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    configs: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write step_{step:08d}/ atomically and prune to the newest keep_last checkpoints; returns its path."""
    root = Path(checkpoint_dir)
    list_checkpoints(root)  # refuses a step_* symlinked out before this writes, replaces or prunes anything
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        torch.save(model_state(model), tmp / "model.pt")
        if optimizer is not None:
            torch.save(optimizer_state_by_name(model, optimizer), tmp / "optimizer.pt")
        rng_tensors, rng_plain = _rng_state()
        torch.save(rng_tensors, tmp / "rng.pt")
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "trainer": trainer_state or {},
            "sampler": sampler_state,
            "rng": rng_plain,
            **(configs or {}),
        }
        try:
            text = json.dumps(state, indent=1) + "\n"
        except TypeError as exc:
            raise CheckpointError(f"{final}: checkpoint state is not plain JSON ({exc}); sampler.state_dict() "
                                  "must return only dicts, lists, str, int, float, bool and None") from exc
        (tmp / "state.json").write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave the step missing
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the tensors already copied into the model/optimizer."""

    path: Path
    step: int
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def sampler_state(self) -> dict[str, Any] | None:
        return self.state.get("sampler")

    @property
    def trainer_state(self) -> dict[str, Any]:
        return self.state.get("trainer", {})

    @property
    def model_config(self) -> dict[str, Any] | None:
        return self.state.get("model_config")

    @property
    def train_config(self) -> dict[str, Any] | None:
        return self.state.get("train_config")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Only state.json (cheap): step, configs, sampler and trainer state."""
    path = Path(path)
    _refuse_outside(path.parent, path)
    for name in CHECKPOINT_FILES:
        _refuse_outside(path, path / name)
    meta = path / "state.json"
    if not meta.exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no state.json); pass a step_* directory that "
                              "has one, e.g. training.latest_checkpoint(run.checkpoint_dir)")
    try:
        state = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta}: unreadable ({exc}); delete {path} to fall back to the previous checkpoint") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{meta}: holds a JSON {type(state).__name__}, not an object; delete {path} to fall "
                              "back to the previous checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        newer = isinstance(state.get("format"), int) and state["format"] > CHECKPOINT_FORMAT
        raise CheckpointError(f"{meta}: checkpoint format {state.get('format')!r} unsupported (expected "
                              f"{CHECKPOINT_FORMAT}); it was written by "
                              + ("a newer mixlab: resume it with that version" if newer else "another mixlab version"))
    step = state.get("step")
    named = _STEP_DIR.match(path.name)
    problems = [f"{key} = {state[key]!r:.60} is a {type(state[key]).__name__}, not an object"
                for key, expected in (("trainer", dict), ("rng", dict), ("sampler", dict | None))
                if key in state and not isinstance(state[key], expected)]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.insert(0, f"step = {step!r:.60} is not a whole number >= 0")
    elif named and int(named.group(1)) != step:
        problems.insert(0, f"step = {step} differs from the directory name {path.name!r}")
    if problems:
        raise CheckpointError(f"{meta}: {problems[0]}; delete {path} to fall back to the previous checkpoint")
    return Checkpoint(path=path, step=step, state=state)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> Checkpoint:
    """Copy weights (and optimizer state, RNG states) from a checkpoint into live objects."""
    ckpt = read_checkpoint(path)
    weights = _load_tensors(ckpt.path / "model.pt")
    target = {canonical_name(k): k for k in model.state_dict()}
    missing = sorted(set(target) - set(weights))
    unexpected = sorted(set(weights) - set(target))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path}: model mismatch; missing {missing[:5]}, unexpected {unexpected[:5]}: "
                              "build the model from the checkpoint's model_config (training.load_model does)")
    model.load_state_dict({target[k]: v for k, v in weights.items()})
    if optimizer is not None:
        try:
            load_optimizer_state_by_name(model, optimizer, _load_tensors(ckpt.path / "optimizer.pt"))
        except CheckpointError as exc:
            raise CheckpointError(f"{ckpt.path}: {exc}") from exc
    if restore_rng:
        try:
            _set_rng_state(_load_tensors(ckpt.path / "rng.pt"), ckpt.state["rng"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{ckpt.path}: RNG state unusable ({type(exc).__name__}: {exc}); delete {ckpt.path} "
                                  "to resume from the previous checkpoint") from exc
    return ckpt


def _load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated or not a torch file: say which and what to do
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc}); delete {path.parent} to "
                              "resume from the previous checkpoint") from exc
