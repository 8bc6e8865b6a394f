"""Mixture search from proxy runs (RegMix, Olmix): sample mixtures, fit a regression of a loss on the
weights, and search the simplex for the mixture the regression predicts best.

The three steps are separate functions so that any (mixtures, losses) table can be used, whoever trained the
proxies:

    mixtures = sample_mixtures(natural, n=64, seed=0, max_weight=weight_caps(available, run_tokens))
    ... train one proxy per row, measure a loss ...
    model = fit_mixture_regression(table, target="val_loss", kind="lightgbm")
    best = search_simplex(model, caps=weight_caps(available, run_tokens), seed=0)

Caps come from the planner's max-epoch limit: a source with A tokens, in a run of R tokens, may be seen at
most `max_epochs` times, so its weight is at most `max_epochs * A / R`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
from mixlab.mixtures.planner import DEFAULT_MAX_EPOCHS

RegressorKind = Literal["linear", "log-linear", "lightgbm"]
_TOL = 1e-9


class MixtureSearchError(ValueError):
    """A mixture table, cap set or search request that cannot be used as given."""


# ---------------------------------------------------------------------------------------------- caps & sampling


def weight_caps(available_tokens: Mapping[str, float], run_tokens: float, max_epochs: float = DEFAULT_MAX_EPOCHS,
                by_source: Mapping[str, float] | None = None) -> dict[str, float]:
    """The largest weight each source may take in a run of `run_tokens` without passing its epoch limit.

    `by_source` overrides `max_epochs` for named sources (e.g. 1.0 for a source that must not repeat).
    Weights are capped at 1.0.
    """
    if run_tokens <= 0:
        raise MixtureSearchError(f"run_tokens must be > 0, got {run_tokens}")
    overrides = dict(by_source or {})
    unknown = sorted(set(overrides) - set(available_tokens))
    if unknown:
        raise MixtureSearchError(f"by_source names unknown sources {unknown}; known: {sorted(available_tokens)}")
    caps = {}
    for name, tokens in available_tokens.items():
        epochs = overrides.get(name, max_epochs)
        if tokens < 0 or epochs <= 0:
            raise MixtureSearchError(f"source {name!r}: available tokens must be >= 0 and max epochs > 0 "
                                     f"(got {tokens} tokens, {epochs} epochs)")
        caps[name] = min(1.0, epochs * tokens / run_tokens)
    _check_feasible(caps)
    return caps


def _check_feasible(caps: Mapping[str, float]) -> None:
    total = sum(caps.values())
    if total < 1.0 - 1e-6:
        raise MixtureSearchError(
            f"the weight caps sum to {total:.4f} < 1, so no mixture fits within them: add tokens, allow more "
            f"epochs or shorten the run (caps: { {k: round(v, 4) for k, v in caps.items()} })")


def _cap_vector(caps: Mapping[str, float] | None, sources: Sequence[str]) -> np.ndarray:
    if caps is None:
        return np.ones(len(sources))
    unknown = sorted(set(caps) - set(sources))
    if unknown:
        raise MixtureSearchError(f"caps name sources {unknown} that are not in the mixture {list(sources)}")
    vector = np.array([min(1.0, float(caps.get(s, 1.0))) for s in sources])
    if (vector < 0).any():
        raise MixtureSearchError(f"caps must be >= 0, got {dict(caps)}")
    _check_feasible(dict(zip(sources, vector, strict=True)))
    return vector


def project_to_caps(weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Rows of `weights` moved onto {w >= 0, sum w = 1, w <= caps}, keeping the relative shares of uncapped
    sources: weight above a cap is handed to the others in proportion to their weight (or their headroom where
    they are all zero). Rows already inside are returned unchanged."""
    w = np.clip(np.atleast_2d(np.asarray(weights, dtype=float)), 0.0, None)
    sums = w.sum(axis=1, keepdims=True)
    w = np.where(sums > 0, w / np.where(sums > 0, sums, 1.0), caps / caps.sum())
    for _ in range(len(caps) + 1):
        over = w > caps + _TOL
        if not over.any():
            break
        excess = np.where(over, w - caps, 0.0).sum(axis=1, keepdims=True)
        w = np.minimum(w, caps)
        free = (w < caps - _TOL)
        share = np.where(free, w, 0.0)
        share_sum = share.sum(axis=1, keepdims=True)
        headroom = np.where(free, caps - w, 0.0)
        share = np.where(share_sum > _TOL, share, headroom)
        share_sum = share.sum(axis=1, keepdims=True)
        w = w + excess * share / np.where(share_sum > 0, share_sum, 1.0)
    # proportional hand-out can overshoot again; a final headroom fill is exact
    w = np.minimum(w, caps)
    missing = 1.0 - w.sum(axis=1, keepdims=True)
    headroom = caps - w
    room = headroom.sum(axis=1, keepdims=True)
    w = w + np.where(missing > 0, missing, 0.0) * headroom / np.where(room > 0, room, 1.0)
    return w


