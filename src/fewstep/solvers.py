"""ODE solvers for the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

One flat function per solver, k-diffusion style: ``solver(model, x, sigmas, callback=None, **options)``.
The solvers call ``model(x, sigmas[j], j)``: the denoiser at the schedule's sigma j, with j passed so
that per-step corrections (``corrections.Corrected``) know their step; a plain denoiser D(x, sigma) is
called without it (``stepped``). ``sigma`` is a 0-d tensor, or a ``[batch]`` tensor when the schedule
is per sample (``sigmas`` of shape ``[steps + 1, batch]``). Coefficients are computed in
float64 from the sigmas and cast to ``x.dtype``; every operation is differentiable in the sigmas.

Every solver accepts ``orders``: a per-step cap on the order (SDM's gate stores its decisions there).
A step that lands on sigma = 0 returns the denoised estimate (first order), as k-diffusion does.
``SOLVERS`` is the registry: what each solver is (order, calls per step, history, options), read by
``plan``, ``fewstep.nfe``, SDM's gate and the dynamic programs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

Callback = Callable[[dict], None] | None


def stepped(model: Callable) -> Callable:
    """``model(x, sigma, step)``: a fewstep wrapper that takes the step (``takes_step``) as is, any other
    denoiser D(x, sigma) called without it."""
    return model if getattr(model, "takes_step", False) else (lambda x, sigma, step: model(x, sigma))


def _b(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample coefficient, broadcastable against x, on x's device and in its dtype."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim else c


def _per_step(c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-step coefficients ([steps] or [steps, batch], float64) as one coefficient per step in x's
    dtype and device, broadcastable against x: cast and reshaped once per solve rather than once per step."""
    c = c.to(device=x.device, dtype=x.dtype)
    return (c.reshape(*c.shape, *([1] * (x.ndim - 1))) if c.ndim > 1 else c).unbind(0)


def _log_sigmas(sigmas: torch.Tensor, zero: list[bool]) -> torch.Tensor:
    """log sigma down to the last nonzero sigma (a step onto sigma = 0 needs no log: no -inf, no NaN gradient)."""
    return sigmas[: len(sigmas) - zero[-1]].log()


def _zeros(sigmas: torch.Tensor) -> list[bool]:
    """Whether each sigma (each row, for per-sample sigmas) is 0; one host sync per solve, not per step."""
    z = sigmas == 0
    return (z if z.ndim == 1 else z.all(-1)).tolist()


def _cap(orders: Sequence[int] | None, i: int, order: int, room: Sequence[int] | None = None) -> int:
    """Step i's order: ``order``, capped by ``orders[i]`` (read at the step: SDM's gate fills it in as the
    solver runs) and by ``room[i]`` (``_room``)."""
    order = order if orders is None else min(order, int(orders[i]))
    return order if room is None else min(order, room[i])


MIN_NODE_GAP = 1e-3  # a history node closer than this fraction of the step (in lambda) to the next is not used


def _room(sigmas: torch.Tensor, zero: list[bool], depth: int) -> list[int]:
    """The highest order each step's history supports: a step of length h in lambda = -log sigma uses the
    nodes before it only while each gap between consecutive ones is at least MIN_NODE_GAP * h (extrapolating
    from crowded nodes amplifies their error by ~h / gap, and nearly equal sigmas make the multistep
    coefficients blow up numerically). Per-sample sigmas: the tightest sample. One host read per solve."""
    lam = -_log_sigmas(sigmas, zero).detach().cpu()
    gaps = lam[1:] - lam[:-1]  # gaps[i]: step i in lambda (steps to sigma = 0 have none)
    room = []
    for i in range(len(sigmas) - 1):
        p = 1
        while i < len(gaps) and p <= min(depth, i) and bool((gaps[i - p] >= MIN_NODE_GAP * gaps[i]).all()):
            p += 1
        room.append(p)
    return room


