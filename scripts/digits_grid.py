"""Grids of samples from the shipped networks (docs/img/digits_models.png, docs/img/digits_cond.png: docs/models.md).

    OMP_NUM_THREADS=1 python scripts/digits_grid.py [--out docs/img/digits_models.png]
    OMP_NUM_THREADS=1 python scripts/digits_grid.py --cond [--out docs/img/digits_cond.png]

Panels: 64 training digits; then for 'digits-unet' and 'digits-flow' the same 64 noises solved with
Heun on 40 Karras steps (79 network calls) and with DPM-Solver++(2M) on 6 Karras steps (6 calls).
With --cond: 'digits-cond', one row per class 0-9 on the same 8 noises, at guidance 0 (unconditional),
1 and 3 with Heun on 40 Karras steps, and at guidance 3 with DPM-Solver++(2M) on 6 Karras steps.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fewstep  # noqa: E402
from fewstep.files import write_atomic
from fewstep.schedules import karras  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tile(x: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """[n, 1, h, w] in [-1, 1] -> one [rows * (h + 1), cols * (w + 1)] image in [0, 1]."""
    n, _, h, w = x.shape
    canvas = torch.zeros((n + cols - 1) // cols * (h + 1), cols * (w + 1))
    for i, img in enumerate(((x[:, 0] + 1) / 2).clamp(0, 1)):
        r, c = divmod(i, cols)
        canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
    return canvas


def model_panels(seed: int) -> list:
    from sklearn.datasets import load_digits

    panels = [("training data", torch.tensor(load_digits().images[:64], dtype=torch.float32)[:, None] / 8 - 1)]
    with torch.no_grad():
        for name in ("digits-unet", "digits-flow"):
            den = fewstep.load_model(name)
            x = fewstep.noise(64, den.shape, den.sigma_max, seed=seed).float()
            for solver, steps, label in (("heun", 40, "Heun, 79 calls"), ("dpmpp_2m", 6, "DPM++(2M), 6 calls")):
                sched = karras(steps, den.sigma_min, den.sigma_max)
                panels.append((f"{name}\n{label}", fewstep.sample(den, x, sched, solver)))
    return panels


def class_panels(seed: int) -> list:
    """digits-cond: rows are the classes 0-9, columns the same 8 noises."""
    from fewstep.zoo import digits_cond

    panels, labels = [], {"class_labels": torch.arange(10).repeat_interleave(8)}
    with torch.no_grad():
        for w, solver, steps, label in ((0.0, "heun", 40, "Heun, 79 calls"), (1.0, "heun", 40, "Heun, 79 calls"),
                                        (3.0, "heun", 40, "Heun, 79 calls"), (3.0, "dpmpp_2m", 6, "DPM++(2M), 6 calls")):
            den = digits_cond(w)
            x = fewstep.noise(8, den.shape, den.sigma_max, seed=seed).float().repeat(10, 1, 1, 1)
            sched = karras(steps, den.sigma_min, den.sigma_max)
            panels.append((f"guidance {w:g}\n{label}", fewstep.sample(den, x, sched, solver, cond=labels)))
    return panels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cond", action="store_true", help="digits-cond's classes at several guidance scales")
    p.add_argument("--out")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    out = args.out or str(ROOT / "docs" / "img" / ("digits_cond.png" if args.cond else "digits_models.png"))
    panels = class_panels(args.seed) if args.cond else model_panels(args.seed)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    for ax, (title, imgs) in zip(axes, panels):
        ax.imshow(tile(imgs, 8), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    print(f"wrote {write_atomic(out, buf.getvalue())}")


if __name__ == "__main__":
    main()
