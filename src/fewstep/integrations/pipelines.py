"""What diffusers' pipelines feed their networks, per pipeline family (read from the denoising loops of
diffusers 0.42): the timestep unit of flow-matching networks, and the conditioning ``pipe.encode_prompt``
gives for Stable Diffusion-style, SD3 and Flux pipelines.

``Conditioning`` is the result: the network's keyword arguments for the prompt (``cond``) and the negative
prompt (``uncond``), the guidance scale, whether the pipeline batches the two (SD, SD3: one
``[uncond, cond]`` batch) or calls the network twice (Flux's true CFG), and the latent shape.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

# How a flow-matching network takes the time t in [0, 1]. SD3's loop (and the generic FlowMatch loop) passes the
# scheduler's timesteps, t * num_train_timesteps; Flux's passes timestep / 1000 = t, and FluxTransformer2DModel
# multiplies by 1000 inside (pipeline_flux.py, transformer_flux.py).
FLOW_TIME_UNITS = {"SD3Transformer2DModel": "train_timesteps", "FluxTransformer2DModel": "t"}
FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def flow_time_scale(net: Any, num_train_timesteps: int, time_scale: float | None = None) -> float:
    """The factor from flow time t to the network's timestep argument; a diffusers transformer fewstep has not
    checked is an error asking for ``time_scale=`` rather than a silent guess."""
    if time_scale is not None:
        return float(time_scale)
    name = type(net).__name__
    unit = FLOW_TIME_UNITS.get(name)
    if unit is None and type(net).__module__.startswith("diffusers.models.transformers"):
        raise ValueError(f"fewstep does not know how {name} takes its timestep: pass time_scale= (1 if its pipeline "
                         f"passes timestep / 1000, as Flux's does; {num_train_timesteps} if it passes the scheduler's "
                         "timesteps, as SD3's does)")
    return 1.0 if unit == "t" else float(num_train_timesteps)


@dataclass
class Conditioning:
    """Network keyword arguments for the prompt and the negative prompt, and how the pipeline combines them."""

    cond: dict
    uncond: dict | None = None
    guidance_scale: float = 1.0
    batched: bool = True  # [uncond, cond] in one network call (SD, SD3); False: two calls (Flux's true CFG)
    shape: tuple[int, ...] | None = None
    image_seq_len: int | None = None  # Flux: packed latent tokens, from which the pipeline computes mu
    rows: tuple[str, ...] = ()  # inputs given per sample at call time (cond=), the prompt's; cond holds the rest


# The network inputs that come from the prompt, one row per prompt; the others (Flux's ids and distilled guidance)
# are the same for every prompt.
ROW_KEYS = {"sd": ("encoder_hidden_states",), "sd3": ("encoder_hidden_states", "pooled_projections"),
            "flux": ("encoder_hidden_states", "pooled_projections")}


def network(pipe: Any) -> Any:
    """The pipeline's denoising network (its UNet or transformer)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def family(net: Any) -> str:
    """'sd3', 'flux', or 'sd' (a UNet pipeline whose encode_prompt returns (prompt_embeds, negative_embeds))."""
    return FAMILIES.get(type(net).__name__, "sd")


