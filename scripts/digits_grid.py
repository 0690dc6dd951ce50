"""Grid of samples from the shipped networks (docs/img/digits_models.png, shown in docs/models.md).

    OMP_NUM_THREADS=1 python scripts/digits_grid.py [--out docs/img/digits_models.png]

Panels: 64 training digits; then for 'digits-unet' and 'digits-flow' the same 64 noises solved with
Heun on 40 Karras steps (79 network calls) and with DPM-Solver++(2M) on 6 Karras steps (6 calls).
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "digits_models.png"))
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    from sklearn.datasets import load_digits

    panels = [("training data", torch.tensor(load_digits().images[:64], dtype=torch.float32)[:, None] / 8 - 1)]
    with torch.no_grad():
        for name in ("digits-unet", "digits-flow"):
            den = fewstep.load_model(name)
            x = fewstep.noise(64, den.shape, den.sigma_max, seed=args.seed).float()
            for solver, steps, label in (("heun", 40, "Heun, 79 calls"), ("dpmpp_2m", 6, "DPM++(2M), 6 calls")):
                sched = karras(steps, den.sigma_min, den.sigma_max)
                panels.append((f"{name}\n{label}", fewstep.sample(den, x, sched, solver)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    for ax, (title, imgs) in zip(axes, panels):
        ax.imshow(tile(imgs), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    print(f"wrote {write_atomic(args.out, buf.getvalue())}")


if __name__ == "__main__":
    main()
