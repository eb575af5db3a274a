"""Figures, tables, findings and ``RESULTS.md`` for :mod:`lookahead_dist.experiments`.

Everything here is a function of an experiment's JSON record, so that the
numbers in the documentation are the numbers the runs produced:
:func:`write_outputs` writes ``NAME.png``, ``NAME.csv`` and ``NAME.md`` beside
``NAME.json``; :func:`write_results_md` copies the images to ``DOCS/img`` and
writes ``DOCS/RESULTS.md`` from every record found.

Length: about 600 lines, because it holds the plot, the table and the written
findings of each of the three experiments side by side with the helpers they
share (column formats, the record reader); most lines are the long literal
sentences of the findings, which ruff's formatter wraps.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

__all__ = ["findings", "setup_text", "tables", "write_outputs", "write_results_md"]

TITLES = {
    "fig1": "Figure 1: Lookahead against SGD with momentum (digits CNN)",
    "theorem2": "Theorem 2: bound (14) against the measured gradient norm",
    "slowmo": "SlowMo: slow momentum beta over local SGD and SGP (4 workers)",
}
DPI = 100


def _std(values) -> float:
    """Sample standard deviation (ddof 1); 0 for a single value."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _pm(values, fmt="{:.3g}") -> str:
    return f"{fmt.format(float(np.mean(values)))} ± {fmt.format(_std(values))}"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- Figure 1 -----------------------------------------------------------------------------------


def _fig1_points(rec: dict) -> dict:
    """Indices into the loss curves: early (10 % of the run), before the first decay, final."""
    steps, every = rec["config"]["steps"], rec["config"]["eval_every"]
    pts = {"early": max(1, int(round(0.1 * steps / every)))}
    if rec["lr_milestones"] and rec["lr_milestones"][0] // every > pts["early"]:
        pts["before_decay"] = rec["lr_milestones"][0] // every
    pts["final"] = len(rec["steps_axis"]) - 1
    return pts


def _fig1_tables(rec: dict) -> tuple[list[str], list[list]]:
    pts, axis = _fig1_points(rec), rec["steps_axis"]
    header = ["variant", "final training loss (mean ± std)", "min .. max", f"loss at step {axis[pts['early']]}"]
    if "before_decay" in pts:
        header.append(f"loss at step {axis[pts['before_decay']]} (before the first decay)")
    header += ["test accuracy", "serial vs two-process (max rel. deviation)"]
    rows = []
    for v in rec["variants"]:
        c = np.array(v["serial_curves"])
        row = [v["label"], _pm(c[:, -1]), f"{c[:, -1].min():.3g} .. {c[:, -1].max():.3g}", _pm(c[:, pts["early"]])]
        if "before_decay" in pts:
            row.append(_pm(c[:, pts["before_decay"]]))
        row += [_pm(v["serial_test_accuracy"], "{:.4f}"), f"{v['max_rel_deviation']:.1e}"]
        rows.append(row)
    return header, rows