@torch.no_grad()
def encode(pipe: Any, net: Any, prompt, negative_prompt, guidance_scale: float | None, kwargs: dict) -> Conditioning:
    """``Conditioning`` for ``pipe(prompt, negative_prompt=..., guidance_scale=..., **kwargs)``; ``kwargs`` are the
    pipeline's own arguments (height, width, prompt_2, max_sequence_length, true_cfg_scale, prompt_embeds, ...).
    Without gradients, as ``pipe(...)`` encodes: embeddings holding a graph into the text encoders would break
    every backward through the denoiser after the first (LD3's training)."""
    fam = family(net)
    kwargs = dict(kwargs)
    height, width = kwargs.pop("height", None), kwargs.pop("width", None)
    true_cfg = kwargs.pop("true_cfg_scale", 1.0) if fam == "flux" else None
    allowed = set(inspect.signature(pipe.encode_prompt).parameters) - {"self", "device", "num_images_per_prompt"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{type(pipe).__name__}: unknown argument(s) {unknown}; from_diffusers takes height, width"
                         f"{', true_cfg_scale' if fam == 'flux' else ''} and {type(pipe).__name__}.encode_prompt's "
                         f"arguments: {', '.join(sorted(allowed))}")
    if fam == "flux":
        return _flux(pipe, net, prompt, negative_prompt, guidance_scale, true_cfg, height, width, kwargs)
    g = 1.0 if guidance_scale is None else float(guidance_scale)
    common = dict(device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=g != 1.0,
                  negative_prompt=negative_prompt)
    shape = _latent_shape(pipe, net, height, width)
    if fam == "sd3":
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompt, prompt_2=kwargs.pop("prompt_2", None),
                                                          prompt_3=kwargs.pop("prompt_3", None), **common, **kwargs)
        cond = {"encoder_hidden_states": pos, "pooled_projections": pooled}
        uncond = None if neg is None else {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
        return Conditioning(cond, uncond, g, shape=shape)
    out = pipe.encode_prompt(prompt=prompt, **common, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"{type(pipe).__name__}.encode_prompt does not return (prompt_embeds, negative_embeds) as "
                         "Stable Diffusion's does: pass cond= / uncond= network arguments instead")
    pos, neg = out
    uncond = {"encoder_hidden_states": neg} if neg is not None else None
    return Conditioning({"encoder_hidden_states": pos}, uncond, g, shape=shape)


def per_prompt(pipe: Any, net: Any, negative_prompt, guidance_scale: float | None, kwargs: dict) -> Conditioning:
    """``Conditioning`` for a denoiser that takes the prompt at call time (``cond=``, rows from ``encode_prompts``):
    the negative prompt's branch and every input shared by all prompts fixed now, the prompt's inputs left out."""
    c = encode(pipe, net, "", negative_prompt, guidance_scale, kwargs)
    c.rows = ROW_KEYS[family(net)]
    c.cond = {k: v for k, v in c.cond.items() if k not in c.rows}
    return c


def encode_prompts(pipe: Any, prompts, batch_size: int = 16, **kwargs: Any) -> dict:
    """A pool of conditions for ``from_diffusers(pipe, guidance_scale=w)``: the network inputs of each prompt
    (``ROW_KEYS``: SD's text embeddings; SD3 and Flux's pooled embeddings too), one row per prompt, encoded
    ``batch_size`` at a time; ``kwargs`` are the pipeline's encoding arguments (``max_sequence_length``, ...)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"encode_prompts needs a non-empty list of strings, got {prompts[:3]!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net = network(pipe)
    keys = ROW_KEYS[family(net)]
    parts = []
    for i in range(0, len(prompts), int(batch_size)):
        c = encode(pipe, net, prompts[i:i + int(batch_size)], None, 1.0, dict(kwargs))
        parts.append([c.cond[k] for k in keys])
    return {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(keys)}


def _latent_shape(pipe, net, height, width) -> tuple[int, ...] | None:
    """(channels, h, w) of the pipeline's latents for an image of height x width (its default size if not given)."""
    if height is None and width is None:
        return None
    f = pipe.vae_scale_factor
    default = pipe.default_sample_size * f
    return int(net.config.in_channels), int(height or default) // f, int(width or default) // f


def _flux(pipe, net, prompt, negative_prompt, guidance_scale, true_cfg, height, width, kwargs) -> Conditioning:
    """FluxPipeline's inputs (pipeline_flux.py): packed latents of (h/2)(w/2) tokens, image ids for that grid,
    the distilled guidance as a network input, and true CFG (true_cfg_scale > 1 with a negative prompt) as two calls."""
    if pipe.text_encoder_2 is None and prompt is not None:
        raise ValueError(f"{type(pipe).__name__} has no text_encoder_2 (T5) to encode prompt=: pass prompt_embeds= and "
                         "pooled_prompt_embeds= (what pipe.encode_prompt returns) instead of prompt=")
    neg_keys = ("negative_prompt_2", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
    negative = {k.replace("negative_", "", 1): kwargs.pop(k) for k in neg_keys if k in kwargs}
    pos, pooled, ids = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1, **kwargs)
    f = pipe.vae_scale_factor
    h, w = (2 * (int(v or pipe.default_sample_size * f) // (f * 2)) for v in (height, width))
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, pipe.device, pos.dtype)
    extra = {"img_ids": img_ids}
    if net.config.guidance_embeds:
        default = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
        extra["guidance"] = torch.full([1], default if guidance_scale is None else guidance_scale, dtype=torch.float32)
    cond = {"encoder_hidden_states": pos, "pooled_projections": pooled, "txt_ids": ids, **extra}
    uncond = None
    if true_cfg > 1 and (negative_prompt is not None or "prompt_embeds" in negative):
        shared = {k: kwargs[k] for k in ("max_sequence_length",) if k in kwargs}
        n_pos, n_pooled, n_ids = pipe.encode_prompt(prompt=negative_prompt, device=pipe.device, num_images_per_prompt=1,
                                                    **negative, **shared)
        uncond = {"encoder_hidden_states": n_pos, "pooled_projections": n_pooled, "txt_ids": n_ids, **extra}
    seq = (h // 2) * (w // 2)
    return Conditioning(cond, uncond, float(true_cfg), batched=False, shape=(seq, int(net.config.in_channels)),
                        image_seq_len=seq)
