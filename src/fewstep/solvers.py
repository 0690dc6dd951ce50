"""ODE solvers for the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

One flat function per solver, k-diffusion style: ``solver(model, x, sigmas, callback=None, **options)``.
The solvers call ``model(x, sigmas[j], j)``: the denoiser at the schedule's sigma j, with j passed so
that per-step corrections (``corrections.Corrected``) know their step; a plain denoiser D(x, sigma) is
called without it (``stepped``). ``sigma`` is a 0-d tensor, or a ``[batch]`` tensor when the schedule
is per sample (``sigmas`` of shape ``[steps + 1, batch]``). Coefficients are computed in
float64 from the sigmas and cast to ``x.dtype``; every operation is differentiable in the sigmas.

Every solver accepts ``orders``: a per-step cap on the order (SDM's gate stores its decisions there),
and ``afs``: the analytical first step (the first denoised estimate from x itself, no call).
A step that lands on sigma = 0 returns the denoised estimate (first order), as k-diffusion does.
``learned`` runs given coefficients (a method's, e.g. ``methods/s4s.py``); ``chain`` writes any one-call
solver in its form.
``SOLVERS`` is the registry: what each solver is (order, calls per step, history, options), read by
``plan``, ``fewstep.nfe``, SDM's gate and the dynamic programs.
"""

from __future__ import annotations

import functools
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


def afs_denoised(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The analytical first step's denoised estimate, no call (AFS: zju-pi/diff-sampler, gits-main/solvers.py,
    ``afs``, where the first direction is x / sqrt(1 + sigma^2), the noise of unit-variance Gaussian data at
    sigma_max). Here the first step follows that Gaussian's flow exactly, x_1 = x sqrt(1 + s_1^2) / sqrt(1 + s_0^2)
    (dx/dsigma = sigma x / (1 + sigma^2)): every solver's first step is x_1 = r x + (1 - r) D with r = s_1 / s_0,
    so D = x (r_G - r) / (1 - r), r_G = sqrt(1 + s_1^2) / sqrt(1 + s_0^2). Measured within 2% of the reference's
    Euler step (better on most schedules), and the first call's input is the initial state in VP coordinates
    x / sqrt(1 + sigma^2), which is what a DDPM-style pipeline holds (``FewstepScheduler``)."""
    s0, s1 = _b(sigma, x), _b(sigma_next, x)
    r, r_gauss = s1 / s0, torch.sqrt((1 + s1 * s1) / (1 + s0 * s0))
    return x * (r_gauss - r) / (1 - r)


def _denoised(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, i: int, callback: Callback,
              afs: bool = False) -> torch.Tensor:
    """D(x, sigma_i) at step i, reported to the callback (x, i, sigma, sigma_next, denoised); with ``afs``
    the first step's estimate is ``afs_denoised`` (no call)."""
    denoised = afs_denoised(x, sigmas[0], sigmas[1]) if afs and i == 0 else model(x, sigmas[i], i)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
    return denoised


def euler(model, x, sigmas, callback: Callback = None, orders=None, afs: bool = False):
    """Euler on dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 1 without the correction)."""
    model = stepped(model)
    sig, dt = _per_step(sigmas, x), _per_step(sigmas[1:] - sigmas[:-1], x)
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas, i, callback, afs)
        d = (x - denoised) / sig[i]
        x = x + d * dt[i]
    return x


