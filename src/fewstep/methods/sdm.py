"""SDM: Wasserstein-bounded timesteps, N-step resampling and the adaptive-order gate.

After "Formalizing the Sampling Design Space of Diffusion-Based Generative Models via Adaptive Solvers
and Wasserstein-Bounded Timesteps" (arXiv 2602.12624; reference code aiimaginglab/sdm,
``modules/sampler.py``, ``modules/utils.py``). See docs/methods/sdm.md.

1. ``search``: walk the calibration batch from sigma_max to sigma_min with Euler steps whose local
   error bound 1/2 h^2 S stays under eta(sigma); S is the secant size of the drift's change, the RMS of
   the per-sample secants over the batch (a W2 bound; the reference's batch mean bounds W1).
2. ``resample``: put exactly ``steps`` nodes uniformly in the cumulative weight eta_i^power (sigma_max/sigma_i)^q,
   mapped back by a monotone PCHIP in u = sigma^(1/rho); a final step to 0 is appended.
3. ``gate``: per step, order 1 until the curvature proxy kappa reaches tau, then the solver's full
   order (one-way), last step first order. Measured on the calibration batch, the decisions are stored
   as ``solver_options['orders']`` so sampling spends a fixed, known NFE; ``sample_adaptive`` runs the
   gate online instead and reports the calls it spent.

Norms are per-dimension RMS (a dimension-free tolerance); the reference uses whole-sample L2 norms,
so its eta values equal ours times sqrt(dim) (``norm="l2"`` reproduces them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..metrics import rmse
from ..sampling import CheckedDenoiser, nfe as count_nfe, sample
from ..schedules import RHO, Schedule, polynomial
from ..solvers import get_solver, plan
from .base import Calibration, register

# The reference's defaults (eta 0.02 / 0.20 with whole-sample L2 norms, used for its 64x64x3 data
# sets FFHQ and AFHQv2) in per-dimension RMS units: divided by sqrt(3 * 64 * 64).
REF_DIM = 3 * 64 * 64
ETA_MIN, ETA_MAX, ETA_P = 0.02 / math.sqrt(REF_DIM), 0.20 / math.sqrt(REF_DIM), 1.0
GAMMA, C_SHRINK, MAX_EXPAND, MAX_SHRINK = 0.95, 0.5, 2, 2
POWER, Q = 0.5, 0.25
# Noises the switch is chosen on (the calibration batch, extended with seeded noises): a switch that
# keeps long first-order steps at high noise can send ~1% of samples to another mode; 256 noises see
# such an event with probability 1 - 0.99^256 = 92%, 64 with 47% (docs/methods/sdm.md).
GATE_SAMPLES = 256



def _norms(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of v: RMS over dimensions ('rms') or the whole-sample L2 norm ('l2', reference)."""
    n = v.reshape(v.shape[0], -1).norm(dim=1)
    return n / math.sqrt(v[0].numel()) if norm == "rms" else n


def _batch(n: torch.Tensor, batch: str) -> float:
    """One secant for the batch from per-sample norms: RMS ('rms', the W2 coupling bound
    W2 <= sqrt(E_b |e_b|^2)) or the mean ('mean', the reference's, a W1 bound)."""
    return float(n.square().mean().sqrt()) if batch == "rms" else float(n.mean())


def eta_of(sigma: float, sigma_max: float, eta_min: float, eta_max: float, eta_p: float) -> float:
    """Tolerance eta(sigma) = eta_min + (eta_max - eta_min) (sigma / sigma_max)^p (SDM, Sec. 4)."""
    r = min(max(sigma / sigma_max, 0.0), 1.0)
    return eta_min + (eta_max - eta_min) * r ** eta_p


