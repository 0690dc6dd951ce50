"""``fewstep.tune``: the best schedule per NFE for the user's model, raced on held-out noises.

Cells are (nfe, method, solver). Baseline methods are the built-in schedules; every optimizer that
``fewstep.optimize`` knows is a method too. Calibration and test noises are disjoint seeded batches; the
teacher (``teacher.py``) is solved once per noise, to a tolerance tied to the errors the run measures.

The race (default): the baselines with every solver rank the solvers; the optimizers run for the best
three solvers at each NFE; every cell is scored on a first round of test noises, and rounds of twice as
many go to the cells still in the race whose paired difference to the leader is not clearly positive (the
ALIVE closest, and the best baseline), until one is left or the test set is used up. The learned tiers'
solvers are chosen once the race has given the cells RANKED noises (tier 1, LD3, for the best two; tier 2
for the best one: instance, and s4s and pas for the best one-call solver, from the best schedule so far,
for it or another one-call solver, ``_starts``). Where what such a method learned is behind another method's
best cell on the test noises, it runs once more on the next solver (``_retries``; not with a budget).
``exhaustive`` scores every cell on every test noise. A ``budget`` of evaluations is never exceeded:
cells that do not fit are left out, and the plan, results.json and the report say which. Every cell
records its evaluations (rows through the network) for the method and the scoring; the run records the
teacher's and the total. results.json is rewritten atomically after every cell, so a killed run
resumes with the same results as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import conditions, distributed
from .costs import BudgetExhausted, Meter, Staged, seconds_per_row, with_spent
from .files import FewstepWarning, write_atomic
from .methods import METHODS, optimize
from .methods.base import any_solver, memo_table
from .metrics import clearly_worse, rmse, summarize
from .models.device import release_cached_memory
from .models.info import fingerprint, model_info
from .noises import CALIB_SEED, TEST_SEED, noise
from .sampling import nfe as count_nfe, probe_denoiser, sample
from .schedules import BASELINES, BUILTIN_SCHEDULES, Schedule, ScheduleLike, builtin
from .solvers import PLANNED, SOLVERS, plan, twins
from .teacher import Teacher, content_key
from .version import __version__

RESULTS_VERSION = 2
FIRST_ROUND = 16  # test noises every scored cell gets
CONTENDERS, LEARNED_SOLVERS = 3, 2  # solvers per NFE the optimizers run for (the learned methods: fewer)
ALIVE = 8  # at most this many cells (the closest to the leader) go on to a round, besides the best baseline
RANKED = 64  # test noises the race gives the cells before the learned methods' solvers are chosen
COSTLIER = 4  # a race leaves out a solver for which a method costs over this many times another's
RETRIES = 1  # a start-taking learned method whose own solver is behind on the test noises: once more, another solver
TEACHER_SHARE = 0.05  # the teacher's tolerance: this fraction of the least baseline error measured
INITIAL_REL_TOL = 2e-2  # until then: this fraction of the RMS of its answers


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
    """What every cell of one tuning run shares, and the race's state."""

    meter: Meter
    info: dict
    calib: torch.Tensor
    x_test: torch.Tensor
    teacher: Teacher
    method_options: dict
    out: Path | None
    key: dict
    exhaustive: bool
    first: int = FIRST_ROUND  # test noises in the first round
    progress: Any = None
    results: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # cell name -> per-sample errors on the first test noises
    schedules: dict = field(default_factory=dict)  # cell name -> its schedule (made or loaded this run)
    sampled_as: dict = field(default_factory=dict)  # what a schedule samples (``_samples``) -> the first such cell
    refs: list = field(default_factory=list)  # the teacher's x0 for the test rounds solved so far
    calib_cond: Any = None  # the calibration noises' conditions (a conditional model), and the test noises'
    test_cond: Any = None
    pools: tuple = (None, None)  # conditions in the calibration and the test pools
    teacher_error: float | None = None  # the teacher's estimated error on the scored test noises (at the end)

    def rounds(self) -> list[int]:
        """Test noises after each round: 16, 32, 64, ... up to all of them (all at once if exhaustive)."""
        n = len(self.x_test)
        if self.exhaustive:
            return [n]
        sizes, k = [], min(self.first, n)
        while k < n:
            sizes.append(k)
            k *= 2
        return sizes + [n]

    def ref(self, n: int) -> torch.Tensor:
        """The teacher's x0 for the first ``n`` test noises, solved round by round (cached)."""
        bounds = [0] + self.rounds()
        while sum(len(r) for r in self.refs) < n:
            a, b = bounds[len(self.refs)], bounds[len(self.refs) + 1]
            self.refs.append(self.teacher.solve(self.x_test[a:b], self.info["sigma_max"],
                                                conditions.rows(self.test_cond, slice(a, b))))
        return torch.cat(self.refs)[:n]

    def save(self, cost: dict | None = None) -> None:
        """results.json rewritten (by rank 0; every rank calls this at the same point, unless ``cost`` is given:
        rank 0 alone, after the report) and the progress bar."""
        cost = self.cost() if cost is None else cost
        if self.out is not None and distributed.rank() == 0:
            payload = {"version": RESULTS_VERSION, "key": self.key, "model": {**self.info, "shape": list(self.info["shape"])},
                       "cells": list(self.results.values()), "cost": cost}
            write_atomic(self.out / "results.json", json.dumps(payload, indent=1))
        if self.progress is not None:
            self.progress.update(cost["total"] - self.progress.n)

    def cost(self, seconds_per_eval: float | None = None) -> dict:
        """The evaluations so far (every rank's), and the teacher's settings and estimated errors."""
        return {**self.meter.combined().report(seconds_per_eval),
                "teacher": {"steps": self.teacher.steps(self.info["sigma_max"]),
                            "error_check": self.teacher.error(self.info["sigma_max"]), "tol": self.teacher.tol,
                            "error": self.teacher_error}}


