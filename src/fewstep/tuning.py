"""``fewstep.tune``: every method x every solver x every NFE on the user's model, scored held out.

Cells are (nfe, method, solver). Baseline methods are the built-in schedules; every optimizer that
``fewstep.optimize`` knows is a method too, so a new optimizer appears here without editing this file.
Calibration and test noises are disjoint seeded batches; the teacher is solved once (and cached on
disk); every cell is written to ``results.json`` as soon as it is done, atomically, so a run that is
killed resumes where it stopped and ends with the same results as one that was never interrupted.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .files import FewstepWarning, write_atomic
from .methods import METHODS, optimize
from .metrics import rmse, summarize
from .models.info import fingerprint, model_info
from .noises import CALIB_SEED, TEST_SEED, noise
from .sampling import nfe as count_nfe, probe_denoiser, sample
from .schedules import BASELINES, BUILTIN_SCHEDULES, Schedule, ScheduleLike, builtin
from .solvers import PLANNED, plan
from .teacher import Teacher
from .version import __version__

RESULTS_VERSION = 1


@dataclass(frozen=True)
class Sizes:
    """Default sizes of a tuning run (``quick`` is the smaller set)."""

    nfe: tuple = (4, 5, 6, 8, 10)
    n_calib: int = 32
    n_test: int = 128

    @staticmethod
    def quick() -> "Sizes":
        return Sizes(nfe=(5, 10), n_calib=16, n_test=64)


def all_methods() -> list[str]:
    return BASELINES + sorted(METHODS)


def _cell_name(k: int, method: str, solver: str) -> str:
    return f"nfe{k}-{method}-{solver}"


def baseline(method: str, solver: str, k: int, info: dict) -> Schedule:
    """The built-in schedule ``method`` for ``solver`` at exactly ``k`` calls, on the model's sigma range."""
    steps, options = plan(solver, k)
    sched = builtin(method, steps, sigma_min=info["sigma_min"], sigma_max=info["sigma_max"])
    return sched.with_metadata(solver=solver, solver_options=options, nfe=k)


@dataclass
class _Run:
    """What every cell of one tuning run shares."""

    denoiser: Callable
    info: dict
    calib: Any
    x_test: Any
    ref: Any
    teacher: Teacher
    method_options: dict
    out: Path | None


def _run_cell(run: _Run, method: str, solver: str, k: int) -> tuple[dict, Any]:
    start = time.perf_counter()
    if method in BUILTIN_SCHEDULES:
        sched = baseline(method, solver, k, run.info)
        calib_calls, calib_seconds = 0, 0.0
    else:
        sched = optimize(run.denoiser, method, solver, k, calib=run.calib, teacher=run.teacher,
                         sigma_min=run.info["sigma_min"], sigma_max=run.info["sigma_max"], **run.method_options[method])
        prov = sched.metadata.get("provenance", {})
        calib_calls, calib_seconds = prov.get("denoiser_calls", 0), time.perf_counter() - start
    out = sample(run.denoiser, run.x_test, sched)
    errors = rmse(out, run.ref)
    row = {"nfe": k, "method": method, "solver": solver, "status": "ok", **summarize(errors, ci=True),
           "calib_calls": int(calib_calls), "calib_seconds": round(calib_seconds, 3)}
    if not sched.per_sample:
        row["sigmas"] = sched.to_list()
        row["nfe_counted"] = count_nfe(sched)
    return row, sched


def _cell(run: _Run, k: int, method: str, solver: str) -> dict:
    """One cell's row: scored; skipped with the reason (an NFE the solver cannot spend, a method that
    refuses the setting: a ValueError); or failed (any other exception: its type and message, and the
    seconds spent). An optimized schedule is saved under ``schedules/``. KeyboardInterrupt still stops."""
    cell, start = {"nfe": k, "method": method, "solver": solver}, time.perf_counter()
    try:
        plan(solver, k)
        row, sched = _run_cell(run, method, solver, k)
        if run.out is not None and method not in BUILTIN_SCHEDULES:
            row["schedule_file"] = _save_schedule(sched, run.out / "schedules", _cell_name(k, method, solver))
    except (ValueError, NotImplementedError) as e:
        return {**cell, "status": "skipped", "reason": str(e), "error": type(e).__name__}
    except Exception as e:  # one cell never ends the run: recorded, and the run goes on
        return {**cell, "status": "failed", "error": type(e).__name__, "reason": str(e),
                "seconds": round(time.perf_counter() - start, 3)}
    return row