def _trial(model: Callable, x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_min: float, grid: list[float],
           eta: float, norm: str, batch: str, c_shrink: float, max_expand: int, max_shrink: int) -> tuple[float, float]:
    """The trial steps from ``sigma`` (reference: ``sdm_scheduler``): down to the next grid node, expanded
    (to 2, 4 nodes) while 1/2 h^2 S <= eta, shrunk by ``c_shrink`` while not. Returns (S, h_floor): the
    secant size of the last accepted trial and its length (a rejected search: the last S and 0)."""
    k = next((i for i in range(len(grid) - 1) if grid[i + 1] < sigma), len(grid) - 2)
    delta = min(sigma - sigma_min, sigma - grid[k + 1])  # trial: down to the next grid node
    best, last, expand, shrink, prev = None, None, 0, 0, None
    while True:
        s_try = min(max(sigma - delta, sigma_min), sigma)
        if s_try == prev:
            break
        prev, h = s_try, sigma - s_try
        d_try = (x - h * d - model(x - h * d, torch.tensor(s_try, dtype=torch.float64))) / s_try
        s_hat = _batch(_norms(d_try - d, norm), batch) / h  # secant estimate of |dd/dsigma|
        last = (s_hat, h)
        if 0.5 * h * h * s_hat <= eta:
            best = last
            nxt = k + 2 ** (expand + 1)
            if expand >= max_expand or shrink or nxt > len(grid) - 1:
                break
            new = min(sigma - sigma_min, sigma - grid[nxt])
            if new <= delta * (1 + 1e-15):
                break
            delta, expand = new, expand + 1
        elif shrink < max_shrink:
            delta, shrink = c_shrink * delta, shrink + 1
        else:
            break
    return best if best is not None else (last[0], 0.0)


