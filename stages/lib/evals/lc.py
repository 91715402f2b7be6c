"""Length-controlled pairwise win rate, as AlpacaEval 2 computes it (Dubois et al. 2024, arXiv 2404.04475;
tatsu-lab/alpaca_eval `src/alpaca_eval/metrics/glm_winrate.py`, GLM `length_controlled_v1`).

The judge's preference for the model (output 2) over the baseline (output 1) is fitted with a logistic GLM

    P(model preferred) = sigmoid(w_len * tanh(Δ / std(Δ)) + w_diff * difficulty_i + θ_model)

where Δ = len(output_1) - len(output_2) in characters (pandas `str.len`), std with ddof 1 over all rows, and
`difficulty_i` AlpacaEval's per-instruction difficulty (used only when given). The length-controlled win rate
is the GLM's mean predicted preference with the length difference set to zero, times 100:
LC = 100 * mean_i sigmoid(w_diff * difficulty_i + θ_model).

The fit is AlpacaEval's: labels are the preference in [0, 1] (1 = the model wins, a draw 0.5: AlpacaEval's
0 and 1.5), used as soft labels (AlpacaEval duplicates each row as y=1 with weight p and y=0 with weight
1 - p: the same objective), no separate intercept (θ_model is the constant column), an L1 penalty as
liblinear's `||w||_1 + C * Σ loss_i`, and C chosen from `np.logspace(-4, 4, 10)` by 5-fold cross-validated
log loss, then refitted on every row (`LogisticRegressionCV(penalty="l1", solver="liblinear",
fit_intercept=False)` with `GroupKFold`). Here the solver is a small proximal Newton method in numpy
(`fit_logistic`), tested against scikit-learn on AlpacaEval's public GPT-4 annotations (tests/test_lc.py).

What is not AlpacaEval's, on purpose (docs/evaluation.md, "Length-controlled win rate"):
* AlpacaEval also regularizes towards the baseline with the annotations of two "gamed" baselines (λ = 0.2)
  and takes `instruction_difficulty` from files on the Hugging Face Hub; both exist only for its 805
  instructions and are not reachable here. Without them the GLM has two parameters (length slope and the
  model's intercept) and LC = 100 * sigmoid(θ_model), one number per (model, baseline, judge).
* The cross-validation folds are row i -> fold i mod k (`folds`), not scikit-learn's GroupKFold order
  (which depends on its version); pass `folds` to use another assignment.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from stages.lib.judging.winrate import student_score

log = logging.getLogger(__name__)

CS = tuple(np.logspace(-4, 4, 10))  # scikit-learn's LogisticRegressionCV default grid (Cs=10)
N_SPLITS = 5  # AlpacaEval's length_controlled_v1 kwargs
LOSS_EPS = 1e-15  # AlpacaEval's logloss clipping


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # AlpacaEval's `_logistic`: stable at both ends


def _objective(w, X, p, s, C, penalty) -> float:
    z = X @ w
    loss = float(np.sum(s * (np.logaddexp(0.0, z) - p * z)))
    reg = float(np.abs(w).sum()) if penalty == "l1" else 0.5 * float(w @ w)
    return reg + C * loss


def fit_logistic(X: np.ndarray, p: np.ndarray, C: float, penalty: str = "l1", sample_weight: np.ndarray | None = None,
                 w0: np.ndarray | None = None, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """The weights minimizing `R(w) + C * Σ_i s_i * CE(p_i, sigmoid(X_i · w))`, no intercept, with soft labels
    `p` in [0, 1]: R = ||w||_1 (`l1`, liblinear's L1R_LR) or ||w||² / 2 (`l2`). Proximal Newton: each step solves
    the penalized quadratic model by coordinate descent, then backtracks on the true objective."""
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty: expected l1 or l2, got {penalty!r}")
    X, p = np.asarray(X, float), np.asarray(p, float)
    s = np.ones(len(p)) if sample_weight is None else np.asarray(sample_weight, float)
    d = X.shape[1]
    w = np.zeros(d) if w0 is None else np.asarray(w0, float).copy()
    f = _objective(w, X, p, s, C, penalty)
    for _ in range(max_iter):
        q = _sigmoid(X @ w)
        g = C * (X.T @ (s * (q - p)))
        H = C * (X.T * (s * q * (1 - q))) @ X
        if penalty == "l2":
            step = -np.linalg.solve(H + np.eye(d), g + w)
            decrease = float((g + w) @ step)
        else:
            step = _l1_quadratic_step(w, g, H)
            decrease = float(g @ step + np.abs(w + step).sum() - np.abs(w).sum())
        if not np.any(np.abs(step) > tol * (1 + np.abs(w))) or decrease >= 0:
            break
        t = 1.0
        while True:  # Armijo backtracking on the exact objective
            w_new = w + t * step
            f_new = _objective(w_new, X, p, s, C, penalty)
            if f_new <= f + 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        if f - f_new <= 1e-15 * max(1.0, abs(f)):
            w, f = w_new, min(f, f_new)
            break
        w, f = w_new, f_new
    return w


def _l1_quadratic_step(w: np.ndarray, g: np.ndarray, H: np.ndarray, sweeps: int = 2000) -> np.ndarray:
    """argmin_δ g·δ + δᵀHδ/2 + ||w + δ||_1, by cyclic coordinate descent (soft-thresholding per coordinate)."""
    d = len(w)
    delta = np.zeros(d)
    Hd = np.zeros(d)
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(d):
            h = H[j, j]
            if h <= 0:
                continue
            u = w[j] + delta[j]  # current value of the coordinate
            grad = g[j] + Hd[j]  # derivative of the smooth part at δ
            target = u - grad / h
            new = math.copysign(max(abs(target) - 1.0 / h, 0.0), target)
            change = new - u
            if change:
                delta[j] += change
                Hd += H[:, j] * change
                biggest = max(biggest, abs(change))
        if biggest <= 1e-15 * (1 + np.abs(w + delta).max()):
            break
    return delta


def log_loss(p: np.ndarray, q: np.ndarray) -> float:
    """AlpacaEval's `logloss` with soft targets: -mean(p log q + (1-p) log(1-q)), q clipped to [1e-15, 1-1e-15]."""
    q = np.clip(q, LOSS_EPS, 1 - LOSS_EPS)
    return float(-np.mean(p * np.log(q) + (1 - p) * np.log(1 - q)))


def default_folds(n: int, n_splits: int = N_SPLITS) -> np.ndarray:
    return np.arange(n) % n_splits


def fit_cv(X: np.ndarray, p: np.ndarray, Cs: Sequence[float] = CS, folds: np.ndarray | None = None,
           n_splits: int = N_SPLITS, penalty: str = "l1") -> tuple[np.ndarray, float, list[float]]:
    """(weights refitted on all rows with the best C, that C, the summed held-out log loss per C), as
    `LogisticRegressionCV` picks it: the C with the least held-out loss summed over folds, the first on ties."""
    X, p = np.asarray(X, float), np.asarray(p, float)
    folds = default_folds(len(p), n_splits) if folds is None else np.asarray(folds)
    losses = np.zeros(len(Cs))
    for k in np.unique(folds):
        train, test = folds != k, folds == k
        w = None
        for i, C in enumerate(Cs):  # warm start along the path, as scikit-learn's path does
            w = fit_logistic(X[train], p[train], C, penalty, w0=w)
            losses[i] += log_loss(p[test], _sigmoid(X[test] @ w))
    best = int(np.argmin(losses))
    return fit_logistic(X, p, Cs[best], penalty), float(Cs[best]), [float(x) for x in losses]


def is_extreme_change(prev: float, new: float, abs_diff: float = 10, rel_diff: float = 4) -> bool:
    """AlpacaEval's `get_is_extreme_changes`: the new win rate is below min(prev - prev/4, prev - 10) or above
    max(prev + (100 - prev)/4, prev + 10)."""
    too_small = new < min(prev - prev / rel_diff, prev - abs_diff)
    too_large = new > max(prev + (100 - prev) / rel_diff, prev + abs_diff)
    return bool(too_small or too_large)


@dataclass
class LCResult:
    """The raw and length-controlled win rates of the model (output 2) against the baseline (output 1)."""

    win_rate: float
    standard_error: float
    length_controlled_winrate: float
    n: int
    n_fitted: int
    weights: dict
    C: float
    extreme_change: bool

    def as_dict(self) -> dict:
        return {"win_rate": self.win_rate, "standard_error": self.standard_error,
                "length_controlled_winrate": self.length_controlled_winrate, "n": self.n, "n_fitted": self.n_fitted,
                "weights": self.weights, "C": self.C, "extreme_change": self.extreme_change}


def features(len_1: Sequence[float], len_2: Sequence[float], difficulty: Sequence[float] | None = None) -> np.ndarray:
    """The design matrix, AlpacaEval's column order: tanh(std_delta_len), [instruction_difficulty], model (1)."""
    delta = np.asarray(len_1, float) - np.asarray(len_2, float)
    std = float(np.std(delta, ddof=1)) if len(delta) > 1 else 0.0
    std_delta = delta / std if std > 0 else np.zeros_like(delta)  # no length difference to explain: slope 0
    cols = [np.tanh(std_delta)]
    if difficulty is not None:
        cols.append(np.asarray(difficulty, float))
    cols.append(np.ones(len(delta)))
    return np.column_stack(cols)


def length_controlled(preferences: Sequence[float | None], outputs_1: Sequence[str] | None = None,
                      outputs_2: Sequence[str] | None = None, *, len_1: Sequence[float] | None = None,
                      len_2: Sequence[float] | None = None, difficulty: Sequence[float] | None = None,
                      Cs: Sequence[float] = CS, folds: np.ndarray | None = None, n_splits: int = N_SPLITS,
                      penalty: str = "l1", warn: bool = True) -> LCResult:
    """AlpacaEval's length-controlled win rate of output 2 (the model) over output 1 (the baseline).

    `preferences`: AlpacaEval's per row (1 baseline wins, 2 model wins, 0 or 1.5 a draw, a float in [1, 2] for a
    weighted annotator; None: not judged, left out of the fit but predicted, as AlpacaEval does). Lengths: the
    outputs' characters, or `len_1` / `len_2` directly. `difficulty`: per-instruction difficulty (AlpacaEval's
    805 only). Warns (logging) when LC and the raw win rate differ wildly, as AlpacaEval does."""
    if len_1 is None:
        len_1 = [len(o) for o in outputs_1]
    if len_2 is None:
        len_2 = [len(o) for o in outputs_2]
    n = len(preferences)
    if not (len(len_1) == len(len_2) == n) or (difficulty is not None and len(difficulty) != n):
        raise ValueError("preferences, outputs and difficulty must have one entry per row")
    X = features(len_1, len_2, difficulty)
    known = np.array([q is not None and q == q for q in preferences])
    p = np.array([_soft(q) if k else np.nan for q, k in zip(preferences, known)])
    if known.sum() < 2:
        raise ValueError(f"length-controlled win rate: need at least 2 judged rows, got {int(known.sum())}")
    fold_ids = None if folds is None else np.asarray(folds)[known]
    w, C, _ = fit_cv(X[known], p[known], Cs, fold_ids, n_splits, penalty)
    X0 = X.copy()
    X0[:, 0] = 0.0  # no length difference
    lc = float(_sigmoid(X0 @ w).mean() * 100)
    m = p[known] * 100  # stillhouse's `win_rate` (AlpacaEval's): mean, a draw half, standard error ddof 1
    raw = {"win_rate": float(m.mean()), "standard_error": float(m.std(ddof=1) / math.sqrt(len(m)))}
    names = ["tanh_std_delta_len"] + (["instruction_difficulty"] if difficulty is not None else []) + ["model"]
    extreme = is_extreme_change(raw["win_rate"], lc)
    if extreme and warn:
        log.warning(f"Length controlled win rate is very different from the raw one: {lc:.1f}% vs "
                    f"{raw['win_rate']:.1f}%. This might be a sign of failure of the GLM.")
    return LCResult(float(raw["win_rate"]), float(raw["standard_error"]), lc, n, int(known.sum()),
                    dict(zip(names, (float(x) for x in w))), C, extreme)


def _soft(preference: float) -> float:
    """The model's preference in [0, 1]: AlpacaEval's `replace({0: 1.5}) - 1`."""
    if preference in (0, 1, 1.5, 2):
        return student_score(preference)
    if not 1 <= preference <= 2:
        raise ValueError(f"preference must be in [1, 2] or 0 (a draw), got {preference!r}")
    return float(preference) - 1
