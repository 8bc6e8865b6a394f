"""Training alerts: the Smol Training Playbook's silent-failure monitors, as one object the trainer feeds per step.

A run that diverges loudly (NaN) stops by itself; the failures that cost compute are the quiet ones: a loss or
grad-norm spike the run may or may not recover from, throughput that slowly vanishes (a slow node, a data loader
falling behind), the same token window trained twice (a sampler or resume bug) and one source filling the batches
against the schedule (a broken shard, a wrong weight). `TrainingMonitor.observe` checks each of them against
robust rolling statistics and returns `Alert`s; `decision` turns them into "continue" | "stop" | "rewind".

Token windows are identified by a hash of the row's tokens (`window_ids(tokens)`): it needs nothing from the
sampler, survives resumes and catches a repeat however it came about (same shard offset twice, or a duplicated
document). Any other hashable ids (e.g. (source, shard, offset) tuples) work too; they are kept as strings.

The whole state is plain JSON (`state_dict`), so it goes in the checkpoint's trainer state: a resumed run keeps its
windows and raises exactly the alerts an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from mixlab.training.config import ConfigDict
from mixlab.training.errors import ConfigError, ResumeError

ACTIONS = ("log", "stop", "rewind")
ALERT_KINDS = ("non_finite", "loss_spike", "grad_norm_spike", "throughput_drop", "repeated_window",
               "source_dominance")
# a rewind replays the same data order, so it cannot cure these: the most they can ask for is a stop
_NOT_REWINDABLE = ("throughput_drop", "source_dominance")
STATE_VERSION = 1
_MAD_TO_STD = 1.4826  # MAD of a normal sample x this = its standard deviation


@dataclass
class MonitorConfig(ConfigDict):
    """Thresholds of the monitors. Steps are optimizer steps (1-based, as the trainer logs them)."""

    warmup_steps: int = 20  # loss, grad norm and throughput are neither judged nor remembered before this step
    min_history: int = 10  # values a rolling window needs before it judges anything
    loss_window: int = 50
    loss_z: float = 6.0  # robust z-score (median/MAD) above which a loss is a spike
    loss_min_rel_scale: float = 1e-3  # floor on the loss's scale, relative to its median (a flat loss has MAD 0)
    grad_norm_window: int = 50
    grad_norm_z: float = 8.0  # robust z-score of log(grad norm): norms are skewed, spikes are multiplicative
    grad_norm_min_scale: float = 0.05  # floor on the scale of log(grad norm)
    throughput_window: int = 20
    throughput_drop_ratio: float = 0.5  # tokens/s below this x the rolling median is a drop
    throughput_patience: int = 3  # consecutive slow steps before alerting (one slow step is a hiccup)
    # a window seen again within this many steps is a repeat, unless its source started a new pass over its data in
    # between (the trainer passes each source's pass number: a small source legitimately repeats every epoch)
    repeat_span: int = 1000
    dominance_window: int = 20  # steps (batches) whose rows the source-share check pools
    dominance_z: float = 5.0  # binomial z of a source's observed rows against its scheduled weight
    dominance_min_excess: float = 0.1  # and its share must exceed the weight by this much (absolute)
    cooldown_steps: int = 50  # a condition that persists alerts again (per kind) at most this often
    on_alert: str = "log"  # "log" | "stop" | "rewind"
    kind_actions: dict[str, str] = field(default_factory=dict)  # per-kind override of on_alert
    max_rewinds: int = 3  # after this many rewinds a rewind alert stops the run instead

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "max_rewinds"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"monitor.{name}={getattr(self, name)} must be >= 0", [f"monitor.{name}"])
        for name in ("min_history", "loss_window", "grad_norm_window", "throughput_window", "throughput_patience",
                     "repeat_span", "dominance_window", "cooldown_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"monitor.{name}={getattr(self, name)} must be >= 1", [f"monitor.{name}"])
        for name in ("loss_window", "grad_norm_window", "throughput_window"):
            if getattr(self, name) < self.min_history:
                raise ConfigError(f"monitor.{name}={getattr(self, name)} is shorter than monitor.min_history="
                                  f"{self.min_history}: the window would never judge; lengthen it or lower "
                                  "min_history", [f"monitor.{name}", "monitor.min_history"])
        for name in ("loss_z", "grad_norm_z", "dominance_z", "loss_min_rel_scale", "grad_norm_min_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"monitor.{name}={value!r} must be a positive number", [f"monitor.{name}"])
        if not 0 < self.throughput_drop_ratio < 1:
            raise ConfigError(f"monitor.throughput_drop_ratio={self.throughput_drop_ratio} must be in (0, 1): the "
                              "fraction of the rolling median below which throughput counts as dropped",
                              ["monitor.throughput_drop_ratio"])
        if not 0 <= self.dominance_min_excess < 1:
            raise ConfigError(f"monitor.dominance_min_excess={self.dominance_min_excess} must be in [0, 1)",
                              ["monitor.dominance_min_excess"])
        if self.on_alert not in ACTIONS:
            raise ConfigError(f"monitor.on_alert={self.on_alert!r}: use one of {list(ACTIONS)}", ["monitor.on_alert"])
        for kind, action in self.kind_actions.items():
            if kind not in ALERT_KINDS or action not in ACTIONS:
                raise ConfigError(f"monitor.kind_actions[{kind!r}]={action!r}: kinds are {list(ALERT_KINDS)}, "
                                  f"actions {list(ACTIONS)}", ["monitor.kind_actions"])



@dataclass
class Alert:
    """One anomaly at one step: what, how far off (value vs threshold) and what the run does about it."""

    step: int
    kind: str
    message: str
    value: float
    threshold: float
    action: str  # "log" | "stop" | "rewind"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe row (non-finite values become strings) for the run's alert log."""
        row = asdict(self)
        for key in ("value", "threshold"):
            if not math.isfinite(row[key]):
                row[key] = str(row[key])
        return row

    def format(self) -> str:
        """The console line."""
        return f"[alert step {self.step}] {self.kind}: {self.message} (action: {self.action})"