@torch.no_grad()
def search(model: Callable, x: torch.Tensor, sigma_min: float, sigma_max: float, *, eta_min: float = ETA_MIN,
           eta_max: float = ETA_MAX, eta_p: float = ETA_P, grid_points: int = 40, rho: float = RHO,
           norm: str = "rms", batch: str = "rms", gamma: float = GAMMA, c_shrink: float = C_SHRINK,
           max_expand: int = MAX_EXPAND, max_shrink: int = MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wasserstein-bounded step search on the batch ``x`` (states at sigma_max).

    Returns the path sigma_max > ... > sigma_min, eta_i = 1/2 h_i^2 S_i measured on each of its
    intervals (the drift at the end of an interval is the next step's drift, so this costs no extra
    call but the one at sigma_min), and T_i, the size of the drift's second derivative on each
    interval (batch aggregate of the second differences of the drifts along the path, averaged over the
    interval's two nodes), which sets a second-order step's error. Reference: ``sdm_scheduler`` in
    modules/sampler.py (eta and the path; T is fewstep's, for ``resample_orders``).
    """
    grid = polynomial(grid_points - 1, sigma_min, sigma_max, rho, final_zero=False).sigmas.tolist()
    sigma, path, etas, second = sigma_max, [sigma_max], [], []
    d_prev = sec_prev = h_before = None
    while True:
        d = (x - model(x, torch.tensor(sigma, dtype=torch.float64))) / sigma
        if d_prev is not None:  # eta actually spent on the step just taken
            h_prev = path[-2] - sigma
            etas.append(0.5 * h_prev * _batch(_norms(d - d_prev, norm), batch))
            sec = (d - d_prev) / h_prev
            if sec_prev is not None:  # |d''| at the node between the last two intervals
                second.append(_batch(_norms(sec - sec_prev, norm), batch) / (0.5 * (h_prev + h_before)))
            sec_prev, h_before = sec, h_prev
        if sigma <= sigma_min * (1 + 1e-12):
            break
        eta = eta_of(sigma, sigma_max, eta_min, eta_max, eta_p)
        s_hat, h_floor = _trial(model, x, d, sigma, sigma_min, grid, eta, norm, batch, c_shrink, max_expand,
                                max_shrink)
        # Step 0.95 sqrt(2 eta / S), never shorter than an accepted trial. The reference also keeps
        # a rejected trial as floor, which breaks the bound; here a rejected search uses S alone.
        h = min(max(gamma * math.sqrt(2 * eta / max(s_hat, 1e-30)), h_floor), sigma - sigma_min)
        s_next = sigma_min if sigma - h <= sigma_min * (1 + 1e-12) else sigma - h
        x = x + (s_next - sigma) * d
        sigma, d_prev = s_next, d
        path.append(sigma)
    nodes = torch.tensor(second[:1] + second + second[-1:] if second else [0.0] * (len(etas) + 1), dtype=torch.float64)
    return (torch.tensor(path, dtype=torch.float64), torch.tensor(etas, dtype=torch.float64),
            0.5 * (nodes[:-1] + nodes[1:]))


def resample(path: torch.Tensor, etas: torch.Tensor, steps: int, power: float = POWER, q: float = Q,
             rho: float = RHO) -> torch.Tensor:
    """``steps`` nodes from sigma_max to sigma_min, uniform in C = cumsum(eta_i^power (sigma_0 / sigma_i)^q),
    through a monotone PCHIP of u = sigma^(1/rho) against C, then 0 appended: ``steps`` steps.

    Reference: ``resample_sigmas_uniform_cum_eta`` in modules/utils.py (sigma_i = interval's lower end).
    """
    from scipy.interpolate import PchipInterpolator

    if int(steps) != steps or steps < 2:
        raise ValueError(f"resampling needs steps >= 2 (sigma_max, sigma_min, then 0), got {steps!r}")
    if len(path) < 2 or len(etas) != len(path) - 1:
        raise ValueError(f"need a path of >= 2 sigmas and one eta per interval, got {len(path)} and {len(etas)}")
    w = etas.clamp_min(0) ** power * (path[0] / path[1:]) ** q
    w = w.clamp_min(1e-12 * float(w.max().clamp_min(1e-300)))  # keep C strictly increasing
    c = torch.cat([w.new_zeros(1), w.cumsum(0)])
    u = path ** (1 / rho)
    f = PchipInterpolator(c.numpy(), u.numpy())
    new = torch.as_tensor(f(torch.linspace(0, float(c[-1]), steps, dtype=torch.float64).numpy())) ** rho
    new[0], new[-1] = path[0], path[-1]
    return torch.cat([new, new.new_zeros(1)])


def resample_orders(path: torch.Tensor, etas: torch.Tensor, second: torch.Tensor, low: int, high: int,
                    power: float = POWER, q: float = Q, rho: float = RHO) -> torch.Tensor:
    """``low`` first-order steps from sigma_max, then ``high`` second-order steps down to sigma_min,
    then the step to 0, each part equidistributing its own order's local error (fewstep's extension).

    A first-order step of weight W = sum eta_i^power errs by W^(1/power) (W^2 at power 1/2: 1/2 H^2 S);
    a second-order (Heun, trapezoidal) step of weight W = sum (T_i / 12)^(1/3) h_i errs by W^3
    (H^3 T / 12). Both weights carry the tilt (sigma_max / sigma_i)^q. The split sigma* gives the two
    parts equal error per step; each part's nodes are uniform in its cumulative weight, mapped back by
    a monotone PCHIP in u = sigma^(1/rho). ``high`` = 0 is ``resample``'s schedule.
    """
    from scipy.interpolate import PchipInterpolator

    if high == 0:
        return resample(path, etas, low + 1, power, q, rho)
    tilt = (path[0] / path[1:]) ** q
    w1 = etas.clamp_min(0) ** power * tilt
    w2 = (second.clamp_min(0) / 12) ** (1 / 3) * (path[:-1] - path[1:]) * tilt
    floor = 1e-12 * float(torch.cat([w1, w2]).max().clamp_min(1e-300))
    w1, w2 = w1.clamp_min(floor), w2.clamp_min(floor)  # keep both cumulative weights strictly monotone
    above = torch.cat([w1.new_zeros(1), w1.cumsum(0)])  # first-order weight above each path node
    below = torch.cat([w2.flip(0).cumsum(0).flip(0), w2.new_zeros(1)])  # second-order weight below it
    gap = ((above / max(low, 1)) ** (1 / power) if low else torch.zeros_like(above)) - (below / high) ** 3
    k = int((gap >= 0).nonzero()[0]) if low else 0  # first node where the first-order part errs more
    t = 0.0 if k == 0 else float(-gap[k - 1] / (gap[k] - gap[k - 1]))
    u, i = path ** (1 / rho), max(k - 1, 0)
    u_split, a_split, b_split = (float(v[i] + t * (v[k] - v[i])) for v in (u, above, below))  # at the split
    top = PchipInterpolator(above.numpy(), u.numpy())(torch.linspace(0, a_split, low + 1, dtype=torch.float64).numpy())
    bottom = PchipInterpolator(below.flip(0).numpy(), u.flip(0).numpy())(
        torch.linspace(b_split, 0, high + 1, dtype=torch.float64).numpy())
    new = torch.as_tensor(list(top[:-1]) + [u_split] + list(bottom[1:]), dtype=torch.float64) ** rho
    new[0], new[-1] = path[0], path[-1]
    return torch.cat([new, new.new_zeros(1)])


def _gate_run(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, solver: str, tau: float,
              **options: Any) -> tuple[torch.Tensor, list[int], list[float]]:
    """Run ``solver`` with the online gate; returns (x, per-step orders used, per-step kappa).

    kappa_i = mean_b ||d_i - d_{i-1}|| / (|sigma_i - sigma_{i-1}| ||d_{i-1}||), kappa_0 = 0, with
    d = (x - D(x, sigma)) / sigma at each step's start (reference: ``sdm_solver``, modules/sampler.py).
    The order is 1 until kappa >= tau, then the solver's full order; the last step is first order.
    The solvers read ``orders[i]`` after step i's first call, so the callback decides it in time.
    """
    spec = get_solver(solver)
    high = spec.max_order(options)
    steps = len(sigmas) - 1
    orders, kappas, state = [1] * steps, [0.0] * steps, {"d": None, "on": False}

    def gate(info: dict) -> None:
        i, s = info["i"], info["sigma"]
        d = (info["x"] - info["denoised"]) / s
        if state["d"] is not None:
            dp = state["d"]
            k = _norms(d - dp, "l2") / (_norms(dp, "l2").clamp_min(1e-30) * abs(float(sigmas[i - 1] - s)) + 1e-12)
            kappas[i] = float(k.mean())
        state["on"] = state["on"] or kappas[i] >= tau
        orders[i] = high if state["on"] and i < steps - 1 else 1
        state["d"] = d

    x = spec.fn(model, x, sigmas, callback=gate, **{**spec.options, **options, "orders": orders})
    return x, orders, kappas


@torch.no_grad()
def sample_adaptive(denoiser: Callable, x: torch.Tensor, schedule: Any, solver: str | None = None,
                    tau: float | None = None, **options: Any) -> tuple[torch.Tensor, int]:
    """Sample with the online gate (the reference's ``sdm_solver``): the order is decided per step
    from this batch's own kappa, so the NFE is known only afterwards. Returns (x, calls spent).

    ``solver`` and ``tau`` default to those stored by ``optimize(method="sdm")`` in the schedule.
    """
    sched = schedule if isinstance(schedule, Schedule) else Schedule(schedule)
    solver = solver or sched.solver or "heun"
    stored = sched.metadata.get("sdm") or {}
    if tau is None and "switch" in stored:  # a stored tau of None: the gate never switched
        tau = math.inf if stored["tau"] is None else stored["tau"]
    if tau is None or not tau >= 0:
        raise ValueError(f"tau must be a number >= 0 (or stored in the schedule by optimize), got {tau!r}")
    model = CheckedDenoiser(denoiser)
    opts = {k: v for k, v in {**sched.solver_options, **options}.items() if k != "orders"}
    x, _, _ = _gate_run(model, x, sched.sigmas.to(x.device), solver, float(tau), **opts)
    return x, model.calls


def _switch_candidates(kappas: list[float], tau: float | None) -> dict[int, float]:
    """Switch step -> the threshold that makes the gate switch there (first i with kappa_i >= tau).

    With tau given, the one switch it makes; otherwise every step whose kappa is a new maximum (the
    switches some tau can make; tau = kappa there), and "never" (index len, tau = inf).
    """
    n = len(kappas)
    if tau is not None:
        return {next((i for i, k in enumerate(kappas[:-1]) if k >= tau), n): tau}
    out, top = {n: math.inf}, -math.inf
    for i, k in enumerate(kappas[:-1]):
        if k > top:
            out[i], top = k, k
    return out


@dataclass(frozen=True)
class Options:
    """SDM's options (the module docstring and docs/methods/sdm.md explain each part).

    Search: the tolerance eta(sigma) from ``eta_min`` to ``eta_max`` with exponent ``eta_p``, the trial
    grid of ``grid_points`` polynomial(``rho``) nodes, per-sample ``norm`` 'rms' (per dimension) or 'l2'
    (whole sample, the reference's), batch aggregate ``batch`` 'rms' (a W2 bound) or 'mean' (the
    reference's, W1), and the step rule's ``gamma``, ``c_shrink``, ``max_expand``, ``max_shrink``.
    Resampling: weights eta^``power`` tilted by (sigma_max / sigma)^``q``; ``resampling`` 'euler' (the
    reference's, every step placed by the first-order error), 'orders' (second-order steps by their own
    error model) or 'both' (the gate is offered both). Gate: with ``gate`` (default), the per-step
    orders of the adaptive solver are measured on the calibration batch and stored; ``tau=None`` picks,
    among the switches a threshold can make, the one with the lowest error to the teacher on
    ``gate_samples`` noises (the first of the batch, or the batch extended with seeded ones; kappa is
    measured on the first ``gate_samples`` of the batch), and stores tau = kappa at that step; ``switch`` fixes the step at which the
    higher order starts (e.g. 1: first order on the first step only, as the reference's small tau does).
    ``search_samples``: the search walks the first that many calibration noises (default: all of them).
    """

    eta_min: float = ETA_MIN
    eta_max: float = ETA_MAX
    eta_p: float = ETA_P
    power: float = POWER
    q: float = Q
    tau: float | None = None
    switch: int | None = None
    gate: bool = True
    gate_samples: int = GATE_SAMPLES
    resampling: str = "both"
    grid_points: int = 40
    rho: float = RHO
    norm: str = "rms"
    batch: str = "rms"
    gamma: float = GAMMA
    c_shrink: float = C_SHRINK
    max_expand: int = MAX_EXPAND
    max_shrink: int = MAX_SHRINK
    search_samples: int | None = None

    def __post_init__(self):
        _check(self)

    def search_settings(self) -> dict:
        """The options the step search depends on (``search``'s keywords)."""
        keep = ("eta_min", "eta_max", "eta_p", "grid_points", "rho", "norm", "batch", "gamma", "c_shrink",
                "max_expand", "max_shrink")
        return {k: v for k, v in asdict(self).items() if k in keep}


def _check(o: Options) -> None:
    if not 0 < o.eta_min <= o.eta_max:
        raise ValueError(f"need 0 < eta_min <= eta_max, got eta_min={o.eta_min}, eta_max={o.eta_max}")
    if o.tau is not None and not o.tau >= 0:
        raise ValueError(f"tau must be >= 0 (or None to choose it from the calibration batch), got {o.tau}")
    if o.switch is not None and (int(o.switch) != o.switch or o.switch < 0 or o.tau is not None):
        raise ValueError(f"switch must be a step index >= 0, and not given with tau; got switch={o.switch!r}, "
                         f"tau={o.tau!r}")
    if o.resampling not in ("orders", "euler", "both"):
        raise ValueError(f"resampling must be 'orders', 'euler' (the reference's) or 'both', got {o.resampling!r}")
    if int(o.gate_samples) != o.gate_samples or o.gate_samples < 1:
        raise ValueError(f"gate_samples must be a positive integer, got {o.gate_samples!r}")
    if o.norm not in ("rms", "l2"):
        raise ValueError(f"norm must be 'rms' (per dimension) or 'l2' (whole sample, the reference's), got {o.norm!r}")
    if o.batch not in ("rms", "mean"):
        raise ValueError(f"batch must be 'rms' (W2 bound over the batch) or 'mean' (the reference's), got {o.batch!r}")
    if int(o.grid_points) != o.grid_points or o.grid_points < 2:
        raise ValueError(f"grid_points must be an integer >= 2, got {o.grid_points!r}")
    if o.search_samples is not None and (int(o.search_samples) != o.search_samples or o.search_samples < 1):
        raise ValueError(f"search_samples must be a positive integer or None, got {o.search_samples!r}")
    if o.power <= 0 or o.q < 0 or o.eta_p <= 0 or o.rho <= 0:
        raise ValueError(f"need power > 0, q >= 0, eta_p > 0, rho > 0; got {o.power}, {o.q}, {o.eta_p}, {o.rho}")


def _candidates(ctx: Calibration, solver: str, nfe: int, o: Options, path, etas, second, high: int) -> list:
    """(sigmas, orders, switch, tau, kappas) of every gated schedule that spends exactly ``nfe`` calls:
    each step count a two-call solver can spend them on, each switch a threshold can make (or the given
    one), with the Euler-resampled sigmas and (``resampling``) the order-consistent ones."""
    two_stage, gate = get_solver(solver).calls_per_step == 2, ctx.subset(slice(None, o.gate_samples))  # kappa's noises
    lo = (nfe + 2) // 2 if two_stage else nfe  # Heun: fewest steps (first and last steps first order)
    candidates = []
    for steps in range(lo, nfe + 1) if two_stage else [nfe]:
        sigmas = resample(path, etas, steps, o.power, o.q, o.rho)
        _, _, kappas = _gate_run(gate.denoiser, gate.x, sigmas, solver, math.inf)  # kappa before any switch
        switches = (_switch_candidates(kappas, o.tau) if o.switch is None
                    else {int(o.switch): kappas[int(o.switch)] if int(o.switch) < steps else math.inf})
        for j, t in switches.items():
            orders = [1] * min(j, steps) + [high] * max(steps - 1 - j, 0) + [1] * (j < steps)
            if count_nfe(Schedule(sigmas), solver, orders=orders) != nfe:
                continue
            if two_stage and o.resampling in ("orders", "both") and o.tau is None and 0 < steps - 1 - j:
                # the second-order steps placed by their own error model; kept if the gate, measured
                # on these sigmas, still switches at j (so the online gate reproduces it)
                mixed = resample_orders(path, etas, second, j, steps - 1 - j, o.power, o.q, o.rho)
                _, _, k_mixed = _gate_run(gate.denoiser, gate.x, mixed, solver, math.inf)
                found = _switch_candidates(k_mixed, None) if o.switch is None else {j: k_mixed[j]}
                if j in found:
                    candidates.append((mixed, orders, j, found[j], k_mixed))
                    if o.resampling == "orders":
                        continue
            candidates.append((sigmas, orders, j, t, kappas))
    if not candidates:
        raise ValueError(f"with tau={o.tau}, switch={o.switch} no {solver} schedule of {lo}..{nfe} steps spends "
                         f"exactly {nfe} calls; pass another tau or switch, or neither to choose it from the "
                         "calibration batch")
    return candidates


def _gate_batch(ctx: Calibration, gate_samples: int) -> Calibration:
    """The first ``gate_samples`` calibration noises, or the batch extended to that many with fresh noises
    from the calibration seed's stream, after the batch's own."""
    return ctx.subset(slice(None, gate_samples)) if gate_samples < ctx.x.shape[0] else ctx.extended(gate_samples)


def _choose(ctx: Calibration, solver: str, candidates: list, gate_samples: int) -> tuple[tuple, float | None]:
    """The candidate with the lowest error to the teacher on ``gate_samples`` noises (``_gate_batch``), and
    that error (the only candidate: None)."""
    if len(candidates) == 1:
        return candidates[0], None
    ext = _gate_batch(ctx, gate_samples)
    ref = ext.target() if gate_samples >= ctx.x.shape[0] else ctx.target()[:gate_samples]  # the batch's, no new solve
    errs = [float(rmse(sample(ext.denoiser, ext.x, Schedule(c[0]), solver, orders=c[1]), ref).mean())
            for c in candidates]
    err = min(errs)
    return candidates[errs.index(err)], err


def cost(opts: Options, solver: str, nfe: int, n: int) -> int:
    """The step search (shared by every sdm call on the batch: measured at about 700 rows per noise
    searched), the gate measured on the candidates (about 3, min(B, gate_samples) * NFE each), and the
    choice among them on gate_samples noises (whose teacher solves those beyond the batch)."""
    gate = 3 * (min(n, opts.gate_samples) + opts.gate_samples) * nfe if opts.gate else 0
    return 700 * min(n, opts.search_samples or n) + gate


# tune: the search on 6 noises and no gate (the solver's own orders): SDM's cells were never near the lead on
# digits-unet, and the gate's choice among switches cost ~4x the search there (docs/tune.md)
@register("sdm", Options, tune_options={"gate": False, "search_samples": 6}, cost=cost)
@torch.no_grad()
def sdm(ctx: Calibration, solver: str, nfe: int, opts: Options) -> Schedule:
    """SDM schedule of exactly ``nfe`` calls for ``solver`` (``Options``; docs/methods/sdm.md)."""
    if nfe < 2:
        raise ValueError(f"sdm needs nfe >= 2 (a step to sigma_min and the final step to 0), got {nfe}")
    settings = opts.search_settings()
    # The search depends on neither the solver nor the NFE: shared by every sdm call on this batch.
    sub = ctx.subset(slice(None, opts.search_samples))
    path, etas, second = ctx.memo("sdm-search", (ctx.sigma_min, ctx.sigma_max, settings, len(sub.x)),
                                  lambda: search(sub.denoiser, sub.x, ctx.sigma_min, ctx.sigma_max, **settings))
    info = {"path_steps": len(path) - 1, "search_calls": ctx.denoiser.calls, "path": path.tolist(), "eta": etas.tolist()}
    high = get_solver(solver).max_order()
    if not opts.gate or high == 1:
        steps, sopts = plan(solver, nfe)
        return Schedule(resample(path, etas, steps, opts.power, opts.q, opts.rho), solver=solver,
                        solver_options=sopts, sdm={**info, "tau": None})
    candidates = _candidates(ctx, solver, nfe, opts, path, etas, second, high)
    (sigmas, orders, j, t, kappas), err = _choose(ctx, solver, candidates, opts.gate_samples)
    info.update(tau=None if math.isinf(t) else t, switch=j, kappa=kappas, calib_rmse=err)
    return Schedule(sigmas, solver=solver, solver_options={"orders": orders}, sdm=info)
