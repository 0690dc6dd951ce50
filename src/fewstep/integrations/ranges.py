"""A schedule meeting a model's trained sigma range, for the integrations (diffusers, ComfyUI).

Published tables are rounded: diffusers' Align Your Steps lists for SD start at 14.615, while the SD
noise schedule's top sigma is 14.6146. A schedule that leaves the range by rounding only (relative
``RTOL``) is clipped onto it, and the clip is recorded in its metadata (``clipped_to_range``); beyond
that it is an error naming both numbers.
"""

from __future__ import annotations

from ..schedules import Schedule, ScheduleError

RTOL = 1e-4  # 14.615 vs 14.6146 is 2.7e-5; one decimal less than a published 4-5 digit table


def clip_to_range(schedule: Schedule, sigma_min: float, sigma_max: float, what: str = "the model's trained range",
                  rtol: float = RTOL) -> Schedule:
    """``schedule`` with its positive sigmas inside [sigma_min, sigma_max]; those outside by at most ``rtol``
    (relative) are moved onto the bound, farther ones raise ScheduleError."""
    s = schedule.sigmas
    positive = s > 0
    low = positive & (s < sigma_min)
    high = s > sigma_max
    far = (low & (s < sigma_min * (1 - rtol))) | (high & (s > sigma_max * (1 + rtol)))
    if far.any():
        bad = float(s[far][0])
        raise ScheduleError(f"sigma {bad:.6g} is outside {what} [{sigma_min:.6g}, {sigma_max:.6g}] by more than "
                            f"rounding (relative {rtol:g})")
    if not (low.any() or high.any()):
        return schedule
    clipped = s.clone()
    clipped[low], clipped[high] = sigma_min, sigma_max
    record = [[float(a), float(b)] for a, b in zip(s[low | high], clipped[low | high])]
    return Schedule(clipped, **{**schedule.metadata, "clipped_to_range": record})