# --------------------------------------------------------------------------------------------
# One cell: its schedule (made once) and its scores (round by round)


def _schedule(run: _Run, k: int, method: str, solver: str) -> ScheduleLike:
    """The cell's schedule: a baseline, the one saved by an earlier run, or ``optimize``'s now."""
    if method in BUILTIN_SCHEDULES:
        return baseline(method, solver, k, run.info)
    if _cell_name(k, method, solver) in run.schedules:
        return run.schedules[_cell_name(k, method, solver)]
    row = run.results.get(_cell_name(k, method, solver), {})
    if run.out is not None and "schedule_file" in row:
        from .schedules import load_schedule
        return load_schedule(run.out / "schedules" / row["schedule_file"])
    options = run.method_options[method]
    if _takes_start(method) and "start" not in options:
        options = {**options, "start": _starts(run, k, method, solver)}
    with run.meter.at("method"):
        return optimize(run.meter, method, solver, k, calib=run.calib, teacher=run.teacher, cond=run.calib_cond,
                        sigma_min=run.info["sigma_min"], sigma_max=run.info["sigma_max"], **options)


def _takes_start(method: str) -> bool:
    return "start" in {f.name for f in dataclasses.fields(METHODS[method].options)}


def _starts(run: _Run, k: int, method: str, solver: str) -> tuple:
    """What a method that takes ``start`` starts from, among the global schedules at NFE ``k`` of the cells made
    before its tier (the baselines and the earlier tiers' optimizers): for each solver the method accepts, the
    best by the tune's test noises (``_standing``; one for each solver a fallback may learn on), and the other
    schedules for ``solver`` not clearly worse than the first on the test noises both are scored on (as the race
    judges: a few validation noises could only put those ahead by luck). A start brings its solver, so the
    method is not bound to the solver of its cell. They come best first: the method keeps the first unless
    another is clearly ahead on its validation noises. An exhaustive run gives each cell its own solver's only:
    the method then runs on every solver it accepts, each cell its own (else every cell would pick the same
    start); so does a race to a second cell of the method at ``k`` (``_retries``: another solver than the
    first cell's)."""
    tier, accepts = METHODS[method].tier, METHODS[method].accepts
    own = run.exhaustive or any(r["solver"] != solver for r in _ok(run, k, methods=[method]))
    rows = sorted((r for r in _ok(run, k) if "sigmas" in r and accepts(r["solver"])
                   and (r["method"] in BUILTIN_SCHEDULES or METHODS[r["method"]].tier < tier)),
                  key=_standing(run, k))
    best, out = {}, []
    for r in rows:
        best.setdefault(r["solver"], r)
    rows = [r for r in rows if r["solver"] == solver or (best[r["solver"]] is r and not own)]
    for r in rows:
        if best[r["solver"]] is not r and _behind(r, rows[0]):
            continue
        sched = _schedule(run, k, r["method"], r["solver"])
        if isinstance(sched, Schedule) and sched.solver == r["solver"]:
            out.append(sched.with_metadata(method=r["method"]))
    return tuple(out)


def _samples(sched: ScheduleLike) -> tuple | None:
    """What a schedule makes of any noise: its sigmas, solver and solver options (None for a per-sample
    policy). Two cells with the same (a method that kept its start) sample the same on every test noise."""
    if not isinstance(sched, Schedule):
        return None
    return sched.solver, json.dumps(sched.solver_options, sort_keys=True), tuple(sched.to_list())


def _score(run: _Run, name: str, sched: ScheduleLike, n: int) -> None:
    """Per-sample errors of the cell on the first ``n`` test noises: only the new ones are sampled, and those
    that a cell with the same sigmas, solver and options (``_samples``) has are taken from it."""
    have = run.errors.get(name, torch.zeros(0, dtype=torch.float64))
    twin = run.sampled_as.get(_samples(sched))
    if twin is not None and twin != name and len(run.errors.get(twin, ())) > len(have):
        have = run.errors[twin][:n]
    if len(have) >= n:
        run.errors[name] = have
        return
    ref = run.ref(n)
    with run.meter.at("scoring"):
        out = sample(run.meter, run.x_test[len(have):n], sched, cond=conditions.rows(run.test_cond, slice(len(have), n)))
    run.errors[name] = torch.cat([have, rmse(out, ref[len(have):n]).cpu()])


def _row(run: _Run, k: int, method: str, solver: str, sched: ScheduleLike, spent: dict, seconds: float) -> dict:
    errors = run.errors[_cell_name(k, method, solver)]
    old = run.results.get(_cell_name(k, method, solver), {})
    row = {"nfe": k, "method": method, "solver": solver, "status": "ok", **summarize(errors, ci=True),
           "errors": errors.tolist(), "evaluations": {s: old.get("evaluations", {}).get(s, 0) + spent.get(s, 0)
                                                      for s in ("method", "scoring")},
           "calib_seconds": old.get("calib_seconds", round(seconds, 3))}
    if not sched.per_sample:
        row["sigmas"], row["nfe_counted"] = sched.to_list(), count_nfe(sched)
    training = getattr(sched, "metadata", {}).get("training", {})
    start = training.get("start_solver") or training.get("base_solver")
    if start and start != solver:  # a learned method took a start on another solver (its cell's only ranks it)
        row["start_solver"] = start
    if "schedule_file" in old:
        row["schedule_file"] = old["schedule_file"]
    elif run.out is not None and method not in BUILTIN_SCHEDULES:
        row["schedule_file"] = f"{_cell_name(k, method, solver)}{sched.SUFFIX}"  # written by _record
    return row


