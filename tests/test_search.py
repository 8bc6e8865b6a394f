"""Mixture regression and simplex search on synthetic swarms whose answer is known: a quadratic bowl with a
known minimiser, linear and log-linear laws, and caps that move the optimum onto a boundary."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from mixlab.mixtures.search import (
    LightGBMRegressor,
    MixtureSearchError,
    fit_mixture_regression,
    project_to_caps,
    sample_mixtures,
    search_simplex,
    weight_caps,
)
from scipy.stats import spearmanr

SOURCES = ["web", "code", "math", "books", "chat"]
OPTIMUM = np.array([0.35, 0.25, 0.20, 0.15, 0.05])
CURVATURE = np.array([2.0, 3.0, 4.0, 5.0, 6.0])


class Bowl:
    """The exact loss surface: 3 + sum_i a_i (w_i - w*_i)^2, minimised on the simplex at w*."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        return 3.0 + ((np.asarray(X) - OPTIMUM) ** 2 * CURVATURE).sum(axis=1)


def swarm(n: int, seed: int, law, noise: float = 0.003) -> pl.DataFrame:
    mixtures = sample_mixtures(dict.fromkeys(SOURCES, 1.0), n=n, concentration=5.0, seed=seed)
    X = mixtures.to_numpy()
    y = law(X) + np.random.default_rng(seed + 1).normal(0.0, noise, len(X))
    return mixtures.with_columns(pl.Series("loss", y))


def linear_law(X: np.ndarray) -> np.ndarray:
    return 4.0 + X @ np.array([-1.0, 0.5, -0.3, 0.8, 0.2])


def log_linear_law(X: np.ndarray) -> np.ndarray:
    return np.exp(1.2 + np.log(X + 1e-3) @ np.array([-0.04, -0.02, -0.03, -0.01, -0.005]))


def held_out_rho(kind: str, law) -> float:
    train, test = swarm(400, seed=0, law=law), swarm(200, seed=10, law=law)
    model = fit_mixture_regression(train, "loss", kind=kind)
    assert model.sources == tuple(SOURCES)
    return spearmanr(model.predict(test), test["loss"].to_numpy()).statistic


# ------------------------------------------------------------------------------------------------ caps, sampling


def test_weight_caps_follow_the_epoch_limit() -> None:
    caps = weight_caps({"web": 1e9, "math": 1e6, "code": 5e6}, run_tokens=1e7, max_epochs=4.0,
                       by_source={"code": 1.0})
    assert caps == pytest.approx({"web": 1.0, "math": 0.4, "code": 0.5})
    with pytest.raises(MixtureSearchError, match="sum to"):
        weight_caps({"a": 1e6, "b": 1e6}, run_tokens=1e8)
    with pytest.raises(MixtureSearchError, match="unknown sources"):
        weight_caps({"a": 1e9}, run_tokens=1e6, by_source={"b": 1.0})


def test_sampling_is_deterministic_by_seed_and_on_the_simplex() -> None:
    natural = {"web": 0.6, "code": 0.25, "math": 0.1, "chat": 0.05}
    a = sample_mixtures(natural, n=300, concentration=2.0, seed=7)
    b = sample_mixtures(natural, n=300, concentration=2.0, seed=7)
    c = sample_mixtures(natural, n=300, concentration=2.0, seed=8)
    assert a.equals(b) and not a.equals(c)
    assert a.columns == list(natural) and a.height == 300
    X = a.to_numpy()
    assert (X >= 0).all() and np.allclose(X.sum(axis=1), 1.0)
    # centred on the natural shares: a tight Dirichlet stays near them
    tight = sample_mixtures(natural, n=2000, concentration=500.0, seed=1).to_numpy()
    assert np.allclose(tight.mean(axis=0), list(natural.values()), atol=0.01)


def test_sampling_respects_caps() -> None:
    natural = {"web": 0.7, "code": 0.2, "math": 0.1}
    caps = {"web": 0.5, "math": 0.15}
    free = sample_mixtures(natural, n=500, concentration=1.0, seed=3).to_numpy()
    assert (free[:, 0] > 0.5).mean() > 0.3  # the cap binds for many uncapped draws
    X = sample_mixtures(natural, n=500, concentration=1.0, seed=3, max_weight=caps).to_numpy()
    assert (X[:, 0] <= 0.5 + 1e-9).all() and (X[:, 2] <= 0.15 + 1e-9).all()
    assert np.allclose(X.sum(axis=1), 1.0)
    # a hard cap where rejection rarely succeeds falls back to projection, still within caps
    hard = sample_mixtures(natural, n=200, concentration=50.0, seed=3, max_weight={"web": 0.3}, max_tries=2)
    assert (hard["web"].to_numpy() <= 0.3 + 1e-9).all() and np.allclose(hard.to_numpy().sum(axis=1), 1.0)
    with pytest.raises(MixtureSearchError, match="sum to"):
        sample_mixtures(natural, n=5, max_weight={"web": 0.1, "code": 0.1, "math": 0.1})