def window_ids(tokens: np.ndarray) -> list[str]:
    """One id per batch row: a 64-bit blake2b hash of the row's tokens as int64 (same tokens, same id)."""
    rows = np.ascontiguousarray(np.asarray(tokens), dtype=np.int64)
    if rows.ndim != 2:
        raise ValueError(f"window_ids needs a [rows, tokens] array, got shape {rows.shape}")
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in rows]


def _robust_z(value: float, history: Sequence[float], min_scale: float) -> tuple[float, float]:
    """(z, median): how many robust standard deviations `value` lies above the history's median."""
    values = np.asarray(history, dtype=np.float64)
    median = float(np.median(values))
    scale = max(_MAD_TO_STD * float(np.median(np.abs(values - median))), min_scale)
    return (value - median) / scale, median


class TrainingMonitor:
    """Per-step anomaly checks over rolling windows; call `observe` once per optimizer step, before or after the
    update, always at the same point."""

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.rewinds = 0
        self.skipped_steps: list[int] = []  # steps whose batches a rewind skipped (the trainer reports them here)
        self._reset()

    def _reset(self) -> None:
        self._losses: list[float] = []
        self._grad_norms: list[float] = []  # log values
        self._throughputs: list[float] = []
        self._slow_steps = 0
        self._seen: dict[str, int] = {}  # window id -> last step it was trained
        self._seen_pass: dict[str, int] = {}  # window id -> its source's pass number then (absent: not known)
        self._rows: list[dict[str, Any]] = []  # per step: {"step", "observed": {src: rows}, "expected": {src: rows}, "var": {src: v}}
        self._last_alert: dict[str, int] = {}
        self._last_step: int | None = None

    # ---- the per-step call ---------------------------------------------------------------------------------
    def observe(
        self,
        step: int,
        loss: float,
        grad_norm: float | None,
        tokens_per_s: float | None,
        windows: np.ndarray | Sequence[Any],
        sources: Sequence[str],
        weights: Mapping[str, float] | None,
        passes: Mapping[str, int] | None = None,
    ) -> list[Alert]:
        """Check one step. windows: the step's token rows ([rows, tokens] array, hashed by `window_ids`) or one
        id per row; sources: the source of each row; weights: the sampler's current {source: weight} (None
        skips the share check). grad_norm / tokens_per_s may be None or NaN (not measured): not checked.
        passes: each source's pass number over its data (MixtureSampler.epochs_by_source, floored): a window
        repeated after its source began a new pass is an epoch, not an anomaly."""
        ids = window_ids(windows) if isinstance(windows, np.ndarray) else [str(w) for w in windows]
        if len(ids) != len(sources):
            raise ValueError(f"monitor step {step}: {len(ids)} windows but {len(sources)} sources; pass one of "
                             "each per batch row (all micro-batches of the step)")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"monitor step {step} comes after step {self._last_step}: steps must increase; after a "
                             "rewind load the checkpoint's monitor state with rewind()")
        self._last_step = step
        cfg = self.config
        alerts: list[Alert | None] = []
        if not math.isfinite(loss) or (grad_norm is not None and math.isinf(grad_norm)):
            alerts.append(self._alert(step, "non_finite", f"loss {loss}, grad norm {grad_norm}", loss, math.inf,
                                      force=True))
        elif step > cfg.warmup_steps:
            alerts += self._check_loss(step, float(loss))
            if grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0:
                alerts += self._check_grad_norm(step, float(grad_norm))
        if step > cfg.warmup_steps and tokens_per_s is not None and math.isfinite(tokens_per_s) and tokens_per_s > 0:
            alerts += self._check_throughput(step, float(tokens_per_s))
        alerts += self._check_repeats(step, ids, [passes.get(str(s)) for s in sources] if passes else None)
        if weights is not None:
            alerts += self._check_dominance(step, [str(s) for s in sources], weights)
        return [a for a in alerts if a is not None]

    def decision(self, alerts: Sequence[Alert]) -> str:
        """What the trainer does after a step's alerts: "rewind" beats "stop" beats "continue"."""
        actions = {a.action for a in alerts}
        if "rewind" in actions:
            return "rewind"
        return "stop" if "stop" in actions else "continue"

    # ---- the checks ----------------------------------------------------------------------------------------
    def _check_loss(self, step: int, loss: float) -> list[Alert | None]:
        cfg, alerts = self.config, []
        if len(self._losses) >= cfg.min_history:
            median = float(np.median(self._losses))
            z, median = _robust_z(loss, self._losses, cfg.loss_min_rel_scale * max(abs(median), 1e-12))
            if z > cfg.loss_z:
                alerts.append(self._alert(step, "loss_spike", f"loss {loss:.4f} is {z:.1f} robust sigma above the "
                                          f"median {median:.4f} of the last {len(self._losses)} steps", z, cfg.loss_z))
        self._losses = (self._losses + [loss])[-cfg.loss_window:]
        return alerts

    def _check_grad_norm(self, step: int, grad_norm: float) -> list[Alert | None]:
        cfg, alerts, value = self.config, [], math.log(grad_norm)
        if len(self._grad_norms) >= cfg.min_history:
            z, median = _robust_z(value, self._grad_norms, cfg.grad_norm_min_scale)
            if z > cfg.grad_norm_z:
                alerts.append(self._alert(step, "grad_norm_spike", f"grad norm {grad_norm:.4g} is {z:.1f} robust "
                                          f"sigma (of log norm) above the median {math.exp(median):.4g} of the last "
                                          f"{len(self._grad_norms)} steps", z, cfg.grad_norm_z))
        self._grad_norms = (self._grad_norms + [value])[-cfg.grad_norm_window:]
        return alerts

    def _check_throughput(self, step: int, tokens_per_s: float) -> list[Alert | None]:
        cfg, alerts = self.config, []
        if len(self._throughputs) >= cfg.min_history:
            median = float(np.median(self._throughputs))
            ratio = tokens_per_s / median
            self._slow_steps = self._slow_steps + 1 if ratio < cfg.throughput_drop_ratio else 0
            if self._slow_steps >= cfg.throughput_patience:
                alerts.append(self._alert(step, "throughput_drop", f"{tokens_per_s:,.0f} tokens/s is {ratio:.2f}x the "
                                          f"median {median:,.0f} of the last {len(self._throughputs)} steps, for "
                                          f"{self._slow_steps} steps in a row", ratio, cfg.throughput_drop_ratio))
        self._throughputs = (self._throughputs + [tokens_per_s])[-cfg.throughput_window:]
        return alerts

    def _check_repeats(self, step: int, ids: list[str], passes: list[int | None] | None) -> list[Alert | None]:
        cfg = self.config
        repeats: list[tuple[str, int]] = []
        for i, window in enumerate(ids):
            last = self._seen.get(window)
            now = passes[i] if passes is not None else None
            same_pass = now is None or self._seen_pass.get(window) in (None, now)
            if last is not None and step - last <= cfg.repeat_span and same_pass:
                repeats.append((window, last))
            self._seen[window] = step
            if now is not None:
                self._seen_pass[window] = int(now)
            else:
                self._seen_pass.pop(window, None)
        if step % cfg.repeat_span == 0 or len(self._seen) > 4 * cfg.repeat_span * max(len(ids), 1):
            self._seen = {w: s for w, s in self._seen.items() if step - s <= cfg.repeat_span}
            self._seen_pass = {w: e for w, e in self._seen_pass.items() if w in self._seen}
        if not repeats:
            return []
        window, last = repeats[0]
        gap = step - last
        return [self._alert(step, "repeated_window", f"{len(repeats)} row(s) repeat a window already trained within "
                            f"{cfg.repeat_span} steps (e.g. {window} last seen at step {last}, {gap} steps ago)",
                            float(gap), float(cfg.repeat_span), force=True)]

    def _check_dominance(self, step: int, sources: list[str], weights: Mapping[str, float]) -> list[Alert | None]:
        cfg = self.config
        total_weight = sum(max(float(w), 0.0) for w in weights.values())
        if not total_weight > 0:
            raise ValueError(f"monitor step {step}: the sampler's weights {dict(weights)} sum to "
                             f"{total_weight}; pass the current positive weights")
        rows = len(sources)
        observed: dict[str, int] = {}
        for source in sources:
            observed[source] = observed.get(source, 0) + 1
        shares = {s: max(float(w), 0.0) / total_weight for s, w in weights.items()}
        self._rows.append({"step": step, "rows": rows, "observed": observed,
                           "expected": {s: rows * p for s, p in shares.items()},
                           "var": {s: rows * p * (1 - p) for s, p in shares.items()}})
        self._rows = self._rows[-cfg.dominance_window:]
        if len(self._rows) < cfg.dominance_window:
            return []
        n = sum(r["rows"] for r in self._rows)
        worst: tuple[float, str, float, float] | None = None
        for source in sorted({s for r in self._rows for s in r["observed"]}):
            got = sum(r["observed"].get(source, 0) for r in self._rows)
            expected = sum(r["expected"].get(source, 0.0) for r in self._rows)
            var = sum(r["var"].get(source, 0.0) for r in self._rows)
            z = (got - expected) / math.sqrt(max(var, 1.0))  # a weight-0 source: one row is one sigma
            excess = (got - expected) / n
            if z > cfg.dominance_z and excess > cfg.dominance_min_excess and (worst is None or z > worst[0]):
                worst = (z, source, got / n, expected / n)
        if worst is None:
            return []
        z, source, share, weight = worst
        return [self._alert(step, "source_dominance", f"source {source!r} filled {share:.0%} of the rows of the last "
                            f"{len(self._rows)} batches against a scheduled weight of {weight:.0%} (binomial z "
                            f"{z:.1f})", z, cfg.dominance_z)]

    def _alert(self, step: int, kind: str, message: str, value: float, threshold: float,
               force: bool = False) -> Alert | None:
        """The alert with its action, or None inside the kind's cooldown (unless `force`: every occurrence of a
        NaN or a repeated window matters)."""
        last = self._last_alert.get(kind)
        if not force and last is not None and step - last < self.config.cooldown_steps:
            return None
        self._last_alert[kind] = step
        action = self.config.kind_actions.get(kind, self.config.on_alert)
        if kind == "non_finite" and action == "log":
            action = "stop"  # the update cannot be applied; the trainer stops on it anyway
        if action == "rewind" and (kind in _NOT_REWINDABLE or self.rewinds >= self.config.max_rewinds):
            action = "stop"
            if kind not in _NOT_REWINDABLE:
                message += f"; {self.rewinds} rewinds done (max_rewinds={self.config.max_rewinds}), so the run stops"
        return Alert(step=step, kind=kind, message=message, value=float(value), threshold=float(threshold),
                     action=action)

    # ---- checkpoint state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON: the rolling windows, the seen windows, cooldowns and the rewind count."""
        return {"version": STATE_VERSION, "losses": list(self._losses), "grad_norms": list(self._grad_norms),
                "throughputs": list(self._throughputs), "slow_steps": self._slow_steps, "seen": dict(self._seen),
                "seen_pass": dict(self._seen_pass),
                "rows": [dict(r) for r in self._rows], "last_alert": dict(self._last_alert),
                "last_step": self._last_step, "rewinds": self.rewinds, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ResumeError(f"monitor state has version {got!r}, this mixlab reads version {STATE_VERSION}: resume "
                              "with the mixlab that wrote the checkpoint, or drop the checkpoint's trainer 'monitor' "
                              "entry to start the monitor afresh")
        try:
            self._losses = [float(v) for v in state["losses"]]
            self._grad_norms = [float(v) for v in state["grad_norms"]]
            self._throughputs = [float(v) for v in state["throughputs"]]
            self._slow_steps = int(state["slow_steps"])
            self._seen = {str(k): int(v) for k, v in state["seen"].items()}
            self._seen_pass = {str(k): int(v) for k, v in state.get("seen_pass", {}).items()}
            self._rows = [{"step": int(r["step"]), "rows": int(r["rows"]), "observed": dict(r["observed"]),
                           "expected": dict(r["expected"]), "var": dict(r["var"])} for r in state["rows"]]
            self._last_alert = {str(k): int(v) for k, v in state["last_alert"].items()}
            self._last_step = None if state["last_step"] is None else int(state["last_step"])
            self.rewinds = int(state["rewinds"])
            self.skipped_steps = [int(s) for s in state["skipped_steps"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResumeError(f"monitor state is malformed ({type(exc).__name__}: {exc}); drop the checkpoint's "
                              "trainer 'monitor' entry to start the monitor afresh") from exc

    def rewind(self, state: Mapping[str, Any] | None, skip_steps: Sequence[int] = ()) -> None:
        """After the trainer reloaded an earlier checkpoint: take that checkpoint's monitor state (None: the run
        rewound to its start) but keep counting rewinds, and remember which steps' batches will be skipped."""
        rewinds, skipped = self.rewinds + 1, sorted(set(self.skipped_steps) | {int(s) for s in skip_steps})
        if state is None:
            self._reset()
        else:
            self.load_state_dict(state)
        self.rewinds, self.skipped_steps = rewinds, skipped