def _denoised(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, i: int, callback: Callback) -> torch.Tensor:
    """D(x, sigma_i) at step i, reported to the callback (x, i, sigma, sigma_next, denoised)."""
    denoised = model(x, sigmas[i], i)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
    return denoised


def euler(model, x, sigmas, callback: Callback = None, orders=None):
    """Euler on dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 1 without the correction)."""
    model = stepped(model)
    sig, dt = _per_step(sigmas, x), _per_step(sigmas[1:] - sigmas[:-1], x)
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas, i, callback)
        d = (x - denoised) / sig[i]
        x = x + d * dt[i]
    return x


def heun(model, x, sigmas, callback: Callback = None, orders=None):
    """EDM 2nd-order Heun (Karras et al. 2022, Alg. 1); Euler on a step to sigma = 0 or where orders[i] == 1."""
    model = stepped(model)
    sig, dt = _per_step(sigmas, x), _per_step(sigmas[1:] - sigmas[:-1], x)
    zero = _zeros(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas, i, callback)
        d = (x - denoised) / sig[i]
        x_next = x + d * dt[i]
        if not zero[i + 1] and _cap(orders, i, 2) >= 2:
            d_next = (x_next - model(x_next, sigmas[i + 1], i + 1)) / sig[i + 1]
            x_next = x + (d + d_next) / 2 * dt[i]
        x = x_next
    return x


def dpmpp_2m(model, x, sigmas, callback: Callback = None, orders=None):
    """DPM-Solver++(2M), data prediction, in lambda = -log sigma (Lu et al. 2022, Alg. 2)."""
    model = stepped(model)
    zero = _zeros(sigmas)
    log_s = _log_sigmas(sigmas, zero)
    h = log_s[:-1] - log_s[1:]  # h_i = lambda_{i+1} - lambda_i
    r = torch.cat([h[:1], h[:-1]]) / h  # r_i = h_{i-1} / h_i (unused at i = 0)
    ratio, em1 = _per_step(sigmas[1:] / sigmas[:-1], x), _per_step(torch.expm1(-h), x)
    w_new, w_old = _per_step(1 + 1 / (2 * r), x), _per_step(1 / (2 * r), x)
    old_denoised, room = None, _room(sigmas, zero, 1)
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas, i, callback)
        if zero[i + 1]:
            x = denoised
        else:
            d = denoised
            if old_denoised is not None and _cap(orders, i, 2, room) >= 2:
                d = w_new[i] * denoised - w_old[i] * old_denoised
            x = ratio[i] * x - em1[i] * d
        old_denoised = denoised
    return x


def dpmpp_3m(model, x, sigmas, callback: Callback = None, orders=None, exact3: bool = False):
    """DPM-Solver++(3M), data prediction (Lu et al. 2022; k-diffusion's 3M form with eta = 0).

    First step order 1, second order 2, then order 3; a step to sigma = 0 returns the denoised estimate.
    With D2 = h^2 D''/2, the Taylor-exact weight of D2 is -2 phi_3, while the published update (and
    k-diffusion's and diffusers') uses -phi_3, which leaves the scheme globally second order
    (tests/test_solvers.py measures both); ``exact3=True`` uses -2 phi_3 and is third order.
    """
    model = stepped(model)
    zero = _zeros(sigmas)
    log_s = _log_sigmas(sigmas, zero)
    h = log_s[:-1] - log_s[1:]  # h_i = lambda_{i+1} - lambda_i
    r0 = torch.cat([h[:1], h[:-1]]) / h  # h_{i-1} / h_i (unused at i = 0)
    r1 = torch.cat([h[:2], h[:-2]]) / h  # h_{i-2} / h_i (unused at i < 2)
    phi_2 = torch.expm1(-h) / h + 1
    phi_3 = phi_2 / h - 0.5
    ratio, em1 = _per_step(sigmas[1:] / sigmas[:-1], x), _per_step(torch.expm1(-h), x)
    c_r0, c_r1, c_w, c_r01 = (_per_step(c, x) for c in (r0, r1, r0 / (r0 + r1), r0 + r1))
    c_phi_2, c_phi_3 = _per_step(phi_2, x), _per_step(phi_3 * (2 if exact3 else 1), x)
    den_1 = den_2 = None  # denoised estimates of the last two steps
    room = _room(sigmas, zero, 2)
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas, i, callback)
        if zero[i + 1]:
            x = denoised
            break
        x = ratio[i] * x - em1[i] * denoised
        order = _cap(orders, i, min(3, i + 1), room)
        if order == 2:
            d = (denoised - den_1) / c_r0[i]
            x = x + c_phi_2[i] * d
        elif order == 3:
            d1_0 = (denoised - den_1) / c_r0[i]
            d1_1 = (den_1 - den_2) / c_r1[i]
            d1 = d1_0 + (d1_0 - d1_1) * c_w[i]
            d2 = (d1_0 - d1_1) / c_r01[i]
            x = x + c_phi_2[i] * d1 - c_phi_3[i] * d2
        den_1, den_2 = denoised, den_1
    return x