def test_projection_keeps_feasible_rows_and_fixes_the_rest() -> None:
    caps = np.array([0.5, 0.3, 1.0])
    inside = np.array([[0.4, 0.3, 0.3]])
    assert np.allclose(project_to_caps(inside, caps), inside)
    rows = np.random.default_rng(0).dirichlet([0.2, 0.2, 0.2], size=500)
    out = project_to_caps(rows, caps)
    assert (out <= caps + 1e-9).all() and (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0)


# --------------------------------------------------------------------------------------------------- regressors


@pytest.mark.parametrize(("kind", "law", "floor"), [
    ("linear", linear_law, 0.97),
    ("log-linear", log_linear_law, 0.97),
    ("lightgbm", Bowl().predict, 0.9),
])
def test_each_regressor_ranks_held_out_mixtures(kind: str, law, floor: float) -> None:
    assert held_out_rho(kind, law) >= floor


def test_the_laws_tell_the_regressors_apart() -> None:
    """The checks have teeth: the bowl's minimum is interior, which no linear law can rank, and the linear
    law misses the log-linear law's diminishing returns near zero weight."""
    assert held_out_rho("linear", Bowl().predict) < 0.8 < held_out_rho("lightgbm", Bowl().predict)
    assert held_out_rho("linear", log_linear_law) < 0.8 < held_out_rho("log-linear", log_linear_law)


def test_tables_as_mappings_fit_the_same_and_lightgbm_is_deterministic() -> None:
    table = swarm(200, seed=2, law=Bowl().predict)
    from_frame = fit_mixture_regression(table, "loss", kind="lightgbm", n_estimators=200)
    from_mapping = fit_mixture_regression(table.to_dict(as_series=False), "loss", kind="lightgbm",
                                          n_estimators=200)
    probe = swarm(50, seed=3, law=Bowl().predict)
    assert np.array_equal(from_frame.predict(probe), from_mapping.predict(probe))
    assert np.array_equal(from_frame.predict(probe), from_frame.predict(probe.to_numpy()[:, :5]))


def test_bad_tables_and_kinds_are_named() -> None:
    table = swarm(20, seed=0, law=linear_law)
    with pytest.raises(MixtureSearchError, match="target column 'nope'"):
        fit_mixture_regression(table, "nope")
    with pytest.raises(MixtureSearchError, match="unknown regressor kind"):
        fit_mixture_regression(table, "loss", kind="cubic")  # type: ignore[arg-type]
    with pytest.raises(MixtureSearchError, match="lacks columns"):
        fit_mixture_regression(table, "loss", sources=["web", "video"])
    with pytest.raises(MixtureSearchError, match="not fitted"):
        LightGBMRegressor().predict(np.zeros((1, 5)))


# ------------------------------------------------------------------------------------------------------- search


def test_search_finds_the_bowl_minimiser() -> None:
    result = search_simplex(Bowl(), sources=SOURCES, n_samples=20_000, seed=0)
    found = np.array([result.mixture[s] for s in SOURCES])
    assert np.abs(found - OPTIMUM).max() < 0.02
    assert result.predicted_loss == pytest.approx(3.0, abs=1e-3)
    assert result.predicted_loss <= result.top_k_predicted_loss


def test_search_on_a_fitted_model_lands_near_the_true_optimum() -> None:
    model = fit_mixture_regression(swarm(500, seed=4, law=Bowl().predict), "loss", kind="lightgbm")
    result = search_simplex(model, n_samples=20_000, seed=0)
    found = np.array([result.mixture[s] for s in SOURCES])
    assert np.abs(found - OPTIMUM).sum() < 0.2
    # the found mixture is truly good: its real loss is close to the minimum, far below a random mixture's
    random_loss = Bowl().predict(swarm(500, seed=5, law=Bowl().predict).to_numpy()[:, :5]).mean()
    assert Bowl().predict(found[None])[0] - 3.0 < 0.2 * (random_loss - 3.0)


def test_search_respects_caps_and_fills_the_best_sources_first() -> None:
    """On a linear law the optimum is known exactly: the cheapest sources filled to their caps, in order."""
    model = fit_mixture_regression(swarm(300, seed=6, law=linear_law, noise=0.0), "loss", kind="linear")
    caps = {"web": 0.4, "math": 0.3, "chat": 0.2}
    result = search_simplex(model, caps=caps, n_samples=20_000, seed=0)
    for source, cap in caps.items():
        assert result.mixture[source] <= cap + 1e-9
    assert sum(result.mixture.values()) == pytest.approx(1.0)
    # coefficients web -1.0 < math -0.3 < chat 0.2 < code 0.5 < books 0.8
    expected = {"web": 0.4, "math": 0.3, "chat": 0.2, "code": 0.1, "books": 0.0}
    assert result.mixture == pytest.approx(expected, abs=0.01)
    with pytest.raises(MixtureSearchError, match="not in the mixture"):
        search_simplex(model, caps={"video": 0.5})


def test_search_is_deterministic_by_seed() -> None:
    a = search_simplex(Bowl(), sources=SOURCES, n_samples=5_000, refine_steps=20, seed=1)
    b = search_simplex(Bowl(), sources=SOURCES, n_samples=5_000, refine_steps=20, seed=1)
    assert a == b