def _run_cell(run: _Run, k: int, method: str, solver: str, n: int) -> tuple[dict, ScheduleLike | None]:
    """Make (or reload) the cell's schedule and score it on ``n`` test noises: (a row that says what
    happened, the schedule or None). The row: ok, skipped (a ValueError: a setting the method refuses),
    failed (any other exception, with its type, message and seconds: the run goes on) or pruned (the
    budget ran out)."""
    name, cell, start = _cell_name(k, method, solver), {"nfe": k, "method": method, "solver": solver}, time.perf_counter()
    before = dict(run.meter.rows)
    try:
        plan(solver, k)
        sched = _schedule(run, k, method, solver)
        made = time.perf_counter() - start
        _score(run, name, sched, n)
        spent = {s: run.meter.rows[s] - before.get(s, 0) for s in run.meter.rows}
        return _row(run, k, method, solver, sched, spent, made), sched
    except BudgetExhausted as e:
        return {**cell, "status": "pruned", "reason": str(e)}, None
    except (ValueError, NotImplementedError) as e:
        return {**cell, "status": "skipped", "reason": str(e), "error": type(e).__name__}, None
    except Exception as e:  # one cell never ends the run: recorded, and the run goes on
        if isinstance(e, torch.OutOfMemoryError):
            release_cached_memory()  # what the failed cell held, back to the device for the next cells
        return {**cell, "status": "failed", "error": type(e).__name__, "reason": str(e),
                "seconds": round(time.perf_counter() - start, 3)}, None


Cell = tuple[int, str, str]  # (nfe, method, solver)


def _attempt(run: _Run, cell: Cell, n: int) -> tuple[dict, ScheduleLike | None]:
    """``_run_cell`` for a cell not yet scored on ``n`` test noises, from its earlier errors if any."""
    name, row = _cell_name(*cell), run.results.get(_cell_name(*cell))
    if row is not None:
        run.errors[name] = torch.tensor(row["errors"], dtype=torch.float64)
    return _run_cell(run, *cell, n)


def _record(run: _Run, cell: Cell, new: dict, sched: ScheduleLike | None) -> None:
    """Keep a cell's new row (but not a pruned one over an earlier row: more noises that the budget
    could not pay), its errors and schedule; rank 0 writes a newly made schedule's file."""
    name = _cell_name(*cell)
    old = run.results.get(name)
    if old is not None and new["status"] == "pruned":
        return
    run.results[name] = new
    if new["status"] == "ok":
        run.errors[name] = torch.tensor(new["errors"], dtype=torch.float64)
        run.schedules[name] = sched
        if (sampled := _samples(sched)) is not None:
            run.sampled_as.setdefault(sampled, name)
        if "schedule_file" in new and "schedule_file" not in (old or {}) and distributed.rank() == 0:
            sched.save(run.out / "schedules" / new["schedule_file"])


def _do(run: _Run, cells: list[Cell], n: int) -> None:
    """The cells made and scored on ``n`` test noises, but those an earlier run (resumed) has at ``n``
    already; saved after each. Under torchrun the cells are dealt out to the ranks by their estimated
    cost (``distributed.deal``), once the teacher has answered for the test noises (sharded), saved once
    all are back, and what each rank's methods memoized is shared with the others (a later method starts
    from it)."""
    cells = [c for c in cells if (row := run.results.get(_cell_name(*c))) is None
             or (row["status"] == "ok" and row["n"] < n)]
    if not distributed.active():
        for cell in cells:
            _record(run, cell, *_attempt(run, cell, n))
            run.save()
        return
    if cells:
        run.ref(n)
        known = set(memo_table(run.meter))
        outcomes = distributed.deal(lambda c: _attempt(run, c, n), cells, [_cost(run, m, s, k) + n * k for k, m, s in cells],
                                    [(k, s) for k, _, s in cells])  # one (NFE, solver)'s cells share their start
        for table in distributed.gathered(_portable(memo_table(run.meter), known)):
            memo_table(run.meter).update(table)
        for cell, outcome in zip(cells, outcomes):
            _record(run, cell, *outcome)
        run.save()


# --------------------------------------------------------------------------------------------
# The race


def _ok(run: _Run, k: int, methods=None, solvers=None) -> list[dict]:
    return [r for r in run.results.values() if r["nfe"] == k and r["status"] == "ok"
            and (methods is None or r["method"] in methods) and (solvers is None or r["solver"] in solvers)]


def _mean_on(row: dict, n: int) -> float:
    """A cell's mean error on the first ``n`` test noises (all it has, if fewer)."""
    return float(torch.tensor(row["errors"][:n]).mean())


def _behind(row: dict, lead: dict) -> bool:
    """Whether a cell is clearly worse than ``lead`` (``metrics.clearly_worse``) on the test noises both are
    scored on: their paired per-sample differences."""
    n = min(row["n"], lead["n"])
    return clearly_worse(torch.tensor(row["errors"][:n]) - torch.tensor(lead["errors"][:n]))


def _first_round(run: _Run, row: dict) -> float:
    """A cell's mean error on the first-round noises (every scored cell has them)."""
    return _mean_on(row, run.rounds()[0])


def _standing(run: _Run, k: int) -> Callable[[dict], tuple]:
    """A sort key for the scored cells at NFE ``k``, the best first: those scored on the most noises by their
    mean error on them, then the others (left behind by the race) by their first-round error."""
    m = _level(run, k)
    return lambda r: (0, _mean_on(r, m)) if r["n"] >= m else (1, _first_round(run, r))


