"""The ``fewstep`` command line: demo, sample, evaluate, optimize."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import conditions, distributed
from .evaluation import evaluate
from .files import write_atomic
from .methods import METHODS, optimize
from .models.info import fingerprint, model_info
from .noises import CALIB_SEED, TEST_SEED, noise
from .sampling import DenoiserError, probe_denoiser, sample
from .schedules import BUILTIN_SCHEDULES, ScheduleLike, load_schedule
from .solvers import PLANNED, SOLVERS
from .teacher import Teacher
from .tuning import all_methods, baseline, tune
from .version import __version__
from .zoo import BUILTIN_CONDITIONS, BUILTIN_MODELS, DEFAULT_MODEL, is_pipeline, load_model, load_pipeline

DEMO_SCHEDULES = ["karras", "logsnr_uniform", "time_uniform", "ays"]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # fewstep sample -o: an image grid, else a torch file


def _ints(text: str) -> list[int]:
    """Comma-separated positive integers and ranges: '4,6,8', '3-6' (3, 4, 5, 6), '3-5,8'."""
    bad = argparse.ArgumentTypeError(f"expected comma-separated positive integers or ranges (4,6,8 or 3-6), got {text!r}")
    values = []
    for part in (v.strip() for v in text.split(",") if v.strip()):
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if dash else lo)
        except ValueError:
            raise bad from None
        if a < 1 or b < a:
            raise bad
        values += range(a, b + 1)
    if not values:
        raise bad
    return sorted(set(values))


def _positive(text: str) -> int:
    """One positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of options, got {text!r}")
    return value


def _names(known):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if names == ["all"]:
            return list(known)
        bad = [v for v in names if v not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)}; known: {', '.join(known)}")
        return names
    return parse


def cache_dir() -> Path:
    """``$FEWSTEP_CACHE`` if set and not empty, else ~/.cache/fewstep."""
    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep")