def _fig1_findings(rec: dict) -> list[str]:
    pts, axis, cfg = _fig1_points(rec), rec["steps_axis"], rec["config"]
    curves = {v["alpha"]: np.array(v["serial_curves"]) for v in rec["variants"]}
    final = {a: c[:, -1] for a, c in curves.items()}
    early = {a: c[:, pts["early"]] for a, c in curves.items()}
    sgd, las = final[1.0], sorted(a for a in curves if a != 1.0)
    n = len(sgd)
    lower = [a for a in las if final[a].mean() < sgd.mean()]
    detail = "; ".join(
        f"alpha={a:g}: {final[a].mean():.3g} ({int((final[a] < sgd).sum())}/{n} seeds below SGD)" for a in las
    )
    verdict = (
        "holds"
        if len(lower) == len(las)
        else "holds only for alpha in {%s}" % ", ".join(f"{a:g}" for a in lower)
        if lower
        else "does not hold"
    )
    out = [
        f"(a) Lookahead reaches a lower final training loss than SGD with momentum: **{verdict}** here. "
        f"SGD with momentum ends at {sgd.mean():.3g} (mean of {n} seeds); Lookahead: {detail}."
    ]
    small, others = las[0], las[1:]
    if others:
        helps = all(early[small].mean() < early[a].mean() for a in others)
        ends = all(final[small].mean() > final[a].mean() for a in others)
        verdict = {
            (True, True): "holds",
            (False, False): "does not hold",
            (True, False): "only the first half holds",
            (False, True): "only the second half holds",
        }
        ear = ", ".join(f"alpha={a:g}: {early[a].mean():.3g}" for a in las)
        fin = ", ".join(f"alpha={a:g}: {final[a].mean():.3g}" for a in las)
        out.append(
            f"(b) A small alpha helps early but ends higher: **{verdict[(helps, ends)]}** here. "
            f"Early (step {axis[pts['early']]}, mean loss): {ear}, SGD {early[1.0].mean():.3g}; "
            f"alpha={small:g} is {'the lowest' if helps else 'not the lowest'} of the Lookahead runs. "
            f"Final: {fin}; alpha={small:g} ends {'the highest' if ends else 'not the highest'}."
        )
    acc = {v["alpha"]: np.asarray(v["serial_test_accuracy"]) for v in rec["variants"]}
    better = [a for a in las if acc[a].mean() - acc[1.0].mean() > max(_std(acc[a]), _std(acc[1.0]))]
    out.append(
        f"(c) Lookahead does not generalize markedly better than SGD (the paper's remark on test accuracy): "
        f"**{'holds' if not better else 'does not hold'}** here. Test accuracy: SGD {_pm(acc[1.0], '{:.4f}')}; "
        + "; ".join(f"alpha={a:g}: {_pm(acc[a], '{:.4f}')}" for a in las)
        + (
            f". Better than SGD by more than one seed std: alpha in {{{', '.join(f'{a:g}' for a in better)}}}."
            if better
            else "; no Lookahead variant is ahead of SGD by more than one seed std."
        )
    )
    out.append(
        f"Serial Lookahead and the two-process run (fast agent on rank 0, passive slow agent on rank 1) "
        f"give the same curves: max relative deviation {rec['max_rel_deviation']:.1e} over every variant, "
        f"seed and evaluation point (allowed {cfg['tol']:g})."
    )
    return out


def _band(ax, x, c, label, color, style="-"):
    ax.plot(x, c.mean(0), style, color=color, label=label, lw=1.5)
    ax.fill_between(x, c.min(0), c.max(0), color=color, alpha=0.2, lw=0)