def _level(run: _Run, k: int) -> int:
    """The most test noises a cell at NFE ``k`` is scored on (the first round before any is)."""
    return max((r["n"] for r in _ok(run, k)), default=run.rounds()[0])


def _ranked_solvers(run: _Run, k: int, solvers: list[str]) -> list[str]:
    """The solvers by their best scored cell at NFE ``k`` (``_standing``)."""
    key, best = _standing(run, k), {}
    for r in _ok(run, k, solvers=solvers):
        best[r["solver"]] = min(best.get(r["solver"], (math.inf,)), key(r))
    return sorted(best, key=best.get)


def _takes(method: str) -> str:
    return f"{method} runs only on solvers of {METHODS[method].accepts.__doc__.strip().rstrip('.')}"


def _refuse(run: _Run, k: int, method: str, solver: str) -> None:
    """A solver the method does not run on (``Method.accepts``): skipped, with the reason."""
    run.results[_cell_name(k, method, solver)] = {"nfe": k, "method": method, "solver": solver, "status": "skipped",
                                                  "reason": f"{_takes(method)}; {solver} is not one"}


def _prune(run: _Run, k: int, method: str, solver: str, why: str) -> None:
    name = _cell_name(k, method, solver)
    if name not in run.results:
        run.results[name] = {"nfe": k, "method": method, "solver": solver, "status": "pruned", "reason": why}


def _portable(table: dict, known: set) -> dict:
    """The entries of a memo table not in ``known`` that can be sent to the other ranks (pickled)."""
    out = {}
    for key, value in table.items():
        if key not in known:
            try:
                pickle.dumps(value)
            except Exception:  # kept on this rank only: the others compute it if they need it
                continue
            out[key] = value
    return out


def _stage(run: _Run, k: int, methods: list[str], solvers: list[str], ranked: list[str], count: int,
           why: str) -> list[Cell]:
    """The cells of ``methods`` for the ``count`` best solvers each accepts (all of them when exhaustive), the others
    pruned; in a race, also a solver for which a method costs more than COSTLIER times its cheapest chosen solver.
    A solver that at NFE ``k`` runs exactly as an earlier one (``solvers.twins``) is pruned in every mode."""
    todo, same = [], twins(tuple(solvers), k)
    for method in methods:  # the best solvers the method runs on (s4s and pas: one call a step)
        accepts = METHODS[method].accepts if method in METHODS else any_solver
        chosen = [s for s in (solvers if run.exhaustive else ranked)
                  if accepts(s) and s not in same][:None if run.exhaustive else count]
        costs = {s: _cost(run, method, s, k) for s in chosen}
        for solver in solvers:
            if solver in same:
                _prune(run, k, method, solver, f"at NFE {k} {solver} computes exactly what {same[solver]} does "
                                               f"(solvers.twins): its cells would repeat {same[solver]}'s")
            elif not accepts(solver):
                _refuse(run, k, method, solver)
            elif solver not in chosen:
                _prune(run, k, method, solver, why)
            elif not run.exhaustive and costs[solver] > COSTLIER * max(1, min(costs.values())):
                _prune(run, k, method, solver, f"costs ~{costs[solver]:,} evaluations, over {COSTLIER}x the "
                                               f"{min(costs, key=costs.get)} solver's")
            else:
                todo.append((k, method, solver))
    return todo


def _cost(run: _Run, method: str, solver: str, k: int) -> int:
    if method not in METHODS:
        return 0
    entry = METHODS[method]
    return entry.cost(entry.make_options(method, run.method_options[method]), solver, k, len(run.calib))


def _solver_count(tier: int) -> int:
    """Solvers per NFE a method of this tier runs for: CONTENDERS, then LEARNED_SOLVERS, then 1."""
    return CONTENDERS if tier == 0 else max(1, LEARNED_SOLVERS + 1 - tier)


def _race(run: _Run, nfes: list[int], upto: float = math.inf) -> None:
    """Rounds of more test noises (up to ``upto``), every NFE's at once, for the cells not clearly worse than
    their NFE's leader."""
    racing = list(nfes)
    for n in [n for n in run.rounds()[1:] if n <= upto]:
        cells = {k: _alive(run, k) for k in racing}
        racing = [k for k in racing if cells[k]]
        _do(run, [c for k in racing for c in cells[k]], n)


def _alive(run: _Run, k: int) -> list[Cell]:
    """The cells at NFE ``k`` still in the race (those scored on the most noises so far) that are not clearly
    worse than the leader (the best global schedule among them), the closest first (should the budget run
    out), at most ALIVE of them: paired differences on the noises they share. The best baseline stays in (the
    reference); none when only one other cell is left."""
    rows = _ok(run, k)
    m = max((r["n"] for r in rows), default=0)
    rows = [r for r in rows if r["n"] >= m]
    glob = [r for r in rows if "sigmas" in r]
    if not glob:
        return []
    lead = min(glob, key=lambda r: r["mean"])
    base = min((r for r in glob if r["method"] in BUILTIN_SCHEDULES), key=lambda r: r["mean"], default=None)
    alive = sorted((r for r in rows if r is base or not _behind(r, lead)), key=lambda r: r["mean"])
    others = [r for r in alive if r is not base]
    if len(others) <= 1:
        return []
    closest = {id(r) for r in others[:ALIVE]}
    return [(k, r["method"], r["solver"]) for r in alive if r is base or id(r) in closest]


