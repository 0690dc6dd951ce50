"""Train fewstep's shipped networks on scikit-learn's digits (8x8, pixels scaled to [-1, 1]).

Three tiny diffusers ``UNet2DModel`` denoisers of the same data, saved the way diffusers saves models:
- ``digits-unet``: VP / DDPM, epsilon prediction, linear betas 1e-4..0.02 over 1000 steps
  (Ho et al. 2020, Alg. 1), with a ``DDPMScheduler`` config;
- ``digits-flow``: rectified flow, x_t = (1 - t) x0 + t n, target v = n - x0, t ~ U(0, 1), fed to the
  network as t * 1000 (Liu et al. 2022; as SD3 / Flux), with a ``FlowMatchEulerDiscreteScheduler`` config;
- ``digits-cond``: as ``digits-unet``, class-conditional (``class_labels`` 0-9, and 10 the null label each
  label is replaced by with probability 0.1, so one network gives both terms of classifier-free guidance:
  Ho & Salimans 2022, Alg. 1).
Each folder gets ``unet/``, ``scheduler/`` and ``training.json`` (seed, settings, versions, loss curve).
The weights saved are an exponential moving average of the training weights.

    OMP_NUM_THREADS=1 python scripts/train_digits.py            # all three, ~7 min each on one CPU core
    OMP_NUM_THREADS=1 python scripts/train_digits.py --which flow --steps 200 --out /tmp/try
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "assets"

# Small on purpose: a forward of 64 digits takes ~5 ms on one CPU thread, so that `fewstep tune` (thousands of
# calls per cell) runs in minutes. At 8x8 the convolutions dominate; a mid block or attention costs more than it gives.
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    mid_block_type=None, add_attention=False, norm_num_groups=4, time_embedding_dim=64,
)
DDPM_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                   prediction_type="epsilon", clip_sample=False)
FLOW_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
OBJECTIVES = {"unet": "ddpm_epsilon", "flow": "rectified_flow_velocity",
              "cond": "ddpm_epsilon, class_labels 0-9 dropped to the null label 10 with probability 0.1"}
NULL_LABEL, P_UNCOND = 10, 0.1  # digits-cond: the null class, and how often a label is dropped to it


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 images [n, 1, 8, 8] in [-1, 1] and their digits [n]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(d.target)


def ddpm_loss(unet, x0, g, alphas_cumprod, labels=None):
    """Ho et al. 2020, Alg. 1: || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2; with labels,
    each dropped to the null label with probability P_UNCOND (Ho & Salimans 2022, Alg. 1)."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    if labels is None:
        return (unet(x_t, t).sample - eps).pow(2).mean()
    labels = torch.where(torch.rand(labels.shape, generator=g) < P_UNCOND, NULL_LABEL, labels)
    return (unet(x_t, t, class_labels=labels).sample - eps).pow(2).mean()


def flow_loss(unet, x0, g, num_train_timesteps):
    """Rectified flow (Liu et al. 2022): || (n - x0) - v_theta((1 - t) x0 + t n, t) ||^2, t ~ U(0, 1)."""
    t = torch.rand(x0.shape[0], generator=g)
    n = torch.randn(x0.shape, generator=g)
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * n
    return (unet(x_t, t * num_train_timesteps).sample - (n - x0)).pow(2).mean()


def setup(which: str, g: torch.Generator):
    """(unet, scheduler, loss(x0, labels)) for one of the shipped models."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    unet = UNet2DModel(**UNET_CONFIG, **({"num_class_embeds": NULL_LABEL + 1} if which == "cond" else {}))
    if which == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_CONFIG)
        return unet, scheduler, lambda x0, y: flow_loss(unet, x0, g, FLOW_CONFIG["num_train_timesteps"])
    scheduler = DDPMScheduler(**DDPM_CONFIG)
    ac = scheduler.alphas_cumprod.float()
    return unet, scheduler, lambda x0, y: ddpm_loss(unet, x0, g, ac, y if which == "cond" else None)


def train(which: str, args, data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    unet, scheduler, loss_fn = setup(which, g)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    # linear warm-up, then cosine decay to 0
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps))))
    curve, window, t0 = [], [], time.time()
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, data[0].shape[0], (args.batch,), generator=g)
        loss = loss_fn(data[0][pick], data[1][pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(window) / len(window)
            curve.append([step, mean])
            print(f"[{which}] step {step:5d}  loss {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
            window = []
    wall = time.time() - t0
    out = Path(args.out) / f"digits-{which}"
    ema.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    import diffusers

    record = {
        "model": f"digits-{which}", "objective": OBJECTIVES[which],
        "data": "sklearn.datasets.load_digits images / 8 - 1, shape [1797, 1, 8, 8]",
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema,
        "optimizer": "AdamW(weight_decay=0), grad clip 1.0, linear warm-up then cosine decay",
        "unet_config": dict(unet.config), "scheduler_config": FLOW_CONFIG if which == "flow" else DDPM_CONFIG,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "final_loss": curve[-1][1], "loss_curve": curve, "wall_seconds": round(wall, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "command": " ".join(["python"] + sys.argv),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[{which}] saved {out} (final loss {curve[-1][1]:.4f}, {wall:.0f}s)", flush=True)
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--which", choices=["unet", "flow", "cond", "all"], default="all")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=str(ASSETS))
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True, warn_only=True)
    data = digits_data()
    for which in (["unet", "flow", "cond"] if args.which == "all" else [args.which]):
        train(which, args, data)


if __name__ == "__main__":
    main()
