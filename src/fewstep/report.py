"""The tuning report: PNG plots, ``report.md`` and a self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from . import conditions  # noqa: E402
from .files import write_atomic  # noqa: E402
from .metrics import significance, standard_error, tail_share  # noqa: E402
from .sampling import sample  # noqa: E402
from .schedules import BUILTIN_SCHEDULES, Schedule, karras  # noqa: E402


TAIL, HEAVY = 0.05, 0.5  # the worst share of samples looked at; what share of the mean makes errors heavy-tailed


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path.name


def plot_error_vs_nfe(cells: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in sorted({c["method"] for c in cells}):
        pts = {}
        for c in cells:
            if c["method"] == method and c["status"] == "ok" and (c["nfe"] not in pts or c["mean"] < pts[c["nfe"]]["mean"]):
                pts[c["nfe"]] = c
        if not pts:
            continue
        ks = sorted(pts)
        means = [pts[k]["mean"] for k in ks]
        lo = [pts[k]["mean"] - pts[k]["mean_ci95"][0] for k in ks]
        hi = [pts[k]["mean_ci95"][1] - pts[k]["mean"] for k in ks]
        style = "--" if method in BUILTIN_SCHEDULES else "-"
        ax.errorbar(ks, means, yerr=[lo, hi], fmt=style + "o", ms=3, capsize=2, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser calls)")
    ax.set_ylabel("held-out RMSE to teacher (best solver)")
    ax.set_title("Error vs NFE per method (dashed: baselines; bars: 95% CI)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_heatmap(cells: list[dict], k: int, path: Path) -> str:
    methods = sorted({c["method"] for c in cells})
    solvers = list(dict.fromkeys(c["solver"] for c in cells))
    grid = torch.full((len(methods), len(solvers)), float("nan"))
    for c in cells:
        if c["nfe"] == k and c["status"] == "ok":
            grid[methods.index(c["method"]), solvers.index(c["solver"])] = math.log10(max(c["mean"], 1e-12))
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(solvers), 0.8 + 0.4 * len(methods)))
    im = ax.imshow(grid.numpy(), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(solvers)), solvers, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    lo, hi = im.get_clim()
    for i in range(len(methods)):
        for j in range(len(solvers)):
            v = grid[i, j].item()
            dark = not math.isnan(v) and (v - lo) > 0.5 * (hi - lo)  # viridis_r: high values are dark
            ax.text(j, i, "skip" if math.isnan(v) else f"{10 ** v:.3g}", ha="center", va="center", fontsize=6,
                    color="grey" if math.isnan(v) else ("white" if dark else "black"))
    fig.colorbar(im, ax=ax, label="log10 held-out RMSE")
    ax.set_xlabel("solver")
    ax.set_ylabel("method")
    ax.set_title(f"Held-out RMSE at NFE {k}")
    return _save(fig, path)


def plot_sigmas(summary: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    info = summary["model"]
    for k, entry in sorted(summary["best"].items(), key=lambda kv: int(kv[0])):
        s = [v for v in entry["winner"]["sigmas"] if v > 0]
        line, = ax.plot(range(len(s)), s, "o-", ms=3, label=f"NFE {k}: {cell_label(entry['winner'], '+')}")
        ref = karras(len(s), info["sigma_min"], info["sigma_max"]).sigmas[:-1]
        ax.plot(range(len(ref)), ref, ":", color=line.get_color(), alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("step index")
    ax.set_ylabel("sigma (log scale; final 0 not shown)")
    ax.set_title("Chosen sigmas per NFE (dotted: EDM rho=7 with as many steps)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_trajectories(denoiser, teacher, x: torch.Tensor, sched: Schedule, path: Path, n: int = 3,
                      cond=None) -> str:
    """The 'boomerang': each sample's teacher trajectory and few-step states in the plane of the
    trajectory's top-2 principal directions (``cond``: the samples' conditions, for a conditional model)."""
    x, cond = x[:n], conditions.rows(cond, slice(None, n))
    fine = karras(64, teacher.sigma_min, float(sched.sigmas[0])).sigmas
    traj = teacher.trajectory(x, fine, cond=cond).flatten(2).cpu()  # [T, n, d]: the one solve's dense output
    states = _student_states(denoiser, x, sched, cond)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2))
    for i, ax in enumerate(axes if n > 1 else [axes]):
        t = traj[:, i]
        mean = t.mean(0)
        _, _, v = torch.pca_lowrank(t - mean, q=2, center=False)
        pt = (t - mean) @ v
        ps = (states[:, i] - mean) @ v
        ax.plot(pt[:, 0], pt[:, 1], "-", color="grey", label="teacher")
        ax.plot(ps[:, 0], ps[:, 1], "o-", ms=4, color="C3", label=f"{sched.steps} steps")
        ax.plot(pt[0, 0], pt[0, 1], "k^", label="x_T")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(f"sample {i}", fontsize=9)
    axes_list = axes if n > 1 else [axes]
    axes_list[0].legend(fontsize=7)
    fig.suptitle("Trajectories projected on their top-2 principal directions")
    return _save(fig, path)


def _student_states(denoiser, x, sched: Schedule, cond=None) -> torch.Tensor:
    states = []
    out = sample(denoiser, x, sched, cond=cond, callback=lambda d: states.append(d["x"].flatten(1).to(torch.float64)))
    return torch.stack(states + [out.flatten(1).to(torch.float64)]).cpu()


def plot_samples(denoiser, summary: dict, teacher_out: torch.Tensor, x: torch.Tensor, out: Path, path: Path,
                 n: int = 8, cond=None) -> str | None:
    shape = tuple(summary["model"]["shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        return None
    rows, x, cond = [("teacher", teacher_out[:n])], x[:n], conditions.rows(cond, slice(None, n))
    for k, entry in sorted(summary["best"].items(), key=lambda kv: int(kv[0])):
        sched = Schedule.load(out / "best" / f"nfe-{k}.json")
        rows.append((f"NFE {k}", sample(denoiser, x, sched, cond=cond)))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.15 * len(rows)))
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            img = ((imgs[c].to("cpu", torch.float64).clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
            ax.imshow(img.squeeze(-1).numpy() if shape[0] == 1 else img.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("Samples from the same held-out noises: teacher and best schedule per NFE")
    return _save(fig, path)


def check_image_shape(shape: tuple) -> None:
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"samples of shape {shape} are not images (1 or 3 channels, H, W): save them as a torch "
                         "file (-o samples.pt); a latent model's samples need its VAE to decode")


def save_image_grid(samples: torch.Tensor, path: Path) -> None:
    """Samples of shape [n, 1 or 3, H, W] in [-1, 1] as one image: a near-square grid, 1 pixel apart (a named
    error for samples that are no such images, e.g. latents to decode with the model's VAE first)."""
    check_image_shape(tuple(samples.shape[1:]))
    up = max(1, 64 // samples.shape[2])  # small images (8x8 digits) enlarged, pixel by pixel, to >= 64 pixels
    samples = samples.repeat_interleave(up, 2).repeat_interleave(up, 3)
    n, c, h, w = samples.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1, dtype=torch.float64)
    for i, img in enumerate(samples.to("cpu", torch.float64).clamp(-1, 1).add(1).div(2)):
        r, q = divmod(i, cols)
        grid[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img
    buf = io.BytesIO()
    image = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    plt.imsave(buf, image, cmap="gray", vmin=0, vmax=1, format=Path(path).suffix.lstrip(".").lower().replace("jpg", "jpeg"))
    write_atomic(path, buf.getvalue())


def cell_label(row: dict, sep: str = " + ") -> str:
    """'method + solver', and the solver of the start a learned method took where it is another."""
    start = f" (started on {row['start_solver']})" if row.get("start_solver") else ""
    return f"{row['method']}{sep}{row['solver']}{start}"


def improvement_rows(summary: dict) -> list[dict]:
    rows = []
    for k, entry in sorted(summary["best"].items(), key=lambda kv: int(kv[0])):
        win, base = entry["winner"], entry["best_baseline"]
        row = {"nfe": int(k), "winner": cell_label(win), "mean": win["mean"],
               "ci": win["mean_ci95"], "n": win["n"]}
        errors = torch.tensor(win["errors"], dtype=torch.float64)
        row["tail"] = tail_share(errors, TAIL)
        row["heavy"] = row["tail"] > HEAVY
        if base is not None:
            row.update({"baseline": cell_label(base), "base_mean": base["mean"],
                        "base_ci": base["mean_ci95"], "ratio": win["mean"] / base["mean"]})
            m = min(len(win["errors"]), len(base["errors"]))  # the noises both were scored on: a paired difference
            d = errors[:m] - torch.tensor(base["errors"][:m], dtype=torch.float64)
            row.update({"diff": float(d.mean()), "diff_se": float(standard_error(d)) if m > 1 else 0.0,
                        "diff_n": m, "z": -significance(d)})
        if entry.get("policy"):
            row["policy"] = f"{entry['policy']['method']} + {entry['policy']['solver']}: {entry['policy']['mean']:.4g}"
        rows.append(row)
    return rows


def _certainty_lines(rows: list[dict]) -> list[str]:
    """How sure each winner is: its paired difference to the best baseline, and how much of its mean error the
    worst samples carry (heavy tails: a ranking on a few hundred noises rests on a few of them)."""
    lines = ["## How sure", "", "| NFE | winner - best baseline (paired, n) | z (> 0: the winner is better) | "
             f"the worst {TAIL:.0%} of the winner's samples carry |", "|---|---|---|---|"]
    for r in rows:
        diff = (f"{r['diff']:+.4g} +- {r['diff_se']:.2g} ({r['diff_n']}) | {r['z']:.1f}" if "diff" in r else "- | -")
        lines.append(f"| {r['nfe']} | {diff} | {r['tail']:.0%} of its mean |")
    heavy = [str(r["nfe"]) for r in rows if r["heavy"]]
    lines.append("")
    if heavy:
        lines += [f"At NFE {', '.join(heavy)} the worst {TAIL:.0%} of the samples carry over {HEAVY:.0%} of the winner's "
                  "mean error (mode flips or outliers): the ranking there rests on a few samples, and on other noises "
                  "(or other conditions) the order of close cells can change. More test noises (`--n-test`) and, for "
                  "a conditional model, more test conditions (a larger pool) settle it; the optimizers' validation "
                  "halves rest on a few samples too, so more calibration noises (`--n-calib`) let them learn more.", ""]
    return lines


def _header(summary: dict) -> list[str]:
    info, key, cost = summary["model"], summary["key"], summary.get("cost", {})
    t = cost.get("teacher", {})
    err = t.get("error")
    return [f"# fewstep tuning report: {info['name']}", "",
            f"Model shape {tuple(info['shape'])}, sigma {info['sigma_min']:g} .. {info['sigma_max']:g}. "
            f"Held-out error: RMSE to a float64 DEIS teacher of {t.get('steps')} steps (estimated error "
            f"{'-' if err is None else f'{err:.2g}'}) on up to {key['n_test']} test noises (seed {key['test_seed']}); "
            f"optimizers calibrated on {key['n_calib']} other noises (seed {key['calib_seed']}). Mode: {key['mode']}"
            f"{'' if key['mode'] == 'exhaustive' else ' (cells raced: scored on more noises while not clearly worse than the leader)'}. "
            "Intervals: bootstrap 95% of the mean, on each cell's own test noises (n).", ""]


def _condition_lines(summary: dict) -> list[str]:
    """For a conditional model: the conditions each side used, and the winners' spread over the test ones."""
    conds = summary.get("conditions") or {}
    if not conds.get("test"):
        return []
    lines = ["## Conditions", "", f"Calibrated on {conds['calibration']} conditions; scored on {conds['test']} "
             "other conditions (disjoint rows of the pool). The winner's mean error per test condition:", "",
             "| NFE | conditions | min | median | max |", "|---|---|---|---|---|"]
    for k, entry in sorted(summary["best"].items(), key=lambda kv: int(kv[0])):
        p = entry.get("per_condition")
        if p:
            lines.append(f"| {k} | {p['conditions']} | {p['min']:.4g} | {p['median']:.4g} | {p['max']:.4g} |")
    return lines + [""]


def _cost_lines(summary: dict) -> list[str]:
    """Evaluations per stage and per method, and the run's cost at the given seconds per evaluation."""
    cost = summary.get("cost", {})
    ev = cost.get("evaluations", {})
    lines = ["## Cost", "", "| stage | network evaluations |", "|---|---|"]
    lines += [f"| {stage} | {n:,} |" for stage, n in ev.items()] + [f"| total | {cost.get('total', 0):,} |", ""]
    per: dict = {}
    for c in summary["cells"]:
        if c["status"] == "ok":
            e = per.setdefault(c["method"], [0, 0, 0])
            e[0], e[1], e[2] = e[0] + c["evaluations"]["method"], e[1] + c["evaluations"]["scoring"], e[2] + 1
    lines += ["| method | cells scored | calibration evaluations | scoring evaluations |", "|---|---|---|---|"]
    lines += [f"| {m} | {n} | {a:,} | {b:,} |" for m, (a, b, n) in sorted(per.items())]
    at = cost.get("at_seconds_per_eval")
    if at:
        lines += ["", f"At {at['seconds_per_eval']:g} s per evaluation this run costs {at['hours']:.3g} hours."]
    return lines + [""]


def _cell_lists(summary: dict) -> list[str]:
    left = summary.get("plan", {}).get("left_out") or []
    lines = ["## Left out for the budget", "", *[f"- {w}" for w in left], ""] if left else []
    for status, title, note in (
            ("pruned", "Cells left out", "Not run: the race gave them no chance, the budget had run out, or the "
                                       "solver runs exactly as another at that NFE."),
            ("skipped", "Skipped cells", "The method refused the setting."),
            ("failed", "Failed cells", "Each failed with the error below and was not scored; the run went on "
                                       "(`fewstep tune --retry-failed` tries them again).")):
        cells = [c for c in summary["cells"] if c["status"] == status]
        if cells:
            lines += [f"## {title}", "", note, ""]
            lines += [f"- NFE {c['nfe']} {cell_label(c)}: " + (f"{c['error']}: " if status == "failed" else "")
                      + c["reason"] + (f" ({c['seconds']} s)" if status == "failed" else "") for c in cells]
            lines.append("")
    return lines


def _markdown(summary: dict, images: dict[str, str]) -> str:
    lines = _header(summary) + ["## Best schedule per NFE", "",
                                "| NFE | best | mean RMSE [95% CI] (n) | best baseline | its mean [95% CI] | ratio |",
                                "|---|---|---|---|---|---|"]
    rows = improvement_rows(summary)
    for r in rows:
        lines.append(f"| {r['nfe']} | {r['winner']} | {r['mean']:.4g} [{r['ci'][0]:.4g}, {r['ci'][1]:.4g}] ({r['n']}) | "
                     f"{r.get('baseline', '-')} | " + (f"{r['base_mean']:.4g} [{r['base_ci'][0]:.4g}, {r['base_ci'][1]:.4g}] | "
                                                        f"{r['ratio']:.3f} |" if "ratio" in r else "- | - |"))
        if "policy" in r:
            lines.append(f"|  | per-sample policy {r['policy']} | | | | |")
    lines += ["", "ratio < 1: the tuned schedule's held-out error is that fraction of the best baseline's.", ""]
    lines += _certainty_lines(rows) + _condition_lines(summary) + _cost_lines(summary)
    for title, name in images.items():
        lines += [f"## {title}", "", f"![{title}](plots/{name})", ""]
    return "\n".join(lines + _cell_lists(summary)) + "\n"


def _html(markdown_text: str, plots: Path) -> str:
    """A self-contained page: the markdown's tables and headings, images inlined as data URIs."""
    body, table = [], []
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                table.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("![") and "](plots/" in line:
            alt, name = line[2:].split("](plots/")
            data = base64.b64encode((plots / name.rstrip(")")).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("<table>" + "".join(table) + "</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td{border:1px solid #ccc;padding:3px 8px}img{max-width:100%;display:block;margin:1em 0}")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fewstep report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _plots(out: Path, summary: dict, denoiser, teacher, x_test: torch.Tensor, cond=None) -> dict:
    """title -> a function making that plot (returning its file name, or None for no plot)."""
    plots, cells = out / "plots", summary["cells"]
    todo = {"Held-out error vs NFE": lambda: plot_error_vs_nfe(cells, plots / "error_vs_nfe.png")}
    for k in sorted({c["nfe"] for c in cells}):
        todo[f"Method x solver at NFE {k}"] = lambda k=k: plot_heatmap(cells, k, plots / f"heatmap_nfe{k}.png")
    if summary["best"]:
        k_max = max(summary["best"], key=int)
        todo["Chosen sigmas"] = lambda: plot_sigmas(summary, plots / "sigmas.png")
        todo[f"Trajectories at NFE {k_max}"] = lambda: plot_trajectories(
            denoiser, teacher, x_test, Schedule.load(out / "best" / f"nfe-{k_max}.json"), plots / "trajectories.png",
            cond=cond)
        todo["Samples"] = lambda: plot_samples(denoiser, summary, teacher.solve(x_test, summary["model"]["sigma_max"],
                                                                                cond), x_test, out, plots / "samples.png",
                                               cond=cond)
    return todo


def make_plots(out: Path, summary: dict, denoiser, teacher, x_test: torch.Tensor, cond=None) -> tuple[dict, dict]:
    """The report's plots (``cond``: the test noises' conditions, for a conditional model): (title -> file name,
    title -> why it failed); a plot that fails is named in the report instead of ending the run."""
    images, failed = {}, {}
    for title, make in _plots(out, summary, denoiser, teacher, x_test, cond).items():
        try:
            name = make()
        except Exception as e:  # the results are written already: one plot never loses them
            failed[title] = f"{type(e).__name__}: {e}"
            continue
        if name:
            images[title] = name
    return images, failed


def write_report(out: Path, summary: dict, images: dict, failed: dict) -> None:
    """report.md and report.html, with the plots ``make_plots`` made."""
    md = _markdown(summary, images)
    if failed:
        md += "\n## Plots not made\n\n" + "".join(f"- {t}: {why}\n" for t, why in failed.items())
    write_atomic(out / "report.md", md)
    write_atomic(out / "report.html", _html(md, out / "plots"))
