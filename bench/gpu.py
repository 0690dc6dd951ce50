"""fewstep on a CUDA device: every stage run on the GPU and compared with the same run on the CPU.

    python bench/gpu.py [--quick]

Per stage: whether it ran on CUDA, the largest difference from the CPU result, and seconds on each.
Stages: sampling with every solver (gmm64, float64; digits-unet, float32), the teacher, every optimizer,
evaluate, an instance policy, and the diffusers DDPMPipeline with FewstepScheduler. A failing stage
prints its traceback and the run goes on. Needs a CUDA device (``fewstep tune --device cuda`` is timed
by the command that calls this script, see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

import fewstep
from fewstep.schedules import karras

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROWS: list[tuple] = []


def on_both(name: str, run, compare=None) -> None:
    """run(device) -> result on 'cpu' and 'cuda'; report max |difference| (or ``compare``) and times."""
    try:
        out, sec = {}, {}
        for dev in ("cpu", "cuda"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out[dev] = run(dev)
            torch.cuda.synchronize()
            sec[dev] = time.perf_counter() - start
        diff = compare(out["cpu"], out["cuda"]) if compare else float((out["cpu"] - out["cuda"].cpu()).abs().max())
        ROWS.append((name, "ok", diff, sec["cpu"], sec["cuda"]))
    except Exception:  # a broken stage is reported, the others still run
        ROWS.append((name, "FAILED", float("nan"), float("nan"), float("nan")))
        traceback.print_exc()
    r = ROWS[-1]
    print(f"{r[0]:42} {r[1]:6} diff {r[2]:.3g}  cpu {r[3]:.2f} s  cuda {r[4]:.2f} s", flush=True)


def sigma_diff(a, b) -> float:
    return float((fewstep.schedules.as_schedule(a).sigmas - fewstep.schedules.as_schedule(b).sigmas).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the gmm64 stages")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA device"
    print(describe())
    models = {dev: {"gmm64": fewstep.load_model("gmm64", device=dev)} for dev in ("cpu", "cuda")}
    if not args.quick:
        for dev in ("cpu", "cuda"):
            models[dev]["digits-unet"] = fewstep.load_model("digits-unet", device=dev)
    for name, den in models["cuda"].items():
        print(f"{name}: model_info device {fewstep.models.model_info(den)['device']}")
    x = {name: fewstep.noise(64, den.shape, den.sigma_max, 1) for name, den in models["cpu"].items()}

    for name in models["cpu"]:
        den = models["cpu"][name]
        for solver in fewstep.solvers.PLANNED:
            steps, opts = fewstep.plan(solver, 6)
            sched = karras(steps, den.sigma_min, den.sigma_max).with_metadata(solver_options=opts)
            on_both(f"{name} sample {solver} nfe 6",
                    lambda dev: fewstep.sample(models[dev][name], x[name].to(dev), sched, solver))
        on_both(f"{name} teacher (512 Heun steps)",
                lambda dev: fewstep.Teacher(models[dev][name], sigma_min=den.sigma_min).solve(x[name].to(dev)))

    name = "gmm64"
    teachers = {dev: fewstep.Teacher(models[dev][name], sigma_min=models[dev][name].sigma_min) for dev in ("cpu", "cuda")}
    small = {"gits": {"grid": 24}, "oss": {"grid": 24}, "sdm": {}, "ld3": {"oss_grid": 24, "iters": 20},
             "instance": {"oss_grid": 24, "ld3_iters": 10, "iters": 10, "policy": "auto"}}
    for method, opts in small.items():
        for solver in ("euler", "dpmpp_2m", "heun") if method in ("oss", "sdm") else ("ipndm",):
            nfe = 6 if solver != "heun" else 8
            made = {}

            def run(dev, method=method, solver=solver, nfe=nfe, opts=opts):
                made[dev] = fewstep.optimize(models[dev][name], method, solver, nfe, n=32, teacher=teachers[dev], **opts)
                return made[dev]

            compare = sigma_diff
            if method == "instance":
                compare = lambda a, b: float((a.sigmas_for(x[name]) - b.sigmas_for(x[name])).abs().max())  # noqa: E731
            on_both(f"{name} optimize {method} {solver} nfe {nfe}", run, compare)
            if "cuda" in made:
                on_both(f"{name} evaluate {method} {solver} (mean RMSE)",
                        lambda dev: torch.tensor(fewstep.evaluate(models[dev][name], made["cuda"], x=x[name].to(dev),
                                                                  teacher=teachers[dev])["mean"]))

    if not args.quick:
        try:
            from diffusers import DDPMPipeline
        except ImportError as e:
            print(f"diffusers not importable here ({e}): pipeline stage skipped")
            DDPMPipeline = None
        if DDPMPipeline is not None:
            def pipeline(dev):
                den = models[dev]["digits-unet"]
                unet = den.model.net
                config = json.loads((fewstep.zoo.ASSETS / "digits-unet" / "scheduler" /
                                     "scheduler_config.json").read_text())
                sched = karras(5, 0.02, 80.0)
                pipe = DDPMPipeline(unet=unet, scheduler=fewstep.FewstepScheduler.from_schedule(sched, config, solver="dpmpp_2m"))
                pipe.set_progress_bar_config(disable=True)
                return pipe(batch_size=8, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                            output_type="pt").images
            on_both("digits-unet DDPMPipeline + FewstepScheduler", pipeline)

    failed = [r[0] for r in ROWS if r[1] != "ok"]
    print(f"\n{len(ROWS) - len(failed)} of {len(ROWS)} stages ran on CUDA; failed: {failed or 'none'}")
    print(f"largest CPU/CUDA difference among float64 gmm64 sampling stages: "
          f"{max((r[2] for r in ROWS if r[0].startswith('gmm64 sample') and r[1] == 'ok'), default=math.nan):.3g}")


if __name__ == "__main__":
    main()