def _stages(run: _Run, nfes: list[int], methods: list[str], solvers: list[str]) -> None:
    """The stages, each for every NFE before the next (so a budget that runs out leaves every NFE with
    what came first): the baselines with every solver (cheap: scoring only), the optimizers for the
    solvers with the best cells so far (learned methods: fewer, chosen once the race has given the cells
    RANKED test noises; their cells scored on as many as the race's cells at their NFE), then the race."""
    base = [m for m in methods if m in BUILTIN_SCHEDULES]
    _do(run, [c for k in nfes for c in _stage(run, k, base, solvers, solvers, len(solvers), "")], run.rounds()[0])
    for tier in sorted({METHODS[m].tier for m in methods if m in METHODS}):
        count, tiered = _solver_count(tier), [m for m in methods if m in METHODS and METHODS[m].tier == tier]
        why = f"not among the {count} best solver(s) so far (by their best scored cell)" + (" (a learned method)" if tier else "")
        if tier and not run.exhaustive:
            _race(run, nfes, upto=RANKED)
        cells = [c for k in nfes for c in _stage(run, k, tiered, solvers, _ranked_solvers(run, k, solvers) or solvers,
                                                 count, f"NFE {k}: {why}")]
        for n, cells in _by_level(run, cells).items():
            _do(run, cells, n)
    if not run.exhaustive:
        if run.key.get("budget") is None:  # a budgeted run leaves what is left to the race
            for _ in range(RETRIES):
                for n, cells in _by_level(run, [c for k in nfes for c in _retries(run, k, methods, solvers)]).items():
                    _do(run, cells, n)
        _race(run, nfes)


def _by_level(run: _Run, cells: list[Cell]) -> dict[int, list[Cell]]:
    """The cells grouped by the noises their NFE's cells are scored on (``_level``)."""
    levels = {}
    for cell in cells:
        levels.setdefault(_level(run, cell[0]), []).append(cell)
    return levels


def _learned_rows(run: _Run, k: int, method: str) -> list[dict]:
    """The method's global cells at NFE ``k`` that sample unlike every other cell there (learned, not a start
    kept); from the schedules themselves, so a resumed run finds the same."""
    rows = [r for r in _ok(run, k) if "sigmas" in r]
    samples = [_samples(_schedule(run, k, r["method"], r["solver"])) for r in rows]
    return [r for r, s in zip(rows, samples) if r["method"] == method and samples.count(s) == 1]


def _tried(run: _Run, k: int, method: str) -> set[str]:
    """The solvers the method's cells at NFE ``k`` are for, started from or learned on (s4s's ``tried``)."""
    out = set()
    for r in _ok(run, k, methods=[method]):
        training = getattr(_schedule(run, k, method, r["solver"]), "metadata", {}).get("training", {})
        out |= {r["solver"], r.get("start_solver", r["solver"])} | {t["solver"] for t in training.get("tried", [])}
    return out


def _retries(run: _Run, k: int, methods: list[str], solvers: list[str]) -> list[Cell]:
    """For each learned method that takes ``start`` (tier 2: s4s, pas): where what it learned at NFE ``k`` is
    behind the best global cell of another method on the test noises so far (its validation noises missed
    what these show), and nothing it made at ``k`` is ahead, one more cell, on the best-ranked solver it accepts
    and has not tried there; that cell starts from its own solver's schedules only (``_starts``)."""
    todo, same = [], twins(tuple(solvers), k)
    for method in (m for m in methods if m in METHODS and METHODS[m].tier >= 2 and _takes_start(m)):
        learned, mine = _learned_rows(run, k, method), _ok(run, k, methods=[method])
        others = [r for r in _ok(run, k) if "sigmas" in r and r["method"] != method and r["n"] >= _level(run, k)]
        if not learned or not others or len(mine) >= _solver_count(METHODS[method].tier) + RETRIES:
            continue
        n = min(r["n"] for r in learned)
        if min(_mean_on(r, n) for r in mine) < min(_mean_on(r, n) for r in others):
            continue
        tried = _tried(run, k, method)
        fresh = [s for s in _ranked_solvers(run, k, solvers) if METHODS[method].accepts(s) and s not in tried
                 and s not in same]
        if fresh:
            run.results.pop(_cell_name(k, method, fresh[0]), None)  # pruned when its tier ran
            todo.append((k, method, fresh[0]))
    return todo


# --------------------------------------------------------------------------------------------
# Inputs, resume, the plan


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


def _check_budget(budget, seconds_per_eval) -> None:
    """``budget``: a positive integer or None; ``seconds_per_eval``: a positive, finite number or None."""
    if budget is not None and (isinstance(budget, bool) or int(budget) != budget or budget < 1):
        raise ValueError(f"budget must be a positive number of evaluations, got {budget!r}")
    number = isinstance(seconds_per_eval, (int, float)) and not isinstance(seconds_per_eval, bool)
    if seconds_per_eval is not None and not (number and 0 < seconds_per_eval < math.inf):
        raise ValueError(f"seconds_per_eval must be a positive number of seconds, got {seconds_per_eval!r}")