def _model_id(spec: str, den) -> str:
    """The model's identity for the teacher cache and tune's resume key: the built-in name, the pipeline folder
    or the model file's content hash, and the weights' fingerprint (``models.info.fingerprint``: the guidance
    scale too)."""
    if spec in BUILTIN_MODELS or is_pipeline(spec):
        code = __version__ if spec in BUILTIN_MODELS else "pipeline"
    else:
        code = hashlib.sha1(Path(spec.rpartition(":")[0]).read_bytes()).hexdigest()[:12]
    return f"{spec}@{code}:{fingerprint(den)}"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model ({', '.join(BUILTIN_MODELS)}), a diffusers pipeline folder (save_pretrained; "
                        f"local files only), or path/to/file.py:factory (a function returning a denoiser D(x, sigma)); "
                        f"default {DEFAULT_MODEL}")
    p.add_argument("--prompts", help="for a pipeline folder: a text file of prompts, one per line (the conditions)")
    p.add_argument("--conds", help="for a conditional model: a torch file of conditions (a tensor, or a dict of "
                                   "tensors, one row per condition)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (a pipeline folder, gmm-cond)")
    p.add_argument("--negative-prompt", help="for a pipeline folder: the guidance's negative prompt (default empty)")
    p.add_argument("--shape", type=_ints, help="sample shape for a user model without .shape, e.g. 3,32,32")
    p.add_argument("--sigma-min", type=float, help="smallest positive sigma (default: the model's, else 0.002)")
    p.add_argument("--sigma-max", type=float, help="largest sigma (default: the model's, else 80)")
    p.add_argument("--teacher-steps", type=_positive,
                   help="fixed steps of the teacher's solve (default: as many as its error control needs)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (default: a built-in model on CUDA when available; a user "
                        "model where its factory put it), cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch", type=_positive,
                   help="at most this many rows a network call (larger batches are split; a training step "
                        "back-propagates this many samples at a time): for a model that fills the GPU's memory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def _load(args):
    """(denoiser, its info, the teacher, the pool of conditions or None)."""
    user_auto = args.device == "auto" and args.model not in BUILTIN_MODELS and not is_pipeline(args.model)
    device = None if user_auto else args.device
    if args.prompts and not is_pipeline(args.model):
        raise ValueError(f"--prompts needs a diffusers pipeline folder as --model (one with model_index.json), got "
                         f"{args.model!r}; for another conditional model give --conds")
    if args.prompts and args.conds:
        raise ValueError("give --prompts or --conds, not both")
    if is_pipeline(args.model):
        from .integrations.diffusers import encode_prompts, from_diffusers

        pipe = load_pipeline(args.model, device)
        den = from_diffusers(pipe, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
        pool = encode_prompts(pipe, read_prompts(args.prompts)) if args.prompts else None
    else:
        if args.negative_prompt is not None:
            raise ValueError("--negative-prompt is for a diffusers pipeline folder")
        den, pool = load_model(args.model, device, args.guidance_scale), read_conds(args.conds) if args.conds else None
        if pool is None and args.model in BUILTIN_CONDITIONS:
            pool = BUILTIN_CONDITIONS[args.model]()
            print(f"conditions: {args.model}'s built-in pool of {conditions.length(pool)} (give --conds FILE for "
                  "others)", file=sys.stderr)
    if args.max_batch:
        try:
            den.max_batch = args.max_batch
        except AttributeError:
            raise ValueError(f"--max-batch: the model ({type(den).__name__}) takes no attributes; set max_batch "
                             "in its factory instead") from None
    info = model_info(den, args.shape, args.sigma_min, args.sigma_max)
    conditions.check_model(den, pool)
    probe_denoiser(den, info, pool)
    teacher = Teacher(den, steps=args.teacher_steps, sigma_min=info["sigma_min"], cache_dir=cache_dir(),
                      model_id=_model_id(args.model, den), progress=True, shape=info["shape"],
                      check_cond=conditions.to(pool, info["device"]))  # a conditional model's error check needs them
    return den, info, teacher, pool


def _each(pool, n: int, info: dict):
    """One condition per sample: the pool's rows in turn (None for an unconditional model)."""
    return conditions.to(conditions.cycle(pool, n), info["device"])


def read_prompts(path: str) -> list[str]:
    """The prompts of a text file, one per non-empty line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts file {path} could not be read: {type(e).__name__}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def read_conds(path: str):
    """A pool of conditions from a torch file: a tensor or a dict of tensors, one row per condition."""
    try:
        pool = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing file, or not a torch file (pickle and zip errors alike)
        raise ValueError(f"conditions file {path} could not be read as a torch file: {type(e).__name__}: {e}") from None
    try:
        rows = conditions.length(pool)
    except ValueError as e:
        raise ValueError(f"conditions file {path}: {e}") from None
    if not rows:
        raise ValueError(f"conditions file {path} holds no conditions (0 rows)")
    return pool


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def cmd_demo(args) -> int:
    den, info, teacher, pool = _load(args)
    x = noise(args.n, info["shape"], info["sigma_max"], TEST_SEED, device=info["device"])
    cond = _each(pool, args.n, info)
    teacher.solve(x, info["sigma_max"], cond)
    rows = []
    cells = [(s, sol, k) for k in args.nfe for s in args.schedules for sol in args.solvers]
    for sched_name, solver, k in tqdm(cells, desc="demo", disable=args.json):
        res = evaluate(den, baseline(sched_name, solver, k, info), x=x, teacher=teacher, cond=cond)
        rows.append({"nfe": k, "schedule": sched_name, "solver": solver, **res})
    if args.json:
        print(json.dumps({"model": info["name"], "n": args.n, "seed": TEST_SEED, "rows": rows}, indent=2))
        return 0
    print(f"fewstep {__version__} demo: model {info['name']} {info['shape']}, {args.n} held-out noises "
          f"(seed {TEST_SEED}), RMSE to a {teacher.steps(info['sigma_max'])}-step DEIS teacher; {platform.processor() or platform.machine()}")
    for k in args.nfe:
        sub = [r for r in rows if r["nfe"] == k]
        best = min(sub, key=lambda r: r["mean"])
        print(f"\nNFE {k} (best: {best['schedule']} + {best['solver']}, mean RMSE {best['mean']:.4g})")
        _print_table(sub, ["schedule", "solver", "mean", "median", "p90"] + (["w2"] if "w2" in sub[0] else []))
    return 0


def _load_schedule(args, info) -> ScheduleLike:
    if args.schedule:
        return load_schedule(args.schedule)
    if not args.nfe:
        raise ValueError("give --schedule FILE, or --builtin NAME with --nfe N and --solver S")
    if not args.solver:
        raise ValueError(f"without --schedule the built-in {args.builtin} schedule is sampled (--builtin): "
                         "give its --solver too")
    return baseline(args.builtin, args.solver, args.nfe, info)


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", help="a schedule JSON file (from `fewstep optimize` or Schedule.save), or a "
                                      "per-sample policy .pt file (from `fewstep optimize --method instance`)")
    p.add_argument("--builtin", default="karras", choices=sorted(BUILTIN_SCHEDULES),
                   help="a built-in schedule when no --schedule is given (default karras)")
    p.add_argument("--nfe", type=_positive, help="denoiser calls, with --builtin")
    p.add_argument("--solver", choices=list(SOLVERS), help="solver (default: the one the schedule was made for)")


def cmd_sample(args) -> int:
    output = _output_file(args.output, "samples.pt")
    den, info, _, pool = _load(args)
    sched = _load_schedule(args, info)
    image = output.suffix.lower() in IMAGE_SUFFIXES  # an image model's samples as one grid image
    if image:
        from .report import check_image_shape, save_image_grid  # matplotlib: imported only when needed

        check_image_shape(info["shape"])
    x = noise(args.n, info["shape"], sched.sigma_max, args.seed, device=info["device"])
    cond = _each(pool, args.n, info)
    out = sample(den, x, sched, args.solver, progress=True, cond=cond).cpu()
    sigmas = sched.for_batch(x, cond).sigmas  # [steps + 1(, n)]
    if image:
        save_image_grid(out, output)
    else:
        buf = io.BytesIO()
        torch.save({"samples": out, "sigmas": sigmas.cpu(), "metadata": sched.metadata, "seed": args.seed}, buf)
        write_atomic(output, buf.getvalue())
    print(json.dumps({"output": str(output), "n": args.n, "shape": list(out.shape)}) if args.json
          else f"wrote {args.n} samples of shape {tuple(out.shape[1:])} to {output}")
    return 0


def cmd_evaluate(args) -> int:
    den, info, teacher, pool = _load(args)
    sched = _load_schedule(args, info)
    res = evaluate(den, sched, args.solver, n=args.n, seed=args.seed, teacher=teacher, shape=info["shape"], ci=True,
                   cond=_each(pool, args.n, info))
    res.update({"model": info["name"], "solver": args.solver or sched.solver, "seed": args.seed,
                "sigmas": sched.describe().get("sigmas", "per sample")})
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        lo, hi = res["mean_ci95"]
        print(f"{info['name']}: {res['solver']} on {sched.steps} steps, NFE {res['nfe']}, "
              f"{res['n']} held-out noises (seed {args.seed})")
        print(f"RMSE to teacher: mean {res['mean']:.4g} (95% CI {lo:.4g}-{hi:.4g}), median {res['median']:.4g}, "
              f"p90 {res['p90']:.4g}" + (f"; W2 to the data {res['w2']:.4g} (n={res['w2_n']})" if "w2" in res else ""))
    return 0


def _output_file(output: str, default: str) -> Path:
    """Where ``-o`` writes: the path, or ``default`` in it if it is a folder; its folder must be writable,
    which is checked before any work."""
    path = Path(output)
    path = path / default if path.is_dir() else path
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot write {path}: {path.parent} is not a writable folder")
    return path


def cmd_optimize(args) -> int:
    output = _output_file(args.output, "schedule.json")
    den, info, teacher, pool = _load(args)
    options = args.options or {}
    sched = optimize(den, args.method, args.solver, args.nfe, n=args.n_calib, seed=args.seed, shape=info["shape"],
                     sigma_min=info["sigma_min"], sigma_max=info["sigma_max"], teacher=teacher, progress=True,
                     cond=_each(pool, args.n_calib, info), **options)
    if distributed.rank() != 0:
        return 0
    if output.suffix != sched.SUFFIX:  # a per-sample policy is a torch file
        output = output.with_suffix(sched.SUFFIX)
    sched.save(output)
    prov = sched.metadata.get("provenance", {})
    print(json.dumps({"output": str(output), **sched.describe()}, default=str) if args.json else
          f"wrote {output}: {sched}\n{prov.get('evaluations', {}).get('total')} network evaluations, {prov.get('seconds')} s")
    return 0


def cmd_tune(args) -> int:
    from .report import HEAVY, TAIL, improvement_rows  # matplotlib: imported only when a report is made

    den, info, teacher, pool = _load(args)
    summary = tune(den, nfe=args.nfe, methods=args.methods or "all", solvers=args.solvers or "all",
                   outdir=args.output, quick=args.quick, n_calib=args.n_calib, n_test=args.n_test,
                   shape=info["shape"], sigma_min=info["sigma_min"], sigma_max=info["sigma_max"],
                   teacher=teacher, progress=not args.json, model_id=teacher.model_id, retry_failed=args.retry_failed,
                   budget=args.budget, exhaustive=args.exhaustive, seconds_per_eval=args.seconds_per_eval, conds=pool)
    if distributed.rank() != 0:  # rank 0 wrote the results and prints them
        return 0
    rows, cost = improvement_rows(summary), summary["cost"]
    if args.json:
        print(json.dumps({"output": str(args.output), "best": rows, "cost": cost}, indent=2))
        return 0
    print(f"fewstep tune: {info['name']}; report: {Path(args.output) / 'report.html'}")
    print("network evaluations: " + ", ".join(f"{k} {v:,}" for k, v in cost["evaluations"].items())
          + f"; total {cost['total']:,}" + (f" of a budget of {cost['budget']:,}" if cost["budget"] else ""))
    if not rows:
        print(f"no schedule was scored at any NFE: every cell was skipped, pruned or failed ({Path(args.output) / 'results.json'} says why)")
        return 1
    tail = f"tail{TAIL:.0%}"
    _print_table([{**r, "ci95": f"{r['ci'][0]:.4g}-{r['ci'][1]:.4g}", tail: f"{r['tail']:.0%}"} for r in rows],
                 ["nfe", "winner", "mean", "ci95", "baseline", "base_mean", "ratio", "z", tail])
    heavy = [str(r["nfe"]) for r in rows if r["heavy"]]
    print(f"z: the winner's paired lead over the best baseline in standard errors; {tail}: the share of its mean "
          f"error in its worst {TAIL:.0%} of samples" + (f" (over {HEAVY:.0%} at NFE {', '.join(heavy)}: a few "
                                                         "samples decide there; more test noises settle it, see the "
                                                         "report)" if heavy else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fewstep",
        description="Few-step sampling for pretrained diffusion models: pick the solver and timesteps for "
                    "your model. Models are denoisers D(x, sigma) -> x0 (EDM convention).",
        epilog="Start with `fewstep demo`. Each command has --help.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="held-out error of the built-in schedules with every solver at a few NFE")
    _add_model_args(d)
    d.add_argument("--nfe", type=_ints, default=[4, 6, 8], help="NFE budgets: comma-separated, ranges too (3-6; default 4,6,8)")
    d.add_argument("--solvers", type=_names(PLANNED), default=PLANNED, help="comma-separated, or all")
    d.add_argument("--schedules", type=_names(list(BUILTIN_SCHEDULES)), default=DEMO_SCHEDULES,
                   help=f"comma-separated built-in schedules (default {','.join(DEMO_SCHEDULES)})")
    d.add_argument("--n", type=_positive, default=128, help="held-out noises (default 128)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="generate samples with a schedule and save them (torch .pt, or an image grid)")
    _add_model_args(s)
    _add_schedule_args(s)
    s.add_argument("--n", type=_positive, default=16)
    s.add_argument("--seed", type=int, default=TEST_SEED)
    s.add_argument("-o", "--output", default="samples.pt", help="a torch file (default samples.pt) of the samples, "
                   "sigmas and metadata; .png or .jpg: an image model's samples as one grid image")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="held-out RMSE of a schedule against the teacher")
    _add_model_args(e)
    _add_schedule_args(e)
    e.add_argument("--n", type=_positive, default=256, help="held-out noises (default 256)")
    e.add_argument("--seed", type=int, default=TEST_SEED, help=f"noise seed (default {TEST_SEED}; optimizers use {CALIB_SEED})")
    e.set_defaults(func=cmd_evaluate)

    o = sub.add_parser("optimize", help="optimize a schedule for a model, solver and NFE")
    _add_model_args(o)
    o.add_argument("--method", required=True, choices=sorted(METHODS))
    o.add_argument("--solver", required=True, choices=PLANNED)
    o.add_argument("--nfe", type=_positive, required=True)
    o.add_argument("--n-calib", type=_positive, default=64, help="calibration noises (default 64)")
    o.add_argument("--seed", type=int, default=CALIB_SEED, help=f"calibration seed (default {CALIB_SEED})")
    o.add_argument("--options", type=_json_object, help='method options as JSON, e.g. \'{"coeff": 1.2}\'')
    o.add_argument("-o", "--output", default="schedule.json", help="schedule file, or a folder for schedule.json")
    o.set_defaults(func=cmd_optimize)

    t = sub.add_parser("tune", help="every method x solver x NFE on held-out noises: best schedule per NFE + report")
    _add_model_args(t)
    t.add_argument("--nfe", type=_ints, help="NFE budgets: comma-separated, ranges too (3-6,8; default 4,5,6,8,10; --quick: 5,10)")
    t.add_argument("--methods", type=_names(all_methods()), help="comma-separated methods and baselines (default all)")
    t.add_argument("--solvers", type=_names(PLANNED), help="comma-separated solvers (default all)")
    t.add_argument("--n-calib", type=_positive, help="calibration noises (default 32; --quick 16)")
    t.add_argument("--n-test", type=_positive, help="held-out test noises (default 128; --quick 64)")
    t.add_argument("--quick", action="store_true", help="smaller sizes: NFE 5,10 and fewer noises")
    t.add_argument("--retry-failed", action="store_true", help="on a resumed run, compute the failed cells again")
    t.add_argument("--budget", type=_positive, help="at most this many network evaluations in all, teacher included")
    t.add_argument("--exhaustive", action="store_true", help="every cell on every test noise (no race)")
    t.add_argument("--seconds-per-eval", type=_seconds, help="say what the run costs in hours at this speed")
    t.add_argument("-o", "--output", default="fewstep-out", help="output folder (default fewstep-out); a rerun resumes")
    t.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    distributed.init_from_env()
    try:
        return args.func(args)
    except (ValueError, OSError, DenoiserError, distributed.RankFailure) as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()


if __name__ == "__main__":
    sys.exit(main())