def _save_schedule(sched: ScheduleLike, folder: Path, name: str) -> str:
    path = sched.save(folder / f"{name}{sched.SUFFIX}")
    return path.name


def _load_results(path: Path, key: dict, retry_failed: bool) -> dict:
    """The cells of an earlier run with the same key (failed ones too, unless ``retry_failed``); a file
    of another run or version starts afresh, with a warning saying what differs."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        cells = {_cell_name(c["nfe"], c["method"], c["solver"]): c for c in data.get("cells", [])}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        warnings.warn(f"{path} is not a fewstep results file: starting afresh", FewstepWarning, stacklevel=3)
        return {}
    old = data.get("key") if isinstance(data.get("key"), dict) else {}
    differs = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if data.get("version") != RESULTS_VERSION or differs:
        warnings.warn(f"{path} was made by another run (differs in: {', '.join(differs) or 'version'}): "
                      "starting afresh", FewstepWarning, stacklevel=3)
        return {}
    return {n: c for n, c in cells.items() if not (retry_failed and c.get("status") == "failed")}


def _names(value, everything: list[str]) -> list[str]:
    """'all', one name, a comma-separated string of names, or a list of names."""
    if value == "all":
        return list(everything)
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def _counts(nfe, n_calib, n_test, sizes: Sizes) -> tuple[list[int], int, int]:
    """The NFE budgets and sizes, checked: positive integers (None: the default)."""
    nfes = list(sizes.nfe if nfe is None else ([nfe] if isinstance(nfe, (int, float)) else nfe))
    bad = [v for v in nfes if isinstance(v, bool) or int(v) != v or v < 1]
    if bad or not nfes:
        raise ValueError(f"nfe must be positive integers, got {nfes!r}")
    n_calib, n_test = (sizes.n_calib if n_calib is None else n_calib), (sizes.n_test if n_test is None else n_test)
    for name, v in (("n_calib", n_calib), ("n_test", n_test)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return [int(v) for v in nfes], int(n_calib), int(n_test)


def _writable(outdir) -> Path | None:
    """The output folder, made and checked writable before any work (None: no folder)."""
    if outdir is None:
        return None
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / ".write-test", b"").unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {out} ({type(e).__name__}: {e})") from None
    return out


def _checked(methods, solvers) -> tuple[list[str], list[str]]:
    methods, solvers = _names(methods, all_methods()), _names(solvers, PLANNED)
    unknown = [m for m in methods if m not in BUILTIN_SCHEDULES and m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {all_methods()}")
    bad = [s for s in solvers if s not in PLANNED]
    if bad:
        raise ValueError(f"unknown or unplanned solver(s) {bad}; known: {PLANNED}")
    return methods, solvers


def tune(denoiser: Callable, nfe=None, methods="all", solvers="all", outdir: str | Path | None = None, *,
         quick: bool = False, n_calib: int | None = None, n_test: int | None = None, shape=None,
         sigma_min: float | None = None, sigma_max: float | None = None, teacher: Teacher | None = None,
         method_options: dict | None = None, progress: bool = True, report: bool = True,
         model_id: str | None = None, retry_failed: bool = False) -> dict:
    """Score every (NFE, method, solver) cell on held-out noises; return and write the results.

    Returns ``{"cells": [...], "best": {nfe: cell}, ...}``. With ``outdir``: ``results.json``,
    ``schedules/``, ``best/nfe-<N>.json`` and the report (``report.html``, ``report.md``, ``plots/``).
    A rerun into the same ``outdir`` with the same settings resumes; a cell that failed is retried only
    with ``retry_failed``. ``model_id``: the model's identity in the resume key and the teacher cache
    (default: its name and ``models.info.fingerprint``, which follows its weights).
    """
    nfes, n_calib, n_test = _counts(nfe, n_calib, n_test, Sizes.quick() if quick else Sizes())
    methods, solvers = _checked(methods, solvers)
    out = _writable(outdir)
    info = model_info(denoiser, shape, sigma_min, sigma_max)
    probe_denoiser(denoiser, info)
    model_id = model_id or f"{info['name']}@{fingerprint(denoiser)}"
    calib = noise(n_calib, info["shape"], info["sigma_max"], CALIB_SEED, device=info["device"])
    x_test = noise(n_test, info["shape"], info["sigma_max"], TEST_SEED, device=info["device"])
    teacher = teacher or Teacher(denoiser, sigma_min=info["sigma_min"], model_id=model_id,
                                 cache_dir=out / "teacher" if out else None, progress=progress)
    options = {m: {**e.tune, **(e.quick if quick else {}), **(method_options or {}).get(m, {})} for m, e in METHODS.items()}
    key = {"model": model_id, "fewstep": __version__, "sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"],
           "n_calib": n_calib, "n_test": n_test, "calib_seed": CALIB_SEED, "test_seed": TEST_SEED,
           "teacher_steps": teacher.steps, "teacher_sigma_min": teacher.sigma_min, "method_options": options}
    run = _Run(denoiser, info, calib, x_test, teacher.solve(x_test, info["sigma_max"]), teacher, options, out)
    done = _load_results(out / "results.json", key, retry_failed) if out else {}
    results: dict[str, dict] = {}
    bar = tqdm([(k, m, s) for k in nfes for m in methods for s in solvers], desc="tune", disable=not progress)
    for k, method, solver in bar:
        name = _cell_name(k, method, solver)
        bar.set_postfix_str(name)
        results[name] = done[name] if name in done else _cell(run, k, method, solver)
        if out is not None and name not in done:
            _write_results(out, key, info, results)
    summary = {"version": RESULTS_VERSION, "key": key, "model": info, "cells": list(results.values()),
               "best": _best(results, nfes)}
    if out is not None:
        _write_results(out, key, info, results)
        _write_best(out, summary, info)
        if report:
            from .report import write_report
            write_report(out, summary, denoiser, teacher, x_test)
    return summary


def _write_results(out: Path, key: dict, info: dict, results: dict) -> None:
    payload = {"version": RESULTS_VERSION, "key": key, "model": {**info, "shape": list(info["shape"])},
               "cells": list(results.values())}
    write_atomic(out / "results.json", json.dumps(payload, indent=1))


def _best(results: dict, nfes: list[int]) -> dict:
    """Per NFE: the best global schedule and its runner-up, the best baseline, and the best
    per-sample policy where one beats the best global schedule."""
    best = {}
    for k in nfes:
        ok = sorted((c for c in results.values() if c["nfe"] == k and c["status"] == "ok"), key=lambda c: c["mean"])
        glob = [c for c in ok if "sigmas" in c]
        if not glob:
            continue
        base = [c for c in glob if c["method"] in BUILTIN_SCHEDULES]
        # beyond rounding: a policy gated back to a global schedule computes it along another path
        policies = [c for c in ok if "sigmas" not in c and c["mean"] < glob[0]["mean"] * (1 - 1e-9)]
        best[str(k)] = {"winner": glob[0], "runner_up": glob[1] if len(glob) > 1 else None,
                        "best_baseline": base[0] if base else None, "policy": policies[0] if policies else None}
    return best


def _write_best(out: Path, summary: dict, info: dict) -> None:
    """best/nfe-<N>.json: the winning global schedule (a Schedule file), with its held-out error and
    the runner-up; a per-sample policy that beats it is copied beside it as best/nfe-<N>-policy.pt."""
    for k, entry in summary["best"].items():
        win, runner, policy = entry["winner"], entry["runner_up"], entry["policy"]
        meta = {"held_out": {key: win[key] for key in ("mean", "median", "p90", "mean_ci95", "n")},
                "runner_up": None if runner is None else {key: runner[key] for key in ("method", "solver", "mean")}}
        if "schedule_file" in win:
            sched = Schedule.load(out / "schedules" / win["schedule_file"])
        else:
            sched = baseline(win["method"], win["solver"], win["nfe"], info)
        if policy is not None:
            meta["better_policy"] = {"file": f"nfe-{k}-policy.pt", "method": policy["method"],
                                     "solver": policy["solver"], "mean": policy["mean"]}
            write_atomic(out / "best" / f"nfe-{k}-policy.pt", (out / "schedules" / policy["schedule_file"]).read_bytes())
        sched.with_metadata(**meta).save(out / "best" / f"nfe-{k}.json")