def _unipc_update(x, m0, lam0, lam1, older, m_new=None):
    """One UniP (m_new None) or UniC (m_new given) update, B(h) = e^{-h} - 1 ('bh2').

    Zhao et al. 2023, UniPC, Alg. 1-2, data prediction. ``older``: [(m_k, lambda_k)] before m0,
    newest first, as many as the order needs. x_next = (sigma_1/sigma_0) x - (e^{-h} - 1) m0 - B(h) sum_k rho_k D_k,
    with D_k = (m_k - m0) / r_k, r_k = (lambda_k - lambda_0) / h, and rho solving R rho = b.
    """
    h = lam1 - lam0
    hh = -h
    h_phi_1 = torch.expm1(hh)
    x_lin = _b(torch.exp(hh), x) * x - _b(h_phi_1, x) * m0
    rks = [(lam_k - lam0) / h for _, lam_k in older]
    ds = [(m_k - m0) / _b(r_k, x) for (m_k, _), r_k in zip(older, rks)]
    if m_new is not None:
        rks.append(torch.ones_like(h))
        ds.append(m_new - m0)
    n = len(rks)
    if n == 0:
        return x_lin
    if n == 1:  # UniP-2 / UniC-1 use rho = 1/2 (Zhao et al. 2023, Sec. 3.1)
        rhos = [torch.full_like(h, 0.5)]
    else:
        b_h = h_phi_1
        b, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
        for k in range(1, n + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        rk = torch.stack(torch.broadcast_tensors(*rks), -1)  # [..., n]
        R = torch.stack([rk ** j for j in range(n)], -2)  # [..., n(power), n(node)]
        rhos = torch.linalg.solve(R, torch.stack(torch.broadcast_tensors(*b), -1)).unbind(-1)
    res = sum(_b(r, x) * d for r, d in zip(rhos, ds))
    return x_lin - _b(h_phi_1, x) * res


def unipc(model, x, sigmas, callback: Callback = None, orders=None, order: int = 2, corrector: bool = True):
    """UniPC-p with the bh2 variant, data prediction, orders 1-3 (Zhao et al. 2023).

    Order is lowered for warm-up and at the final steps (diffusers' ``lower_order_final``); the
    corrector UniC reuses the next step's model output, so it costs no extra call.
    """
    model = stepped(model)
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    n_steps = len(sigmas) - 1
    hist: list[tuple[torch.Tensor, torch.Tensor]] = []  # (m, lambda), newest first
    x_prev, p_prev = None, 0
    zero = _zeros(sigmas)
    room = _room(sigmas, zero, order - 1)
    for i in range(n_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        m, lam = _denoised(model, x, sigmas, i, callback), -s.log()
        if corrector and x_prev is not None:
            x = _unipc_update(x_prev, hist[0][0], hist[0][1], lam, hist[1:p_prev], m_new=m)
        hist = [(m, lam)] + hist[: order - 1]
        p = _cap(orders, i, min(order, len(hist), n_steps - i), room)
        x_prev, p_prev = x, p
        x = m if zero[i + 1] else _unipc_update(x, m, lam, -s_next.log(), hist[1:p])
    return x


# iPNDM: Adams-Bashforth on d = (x - D) / sigma with the fixed coefficients of uniform steps
# (Zhang & Chen 2023, DEIS paper, "iPNDM"; as in zju-pi/diff-sampler's `ipndm`).
_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm(model, x, sigmas, callback: Callback = None, orders=None, max_order: int = 4):
    """iPNDM, order up to ``max_order`` (<= 4), lower order while the history fills.

    diff-sampler ends its schedules at sigma_min; here a final step to sigma = 0 returns the denoised
    estimate, as for every other solver (an Adams-Bashforth step onto sigma = 0 overshoots).
    """
    model = stepped(model)
    if max_order not in _AB:
        raise ValueError(f"ipndm max_order must be 1-4, got {max_order}")
    ds: list[torch.Tensor] = []  # newest first
    zero = _zeros(sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = _denoised(model, x, sigmas, i, callback)
        ds = [(x - denoised) / _b(s, x)] + ds[: max_order - 1]
        if zero[i + 1]:
            x = denoised
            continue
        p = _cap(orders, i, min(max_order, len(ds)))
        x = x + _b(s_next - s, x) * sum(c * d for c, d in zip(_AB[p], ds))
    return x


def _lagrange_exp_integral(us: list[torch.Tensor], j: int, ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """int_{ua}^{ub} L_j(u) e^u du for the Lagrange basis polynomial L_j on nodes ``us``.

    With p = L_j, the antiderivative of p(u) e^u is e^u (p - p' + p'' - ...).
    """
    coef = [torch.ones_like(ua)]  # polynomial coefficients in u, lowest power first
    for m, um in enumerate(us):
        if m == j:
            continue
        den = us[j] - um
        coef = [(coef[k - 1] if k > 0 else 0) / den - (coef[k] * um / den if k < len(coef) else 0)
                for k in range(len(coef) + 1)]

    def antiderivative(u):
        total, deriv, sign = 0, coef, 1
        while deriv:
            total = total + sign * sum(c * u ** k for k, c in enumerate(deriv))
            deriv = [k * c for k, c in enumerate(deriv)][1:]
            sign = -sign
        return torch.exp(u) * total

    return antiderivative(ub) - antiderivative(ua)


def deis(model, x, sigmas, callback: Callback = None, orders=None, order: int = 3):
    """DEIS tAB-p (Zhang & Chen 2023): x' = x + int eps dsigma, with eps Lagrange-interpolated in log sigma.

    This is the 'deis' algorithm of diffusers' DEISMultistepScheduler written in EDM variables.
    """
    model = stepped(model)
    if order not in (1, 2, 3):
        raise ValueError(f"deis order must be 1, 2 or 3, got {order}")
    hist: list[tuple[torch.Tensor, torch.Tensor]] = []  # (eps, log sigma), newest first
    zero = _zeros(sigmas)
    room = _room(sigmas, zero, order - 1)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = _denoised(model, x, sigmas, i, callback)
        eps = (x - denoised) / _b(s, x)
        hist = [(eps, s.log())] + hist[: order - 1]
        if zero[i + 1]:
            x = denoised
            continue
        p = _cap(orders, i, len(hist), room)
        us = [u for _, u in hist[:p]]
        for j, (e, _) in enumerate(hist[:p]):
            x = x + _b(_lagrange_exp_integral(us, j, s.log(), s_next.log()), x) * e
    return x


@dataclass(frozen=True)
class Solver:
    """What a solver is, for the code that plans, prices and gates it (one entry of ``SOLVERS``).

    ``order``: the order it reaches once warmed up, at its default options (``order_option`` names the
    option that sets it, e.g. UniPC's ``order``); ``calls_per_step``: denoiser calls of a full step
    (Heun: 2, except a step to sigma = 0 or one capped to order 1); ``history``: previous steps whose
    outputs a step reuses (multistep solvers lower their order while it fills: warm-up).
    Unpacks as ``(fn, options)``, as fewstep 0.1's entries did.
    """

    fn: Callable
    order: int
    calls_per_step: int = 1
    history: int = 0
    options: dict = field(default_factory=dict)
    order_option: str | None = None

    def max_order(self, options: dict | None = None) -> int:
        """The order with these options (the one SDM's gate switches to)."""
        opts = {**self.options, **(options or {})}
        return int(opts[self.order_option]) if self.order_option else self.order

    def step_calls(self, cap: int | None = None, to_zero: bool = False) -> int:
        """Denoiser calls of one step with order ``cap`` (None: no cap); a step to 0 makes one call."""
        return 1 if to_zero or (cap is not None and cap < 2) else self.calls_per_step

    def __iter__(self):
        return iter((self.fn, dict(self.options)))

    def check_options(self, options: dict, steps: int) -> None:
        """Raise ValueError naming any option this solver does not take, and a bad ``orders``."""
        known = [p for p in inspect.signature(self.fn).parameters if p not in ("model", "x", "sigmas", "callback")]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"solver option(s) {', '.join(map(repr, unknown))} are not taken by "
                             f"{self.fn.__name__}; it takes {', '.join(known)}")
        orders = options.get("orders")
        if orders is None:
            return
        if not isinstance(orders, (list, tuple)) or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 1
                                                            for o in orders):
            raise ValueError(f"solver option 'orders' must be a list of integers >= 1 (one per step), got {orders!r}")
        if len(orders) != steps:
            raise ValueError(f"solver option 'orders' has {len(orders)} entries for {steps} steps")


# The registry. "unipc_3" and friends are the same function at another order.
SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, order=1),
    "heun": Solver(heun, order=2, calls_per_step=2),
    "dpmpp_2m": Solver(dpmpp_2m, order=2, history=1),
    "dpmpp_3m": Solver(dpmpp_3m, order=3, history=2),
    "unipc": Solver(unipc, order=2, history=1, options={"order": 2}, order_option="order"),
    "unipc_3": Solver(unipc, order=3, history=2, options={"order": 3}, order_option="order"),
    "ipndm": Solver(ipndm, order=4, history=3, options={"max_order": 4}, order_option="max_order"),
    "deis": Solver(deis, order=3, history=2, options={"order": 3}, order_option="order"),
}
MAX_HISTORY = max(s.history for s in SOLVERS.values())  # previous steps any solver reuses (iPNDM-4: 3)


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def plan(solver: str, nfe: int, final_zero: bool = True) -> tuple[int, dict]:
    """Steps and solver options that spend exactly ``nfe`` calls with ``solver``.

    One-call solvers: ``nfe`` steps. Two-call solvers (Heun): 2 calls a step and 1 on a final step to 0;
    for an NFE that this leaves over by one, the first step (at the highest noise, where the path is
    straightest) is a first-order step, recorded as ``orders``.
    """
    spec = get_solver(solver)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if spec.calls_per_step == 1:
        return int(nfe), {}
    if final_zero:
        if nfe % 2 == 1:
            return (nfe + 1) // 2, {}
        steps = nfe // 2 + 1
        return steps, {"orders": [1] + [2] * (steps - 2) + [1]}
    if nfe % 2 == 0:
        return nfe // 2, {}
    steps = (nfe + 1) // 2
    return steps, {"orders": [1] + [2] * (steps - 1)}