def heun(model, x, sigmas, callback: Callback = None, orders=None, afs: bool = False):
    """EDM 2nd-order Heun (Karras et al. 2022, Alg. 1); Euler on a step to sigma = 0 or where orders[i] == 1."""
    model = stepped(model)
    sig, dt = _per_step(sigmas, x), _per_step(sigmas[1:] - sigmas[:-1], x)
    zero = _zeros(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = _denoised(model, x, sigmas, i, callback, afs)
        d = (x - denoised) / sig[i]
        x_next = x + d * dt[i]
        if not zero[i + 1] and _cap(orders, i, 2) >= 2:
            d_next = (x_next - model(x_next, sigmas[i + 1], i + 1)) / sig[i + 1]
            x_next = x + (d + d_next) / 2 * dt[i]
        x = x_next
    return x


def dpmpp_2m(model, x, sigmas, callback: Callback = None, orders=None, afs: bool = False):
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
        denoised = _denoised(model, x, sigmas, i, callback, afs)
        if zero[i + 1]:
            x = denoised
        else:
            d = denoised
            if old_denoised is not None and _cap(orders, i, 2, room) >= 2:
                d = w_new[i] * denoised - w_old[i] * old_denoised
            x = ratio[i] * x - em1[i] * d
        old_denoised = denoised
    return x


def dpmpp_3m(model, x, sigmas, callback: Callback = None, orders=None, exact3: bool = False, afs: bool = False):
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
        denoised = _denoised(model, x, sigmas, i, callback, afs)
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


def unipc(model, x, sigmas, callback: Callback = None, orders=None, order: int = 2, corrector: bool = True,
          afs: bool = False):
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
        m, lam = _denoised(model, x, sigmas, i, callback, afs), -s.log()
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


def ipndm(model, x, sigmas, callback: Callback = None, orders=None, max_order: int = 4, afs: bool = False):
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
        denoised = _denoised(model, x, sigmas, i, callback, afs)
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


def deis(model, x, sigmas, callback: Callback = None, orders=None, order: int = 3, afs: bool = False):
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
        denoised = _denoised(model, x, sigmas, i, callback, afs)
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


# --------------------------------------------------------------------------------------------
# Learned coefficients: x_{i+1} = a_i x_i + sum_{j<=i} b_ij D_j, and PAS's direction corrections

def _coefficients(a, b, pas, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """``learned``'s options as float64 tensors (lists from a file, or tensors that carry a gradient while a
    method trains them), checked against ``steps``; ValueError naming what is wrong."""
    if a is None or b is None:
        raise ValueError("the learned solver needs its coefficients a and b (solver options): make its schedule "
                         "with fewstep.optimize(..., method='s4s' or 'pas')")
    a = torch.as_tensor(a, dtype=torch.float64)
    if a.shape != (steps,) or len(b) != steps:
        raise ValueError(f"learned solver: a needs {steps} values and b {steps} rows (one per step), "
                         f"got {tuple(a.shape)} and {len(b)}")
    b = [torch.as_tensor(row, dtype=torch.float64) for row in b]
    bad = [i for i, row in enumerate(b) if row.shape != (i + 1,)]
    if bad:
        raise ValueError(f"learned solver: b's row i needs i + 1 values (one per output so far); row {bad[0]} "
                         f"has {tuple(b[bad[0]].shape)}")
    if pas is not None:
        if len(pas) != steps:
            raise ValueError(f"learned solver: pas needs one list per step ({steps}), got {len(pas)}")
        pas = [torch.as_tensor(c, dtype=torch.float64).reshape(-1) for c in pas]
    values = torch.cat([a.detach(), *(row.detach() for row in b), *(c.detach() for c in pas or [])])
    if not torch.isfinite(values).all():
        raise ValueError("learned solver: the coefficients contain NaN or inf")
    return a, b, pas


def _check_learned(options: dict, steps: int) -> None:
    _coefficients(options.get("a"), options.get("b"), options.get("pas"), steps)


def _capped(w: torch.Tensor, p: int) -> torch.Tensor:
    """Weights of the ``p`` newest outputs: the older ones' weight moves onto the oldest kept (the sum stays)."""
    k = len(w) - min(p, len(w)) + 1
    return torch.cat([w[:k].sum(0, keepdim=True), w[k:]])


def pas_basis(d: torch.Tensor, x: torch.Tensor, x_T: torch.Tensor, dirs: list[torch.Tensor], k: int) -> torch.Tensor:
    """PAS's per-sample orthonormal basis [batch, k, dim] (Wang et al. 2024, arXiv 2411.06503, Sec. 4.1;
    onefly123/PAS pca_utils/utils.py): u_1 = d / |d|, then the top k - 1 principal directions of the
    sample's own trajectory {x_T, earlier directions, d}, Gram-Schmidt against the ones before and signed
    along the way travelled so far (x - x_T; at the first step, -x_T). Directions past the numerical rank
    (singular values below max(rows, dim) eps of the largest, numpy's matrix_rank rule) or within sqrt(eps)
    of the span before them are zero: rounding picks them, differently in float32 and float64. Exact SVD of
    the small [steps, dim] matrix (the reference's randomized pca_lowrank is not deterministic)."""
    flat = lambda v: v.reshape(v.shape[0], -1)  # noqa: E731
    info = torch.finfo(d.dtype)
    tiny = info.tiny
    rows = torch.stack([flat(v) for v in (x_T, *dirs, d)], 1)
    _, sv, vh = torch.linalg.svd(rows - rows.mean(1, keepdim=True), full_matrices=False)
    vh = vh * (sv > max(rows.shape[1:]) * info.eps * sv[:, :1]).unsqueeze(-1)
    way = flat(x - x_T) if dirs else -flat(x_T)
    basis = [flat(d) / flat(d).norm(dim=1, keepdim=True).clamp_min(tiny)]
    for v in vh[:, : k - 1].unbind(1):
        for u in basis:
            v = v - (u * v).sum(1, keepdim=True) * u
        norm = v.norm(dim=1, keepdim=True)
        v = torch.where(norm > info.eps ** 0.5, v / norm.clamp_min(tiny), torch.zeros_like(v))
        basis.append(torch.where((way * v).sum(1, keepdim=True) < 0, -v, v))
    basis += [torch.zeros_like(basis[0])] * (k - len(basis))
    return torch.stack(basis, 1)


def _pas_step(x, x_next, x_T, dirs, dt, c) -> tuple[torch.Tensor, torch.Tensor]:
    """PAS's corrected step: the direction d = (x_next - x) / dt becomes d + |d| sum_k c_k u_k on the basis
    ``pas_basis``; returns the new x_next and the direction, which joins the trajectory's."""
    d = (x_next - x) / dt
    if c is None or not len(c):
        return x_next, d
    basis = pas_basis(d, x, x_T, dirs, len(c))
    norm = d.reshape(d.shape[0], -1).norm(dim=1, keepdim=True)
    d = d + (norm * torch.einsum("bkn,k->bn", basis, c.to(basis.dtype))).reshape(d.shape)
    return x + dt * d, d


def learned(model, x, sigmas, callback: Callback = None, orders=None, afs: bool = False, a=None, b=None, pas=None):
    """A linear multistep solver with learned coefficients: x_{i+1} = a_i x_i + sum_{j<=i} b_ij D_j.

    S4S's solver form (Frankel et al. 2025, arXiv 2502.17423, Sec. 3: the coefficients of every step
    learned against a teacher; also DS-Solver, arXiv 2505.21114). ``chain`` writes every one-call solver
    here in this form, the start a method learns from. The sigmas only say where the denoiser is
    evaluated. ``orders[i] = p``: step i uses its p newest outputs (``_capped``). ``pas``: per step, PAS's
    coordinates c (an empty list: no correction) of ``_pas_step``, after the step's linear update.
    """
    model = stepped(model)
    steps = len(sigmas) - 1
    a, b, pas = _coefficients(a, b, pas, steps)
    x_T, ds, dirs = x, [], []
    for i in range(steps):
        ds.append(_denoised(model, x, sigmas, i, callback, afs))
        w = _capped(b[i], _cap(orders, i, i + 1))
        x_next = _b(a[i], x) * x + sum(_b(wj, x) * d for wj, d in zip(w, ds[len(ds) - len(w):]))
        if pas is not None:
            x_next, d = _pas_step(x, x_next, x_T, dirs, _b(sigmas[i + 1] - sigmas[i], x), pas[i])
            dirs.append(d)
        x = x_next
    return x


def chain(solver: str, sigmas: torch.Tensor, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``solver`` (one call a step) on ``sigmas`` [steps + 1] as ``learned``'s coefficients (a, b), so that
    ``learned(model, x, sigmas, a=a, b=b)`` is ``solver`` itself. Every such solver is linear in x and the
    denoised outputs, so running it on the basis (x_T, D_0, ..., D_{N-1}), with the k-th call answering the
    (k + 1)-th basis vector, gives each call's state and the result in that basis; differentiable in the
    sigmas. ``afs`` is not traced: ``learned`` takes it as an option of its own (D_0 from x)."""
    spec = get_solver(solver)
    if spec.calls_per_step != 1 or spec.required:
        raise ValueError(f"{solver} is not a one-call-per-step solver with fixed coefficients: it has no chain form")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    n = len(sigmas) - 1
    basis, points = torch.eye(n + 1, dtype=torch.float64), []

    def model(x, sigma):
        points.append(x[0])
        return basis[len(points)][None]

    opts = {k: v for k, v in {**spec.options, **options}.items() if k != "afs"}
    out = spec.fn(model, basis[:1], sigmas, **opts)[0]
    pts = torch.stack([*points, out])  # row k: the state of call k (the result last) in the basis
    if (pts[:-1, 0].abs() < 1e-12).any():
        raise ValueError(f"{solver} on these sigmas drops x_T before its last call: no chain form")
    a = pts[1:, 0] / pts[:-1, 0]
    return a, [pts[i + 1, 1:i + 2] - a[i] * pts[i, 1:i + 2] for i in range(n)]


@dataclass(frozen=True)
class Solver:
    """What a solver is, for the code that plans, prices and gates it (one entry of ``SOLVERS``).

    ``order``: the order it reaches once warmed up, at its default options (``order_option`` names the
    option that sets it, e.g. UniPC's ``order``); ``calls_per_step``: denoiser calls of a full step
    (Heun: 2, except a step to sigma = 0 or one capped to order 1); ``history``: previous steps whose
    outputs a step reuses (multistep solvers lower their order while it fills: warm-up). ``required``:
    options it cannot run without (``learned``'s coefficients, made by a method): ``plan`` refuses such a
    solver, the methods that plan one do not take it. ``validate(options, steps)`` raises ValueError for
    options of the wrong shape. Unpacks as ``(fn, options)``, as fewstep 0.1's entries did.
    """

    fn: Callable
    order: int
    calls_per_step: int = 1
    history: int = 0
    options: dict = field(default_factory=dict)
    order_option: str | None = None
    required: tuple[str, ...] = ()
    validate: Callable[[dict, int], None] | None = None

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
        if not isinstance(options.get("afs", False), bool):
            raise ValueError(f"solver option 'afs' must be true or false, got {options['afs']!r}")
        if self.validate is not None:
            self.validate(options, steps)
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
    # no order of its own, and it is never planned (the dynamic programs do not see it)
    "learned": Solver(learned, order=1, required=("a", "b"), validate=_check_learned),
}
PLANNED = [name for name, s in SOLVERS.items() if not s.required]  # the solvers a method or tune can plan
MAX_HISTORY = max(SOLVERS[s].history for s in PLANNED)  # previous steps any planned solver reuses (iPNDM-4: 3)


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def plan(solver: str, nfe: int, final_zero: bool = True, afs: bool = False) -> tuple[int, dict]:
    """Steps and solver options that spend exactly ``nfe`` calls with ``solver``.

    One-call solvers: ``nfe`` steps. Two-call solvers (Heun): 2 calls a step and 1 on a final step to 0;
    for an NFE that this leaves over by one, the first step (at the highest noise, where the path is
    straightest) is a first-order step, recorded as ``orders``. With ``afs`` the first denoised estimate
    costs no call: the plan of ``nfe + 1`` calls, and ``afs`` in the options.
    """
    spec = get_solver(solver)
    if spec.required:
        raise ValueError(f"solver {solver!r} runs the coefficients a method made (solver options "
                         f"{', '.join(spec.required)}: fewstep.optimize(..., method='s4s' or 'pas')); it is not planned")
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if afs:  # the first step's first call is free: the budget of one call more
        steps, opts = plan(solver, nfe + 1, final_zero)
        return steps, {**opts, "afs": True}
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


@functools.lru_cache(maxsize=None)
def twins(names: tuple[str, ...], nfe: int) -> dict[str, str]:
    """The solvers of ``names`` that at ``nfe`` calls compute exactly what an earlier one does (UniPC-3 at 3 and
    4 calls: its order capped, it is UniPC), each to that earlier one. Found without the network: each runs
    its plan (a polynomial grid) on a fixed nonlinear test denoiser from the same state; equal bits, one solver."""
    def test_denoiser(x, sigma):  # the solvers call it with the step's sigma, one for the batch
        return torch.tanh(x / (1 + sigma)) + 0.1 * torch.sin(sigma) * x

    x, runs, out = 80 * torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4), [], {}
    for name in names:
        try:
            steps, opts = plan(name, nfe)
            spec = SOLVERS[name]
            sigmas = torch.linspace(80 ** (1 / 7), 2e-3 ** (1 / 7), steps, dtype=torch.float64) ** 7
            y = spec.fn(test_denoiser, x, torch.cat([sigmas, sigmas.new_zeros(1)]), **{**spec.options, **opts})
        except ValueError:  # not planned at this NFE: the cells say why
            continue
        twin = next((other for other, z in runs if torch.equal(y, z)), None)
        if twin is None:
            runs.append((name, y))
        else:
            out[name] = twin
    return out