def _checked(methods, solvers) -> tuple[list[str], list[str]]:
    methods, solvers = _names(methods, all_methods()), _names(solvers, PLANNED)
    for name, given in (("methods", methods), ("solvers", solvers)):
        if not given:
            raise ValueError(f"{name} is empty: give at least one, or 'all'")
    unknown = [m for m in methods if m not in BUILTIN_SCHEDULES and m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {all_methods()}")
    bad = [s for s in solvers if s not in PLANNED]
    if bad:
        raise ValueError(f"unknown or unplanned solver(s) {bad}; known: {PLANNED}")
    if not any(m in BUILTIN_SCHEDULES or METHODS[m].accepts(s) for m in methods for s in solvers):
        raise ValueError(f"no cell can run on the solvers {', '.join(solvers)}: " + "; ".join(map(_takes, methods)))
    return methods, solvers


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
    return {n: c for n, c in cells.items() if not (retry_failed and c.get("status") == "failed")
            and c.get("status") != "pruned"}


def _estimate(methods: list[str], solvers: list[str], nfes: list[int], n_calib: int, n_test: int,
              teacher_steps: int, options: dict, exhaustive: bool, first: int = FIRST_ROUND, report: bool = False) -> dict:
    """Evaluations each stage is expected to cost (the methods' own cost formulas, ``Method.cost``)."""
    n1 = n_test if exhaustive else min(first, n_test)
    # the teacher's solves, and its error check on the test noises (a solve with twice the steps)
    est = {"teacher": (n_calib + n_test) * (teacher_steps + 1) + n_test * (2 * teacher_steps + 1)}
    for m in methods:
        count = len(solvers) if exhaustive or m in BUILTIN_SCHEDULES else min(len(solvers), CONTENDERS)
        if m in METHODS and METHODS[m].tier and not exhaustive:
            count = _solver_count(METHODS[m].tier)
        per = 0  # a method's cost for its ``count`` cheapest solvers it runs on (a race leaves out the costly ones)
        if m in METHODS:
            opts, runs_on = METHODS[m].make_options(m, options[m]), [s for s in solvers if METHODS[m].accepts(s)]
            each = sorted(sum(METHODS[m].cost(opts, s, k, n_calib) for k in nfes) for s in runs_on)
            count = min(count, len(runs_on))
            per = sum(each[:count]) / max(count, 1)
        scored = n1 if exhaustive or m not in METHODS or not METHODS[m].tier else min(max(n1, RANKED), n_test)
        est[m] = int(count * (per + scored * sum(nfes)))  # a learned method's cells: on the race's RANKED noises
    if not exhaustive:  # about 6 cells per NFE stay in the race
        est["race"] = 6 * (n_test - n1) * sum(nfes)
    if report:  # the sample grid (8 noises per NFE, for images) and 3 trajectories with their teacher solve
        est["report"] = 8 * sum(nfes) + 3 * (max(nfes) + teacher_steps + 1)
    return est


def _plan(run: _Run, nfes, methods, solvers, n_calib, n_test, options, seconds: float, report: bool) -> dict:
    """The run's plan: its cells, sizes and the evaluations each stage is expected to cost, printed."""
    est = _estimate(methods, solvers, nfes, n_calib, n_test, run.teacher.steps(run.info["sigma_max"]), options,
                    run.exhaustive, run.first, report)
    total = sum(est.values())
    plan_ = {"nfe": nfes, "methods": methods, "solvers": solvers, "n_calib": n_calib, "n_test": n_test,
             "mode": "exhaustive" if run.exhaustive else "race", "estimated_evaluations": est,
             "estimated_total": total, "seconds_per_evaluation": seconds, "estimated_hours": total * seconds / 3600,
             "budget": run.meter.budget}
    return plan_


def plan_text(plan_: dict) -> str:
    lines = [f"fewstep tune plan ({plan_['mode']}): NFE {plan_['nfe']}, {len(plan_['methods'])} methods x "
             f"{len(plan_['solvers'])} solvers, {plan_['n_calib']} calibration and up to {plan_['n_test']} test noises"]
    lines += [f"  {stage:14} ~{n:>12,} evaluations" for stage, n in plan_["estimated_evaluations"].items()]
    lines.append(f"  {'total':14} ~{plan_['estimated_total']:>12,} evaluations, ~{plan_['estimated_hours'] * 60:.1f} "
                 f"min at {plan_['seconds_per_evaluation'] * 1e3:.3g} ms per evaluation (timed)"
                 + (f"; budget {plan_['budget']:,}: what does not fit is left out" if plan_["budget"] else ""))
    lines += [f"  left out for the budget: {what}" for what in plan_.get("left_out", [])]
    return "\n".join(lines)


def _teacher_to_errors(run: _Run, k: int, methods: list[str], solvers: list[str]) -> None:
    """Tie the teacher's tolerance to the least error of karras (or the first baseline) at NFE ``k``:
    ``TEACHER_SHARE`` of it. If the teacher is refined, what was scored against it is scored again."""
    first = "karras" if "karras" in methods else next((m for m in methods if m in BUILTIN_SCHEDULES), None)
    if first is None:
        return
    _do(run, _stage(run, k, [first], solvers, solvers, len(solvers), ""), run.rounds()[0])
    errs = [r["mean"] for r in _ok(run, k, methods=[first])]
    if not errs:
        return
    steps = run.teacher.steps(run.info["sigma_max"])
    run.teacher.refine_to(TEACHER_SHARE * min(errs), run.info["sigma_max"])
    moved = run.teacher.steps(run.info["sigma_max"]) != steps
    if moved:
        run.refs.clear()
        for name in [n for n, r in run.results.items() if r["nfe"] == k and r["method"] == first]:
            del run.results[name]
            run.errors.pop(name, None)


def tune(denoiser: Callable, nfe=None, methods="all", solvers="all", outdir: str | Path | None = None, *,
         quick: bool = False, n_calib: int | None = None, n_test: int | None = None, shape=None,
         sigma_min: float | None = None, sigma_max: float | None = None, teacher: Teacher | None = None,
         method_options: dict | None = None, progress: bool = True, report: bool = True,
         model_id: str | None = None, retry_failed: bool = False, budget: int | None = None,
         exhaustive: bool = False, seconds_per_eval: float | None = None, conds=None) -> dict:
    """The best schedule per NFE, raced on held-out noises (module docstring); returns and writes the results.

    Returns ``{"cells": [...], "best": {nfe: ...}, "plan": ..., "cost": ...}``. With ``outdir``:
    ``results.json``, ``schedules/``, ``best/nfe-<N>.json`` and the report. A rerun into the same
    ``outdir`` with the same settings resumes; a failed cell is retried only with ``retry_failed``.
    ``budget``: at most this many network evaluations in all, teacher included; ``exhaustive``: every
    cell on every test noise; ``seconds_per_eval``: the report's cost in hours at that speed.
    ``model_id``: the model's identity in the resume key and the teacher cache (default: its name and
    ``models.info.fingerprint``). ``teacher``: its settings (steps or tolerance, cache) are used, around
    the counted model. ``conds``: for a conditional denoiser D(x, sigma, cond=c), a pool of conditions
    (a tensor or dict of tensors, one per row): its first half conditions the calibration noises, its
    second half the test noises (each in turn), so every error is measured on conditions no optimizer saw.
    """
    _check_budget(budget, seconds_per_eval)
    nfes, n_calib, n_test = _counts(nfe, n_calib, n_test, Sizes.quick() if quick else Sizes())
    methods, solvers = _checked(methods, solvers)
    pools = _split(denoiser, conds)
    out, info = distributed.from_rank0(lambda: _writable(outdir)), model_info(denoiser, shape, sigma_min, sigma_max)
    meter = Meter(denoiser, budget, distributed.world())
    with meter.at("probe"):
        probe_denoiser(meter, info, pools[1])
        seconds = seconds_per_row(meter, noise(min(n_calib, 16), info["shape"], info["sigma_max"], CALIB_SEED,
                                               device=info["device"]), info["sigma_max"],
                                  conditions.to(conditions.cycle(pools[1], min(n_calib, 16)), info["device"]))
    model_id = model_id or f"{info['name']}@{fingerprint(denoiser)}"
    staged = Staged(meter, "teacher")  # the teacher's rows are teacher evaluations, whoever asks for them
    teacher = (teacher.using(staged) if teacher is not None else
               Teacher(staged, sigma_min=info["sigma_min"], model_id=model_id, shape=info["shape"],
                       cache_dir=out / "teacher" if out else None, rel_tol=INITIAL_REL_TOL))
    teacher.check_cond = conditions.to(pools[1], info["device"])
    options = {m: {**e.tune, **(e.quick if quick else {}), **(method_options or {}).get(m, {})} for m, e in METHODS.items()}
    steps, _ = teacher.steps(info["sigma_max"]), teacher.error(info["sigma_max"])  # its error control runs here
    spent = meter.combined().total
    report = report and out is not None
    sizes = _fit(None if budget is None else budget - spent, methods, solvers, nfes, n_calib, n_test, steps, options,
                 exhaustive, report)
    run = _new_run(meter, info, teacher, options, out, sizes, pools, exhaustive,
                   {"model": model_id, "budget": budget, "solvers": solvers})
    run.results = distributed.from_rank0(lambda: _load_results(out / "results.json", run.key, retry_failed)) if out else {}
    plan_ = {**_plan(run, nfes, sizes["methods"], solvers, run.calib.shape[0], run.x_test.shape[0], options, seconds,
                    report),
             "left_out": sizes["left_out"]}
    progress = progress and distributed.rank() == 0
    if progress:
        tqdm.write(plan_text(plan_))
    run.progress = tqdm(total=plan_["estimated_total"], desc="tune (evaluations)", disable=not progress, unit="ev",
                        mininterval=1.0)
    try:
        _teacher_to_errors(run, max(nfes), sizes["methods"], solvers)
        _stages(run, nfes, sizes["methods"], solvers)
    finally:
        run.progress.close()
    return _finish(run, nfes, plan_, report, seconds_per_eval)


def _split(denoiser: Callable, conds) -> tuple:
    """(calibration pool, test pool): the pool's first and second halves (disjoint rows), or (None, None)."""
    n = conditions.length(conds)
    conditions.check_model(denoiser, conds)
    if n is None:
        return None, None
    if n < 2:
        raise ValueError(f"conds has {n} row(s): a pool of at least 2 conditions is needed, its first half to "
                         "calibrate on and its second half held out for scoring")
    return conditions.rows(conds, slice(None, n // 2)), conditions.rows(conds, slice(n // 2, None))


def _new_run(meter: Meter, info: dict, teacher: Teacher, options: dict, out, sizes: dict, pools: tuple,
             exhaustive: bool, ident: dict) -> _Run:
    """The run's noises (and their conditions, each pool in turn) and its resume key."""
    n_calib, n_test, dev = sizes["n_calib"], sizes["n_test"], info["device"]
    key = {**ident, "fewstep": __version__, "sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"],
           "n_calib": n_calib, "n_test": n_test, "calib_seed": CALIB_SEED, "test_seed": TEST_SEED,
           "teacher_sigma_min": teacher.sigma_min, "teacher_tol": teacher.tol, "method_options": options,
           "mode": "exhaustive" if exhaustive else "race", "methods": sizes["methods"],
           "conds": None if pools[0] is None else content_key(*conditions.parts(pools[0]), *conditions.parts(pools[1]))}
    run = _Run(meter, info, noise(n_calib, info["shape"], info["sigma_max"], CALIB_SEED, device=dev),
               noise(n_test, info["shape"], info["sigma_max"], TEST_SEED, device=dev), teacher, options, out, key,
               exhaustive, sizes["first"])
    run.calib_cond = conditions.to(conditions.cycle(pools[0], n_calib), dev)
    run.test_cond = conditions.to(conditions.cycle(pools[1], n_test), dev)
    run.pools = tuple(conditions.length(p) for p in pools)
    return run


def _fit(budget, methods, solvers, nfes, n_calib, n_test, steps, options, exhaustive, report) -> dict:
    """Sizes and methods whose estimated cost is at most 90% of what is left of ``budget``: the first
    round, the test and the calibration sizes halved (to 8, 32 and 16), then methods left out from the
    costliest tier down, then the sizes halved again (to 4, 16 and 8); what was cut is listed
    (``left_out``). Without a budget: as given."""
    first, left_out, methods = FIRST_ROUND, [], list(methods)

    def fits() -> bool:
        est = _estimate(methods, solvers, nfes, n_calib, n_test, steps, options, exhaustive, first, report)
        return budget is None or sum(est.values()) <= 0.9 * budget

    def shrink(floor: tuple) -> None:
        nonlocal first, n_test, n_calib
        while not fits() and (first > floor[0] or n_test > floor[1] or n_calib > floor[2]):
            first, n_test, n_calib = (min(v, max(f, v // 2)) for v, f in zip((first, n_test, n_calib), floor))
            left_out[:] = [w for w in left_out if not w.startswith("sizes")] + [
                f"sizes: first round {first}, up to {n_test} test and {n_calib} calibration noises"]

    shrink((8, 32, 16))
    optimizers = sorted((m for m in methods if m in METHODS), key=lambda m: (METHODS[m].tier, m))
    while not fits() and optimizers:
        m = optimizers.pop()
        methods.remove(m)
        left_out.append(f"method {m}: its estimated cost does not fit the budget")
    shrink((4, 16, 8))
    return {"methods": methods, "n_calib": n_calib, "n_test": n_test, "first": first, "left_out": left_out}


def _finish(run: _Run, nfes: list[int], plan_: dict, report: bool, seconds_per_eval: float | None) -> dict:
    run.save()
    scored = max((len(e) for e in run.errors.values()), default=0)
    try:  # on every test noise a result is measured on
        run.teacher_error = run.teacher.error_on(run.x_test[:scored], run.info["sigma_max"], run.ref(scored),
                                                 conditions.rows(run.test_cond, slice(None, scored))) if scored else None
    except BudgetExhausted:  # not estimated: the budget is spent
        pass
    run.save()  # its cost now with the error check
    cost = run.cost(seconds_per_eval)
    summary = {"version": RESULTS_VERSION, "key": run.key, "model": run.info, "plan": plan_, "cost": cost,
               "cells": list(run.results.values()), "best": _best(run.results, nfes),
               "conditions": {"calibration": run.pools[0], "test": run.pools[1]}}
    if run.pools[1]:
        for entry in summary["best"].values():
            entry["per_condition"] = _per_condition(entry["winner"]["errors"], run.pools[1])
    if run.out is not None and distributed.rank() == 0:
        with distributed.local():  # rank 0 writes (its report's samples: on its own)
            _write_best(run.out, summary, run.info)
            if report:
                _report(run, summary)
    return summary


def _report(run: _Run, summary: dict) -> None:
    """The report (rank 0): its plots first (the winners' samples and trajectories: evaluations of a stage of
    their own, within the budget; the teacher's for the trajectories count as the teacher's), then
    results.json, the summary and the report's text with them in the cost."""
    from .report import make_plots, write_report
    rows, seconds = dict(run.meter.rows), dict(run.meter.seconds)
    with run.meter.at("report"):
        images, failed = make_plots(run.out, summary, run.meter, run.teacher, run.x_test[:run.first],
                                    conditions.rows(run.test_cond, slice(None, run.first)))
    summary["cost"] = with_spent(summary["cost"], {s: v - rows.get(s, 0) for s, v in run.meter.rows.items()},
                                 {s: v - seconds.get(s, 0) for s, v in run.meter.seconds.items()})
    run.save(summary["cost"])
    write_report(run.out, summary, images, failed)


def _per_condition(errors: list, pool: int) -> dict:
    """The spread over the test conditions of a cell's mean error (test noise j has condition j mod pool)."""
    e = torch.tensor(errors, dtype=torch.float64)
    idx = torch.arange(len(e)) % pool
    means = torch.stack([e[idx == c].mean() for c in range(min(pool, len(e)))])
    return {"conditions": len(means), "min": float(means.min()), "median": float(means.median()),
            "max": float(means.max())}


def _best(results: dict, nfes: list[int]) -> dict:
    """Per NFE: the best global schedule (among those scored on the most test noises) and its runner-up,
    the best baseline, and the best per-sample policy where one beats the best global schedule on the
    same noises."""
    best = {}
    for k in nfes:
        ok = [c for c in results.values() if c["nfe"] == k and c["status"] == "ok"]
        if not [c for c in ok if "sigmas" in c]:
            continue
        n = max(c["n"] for c in ok if "sigmas" in c)
        full = sorted((c for c in ok if c["n"] >= n), key=lambda c: c["mean"])
        glob = [c for c in full if "sigmas" in c]
        base = sorted((c for c in ok if "sigmas" in c and c["method"] in BUILTIN_SCHEDULES),
                      key=lambda c: (-c["n"], c["mean"]))
        # beyond rounding: a policy gated back to a global schedule computes it along another path
        policies = [c for c in full if "sigmas" not in c and c["mean"] < glob[0]["mean"] * (1 - 1e-9)]
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
