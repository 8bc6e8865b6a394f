"""Adaptive mixtures: policies that watch per-source losses during training and move the sampling weights.

One interface, `MixturePolicy`, sits between the trainer and the sampler:

- `observe_train(step, loss_by_source, rows_by_source)` after every optimizer step (mean per-row cross-entropy of
  the rows each source contributed, and how many rows that was);
- `observe_eval(step, rows)` after every held-out evaluation (the evaluator's rows: source, loss, bpb, ...);
- `decide(step, current)` after both, every step: at its cadence (`update_every`) the policy proposes new weights,
  which the base class smooths towards the weights in force (`smoothing`) and projects onto the per-source
  `bounds` (the sum stays 1). The trainer hands the result to `sampler.set_weights` and logs it with its cause.

Everything a policy learned, its RNG included, is in `state_dict()`, so a resumed run makes the same decisions.
The policies:

- `DoReMiPolicy` (Xie et al. 2023): excess loss over a reference run per source, exponentiated-gradient weights
  smoothed with the uniform mixture; the weights averaged over the run are the mixture for a final run.
- `OnlineDataMixing` (Albalak et al. 2023): an EXP3 bandit whose reward is each source's training loss,
  importance-weighted by the probability of drawing it (or, with `reward="progress"`, its loss decrease).
- `ADOPolicy` (Jiang et al. 2025): a power law loss(n) = eps + beta * n^-alpha per source, fitted online to the
  training loss against rows seen; weight goes where the fitted curve promises the largest decrease per row.
- `RulePolicy`: rules written in Python over a `PolicyHistory`, e.g. `ShiftWeight`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

POLICY_STATE_VERSION = 1


class PolicyError(ValueError):
    """A policy that cannot be built or continued as asked; the message names the policy and what to change."""


@dataclass
class PolicyDecision:
    """New weights (over every leaf, summing to 1) and why, in words a person reads in the run's mixture.jsonl."""

    weights: dict[str, float]
    cause: str