def _fig1_plot(rec: dict, path: Path) -> None:
    plt = _plt()
    x = np.array(rec["steps_axis"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["black", "tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple"]
    head = max(2, int(np.searchsorted(x, 0.2 * x[-1], side="right")))
    for v, color in zip(rec["variants"], colors):
        c = np.array(v["serial_curves"])
        for ax, sl in ((axes[0], slice(None)), (axes[1], slice(0, head))):
            _band(ax, x[sl], c[:, sl], v["label"], color)
    for m in rec["lr_milestones"]:
        axes[0].axvline(m, color="gray", ls=":", lw=1)
    n = len(rec["variants"][0]["serial_curves"])
    axes[0].set(
        yscale="log",
        xlabel="step",
        ylabel="full training loss",
        title=f"mean and min-max over {n} seeds (lr x{rec['config']['decay']:g} at dotted lines)",
    )
    axes[1].set(yscale="log", xlabel="step", ylabel="full training loss", title="first 20% of the run")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# -- Theorem 2 ----------------------------------------------------------------------------------


def _on_grid(alphas, grid):
    return [g for g in grid if any(abs(g - a) < 1e-9 for a in alphas)] or list(grid)


def _theorem2_tables(rec: dict):
    cfg, rows = rec["config"], rec["rows"]
    alphas = _on_grid(cfg["table_alphas"], rec["alphas"])
    out = []
    for gamma in cfg["gammas"]:
        header = ["alpha"] + [f"tau={t}: measured / bound (14)" for t in cfg["taus"]]
        body = []
        for a in alphas:
            row = [f"{a:g}"]
            for t in cfg["taus"]:
                r = next(r for r in rows if r["tau"] == t and r["gamma"] == gamma and abs(r["alpha"] - a) < 1e-9)
                row.append(f"{r['empirical']:.3f} / {r['bound14']:.3f}" + ("" if r["holds13"] else " †"))
            body.append(row)
        out.append((f"gamma = {gamma:g}", header, body))
    header = [
        "tau",
        "gamma",
        "recommended alpha",
        "measured at it",
        "bound (14) at it",
        "best alpha (grid)",
        "measured at best",
        "(13) at best",
        "best under (13)",
        "gap",
    ]
    body = []
    for r in rec["recommended"]:
        if r["recommended_alpha"] is None:
            body.append(
                [
                    r["tau"],
                    f"{r['gamma']:g}",
                    "none: (13) fails for every alpha",
                    "",
                    "",
                    f"{r['best_alpha']:g}",
                    f"{r['empirical_at_best']:.4f}",
                    "",
                    "",
                    "",
                ]
            )
            continue
        gap = r["empirical_at_recommended"] / r["empirical_at_best"] - 1.0
        body.append(
            [
                r["tau"],
                f"{r['gamma']:g}",
                f"{r['recommended_alpha']:.3f}",
                f"{r['empirical_at_recommended']:.4f} ± {r['stderr_at_recommended']:.4f}",
                f"{r['bound_at_recommended']:.4f}",
                f"{r['best_alpha']:g}",
                f"{r['empirical_at_best']:.4f}",
                "holds" if r["best_alpha_holds13"] else "fails",
                f"{r['best_alpha_feasible']:g}" if r["best_alpha_feasible"] is not None else "none",
                f"{100 * gap:+.1f}%",
            ]
        )
    out.append(
        (
            "recommended alpha (theory.recommended_alpha at this K, under (13)) against the best alpha "
            f"measured on the grid of step {cfg['alpha_step']:g}",
            header,
            body,
        )
    )
    return out


def _theorem2_findings(rec: dict) -> list[str]:
    rows, cfg = rec["rows"], rec["config"]
    ok = [r for r in rows if r["holds13"]]
    bad = [r for r in rows if not r["holds13"]]
    out = []
    if ok:
        worst = max(ok, key=lambda r: r["ratio"])
        holds = worst["ratio"] <= 1.0
        out.append(
            f"Bound (14) {'**holds**' if holds else '**fails**'} in every cell where (13) holds "
            f"({len(ok)} cells): the largest measured / bound ratio is {worst['ratio']:.3f} "
            f"(alpha={worst['alpha']:g}, tau={worst['tau']}, gamma={worst['gamma']:g}); the smallest is "
            f"{min(r['ratio'] for r in ok):.3f}, so the bound is loose by a factor "
            f"{1 / worst['ratio']:.1f} or more."
        )
    if bad:
        over = [r for r in bad if r["ratio"] > 1.0]
        out.append(
            f"Where (13) fails ({len(bad)} cells, marked †; the theorem says nothing there) the expression "
            f"(14) is {'exceeded in ' + str(len(over)) + ' of them' if over else 'still not exceeded'} "
            f"(largest ratio {max(r['ratio'] for r in bad):.3f})."
        )
    recs = [r for r in rec["recommended"] if r["recommended_alpha"] is not None]
    if recs:
        gaps = [r["empirical_at_recommended"] / r["empirical_at_best"] - 1.0 for r in recs]
        diffs = [r["recommended_alpha"] - r["best_alpha"] for r in recs]
        worst = recs[int(np.argmax(gaps))]
        side = sum(d > 0 for d in diffs)
        out.append(
            f"Recommended against best alpha ({len(recs)} cells): the recommended alpha is larger than the best "
            f"grid alpha in {side} cells and smaller in {sum(d < 0 for d in diffs)} (|difference| up to "
            f"{max(abs(d) for d in diffs):.2f}); the measured value at the recommended alpha is at most "
            f"{100 * max(gaps):.1f}% above the best on the grid (tau={worst['tau']}, gamma={worst['gamma']:g}), "
            f"median {100 * float(np.median(gaps)):.1f}%; by gamma: "
            + ", ".join(
                f"gamma={g:g}: largest gap {100 * max(x for x, r in zip(gaps, recs) if r['gamma'] == g):.1f}%"
                for g in cfg["gammas"]
                if any(r["gamma"] == g for r in recs)
            )
            + f". The grid's best alpha satisfies (13) in {sum(r['best_alpha_holds13'] for r in recs)} of "
            f"{len(recs)} cells."
        )
    return out


def _theorem2_plot(rec: dict, path: Path) -> None:
    plt = _plt()
    cfg, rows = rec["config"], rec["rows"]
    fig, axes = plt.subplots(1, len(cfg["taus"]), figsize=(3.2 * len(cfg["taus"]), 3.6), sharey=True, squeeze=False)
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    for ax, tau in zip(axes[0], cfg["taus"]):
        for gamma, color in zip(cfg["gammas"], colors):
            cell = [r for r in rows if r["tau"] == tau and r["gamma"] == gamma]
            a = np.array([r["alpha"] for r in cell])
            ax.plot(a, [r["empirical"] for r in cell], "-", color=color, lw=1.5, label=f"measured, gamma={gamma:g}")
            b = np.array([r["bound14"] if r["holds13"] else np.nan for r in cell])
            ax.plot(a, b, "--", color=color, lw=1.2, label=f"bound (14), gamma={gamma:g}")
            ax.plot(a, [r["bound14"] if not r["holds13"] else np.nan for r in cell], ":", color="gray", lw=1)
            r = next(r for r in rec["recommended"] if r["tau"] == tau and r["gamma"] == gamma)
            if r["recommended_alpha"] is not None:
                ax.plot(
                    [r["recommended_alpha"]],
                    [r["empirical_at_recommended"]],
                    "*",
                    color=color,
                    ms=11,
                    mec="black",
                    mew=0.5,
                )
            ax.plot([r["best_alpha"]], [r["empirical_at_best"]], "v", color=color, ms=7, mec="black", mew=0.5)
        ax.set(yscale="log", xlabel="alpha", title=f"tau = {tau}")
    axes[0][0].set_ylabel("mean ||grad f(y_k)||^2 over K steps")
    axes[0][0].legend(fontsize=7, title="* recommended, v best measured", title_fontsize=7)
    fig.suptitle(
        f"RippledQuadratic (L={rec['problem']['L']:g}), K={cfg['K']}, sigma^2={cfg['sigma2']:g}, "
        f"{cfg['seeds']} seeds; gray dotted: (14) where (13) fails",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# -- SlowMo -------------------------------------------------------------------------------------


def _slowmo_cells(rec: dict):
    """{(base, beta): [runs over seeds]} in the configured order."""
    cells: dict = {}
    for base in rec["bases"]:
        for beta in rec["config"]["betas"]:
            cells[(base, float(beta))] = [r for r in rec["runs"] if r["base"] == base and r["beta"] == float(beta)]
    return cells


def _slowmo_tables(rec: dict):
    header = ["base", "beta", "final training loss (mean ± std)", "test accuracy (mean ± std)", "seeds"]
    rows = [
        [
            base,
            f"{beta:g}",
            _pm([r["final_train_loss"] for r in runs]),
            _pm([r["test_accuracy"] for r in runs], "{:.4f}"),
            len(runs),
        ]
        for (base, beta), runs in _slowmo_cells(rec).items()
    ]
    return header, rows


def _slowmo_findings(rec: dict) -> list[str]:
    cells, betas = _slowmo_cells(rec), [float(b) for b in rec["config"]["betas"]]
    out = []
    for base in rec["bases"]:
        loss = {b: np.mean([r["final_train_loss"] for r in cells[(base, b)]]) for b in betas}
        acc = {b: np.mean([r["test_accuracy"] for r in cells[(base, b)]]) for b in betas}
        spread = np.mean([_std([r["test_accuracy"] for r in cells[(base, b)]]) for b in betas])
        b_loss, b_acc = min(loss, key=loss.get), max(acc, key=acc.get)
        mom = [b for b in betas if b > 0]
        better = [b for b in mom if loss[b] < loss[0.0]] if 0.0 in loss else []
        text = (
            f"{base}: final training loss "
            + ", ".join(f"{loss[b]:.3g} (beta={b:g})" for b in betas)
            + f"; lowest at beta={b_loss:g}. "
        )
        if 0.0 in loss and mom:
            which = (
                "every beta > 0"
                if len(better) == len(mom)
                else "beta in {" + ", ".join(f"{b:g}" for b in better) + "}"
                if better
                else "no beta > 0"
            )
            text += f"Slow momentum lowers the final training loss against beta=0 for {which}. "
        text += (
            f"Test accuracy is highest at beta={b_acc:g} ({acc[b_acc]:.4f}), lowest "
            f"{min(acc.values()):.4f}: a range over beta of {max(acc.values()) - min(acc.values()):.4f} "
            f"against a mean seed-to-seed std of {spread:.4f}, so "
            + (
                "beta makes no difference to test accuracy larger than the seed spread here."
                if max(acc.values()) - min(acc.values()) < spread
                else "the differences between betas exceed the seed spread."
            )
        )
        out.append(text)
    if len(rec["bases"]) == 2:
        a, b = rec["bases"]
        la = np.mean([r["final_train_loss"] for r in rec["runs"] if r["base"] == a])
        lb = np.mean([r["final_train_loss"] for r in rec["runs"] if r["base"] == b])
        out.append(f"Averaged over beta and seeds, {a} ends at training loss {la:.3g} and {b} at {lb:.3g}.")
    return out


def _slowmo_plot(rec: dict, path: Path) -> None:
    plt = _plt()
    cells, betas = _slowmo_cells(rec), [float(b) for b in rec["config"]["betas"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    styles = {base: s for base, s in zip(rec["bases"], ["-o", "--s", ":^"])}
    cmap = plt.get_cmap("viridis")
    for base in rec["bases"]:
        for ax, key in ((axes[0], "test_accuracy"), (axes[1], "final_train_loss")):
            vals = [[r[key] for r in cells[(base, b)]] for b in betas]
            ax.errorbar(
                betas, [np.mean(v) for v in vals], yerr=[_std(v) for v in vals], fmt=styles[base], capsize=3, label=base
            )
        for i, b in enumerate(betas):
            c = np.array([r["curve"] for r in cells[(base, b)]])
            axes[2].plot(
                rec["steps_axis"],
                c.mean(0),
                styles[base][:-1] if len(styles[base]) > 2 else "-",
                color=cmap(i / max(1, len(betas) - 1)),
                label=f"{base}, beta={b:g}",
                lw=1.3,
            )
    cfg = rec["config"]
    axes[0].set(xlabel="beta", ylabel="test accuracy (consensus model)", title="final test accuracy")
    axes[1].set(xlabel="beta", ylabel="full training loss", yscale="log", title="final training loss")
    axes[2].set(
        xlabel="step",
        ylabel="full training loss (consensus z)",
        yscale="log",
        title=f"mean over {cfg['seeds']} seed(s), every {cfg['eval_every']} steps",
    )
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"SlowMo, alpha={cfg['alpha']:g}, tau={cfg['tau']}, {cfg['workers']} workers, "
        f"{cfg['steps']} steps ({rec['slow_steps']} slow steps)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# -- common -------------------------------------------------------------------------------------


def tables(name: str, rec: dict) -> list[tuple[str, list[str], list[list]]]:
    """The record's tables as (caption, header, rows)."""
    if name == "fig1":
        return [("", *_fig1_tables(rec))]
    if name == "theorem2":
        return _theorem2_tables(rec)
    return [("", *_slowmo_tables(rec))]


def findings(name: str, rec: dict) -> list[str]:
    """Plain statements of what holds and what does not, computed from the record's numbers."""
    return {"fig1": _fig1_findings, "theorem2": _theorem2_findings, "slowmo": _slowmo_findings}[name](rec)


def setup_text(name: str, rec: dict) -> str:
    c = rec["config"]
    if name == "fig1":
        m = ", ".join(str(s) for s in rec["lr_milestones"])
        return (
            f"Digits CNN without BatchNorm in {c['dtype']} on the {rec.get('train_examples', '?')}-example "
            f"training split; SGD lr {c['lr']:g}, momentum {c['momentum']:g}, batch {c['batch_size']}, "
            f"{c['steps']} steps, lr x{c['decay']:g} at steps {m}; Lookahead tau {c['tau']} around the same "
            f"SGD; {c['seeds']} seeds (seed s fixes the initial model and the minibatch stream, the same for "
            f"every variant). The full training loss is measured every {c['eval_every']} steps, at sync points, "
            f"where the fast weights equal the slow weights (x = z = y: the model Lookahead returns). "
            f"Bands: min-max over seeds. The numbers below are the serial runs; the two-process runs give "
            f"the same to the deviation shown."
        )
    if name == "theorem2":
        p = rec["problem"]
        return (
            f"Serial Lookahead with SGD on f(x) = sum_i [{p['a']:g} x_i^2/2 - {p['b']:g} cos({p['w']:g} x_i)], "
            f"d={p['d']}, L={p['L']:g} (non-convex: min curvature {p['min_curvature']:g}), f(y_0) - f_inf = "
            f"{p['f_gap']:.2f}, Gaussian gradient noise of total variance sigma^2={c['sigma2']:g}; K={c['K']} "
            f"steps, {c['seeds']} seeds (the same noise for every alpha of a cell); alpha on a grid of step "
            f"{c['alpha_step']:g}, tau in {list(c['taus'])}, gamma in {list(c['gammas'])}. Measured: "
            f"(1/K) sum_k ||grad f(y_k)||^2 averaged over seeds (y_k = alpha x_k + (1 - alpha) z_k, eq. 8)."
        )
    return (
        f"{c['workers']} spawned gloo ranks, each worker on its own shard of the "
        f"{rec.get('train_examples', '?')}-example digits training split, digits CNN without BatchNorm in "
        f"{c['dtype']}; base SGD lr {c['lr']:g}, momentum {c['momentum']:g}, batch {c['batch_size']} per worker, "
        f"lr x{c['decay']:g} at {', '.join(f'{m:g}' for m in c['milestones'])} of the run; SlowMo alpha "
        f"{c['alpha']:g}, tau {c['tau']} ({c['steps']} steps: {rec['slow_steps']} slow steps), beta in "
        f"{[float(b) for b in c['betas']]}; bases: local SGD (no communication between slow steps) and SGP "
        f"(push-sum on the one-peer exponential graph, one exchange per step); {c['seeds']} seed(s). "
        f"With alpha = {c['alpha']:g} a slow momentum beta makes the slow step about alpha / (1 - beta) times "
        f"the workers' average progress over a window (SlowMo paper), so beta also acts as a larger step. "
        f"Measured after finalize(): test accuracy on the held-out split and full training loss, both of the "
        f"consensus model."
    )


def write_outputs(name: str, rec: dict, out: Path) -> None:
    """NAME.png, NAME.csv (every row) and NAME.md (tables and findings) in ``out``."""
    {"fig1": _fig1_plot, "theorem2": _theorem2_plot, "slowmo": _slowmo_plot}[name](rec, out / f"{name}.png")
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        if name == "theorem2":
            keys = list(rec["rows"][0])
            w.writerow(keys)
            w.writerows([[r[k] for k in keys] for r in rec["rows"]])
        elif name == "slowmo":
            w.writerow(["seed", "base", "beta", "final_train_loss", "test_accuracy"])
            w.writerows(
                [[r["seed"], r["base"], r["beta"], r["final_train_loss"], r["test_accuracy"]] for r in rec["runs"]]
            )
        else:
            w.writerow(["variant", "alpha", "seed", "final_train_loss", "test_accuracy", "max_rel_deviation"])
            for v in rec["variants"]:
                for s, (c, acc) in enumerate(zip(v["serial_curves"], v["serial_test_accuracy"])):
                    w.writerow([v["label"], v["alpha"], s, c[-1], acc, v["max_rel_deviation"]])
    (out / f"{name}.md").write_text(_section(name, rec, image=f"{name}.png", level=1))


def _section(name: str, rec: dict, image: str, level: int = 2) -> str:
    parts = [
        f"{'#' * level} {TITLES[name]}",
        "",
        f"![{name}]({image})",
        "",
        setup_text(name, rec),
        "",
        "Command (regenerates the image, the table and the JSON):",
        "",
        "```bash",
        rec["command"],
        "```",
        "",
        f"Wall time on this machine: {rec['wall_time_s']:.0f} s ({rec['wall_time_s'] / 60:.1f} min), "
        f"{rec['machine']['cpus']} CPU cores, torch {rec['machine']['torch']}"
        + (
            f", 5-minute load average {rec['machine']['load_avg_5min']:.1f} at the end (other processes included)."
            if rec["machine"].get("load_avg_5min") is not None
            else "."
        ),
    ]
    if name == "fig1":
        parts[-1] += (
            f" Serial runs {rec['serial_wall_s']:.0f} s and the two-process runs "
            f"{rec['two_process_wall_s']:.0f} s, side by side."
        )
    for caption, header, rows in tables(name, rec):
        parts += ["", caption] if caption else []
        parts += ["", _md_table(header, rows)]
    if name == "theorem2":
        parts += [
            "",
            "† (13) fails at this (alpha, tau, gamma): Theorem 2 does not apply; the bound expression is "
            "shown without its premise. gap: measured at the recommended alpha over the best measured, "
            "minus 1.",
        ]
    parts += ["", "Findings:", ""] + [f"- {s}" for s in findings(name, rec)]
    return "\n".join(parts) + "\n"


def write_results_md(out, docs) -> Path:
    """Write ``docs/RESULTS.md`` from the NAME.json records in ``out``.

    Each record's image and tables are redrawn in ``out`` first, then the image is copied to ``docs/img/``.
    """
    out, docs = Path(out), Path(docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    parts = [
        "# Results",
        "",
        "Generated by `python -m lookahead_dist.experiments report` from the outputs of the commands below "
        "(every number here is read from their JSON records; rerun a command, then `report`, to refresh). "
        "Everything at once:",
        "",
        "```bash",
        "python -m lookahead_dist.experiments all --out results --docs docs",
        "```",
        "",
    ]
    for name in TITLES:
        path = out / f"{name}.json"
        if not path.exists():
            parts += [f"## {TITLES[name]}", "", f"Not run yet: `python -m lookahead_dist.experiments {name}`.", ""]
            continue
        rec = json.loads(path.read_text())
        write_outputs(name, rec, out)  # the image and tables as the current code draws them
        shutil.copyfile(out / f"{name}.png", docs / "img" / f"{name}.png")
        parts.append(_section(name, rec, image=f"img/{name}.png"))
    target = docs / "RESULTS.md"
    target.write_text("\n".join(parts))
    return target