def sample_mixtures(natural: Mapping[str, float], n: int, concentration: float = 1.0, seed: int = 0,
                    max_weight: Mapping[str, float] | None = None, max_tries: int = 50) -> pl.DataFrame:
    """`n` mixtures drawn from a Dirichlet centred on the natural token shares, one column per source.

    alpha = concentration * natural share (normalised): small concentrations give sparse, varied mixtures
    (RegMix's swarm), large ones stay close to the natural mixture. Draws over a cap in `max_weight` are
    rejected; if too few pass after `max_tries` batches, the remaining rows are rejected draws projected onto the
    caps (`project_to_caps`). The same seed gives the same table.
    """
    sources = list(natural)
    if not sources:
        raise MixtureSearchError("natural shares are empty: give at least one source")
    if n < 1 or concentration <= 0:
        raise MixtureSearchError(f"n must be >= 1 and concentration > 0, got n={n}, concentration={concentration}")
    shares = np.array([float(natural[s]) for s in sources])
    if (shares < 0).any() or shares.sum() <= 0:
        raise MixtureSearchError(f"natural shares must be >= 0 and not all zero, got {dict(natural)}")
    shares = shares / shares.sum()
    if (shares == 0).any():
        raise MixtureSearchError(f"sources {[s for s, v in zip(sources, shares, strict=True) if v == 0]} have "
                                 "a natural share of 0, which a Dirichlet cannot sample: drop them or give a share")
    caps = _cap_vector(max_weight, sources)
    rng = np.random.default_rng(seed)
    alpha = concentration * shares
    accepted: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    count = 0
    for _ in range(max_tries):
        draws = _dirichlet(rng, alpha, n)
        ok = (draws <= caps + _TOL).all(axis=1)
        accepted.append(draws[ok])
        rejected.append(draws[~ok])
        count += int(ok.sum())
        if count >= n:
            break
    rows = np.concatenate(accepted)[:n]
    if len(rows) < n:
        filler = project_to_caps(np.concatenate(rejected)[: n - len(rows)], caps)
        rows = np.concatenate([rows, filler])
    return pl.DataFrame({s: rows[:, i] for i, s in enumerate(sources)})


def _dirichlet(rng: np.random.Generator, alpha: np.ndarray, n: int) -> np.ndarray:
    """Dirichlet draws through gammas, redrawing the rare rows where every gamma underflows to 0 (tiny alphas)."""
    g = rng.gamma(alpha, size=(n, len(alpha)))
    sums = g.sum(axis=1)
    while (sums <= 0).any():
        bad = sums <= 0
        g[bad] = rng.gamma(alpha, size=(int(bad.sum()), len(alpha)))
        sums = g.sum(axis=1)
    return g / sums[:, None]


# ------------------------------------------------------------------------------------------------- regressors