# ---- what a policy has seen ---------------------------------------------------------------------------------
class PolicyHistory:
    """Per-source loss series the policies (and rules) read. Training losses keep the last `max_train` points
    per source, so memory does not grow with the run; eval rows are few and all kept."""

    def __init__(self, max_train: int = 512):
        self.max_train = max_train
        self.train: dict[str, deque[tuple[int, float]]] = {}
        self.eval: dict[str, list[tuple[int, float]]] = {}
        self.eval_bpb: dict[str, list[tuple[int, float]]] = {}

    def add_train(self, step: int, loss_by_source: Mapping[str, float]) -> None:
        for source, loss in loss_by_source.items():
            self.train.setdefault(source, deque(maxlen=self.max_train)).append((int(step), float(loss)))

    def add_eval(self, step: int, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            source = str(row["source"])
            if "loss" in row:
                self._put(self.eval.setdefault(source, []), step, float(row["loss"]))
            if "bpb" in row:
                self._put(self.eval_bpb.setdefault(source, []), step, float(row["bpb"]))

    @staticmethod
    def _put(series: list[tuple[int, float]], step: int, value: float) -> None:
        if series and series[-1][0] == step:  # the same checkpoint evaluated again replaces its row
            series[-1] = (int(step), value)
        else:
            series.append((int(step), value))

    def eval_loss(self, source: str) -> list[float]:
        return [v for _, v in self.eval.get(source, [])]

    def train_loss(self, source: str, last: int | None = None) -> list[float]:
        values = [v for _, v in self.train.get(source, ())]
        return values[-last:] if last else values

    def last_eval_step(self) -> int | None:
        steps = [series[-1][0] for series in self.eval.values() if series]
        return max(steps) if steps else None

    def improvement(self, source: str, k: int = 3, metric: Literal["loss", "bpb"] = "loss") -> float:
        """Relative decrease of `source`'s held-out `metric` over its last `k` evals: (first - last) / first over
        the last k + 1 values. NaN until there are k + 1 evals, so a rule comparing it never fires early."""
        series = [v for _, v in (self.eval if metric == "loss" else self.eval_bpb).get(source, [])]
        if k < 1 or len(series) < k + 1 or series[-k - 1] == 0:
            return float("nan")
        return (series[-k - 1] - series[-1]) / series[-k - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"max_train": self.max_train,
                "train": {s: [list(p) for p in v] for s, v in self.train.items()},
                "eval": {s: [list(p) for p in v] for s, v in self.eval.items()},
                "eval_bpb": {s: [list(p) for p in v] for s, v in self.eval_bpb.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.max_train = int(state["max_train"])
        self.train = {s: deque(((int(a), float(b)) for a, b in v), maxlen=self.max_train)
                      for s, v in state["train"].items()}
        self.eval = {s: [(int(a), float(b)) for a, b in v] for s, v in state["eval"].items()}
        self.eval_bpb = {s: [(int(a), float(b)) for a, b in v] for s, v in state["eval_bpb"].items()}


# ---- the weight geometry shared by every policy ------------------------------------------------------------
def normalize(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if not math.isfinite(total) or total <= 0:
        raise PolicyError(f"weights {dict(weights)} have no positive finite total")
    return {k: v / total for k, v in sorted(weights.items())}


def project_to_bounds(weights: Mapping[str, float], bounds: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """The weights closest (Euclidean) to `weights` with lo <= w <= hi per source and a sum of 1: w + tau clipped
    to the bounds, with the shift tau found by bisection. Sources without bounds are in [0, 1]."""
    names = sorted(weights)
    lo = np.array([bounds.get(n, (0.0, 1.0))[0] for n in names], dtype=np.float64)
    hi = np.array([bounds.get(n, (0.0, 1.0))[1] for n in names], dtype=np.float64)
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12:
        raise PolicyError(f"bounds {dict(bounds)} over the sources {names} admit no weights summing to 1 (lower "
                          f"bounds sum to {lo.sum():.4g}, upper to {hi.sum():.4g}): loosen them")
    w = np.array([weights[n] for n in names], dtype=np.float64)
    a, b = float((lo - w).min()) - 1.0, float((hi - w).max()) + 1.0
    for _ in range(200):
        tau = (a + b) / 2
        if np.clip(w + tau, lo, hi).sum() > 1:
            b = tau
        else:
            a = tau
    out = np.clip(w + (a + b) / 2, lo, hi)
    out /= out.sum()  # removes the bisection's last ulp of error; stays within bounds to ~1e-15
    return dict(zip(names, out.tolist(), strict=True))


def _fmt(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(weights.items()))


# ---- the interface ----------------------------------------------------------------------------------------
class MixturePolicy:
    """Base class: cadence, bounds, smoothing, history, the run-average of the weights, RNG and state.

    Subclasses implement `propose(step, current) -> (weights, cause) | None` (raw weights over the leaves of
    `current`) and, when they keep state of their own, `_extra_state()` / `_load_extra_state()`. The weights in
    force are fed to `decide` at every step, so `average_weights()` is the exact average over the steps seen.
    """

    name: ClassVar[str] = "policy"

    def __init__(self, *, update_every: int = 10, bounds: Mapping[str, Sequence[float]] | None = None,
                 smoothing: float = 0.0, seed: int = 0, warmup_steps: int = 0):
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise PolicyError(f"{self.name}: update_every={update_every!r} must be a whole number >= 1 (steps)")
        if not 0.0 <= smoothing < 1.0:
            raise PolicyError(f"{self.name}: smoothing={smoothing!r} must be in [0, 1): the share of the previous "
                              "weights kept at each update (0 = jump to the proposal)")
        self.update_every = update_every
        self.smoothing = float(smoothing)
        self.warmup_steps = int(warmup_steps)
        self.bounds: dict[str, tuple[float, float]] = {}
        for source, pair in (bounds or {}).items():
            if len(pair) != 2 or not 0.0 <= float(pair[0]) <= float(pair[1]) <= 1.0:
                raise PolicyError(f"{self.name}: bounds[{source!r}]={pair!r} must be (lo, hi) with 0 <= lo <= hi <= 1")
            self.bounds[str(source)] = (float(pair[0]), float(pair[1]))
        if sum(lo for lo, _ in self.bounds.values()) > 1:
            raise PolicyError(f"{self.name}: the lower bounds {self.bounds} sum past 1; lower them")
        self.seed = int(seed)
        # for policies that explore at random (none of the built-in ones does): seeded, and restored on resume
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.history = PolicyHistory()
        self.decisions = 0
        self._weight_sum: dict[str, float] = {}
        self._weight_steps = 0
        self._probs: dict[str, float] = {}  # the weights in force, as last given to decide

    # -- observing
    def observe_train(self, step: int, loss_by_source: Mapping[str, float], rows_by_source: Mapping[str, int]) -> None:
        """Per-source mean training loss of the rows drawn at `step`, and the number of those rows."""
        finite = {s: float(v) for s, v in loss_by_source.items() if math.isfinite(v) and rows_by_source.get(s, 0) > 0}
        self.history.add_train(step, finite)
        self._on_train(step, finite, {s: int(rows_by_source[s]) for s in finite})

    def observe_eval(self, step: int, rows: list[dict]) -> None:
        """The held-out evaluator's rows of `step` (one per source plus "all")."""
        rows = [r for r in rows if r.get("source") != "all"]
        self.history.add_eval(step, rows)
        self._on_eval(step, rows)

    def _on_train(self, step: int, loss: dict[str, float], rows: dict[str, int]) -> None:
        pass

    def _on_eval(self, step: int, rows: list[dict]) -> None:
        pass

    # -- deciding
    def decide(self, step: int, current: Mapping[str, float]) -> PolicyDecision | None:
        """Called after every step with the weights in force; returns new weights at the cadence, else None."""
        current = normalize(current)
        unknown = sorted(set(self.bounds) - set(current))
        if unknown:
            raise PolicyError(f"{self.name}: bounds name {unknown}, which are not leaves of the mixture "
                              f"{sorted(current)}: fix the names in the policy's bounds")
        self._probs = dict(current)
        for source, w in current.items():
            self._weight_sum[source] = self._weight_sum.get(source, 0.0) + w
        self._weight_steps += 1
        if step <= self.warmup_steps or step % self.update_every:
            return None
        proposal = self.propose(step, current)
        if proposal is None:
            return None
        raw, cause = proposal
        missing = sorted(set(current) - set(raw))
        raw = normalize({**dict.fromkeys(missing, 0.0), **{k: v for k, v in raw.items() if k in current}})
        mixed = {k: self.smoothing * current[k] + (1 - self.smoothing) * raw[k] for k in current}
        new = project_to_bounds(mixed, self.bounds)
        if max(abs(new[k] - current[k]) for k in current) < 1e-9:
            return None
        self.decisions += 1
        self._probs = dict(new)
        return PolicyDecision(weights=new, cause=f"{self.name}: {cause}")

    def propose(self, step: int, current: dict[str, float]) -> tuple[dict[str, float], str] | None:
        raise NotImplementedError(f"{type(self).__name__} must implement propose(step, current)")

    def average_weights(self) -> dict[str, float]:
        """The weights in force averaged over every step seen so far (DoReMi's mixture for the final run)."""
        if not self._weight_steps:
            raise PolicyError(f"{self.name}: no step seen yet, so there is no average; train with the policy first")
        return normalize({k: v / self._weight_steps for k, v in self._weight_sum.items()})

    def final_schedule(self, name: str = "averaged"):
        """A constant `MixtureSchedule` of `average_weights()`: the mixture to train the final model on."""
        from mixlab.mixtures.schedule import MixtureSchedule

        return MixtureSchedule.constant(self.average_weights(), name=name)

    # -- state
    def config(self) -> dict[str, Any]:
        """The constructor arguments that matter for resuming (checked against the checkpoint's)."""
        return {"update_every": self.update_every, "smoothing": self.smoothing, "seed": self.seed,
                "bounds": {k: list(v) for k, v in sorted(self.bounds.items())}, "warmup_steps": self.warmup_steps}

    def state_dict(self) -> dict[str, Any]:
        return {"version": POLICY_STATE_VERSION, "name": self.name, "config": self.config(),
                "rng": self.rng.bit_generator.state, "history": self.history.state_dict(),
                "decisions": self.decisions, "weight_sum": dict(self._weight_sum), "weight_steps": self._weight_steps,
                "probs": dict(self._probs), "extra": self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != POLICY_STATE_VERSION:
            raise PolicyError(f"{self.name}: saved policy state version {state.get('version')!r}, expected "
                              f"{POLICY_STATE_VERSION}")
        if state.get("name") != self.name:
            raise PolicyError(f"the checkpoint holds the state of policy {state.get('name')!r}, not {self.name!r}: "
                              "resume with the policy the run started with, or use a new run id")
        if state.get("config") != self.config():
            diff = {k: (v, self.config().get(k)) for k, v in state.get("config", {}).items()
                    if self.config().get(k) != v}
            raise PolicyError(f"{self.name}: the policy was built with other settings (field: (saved, now)) {diff}; "
                              "rebuild it as the run did, or use a new run id")
        self.rng.bit_generator.state = state["rng"]
        self.history.load_state_dict(state["history"])
        self.decisions = int(state["decisions"])
        self._weight_sum = {k: float(v) for k, v in state["weight_sum"].items()}
        self._weight_steps = int(state["weight_steps"])
        self._probs = {k: float(v) for k, v in state["probs"].items()}
        self._load_extra_state(state.get("extra") or {})

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass


# ---- DoReMi ------------------------------------------------------------------------------------------------
Reference = str | Path | Mapping[str, float] | Callable[[int], Mapping[str, float]]


class DoReMiPolicy(MixturePolicy):
    """Excess loss over a reference model drives exponentiated-gradient weights (Xie et al. 2023, DoReMi).

    At each update: excess_i = max(loss_i - ref_i, 0) from the held-out evals since the last update (or, with
    `signal="train"`, the mean training loss of the source since then); alpha_i <- w_i * exp(eta * excess_i)
    from the weights w in force (smoothed and bounded), normalised; the new weights are (1 - c) * alpha +
    c * uniform. The reference is a run directory (its evals.jsonl:
    the reference eval at the latest step <= the current one, else its first), a {source: loss} dict, or a
    callable step -> {source: loss}. `average_weights()` / `final_schedule()` give the mixture for a final run.
    """

    name = "doremi"

    def __init__(self, reference: Reference, *, eta: float = 1.0, c: float = 1e-3,
                 signal: Literal["eval", "train"] = "eval", **kw: Any):
        super().__init__(**kw)
        if signal not in ("eval", "train"):
            raise PolicyError(f"doremi: signal={signal!r} must be 'eval' (held-out losses) or 'train'")
        if not eta > 0 or not 0 <= c <= 1:
            raise PolicyError(f"doremi: eta={eta} must be > 0 and c={c} in [0, 1]")
        self.eta, self.c, self.signal = float(eta), float(c), signal
        self.reference_label = str(reference) if isinstance(reference, str | Path) else type(reference).__name__
        # what the config records (and a resume compares): the path, the fixed losses, or only that it was code
        self._reference_config: Any = (str(reference) if isinstance(reference, str | Path) else
                                       {str(k): float(v) for k, v in reference.items()}
                                       if isinstance(reference, Mapping) else "callable")
        self._reference = self._reference_fn(reference)
        self._last_used_eval: int | None = None
        self._train_sum: dict[str, float] = {}
        self._train_n: dict[str, int] = {}

    @staticmethod
    def _reference_fn(reference: Reference) -> Callable[[int], Mapping[str, float]]:
        if callable(reference):
            return reference
        if isinstance(reference, Mapping):
            fixed = {str(k): float(v) for k, v in reference.items()}
            return lambda step: fixed
        from mixlab.training.run_record import RunRecord

        path = Path(reference)
        try:
            rows = RunRecord.load(path).evals()
        except FileNotFoundError as err:
            raise PolicyError(f"doremi: reference {path} is not a run directory ({err}); train a reference run "
                              "first, or pass a {source: loss} dict") from err
        by_step: dict[int, dict[str, float]] = {}
        for row in rows:
            if row.get("source") != "all" and isinstance(row.get("loss"), int | float):
                by_step.setdefault(int(row["step"]), {})[str(row["source"])] = float(row["loss"])
        if not by_step:
            raise PolicyError(f"doremi: reference run {path} has no per-source evals in evals.jsonl; train it with "
                              "an evaluator")
        steps = sorted(by_step)

        def at(step: int) -> Mapping[str, float]:
            before = [s for s in steps if s <= step]
            return by_step[before[-1] if before else steps[0]]

        return at

    def config(self) -> dict[str, Any]:
        return {**super().config(), "eta": self.eta, "c": self.c, "signal": self.signal,
                "reference": self._reference_config}

    def _on_train(self, step: int, loss: dict[str, float], rows: dict[str, int]) -> None:
        for source, value in loss.items():
            self._train_sum[source] = self._train_sum.get(source, 0.0) + value * rows[source]
            self._train_n[source] = self._train_n.get(source, 0) + rows[source]

    def excess_loss(self, step: int, losses: Mapping[str, float]) -> dict[str, float]:
        reference = self._reference(step)
        unknown = sorted(set(losses) - set(reference))
        if unknown:
            raise PolicyError(f"doremi: the reference ({self.reference_label}) has no loss for {unknown} at step "
                              f"{step}; its sources are {sorted(reference)}: use a reference trained on the same "
                              "sources")
        return {s: max(losses[s] - reference[s], 0.0) for s in losses}

    def propose(self, step: int, current: dict[str, float]) -> tuple[dict[str, float], str] | None:
        if self.signal == "eval":
            last = self.history.last_eval_step()
            if last is None or last == self._last_used_eval:
                return None  # nothing new to learn from
            self._last_used_eval = last
            losses = {s: series[-1][1] for s, series in self.history.eval.items() if series and s in current}
        else:
            losses = {s: self._train_sum[s] / self._train_n[s] for s in self._train_sum if s in current}
            self._train_sum, self._train_n = {}, {}
        if not losses:
            return None
        excess = self.excess_loss(step, losses)
        # alpha_{t-1} is the mixture in force (already smoothed and bounded), as in the paper's update
        log_alpha = {s: (math.log(w) if w > 0 else -50.0) + self.eta * excess.get(s, 0.0) for s, w in current.items()}
        top = max(log_alpha.values())
        alpha = normalize({s: math.exp(v - top) for s, v in log_alpha.items()})
        k = len(current)
        weights = {s: (1 - self.c) * alpha.get(s, 0.0) + self.c / k for s in current}
        ranked = sorted(excess.items(), key=lambda kv: (-kv[1], kv[0]))
        cause = "excess loss " + " > ".join(f"{s} {v:.3f}" for s, v in ranked)
        return weights, cause

    def _extra_state(self) -> dict[str, Any]:
        return {"last_used_eval": self._last_used_eval,
                "train_sum": dict(self._train_sum), "train_n": dict(self._train_n)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._last_used_eval = state["last_used_eval"]
        self._train_sum = {k: float(v) for k, v in state["train_sum"].items()}
        self._train_n = {k: int(v) for k, v in state["train_n"].items()}


# ---- ODM (EXP3) --------------------------------------------------------------------------------------------
class OnlineDataMixing(MixturePolicy):
    """Online data mixing as a multi-armed bandit (Albalak et al. 2023): EXP3 over the sources.

    A source's reward at a step is its mean training loss (`reward="loss"`, the paper's choice: a source the
    model still finds hard is worth more) or the decrease of its smoothed loss since it was last drawn
    (`reward="progress"`: a source the model is learning fast gains weight), scaled to [0, 1] by the largest
    reward seen. It is importance-weighted by the probability that the source was in the batch at all,
    1 - (1 - pi_i)^rows (with one row per step that is the textbook 1 / pi_i), and added to the source's
    cumulative gain G_i. At each update pi = (1 - K eps) softmax(eta G) + eps: eta is `learning_rate` or
    sqrt(ln K / (K t)) with t the steps observed, and the exploration rate eps is `exploration` or
    min(1/K, sqrt(ln K / (K t))).
    The bandit's draws are the sampler's; the policy itself is deterministic given what it saw.
    """

    name = "odm"

    def __init__(self, *, exploration: float | None = None, learning_rate: float | None = None,
                 reward: Literal["loss", "progress"] = "loss", **kw: Any):
        super().__init__(**kw)
        if reward not in ("loss", "progress"):
            raise PolicyError(f"odm: reward={reward!r} must be 'loss' or 'progress'")
        if exploration is not None and not 0 <= exploration <= 1:
            raise PolicyError(f"odm: exploration={exploration} must be in [0, 1] (or null: the decaying default)")
        if learning_rate is not None and not learning_rate > 0:
            raise PolicyError(f"odm: learning_rate={learning_rate} must be > 0 (or null: sqrt(ln K / (K t)))")
        self.exploration, self.learning_rate, self.reward = exploration, learning_rate, reward
        self.gains: dict[str, float] = {}
        self._smoothed_loss: dict[str, float] = {}
        self._reward_scale = 0.0
        self._steps_seen = 0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "exploration": self.exploration, "learning_rate": self.learning_rate,
                "reward": self.reward}

    def _rates(self, k: int) -> tuple[float, float]:
        decay = math.sqrt(math.log(k) / (k * max(self._steps_seen, 1))) if k > 1 else 0.0
        eta = self.learning_rate or decay
        eps = min(self.exploration if self.exploration is not None else decay, 1.0 / k)
        return eta, eps

    def _on_train(self, step: int, loss: dict[str, float], rows: dict[str, int]) -> None:
        self._steps_seen += 1
        raw: dict[str, float] = {}
        for source, value in loss.items():
            if self.reward == "loss":
                raw[source] = value
            else:
                before = self._smoothed_loss.get(source)
                now = value if before is None else 0.5 * before + 0.5 * value
                self._smoothed_loss[source] = now
                raw[source] = 0.0 if before is None else max(before - now, 0.0)
        self._reward_scale = max(self._reward_scale, *raw.values(), 0.0)
        if self._reward_scale <= 0:
            return
        total_rows = sum(rows.values())
        k = max(len(self._probs), len(loss), 1)
        for source, r in raw.items():
            pi = self._probs.get(source, 1.0 / k)
            seen = max(1.0 - (1.0 - pi) ** total_rows, 1e-6)
            self.gains[source] = self.gains.get(source, 0.0) + (r / self._reward_scale) / seen

    def propose(self, step: int, current: dict[str, float]) -> tuple[dict[str, float], str] | None:
        if not self.gains:
            return None
        k = len(current)
        eta, eps = self._rates(k)
        gains = {s: self.gains.get(s, 0.0) for s in current}
        top = max(gains.values())
        soft = normalize({s: math.exp(eta * (g - top)) for s, g in gains.items()})
        weights = {s: (1 - k * eps) * soft[s] + eps for s in current}
        best = max(gains, key=lambda s: (gains[s], s))
        second = max((g for s, g in gains.items() if s != best), default=0.0)
        cause = (f"exp3 on {self.reward}: {best} leads by {gains[best] - second:.2f} in importance-weighted gain "
                 f"(eta {eta:.3f}, exploration {eps:.3f})")
        return weights, cause

    def _extra_state(self) -> dict[str, Any]:
        return {"gains": dict(self.gains), "smoothed_loss": dict(self._smoothed_loss),
                "reward_scale": self._reward_scale, "steps_seen": self._steps_seen}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.gains = {k: float(v) for k, v in state["gains"].items()}
        self._smoothed_loss = {k: float(v) for k, v in state["smoothed_loss"].items()}
        self._reward_scale = float(state["reward_scale"])
        self._steps_seen = int(state["steps_seen"])


# ---- ADO ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLaw:
    """loss(n) = eps + beta * n^-alpha, n = rows of the source seen."""

    eps: float
    beta: float
    alpha: float

    def __call__(self, n: float) -> float:
        return self.eps + self.beta * n ** -self.alpha

    def decrease_per_row(self, n: float) -> float:
        """-dloss/dn at n: the loss one more row of this source is expected to remove."""
        return self.alpha * self.beta * n ** (-self.alpha - 1)


def fit_power_law(n: np.ndarray, loss: np.ndarray, grid: int = 48) -> PowerLaw | None:
    """Least squares fit of eps + beta n^-alpha: for each eps on a grid below the smallest loss, a straight line
    in log-log space gives beta and alpha; the eps with the smallest squared error in loss space wins.
    Deterministic, no optimiser to diverge. None when the points cannot determine a curve."""
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    ok = (n > 0) & np.isfinite(loss)
    n, loss = n[ok], loss[ok]
    if len(n) < 4 or np.ptp(np.log(n)) < 1e-9:
        return None
    best: tuple[float, PowerLaw] | None = None
    x = np.log(n)
    for eps in np.linspace(0.0, 0.999, grid) * float(loss.min()):
        y = np.log(np.maximum(loss - eps, 1e-12))
        slope, intercept = np.polyfit(x, y, 1)
        law = PowerLaw(float(eps), float(math.exp(intercept)), float(max(-slope, 0.0)))
        err = float(np.sum((law.eps + law.beta * n ** -law.alpha - loss) ** 2))
        if best is None or err < best[0]:
            best = (err, law)
    return best[1] if best else None


class ADOPolicy(MixturePolicy):
    """Adaptive data optimisation with per-source scaling laws (Jiang et al. 2025, ADO).

    Each source's training loss against the rows of it seen so far is fitted online with a power law
    loss(n) = eps + beta n^-alpha (`fit_power_law`, on the last points kept by the history). The preference of a
    source is prior_i * (-dloss_i/dn)(n_i), the loss one more row of it is expected to remove, normalised;
    `smoothing` moves the weights only part of the way, so a noisy fit cannot swing the mixture.
    `prior` defaults to the weights in force at the first update (the schedule's).
    """

    name = "ado"

    def __init__(self, *, prior: Mapping[str, float] | None = None, min_points: int = 8, **kw: Any):
        kw.setdefault("smoothing", 0.5)
        super().__init__(**kw)
        self.given_prior = normalize(prior) if prior else None
        self.prior = self.given_prior
        self.min_points = int(min_points)
        self.rows_seen: dict[str, int] = {}
        self._points: dict[str, deque[tuple[int, float]]] = {}
        self.laws: dict[str, PowerLaw] = {}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "prior": self.given_prior, "min_points": self.min_points}

    def _on_train(self, step: int, loss: dict[str, float], rows: dict[str, int]) -> None:
        for source, value in loss.items():
            self.rows_seen[source] = self.rows_seen.get(source, 0) + rows[source]
            self._points.setdefault(source, deque(maxlen=self.history.max_train)).append(
                (self.rows_seen[source], value))

    def propose(self, step: int, current: dict[str, float]) -> tuple[dict[str, float], str] | None:
        if self.prior is None:
            self.prior = dict(current)
        scores: dict[str, float] = {}
        for source in current:
            points = self._points.get(source, ())
            if len(points) < self.min_points:
                continue  # no curve yet (e.g. a leaf the schedule gives no weight): it keeps its weight
            n, loss = zip(*points, strict=True)
            law = fit_power_law(np.array(n), np.array(loss))
            if law is None:
                continue
            self.laws[source] = law
            scores[source] = self.prior.get(source, 0.0) * law.decrease_per_row(self.rows_seen[source])
        total = sum(scores.values())
        if total <= 0 or len(scores) < 2 and len(scores) < sum(1 for w in current.values() if w > 0):
            return None  # nothing to compare yet
        # the sources with a curve share the weight they hold now, in proportion to their promise
        mass = sum(current[s] for s in scores) or 1.0
        weights = {s: (scores[s] / total * mass if s in scores else current[s]) for s in current}
        best = max(scores, key=lambda s: (scores[s], s))
        cause = (f"largest expected loss decrease per row {best} {scores[best] / max(self.prior.get(best, 1), 1e-12):.2e}"
                 f" (fit {best}: {self.laws[best].eps:.2f} + {self.laws[best].beta:.2f} n^-{self.laws[best].alpha:.2f})")
        return weights, cause

    def _extra_state(self) -> dict[str, Any]:
        return {"prior": self.prior, "rows_seen": dict(self.rows_seen),
                "points": {s: [list(p) for p in v] for s, v in self._points.items()},
                "laws": {s: [law.eps, law.beta, law.alpha] for s, law in self.laws.items()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.prior = state["prior"]
        self.rows_seen = {k: int(v) for k, v in state["rows_seen"].items()}
        self._points = {s: deque(((int(a), float(b)) for a, b in v), maxlen=self.history.max_train)
                        for s, v in state["points"].items()}
        self.laws = {s: PowerLaw(*v) for s, v in state["laws"].items()}


# ---- rules -------------------------------------------------------------------------------------------------
@dataclass
class ShiftWeight:
    """When `when(history)` holds, move `share` of `take_from`'s weight to `give_to`.

    e.g. `ShiftWeight(when=lambda h: h.improvement("math", k=3) < 0.01, take_from="web", give_to="math",
    share=0.1, name="math stalls")`: math's held-out loss improved less than 1% over its last 3 evals.
    """

    when: Callable[[PolicyHistory], bool]
    take_from: str
    give_to: str
    share: float
    name: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise PolicyError(f"ShiftWeight {self.label}: share={self.share} must be in (0, 1] (of "
                              f"{self.take_from!r}'s weight)")
        if self.take_from == self.give_to:
            raise PolicyError(f"ShiftWeight {self.label}: take_from and give_to are both {self.take_from!r}")

    @property
    def label(self) -> str:
        return self.name or f"{self.take_from}->{self.give_to}"

    def apply(self, history: PolicyHistory, weights: dict[str, float]) -> tuple[dict[str, float], str] | None:
        for source in (self.take_from, self.give_to):
            if source not in weights:
                raise PolicyError(f"rule {self.label}: source {source!r} is not in the mixture {sorted(weights)}")
        if not self.when(history):
            return None
        moved = weights[self.take_from] * self.share
        if moved <= 0:
            return None
        out = dict(weights)
        out[self.take_from] -= moved
        out[self.give_to] += moved
        return out, f"rule {self.label!r}: moved {moved:.3f} from {self.take_from} to {self.give_to}"


class RulePolicy(MixturePolicy):
    """Rules written in Python, checked in order; every rule that fires shifts the weights.

    With `on="eval"` (default) rules are checked at the first decision point after each new evaluation (a rule
    over eval losses would otherwise fire again and again on the same numbers); with `on="step"` at every
    `update_every` steps. Rules are code: the state holds the history they read, the rules are rebuilt by the
    script that builds the policy.
    """

    name = "rules"

    def __init__(self, rules: Sequence[ShiftWeight], *, on: Literal["eval", "step"] = "eval", **kw: Any):
        kw.setdefault("update_every", 1)
        super().__init__(**kw)
        if on not in ("eval", "step"):
            raise PolicyError(f"rules: on={on!r} must be 'eval' or 'step'")
        if not rules:
            raise PolicyError("rules: give at least one rule, e.g. ShiftWeight(when=..., take_from=..., give_to=...)")
        self.rules, self.on = list(rules), on
        self._checked_eval: int | None = None
        self.fired: list[tuple[int, str]] = []

    def config(self) -> dict[str, Any]:
        return {**super().config(), "on": self.on, "rules": [r.label for r in self.rules]}

    def propose(self, step: int, current: dict[str, float]) -> tuple[dict[str, float], str] | None:
        if self.on == "eval":
            last = self.history.last_eval_step()
            if last is None or last == self._checked_eval:
                return None
            self._checked_eval = last
        weights, causes = dict(current), []
        for rule in self.rules:
            result = rule.apply(self.history, weights)
            if result is not None:
                weights, cause = result
                causes.append(cause)
                self.fired.append((step, rule.label))
        return (weights, "; ".join(causes)) if causes else None

    def _extra_state(self) -> dict[str, Any]:
        return {"checked_eval": self._checked_eval, "fired": [list(f) for f in self.fired]}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._checked_eval = state["checked_eval"]
        self.fired = [(int(a), str(b)) for a, b in state["fired"]]


# ---- building from a document (the run config's `policy:` section) ------------------------------------------
POLICIES: dict[str, type[MixturePolicy]] = {"doremi": DoReMiPolicy, "odm": OnlineDataMixing, "ado": ADOPolicy}


def policy_from_dict(section: Mapping[str, Any]) -> MixturePolicy:
    """`{name: doremi, reference: runs/ref, eta: 1.0, update_every: 50, bounds: {web: [0.2, 0.9]}}` -> a policy.
    Rules are Python, so `rules` cannot be built here: construct `RulePolicy` in a script."""
    values = dict(section)
    name = values.pop("name", None)
    if name == "rules":
        raise PolicyError("policy.name='rules': rules are Python callables; build RulePolicy([...]) in a script and "
                          "pass it to train(..., policy=...)")
    if name not in POLICIES:
        raise PolicyError(f"policy.name={name!r}: choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**values)
    except TypeError as err:
        raise PolicyError(f"policy {name!r}: {err}; check the fields of the policy section") from err
