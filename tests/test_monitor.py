"""The training monitors on constructed series whose answer is known: a spike at a known step is flagged and a
smooth or merely noisy series never is, a repeat inside the span is and outside it is not, a source at 0.9 of the
rows against a weight of 0.2 is and seeded sampling noise at the right share is not, and a monitor resumed from
its (JSON) state raises exactly the alerts of an uninterrupted one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mixlab.training.errors import ConfigError, ResumeError
from mixlab.training.monitor import Alert, MonitorConfig, TrainingMonitor, window_ids

WEIGHTS = {"web": 0.5, "code": 0.3, "math": 0.2}
ROWS = 8


def _feed(monitor: TrainingMonitor, steps: range, loss=None, grad=None, tps=None, windows=None, sources=None,
          weights=None, passes=None) -> list[Alert]:
    """Observe each step with per-step callables (defaults: benign constant-ish values, fresh windows)."""
    alerts: list[Alert] = []
    for step in steps:
        ids = windows(step) if windows else [f"w{step}-{r}" for r in range(ROWS)]
        alerts += monitor.observe(step, loss(step) if loss else 3.0, grad(step) if grad else 1.0,
                                  tps(step) if tps else 1000.0, ids,
                                  sources(step) if sources else ["web"] * len(ids), weights,
                                  passes(step) if passes else None)
    return alerts


def _kinds(alerts: list[Alert]) -> list[tuple[int, str]]:
    return [(a.step, a.kind) for a in alerts]


def _noisy(seed: int, base, scale: float):
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, scale, size=10_000)
    return lambda step: base(step) + float(noise[step])


# ---- loss and grad norm spikes ----------------------------------------------------------------------------
def test_loss_spike_at_known_step_is_flagged_and_smooth_decrease_never_is():
    smooth = _noisy(0, lambda s: 2.0 + 6.0 * math.exp(-s / 150), 0.01)
    quiet = _feed(TrainingMonitor(), range(1, 1001), loss=smooth)
    assert quiet == []
    spiky = _feed(TrainingMonitor(), range(1, 1001), loss=lambda s: smooth(s) + (1.5 if s == 400 else 0.0))
    assert _kinds(spiky) == [(400, "loss_spike")]
    assert spiky[0].value > spiky[0].threshold and spiky[0].action == "log"
    warm = _feed(TrainingMonitor(MonitorConfig(warmup_steps=500)), range(1, 1001),
                 loss=lambda s: smooth(s) + (1.5 if s == 400 else 0.0))
    assert warm == []  # inside warmup nothing is judged


def test_grad_norm_spike_flagged_noise_not():
    norm = _noisy(1, lambda s: 0.0, 0.1)
    noisy = lambda s: 0.8 * math.exp(norm(s))  # noqa: E731  (log-normal grad norms)
    assert _feed(TrainingMonitor(), range(1, 801), grad=noisy) == []
    alerts = _feed(TrainingMonitor(), range(1, 801), grad=lambda s: noisy(s) * (20.0 if s == 333 else 1.0))
    assert _kinds(alerts) == [(333, "grad_norm_spike")]


def test_non_finite_loss_always_alerts_and_stops():
    alerts = _feed(TrainingMonitor(), range(1, 6), loss=lambda s: float("nan") if s == 3 else 3.0)
    assert _kinds(alerts) == [(3, "non_finite")] and alerts[0].action == "stop"
    assert json.loads(json.dumps(alerts[0].to_dict()))["value"] == "nan"


# ---- throughput ---------------------------------------------------------------------------------------------
def test_throughput_drop_after_stable_phase():
    stable = _noisy(2, lambda s: 10_000.0, 300.0)
    assert _feed(TrainingMonitor(), range(1, 601), tps=stable) == []
    alerts = _feed(TrainingMonitor(), range(1, 601), tps=lambda s: stable(s) * (0.3 if s >= 300 else 1.0))
    cfg = MonitorConfig()
    assert _kinds(alerts)[0] == (300 + cfg.throughput_patience - 1, "throughput_drop")
    assert all(a.kind == "throughput_drop" and a.value < cfg.throughput_drop_ratio for a in alerts)
    # one slow step (an eval, a GC pause) is not a drop
    assert _feed(TrainingMonitor(), range(1, 601), tps=lambda s: stable(s) * (0.3 if s == 300 else 1.0)) == []


# ---- data order ---------------------------------------------------------------------------------------------
def test_repeated_window_within_span_flagged_outside_not():
    rng = np.random.default_rng(3)
    rows = {s: rng.integers(0, 600, size=(ROWS, 65)) for s in range(1, 401)}
    rows[250] = rows[250].copy()
    rows[250][5] = rows[100][2]  # 150 steps later
    rows[390] = rows[390].copy()
    rows[390][0] = rows[10][7]  # 380 steps later
    cfg = MonitorConfig(repeat_span=200)
    alerts = _feed(TrainingMonitor(cfg), range(1, 401), windows=lambda s: rows[s])
    assert _kinds(alerts) == [(250, "repeated_window")]
    assert alerts[0].value == 150 and "step 100" in alerts[0].message
    assert window_ids(rows[250])[5] == window_ids(rows[100])[2] != window_ids(rows[250])[4]


def test_a_repeat_after_its_source_began_a_new_pass_is_an_epoch_not_an_alert():
    """A small source's pass ends every 120 steps here: its windows come back well inside the 200-step span, and
    only a repeat inside one pass is flagged."""
    rng = np.random.default_rng(5)
    rows = {s: rng.integers(0, 600, size=(ROWS, 65)) for s in range(1, 401)}
    for step in (150, 300):
        rows[step] = rows[step].copy()
    rows[150][0] = rows[100][1]  # step 100 is pass 0, step 150 pass 1: an epoch
    rows[300][0] = rows[260][3]  # both pass 2: a repeat
    alerts = _feed(TrainingMonitor(MonitorConfig(repeat_span=200)), range(1, 401), windows=lambda s: rows[s],
                   passes=lambda s: {"web": (s - 1) // 120})
    assert _kinds(alerts) == [(300, "repeated_window")]
    # without pass numbers both are flagged, as before
    alerts = _feed(TrainingMonitor(MonitorConfig(repeat_span=200)), range(1, 401), windows=lambda s: rows[s])
    assert _kinds(alerts) == [(150, "repeated_window"), (300, "repeated_window")]


def test_dominant_source_flagged_sampling_noise_not():
    rng = np.random.default_rng(4)
    names, probs = list(WEIGHTS), list(WEIGHTS.values())
    draws = {s: list(rng.choice(names, size=ROWS, p=probs)) for s in range(1, 3001)}
    assert _feed(TrainingMonitor(), range(1, 3001), sources=lambda s: draws[s], weights=WEIGHTS) == []
    skewed = {s: list(rng.choice(names, size=ROWS, p=[0.05, 0.05, 0.9])) for s in range(1, 3001)}
    alerts = _feed(TrainingMonitor(), range(1, 101), sources=lambda s: skewed[s], weights=WEIGHTS)
    assert alerts and {a.kind for a in alerts} == {"source_dominance"}
    assert "'math'" in alerts[0].message and alerts[0].step == MonitorConfig().dominance_window
    # the same rows are fine when the schedule asks for them (a policy or stage moved the weights)
    assert _feed(TrainingMonitor(), range(1, 101), sources=lambda s: skewed[s],
                 weights={"web": 0.05, "code": 0.05, "math": 0.9}) == []


# ---- state and decisions ------------------------------------------------------------------------------------
def _eventful(monitor: TrainingMonitor, steps: range) -> list[Alert]:
    rng = np.random.default_rng(5)
    rows = {s: rng.integers(0, 600, size=(ROWS, 33)) for s in range(1, 601)}
    rows[420][1] = rows[260][3]  # repeat across the resume point
    names = list(WEIGHTS)
    srcs = {s: list(rng.choice(names, size=ROWS, p=[0.1, 0.1, 0.8] if 480 <= s < 520 else list(WEIGHTS.values())))
            for s in range(1, 601)}
    loss = _noisy(6, lambda s: 2.0 + 3.0 * math.exp(-s / 100), 0.01)
    tps = _noisy(7, lambda s: 5000.0, 100.0)
    return _feed(monitor, steps, loss=lambda s: loss(s) + (1.0 if s in (310, 450) else 0.0),
                 grad=lambda s: 1.0 * (30.0 if s == 350 else 1.0), tps=lambda s: tps(s) * (0.2 if s > 550 else 1.0),
                 windows=lambda s: rows[s], sources=lambda s: srcs[s], weights=WEIGHTS)


def test_state_round_trip_gives_same_alerts_as_uninterrupted():
    whole = _eventful(TrainingMonitor(), range(1, 601))
    assert {"loss_spike", "grad_norm_spike", "repeated_window", "source_dominance", "throughput_drop"} <= \
        {a.kind for a in whole}
    first = TrainingMonitor()
    before = _eventful(first, range(1, 301))
    resumed = TrainingMonitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
    after = _eventful(resumed, range(301, 601))
    assert [a.to_dict() for a in before + after] == [a.to_dict() for a in whole]
    fresh = _eventful(TrainingMonitor(), range(301, 601))  # without the state the repeat goes unseen
    assert (420, "repeated_window") in _kinds(whole) and (420, "repeated_window") not in _kinds(fresh)
    with pytest.raises(ResumeError, match="version"):
        TrainingMonitor().load_state_dict({"version": 99})


@pytest.mark.parametrize(("on_alert", "expected"), [("log", "continue"), ("stop", "stop"), ("rewind", "rewind")])
def test_decision_follows_on_alert(on_alert: str, expected: str):
    monitor = TrainingMonitor(MonitorConfig(on_alert=on_alert))
    alerts = _feed(monitor, range(1, 101), loss=lambda s: 3.0 + (5.0 if s == 60 else 0.001 * (s % 3)))
    assert _kinds(alerts) == [(60, "loss_spike")]
    assert monitor.decision(alerts) == expected
    assert monitor.decision([]) == "continue"


def test_rewind_budget_and_unrewindable_kinds_stop():
    cfg = MonitorConfig(on_alert="rewind", max_rewinds=1)
    monitor = TrainingMonitor(cfg)
    spike = lambda s: 3.0 + (5.0 if s == 60 else 0.001 * (s % 3))  # noqa: E731
    alerts = _feed(monitor, range(1, 61), loss=spike)
    assert monitor.decision(alerts) == "rewind"
    saved = None  # rewound to the run's start (no checkpoint with monitor state)
    monitor.rewind(saved, skip_steps=[60])
    assert monitor.rewinds == 1 and monitor.skipped_steps == [60]
    again = _feed(monitor, range(1, 61), loss=spike)  # the spike recurs: the budget is spent
    assert monitor.decision(again) == "stop" and "max_rewinds=1" in again[0].message
    slow = TrainingMonitor(MonitorConfig(on_alert="rewind"))
    drop = _feed(slow, range(1, 80), tps=lambda s: 100.0 if s > 50 else 1000.0)
    assert drop and slow.decision(drop) == "stop"  # replaying the same data cannot fix a slow machine


def test_bad_config_and_input_are_named():
    with pytest.raises(ConfigError, match="monitor.on_alert"):
        MonitorConfig(on_alert="panic")
    with pytest.raises(ConfigError, match="throughput_drop_ratio"):
        MonitorConfig(throughput_drop_ratio=1.5)
    with pytest.raises(ConfigError, match="unknown MonitorConfig fields"):
        MonitorConfig.from_dict({"loss_zz": 3})
    monitor = TrainingMonitor()
    with pytest.raises(ValueError, match="2 windows but 3 sources"):
        monitor.observe(1, 3.0, 1.0, 10.0, ["a", "b"], ["web"] * 3, WEIGHTS)
    assert monitor.observe(1, 3.0, 1.0, 10.0, ["a"], ["web"], WEIGHTS) == []
    with pytest.raises(ValueError, match="steps must increase"):
        monitor.observe(1, 3.0, 1.0, 10.0, ["b"], ["web"], WEIGHTS)
    with pytest.raises(ValueError, match="sum to"):
        monitor.observe(2, 3.0, 1.0, 10.0, ["c"], ["web"], {"web": 0.0})