class Regressor(Protocol):
    """What the search needs from a model: fit on (mixtures, losses), predict losses for new mixtures."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Regressor: ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...


@dataclass
class LinearRegressor:
    """loss = c + sum_i b_i w_i by least squares (RegMix's linear baseline). Weights sum to one, so c and the
    b_i are not separately identified; the minimum-norm solution predicts the same."""

    ridge: float = 0.0
    coef_: np.ndarray | None = field(default=None, init=False, repr=False)
    intercept_: float = field(default=0.0, init=False)

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearRegressor:
        self.intercept_, self.coef_ = _least_squares(X, y, self.ridge)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.intercept_ + np.asarray(X, dtype=float) @ _fitted(self.coef_, self)


@dataclass
class LogLinearRegressor:
    """Olmix-style log-linear law: log(loss) = c + sum_i b_i log(w_i + eps), i.e. loss = e^c prod (w_i+eps)^b_i,
    fitted by least squares on log(loss). A source's effect shrinks as its weight grows (diminishing returns),
    which a linear model cannot express. eps keeps absent sources finite."""

    eps: float = 1e-3
    ridge: float = 1e-6
    coef_: np.ndarray | None = field(default=None, init=False, repr=False)
    intercept_: float = field(default=0.0, init=False)

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogLinearRegressor:
        y = np.asarray(y, dtype=float)
        if (y <= 0).any():
            raise MixtureSearchError("the log-linear regression needs positive targets (losses); got values <= 0")
        self.intercept_, self.coef_ = _least_squares(np.log(np.asarray(X, dtype=float) + self.eps), np.log(y),
                                                     self.ridge)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = self.intercept_ + np.log(np.asarray(X, dtype=float) + self.eps) @ _fitted(self.coef_, self)
        return np.exp(z)


@dataclass
class LightGBMRegressor:
    """Gradient-boosted trees (RegMix's best regressor) through LightGBM's own `lightgbm.train` (the
    `LGBMRegressor` wrapper would pull in scikit-learn for nothing), deterministic: fixed seed, `deterministic=True`,
    forced column-wise histograms and a fixed thread count. Defaults suit a few hundred rows x ~20 sources:
    many small, slow steps with shallow trees, since the swarm is small and noisy."""

    n_estimators: int = 1000
    learning_rate: float = 0.01
    num_leaves: int = 15
    min_child_samples: int = 10
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    seed: int = 42
    num_threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)
    model_: Any = field(default=None, init=False, repr=False)

    def fit(self, X: np.ndarray, y: np.ndarray) -> LightGBMRegressor:
        import lightgbm

        params = {"objective": "regression", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                  "min_data_in_leaf": self.min_child_samples, "bagging_fraction": self.subsample,
                  "bagging_freq": 1 if self.subsample < 1 else 0, "feature_fraction": self.colsample_bytree,
                  "seed": self.seed, "num_threads": self.num_threads, "deterministic": True,
                  "force_col_wise": True, "verbosity": -1, **self.extra}
        data = lightgbm.Dataset(np.asarray(X, dtype=float), label=np.asarray(y, dtype=float),
                                params={"verbosity": -1})
        self.model_ = lightgbm.train(params, data, num_boost_round=self.n_estimators)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return _fitted(self.model_, self).predict(np.asarray(X, dtype=float))


def _least_squares(X: np.ndarray, y: np.ndarray, ridge: float) -> tuple[float, np.ndarray]:
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    design = np.hstack([np.ones((len(X), 1)), X])
    if ridge > 0:  # penalise the slopes, not the intercept
        penalty = np.sqrt(ridge) * np.eye(design.shape[1])[1:]
        design = np.vstack([design, penalty])
        y = np.concatenate([y, np.zeros(len(penalty))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(solution[0]), solution[1:]


def _fitted(value: Any, owner: object) -> Any:
    if value is None:
        raise MixtureSearchError(f"{type(owner).__name__} is not fitted yet: call fit(X, y) first")
    return value


REGRESSORS: dict[str, type] = {"linear": LinearRegressor, "log-linear": LogLinearRegressor,
                               "lightgbm": LightGBMRegressor}


@dataclass
class MixtureRegression:
    """A fitted regressor and the source order its columns follow."""

    sources: tuple[str, ...]
    target: str
    kind: str
    regressor: Regressor

    def predict(self, mixtures: pl.DataFrame | Mapping[str, Sequence[float]] | np.ndarray) -> np.ndarray:
        """Predicted target for each mixture (a table with the source columns, or an array in source order)."""
        if isinstance(mixtures, np.ndarray):
            X = np.atleast_2d(mixtures).astype(float)
            if X.shape[1] != len(self.sources):
                raise MixtureSearchError(f"expected {len(self.sources)} columns in source order {self.sources}, "
                                         f"got {X.shape[1]}")
        else:
            X = _columns(_as_frame(mixtures), self.sources)
        return self.regressor.predict(X)


def _as_frame(table: pl.DataFrame | Mapping[str, Sequence[float]]) -> pl.DataFrame:
    if isinstance(table, pl.DataFrame):
        return table
    if isinstance(table, Mapping):
        return pl.DataFrame({k: list(v) for k, v in table.items()})
    raise MixtureSearchError(f"expected a polars DataFrame or a mapping of columns, got {type(table).__name__}")


def _columns(frame: pl.DataFrame, names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise MixtureSearchError(f"the table lacks columns {missing}; it has {frame.columns}")
    X = frame.select(names).to_numpy().astype(float)
    if not np.isfinite(X).all():
        raise MixtureSearchError(f"columns {list(names)} hold missing or non-finite values: fill or drop those rows")
    return X


def fit_mixture_regression(table: pl.DataFrame | Mapping[str, Sequence[float]], target: str,
                           kind: RegressorKind = "lightgbm", sources: Sequence[str] | None = None,
                           **params: Any) -> MixtureRegression:
    """Fit `target` (a loss column) on the mixture weights in `table`.

    `sources` are the weight columns (default: every numeric column except `target`); `params` go to the
    regressor's dataclass (e.g. `n_estimators=500`, `eps=1e-4`).
    """
    if kind not in REGRESSORS:
        raise MixtureSearchError(f"unknown regressor kind {kind!r}; choose one of {sorted(REGRESSORS)}")
    frame = _as_frame(table)
    if target not in frame.columns:
        raise MixtureSearchError(f"target column {target!r} is not in the table; columns: {frame.columns}")
    if sources is None:
        sources = [c for c in frame.columns if c != target and frame.schema[c].is_numeric()]
    sources = tuple(sources)
    if target in sources or not sources:
        raise MixtureSearchError(f"sources must be a non-empty list of weight columns without the target, "
                                 f"got {list(sources)}")
    X = _columns(frame, sources)
    y = _columns(frame, [target])[:, 0]
    if len(y) < 2:
        raise MixtureSearchError(f"need at least 2 rows to fit a regression, got {len(y)}")
    regressor = REGRESSORS[kind](**params).fit(X, y)
    return MixtureRegression(sources=sources, target=target, kind=kind, regressor=regressor)


# --------------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchResult:
    """The best predicted mixture, its predicted loss, and the RegMix-style top-k average it started from."""

    mixture: dict[str, float]
    predicted_loss: float
    top_k_mixture: dict[str, float]
    top_k_predicted_loss: float
    candidates: int


def search_simplex(model: MixtureRegression | Regressor, sources: Sequence[str] | None = None,
                   caps: Mapping[str, float] | None = None, n_samples: int = 100_000, top_k: int = 100,
                   refine_steps: int = 200, seed: int = 0, batch: int = 20_000) -> SearchResult:
    """The mixture with the lowest predicted loss on the simplex within `caps`.

    1. Score `n_samples` candidates: uniform Dirichlet draws plus sparse ones (alpha 0.1) and the vertices,
       all projected onto the caps.
    2. Average the `top_k` best (RegMix): a robust start that does not chase a single noisy prediction.
    3. Refine locally: perturb the incumbent with a Dirichlet centred on it, keep improvements, tighten when
       none are found (`refine_steps` rounds of 64 proposals). Set refine_steps=0 to return the top-k average.
    """
    if sources is None:
        if not isinstance(model, MixtureRegression):
            raise MixtureSearchError("pass `sources` when the model is a bare regressor (it has no column names)")
        sources = model.sources
    sources = list(sources)
    if isinstance(model, MixtureRegression) and tuple(sources) != model.sources:
        raise MixtureSearchError(f"sources {sources} differ from the model's {list(model.sources)}")
    if n_samples < 1 or top_k < 1:
        raise MixtureSearchError(f"n_samples and top_k must be >= 1, got {n_samples} and {top_k}")
    k = len(sources)
    cap = _cap_vector(caps, sources)
    rng = np.random.default_rng(seed)
    predict = model.predict

    def score(X: np.ndarray) -> np.ndarray:
        return np.asarray(predict(X), dtype=float)

    # score in batches, keeping only the running top-k, so memory stays flat for large n_samples
    best_X = project_to_caps(np.eye(k), cap)
    best_y = score(best_X)
    remaining = n_samples
    while remaining > 0:
        m = min(batch, remaining)
        alpha = np.where(np.arange(m)[:, None] % 2 == 0, 1.0, 0.1) * np.ones((m, k))
        X = project_to_caps(rng.gamma(alpha), cap)
        best_X = np.concatenate([best_X, X])
        best_y = np.concatenate([best_y, score(X)])
        keep = np.argsort(best_y, kind="stable")[:top_k]
        best_X, best_y = best_X[keep], best_y[keep]
        remaining -= m
    average = project_to_caps(best_X.mean(axis=0), cap)[0]
    average_loss = float(score(average[None])[0])
    incumbent, incumbent_loss = (average, average_loss) if average_loss <= best_y[0] else (best_X[0], best_y[0])
    concentration = 200.0
    for _ in range(refine_steps):
        proposals = project_to_caps(rng.dirichlet(concentration * incumbent + 0.05, size=64), cap)
        losses = score(proposals)
        i = int(np.argmin(losses))
        if losses[i] < incumbent_loss:
            incumbent, incumbent_loss = proposals[i], float(losses[i])
        else:
            concentration = min(concentration * 1.5, 1e6)
    return SearchResult(mixture=_as_mixture(sources, incumbent), predicted_loss=float(incumbent_loss),
                        top_k_mixture=_as_mixture(sources, average), top_k_predicted_loss=average_loss,
                        candidates=n_samples + k)


def _as_mixture(sources: Sequence[str], w: np.ndarray) -> dict[str, float]:
    return {s: float(v) for s, v in zip(sources, w, strict=True)}
