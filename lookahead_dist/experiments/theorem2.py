"""Theorem 2 of the paper: bound (14) against the measured mean of ||grad f(y_k)||^2.

:func:`~lookahead_dist.reference.theory.empirical_gradient_norm` on the rippled
quadratic against :func:`~lookahead_dist.reference.theory.bound` (14), on a grid
of alpha, tau and gamma, and :func:`~lookahead_dist.reference.theory.recommended_alpha`
against the alpha with the lowest measured value (the same noise for every
alpha of a cell).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lookahead_dist.errors import ConfigError
from lookahead_dist.experiments.common import Progress, finish

__all__ = ["Theorem2Config", "alpha_grid", "run_theorem2"]


@dataclass
class Theorem2Config:
    K: int = 10000
    seeds: int = 40
    taus: tuple = (1, 5, 10, 20)
    gammas: tuple = (0.01, 0.03)
    alpha_step: float = 0.025  # the fine alpha grid: alpha_step, 2 alpha_step, ..., 1
    sigma2: float = 20.0
    table_alphas: tuple = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)  # rows of the markdown table


def alpha_grid(step: float) -> list[float]:
    n = int(round(1.0 / step))
    if n < 1 or abs(n * step - 1.0) > 1e-9:
        raise ConfigError(f"theorem2: alpha_step must divide 1 (1/alpha_step an integer), got {step!r}")
    return [round(i / n, 12) for i in range(1, n + 1)]


def run_theorem2(cfg: Theorem2Config, out: str = "results") -> dict:
    """The measured mean of ||grad f(y_k)||^2 against bound (14); recommended against best alpha."""
    from lookahead_dist.reference import theory as th

    t0 = time.perf_counter()
    if any(cfg.K % tau for tau in cfg.taus) or cfg.seeds < 1:
        raise ConfigError(f"theorem2: K={cfg.K} must be a multiple of every tau {cfg.taus}, seeds >= 1")
    problem = th.RippledQuadratic()
    f_gap = float(problem.value(problem.default_start())) - problem.f_inf
    L, seeds, grid = problem.L, range(cfg.seeds), alpha_grid(cfg.alpha_step)
    cells = [(tau, gamma) for tau in cfg.taus for gamma in cfg.gammas]
    bar = Progress(len(cells) * (len(grid) + 1), "theorem2")

    def measure(alpha, tau, gamma):
        runs = th.empirical_gradient_norm(alpha, tau, gamma, cfg.K, seeds, sigma2=cfg.sigma2)
        se = float(runs.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else float("nan")
        return float(runs.mean()), se

    rows, recs = [], []
    for tau, gamma in cells:
        cell = []
        for alpha in grid:
            emp, se = measure(alpha, tau, gamma)
            cond = th.step_size_condition(alpha, gamma, L, tau)
            b = th.bound(alpha, gamma, L, cfg.sigma2, tau, cfg.K, f_gap, strict=False)
            cell.append(
                {
                    "tau": tau,
                    "gamma": gamma,
                    "alpha": alpha,
                    "cond13": cond,
                    "holds13": cond <= 1.0,
                    "empirical": emp,
                    "stderr": se,
                    "bound14": b,
                    "ratio": emp / b,
                }
            )
            bar.set(bar.done + 1)
        rows += cell
        best = min(cell, key=lambda r: r["empirical"])
        try:
            rec = th.recommended_alpha(gamma, L, cfg.sigma2, tau, cfg.K, f_gap)
        except ConfigError:
            rec = None
        emp_rec = measure(rec, tau, gamma) if rec is not None else (None, None)
        bar.set(bar.done + 1)
        feasible = [r for r in cell if r["holds13"]]
        recs.append(
            {
                "tau": tau,
                "gamma": gamma,
                "recommended_alpha": rec,
                "empirical_at_recommended": emp_rec[0],
                "stderr_at_recommended": emp_rec[1],
                "bound_at_recommended": th.bound(rec, gamma, L, cfg.sigma2, tau, cfg.K, f_gap)
                if rec is not None
                else None,
                "best_alpha": best["alpha"],
                "empirical_at_best": best["empirical"],
                "best_alpha_holds13": best["holds13"],
                "best_alpha_feasible": min(feasible, key=lambda r: r["empirical"])["alpha"] if feasible else None,
                "best_bound_alpha": min(feasible, key=lambda r: r["bound14"])["alpha"] if feasible else None,
            }
        )
    bar.close()
    record = {
        "problem": {
            "name": "RippledQuadratic",
            "d": problem.d,
            "a": problem.a,
            "b": problem.b,
            "w": problem.w,
            "L": L,
            "min_curvature": problem.min_curvature,
            "f_gap": f_gap,
        },
        "alphas": grid,
        "rows": rows,
        "recommended": recs,
    }
    return finish("theorem2", cfg, out, record, t0)
