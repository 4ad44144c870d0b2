"""A fitted mixture (RegMix-style): regress each domain's validation loss on the mixture weights, then propose
the weights that minimize a target on the simplex.

Model: log-linear, log BPB_k(w) = sum_d b_kd w_d, one least-squares fit per evaluated domain k (numpy, a small
ridge term for grids with fewer variants than domains or collinear weights). Why this one: it is the data-mixing
law's form L_k = c_k + s_k exp(t_k . w) (Ye et al., 2024) without the offset c_k, which a handful of tiny-model
variants cannot pin down; the intercept is folded into b because the weights sum to 1. It needs as many variants
as domains, where RegMix's gradient-boosted trees need hundreds of small runs. The target is a weighted sum of
the per-domain predictions; the proposal is its minimum over mixtures on a simplex lattice (or RegMix's random
simplex samples when there are many domains), restricted to the box of weights the grid tried, since a
regression is not trusted outside the region it was fitted on.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..config import ConfigError

RIDGE = 1e-4
LATTICE_MAX_DOMAINS = 5
SAMPLES = 200_000


def _fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ridge least squares of log y on x (no intercept: the rows of x sum to 1)."""
    d = x.shape[1]
    return np.linalg.solve(x.T @ x + RIDGE * np.eye(d), x.T @ np.log(y))


def _candidates(lo: np.ndarray, hi: np.ndarray, seed: int = 0) -> np.ndarray:
    """Mixtures inside [lo, hi] per domain: a lattice of step 1/40 for few domains, else random simplex points."""
    d = len(lo)
    if d <= LATTICE_MAX_DOMAINS:
        n = 40
        points = np.array([c for c in itertools.product(range(n + 1), repeat=d - 1) if sum(c) <= n], dtype=float)
        points = np.column_stack([points, n - points.sum(axis=1)]) / n
    else:
        points = np.random.default_rng(seed).dirichlet(np.ones(d), SAMPLES)
    inside = np.all((points >= lo - 1e-9) & (points <= hi + 1e-9), axis=1)
    return points[inside] if inside.any() else points


def fit_mixture(results: dict[str, dict], target: dict[str, float] | None = None) -> dict:
    """Fit on the variants' final per-domain BPB; leave-one-out predictions and a proposed mixture."""
    names = [n for n, r in results.items() if r["phases"]]
    if len(names) < 3:
        raise ConfigError(f"fitting a mixture needs at least 3 finished variants, got {len(names)}")
    domains = sorted({d for n in names for d in results[n]["mixture"]})
    finals = {n: list(results[n]["phases"].values())[-1]["bpb_per_dataset"] for n in names}
    evaluated = sorted(set.intersection(*(set(f) for f in finals.values())))
    target = target or {d: 1.0 / len(evaluated) for d in evaluated}
    missing = [d for d in target if d not in evaluated]
    if missing:
        raise ConfigError(f"--fit-target: {missing} not evaluated in every variant (evaluated: {evaluated})")
    x = np.array([[results[n]["mixture"].get(d, 0.0) for d in domains] for n in names])
    y = {d: np.array([finals[n][d] for n in names]) for d in target}
    c = np.array([target[d] for d in target])

    def predict(coef: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
        return np.stack([np.exp(w @ coef[d]) for d in target], axis=-1) @ c

    held_out = []
    for i, name in enumerate(names):
        keep = [j for j in range(len(names)) if j != i]
        coef = {d: _fit(x[keep], y[d][keep]) for d in target}
        held_out.append({"variant": name, "predicted": float(predict(coef, x[i])),
                         "measured": float(sum(target[d] * finals[name][d] for d in target))})
    coef = {d: _fit(x, y[d]) for d in target}
    candidates = _candidates(x.min(axis=0), x.max(axis=0))
    scores = predict(coef, candidates)
    best = candidates[int(np.argmin(scores))]
    return {
        "method": "log-linear regression of each domain's final validation BPB on the run's overall mixture "
                  "(log BPB_k = b_k . w, ridge 1e-4); leave-one-out predictions; proposal = argmin of the "
                  "predicted target over mixtures within the weight range the grid tried",
        "domains": domains,
        "target": target,
        "target_description": " + ".join(f"{w:g} x BPB({d})" for d, w in target.items()),
        "coefficients": {d: dict(zip(domains, map(float, coef[d]))) for d in target},
        "held_out": held_out,
        "proposal": {"weights": dict(zip(domains, map(float, best))), "predicted": float(scores.min())},
    }


def parse_target(text: str | None) -> dict[str, float] | None:
    """`prose` or `prose=0.5,python=0.5` -> weights of the target's domains (None: every domain, equally)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"--fit-target: {part!r} is not DOMAIN or DOMAIN=WEIGHT") from None
    total = sum(out.values())
    if total <= 0:
        raise ConfigError(f"--fit-target: weights {out} must sum to a positive number")
    return {d: w / total for d, w in out.items()}
