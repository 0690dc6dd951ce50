"""fewstep inside diffusers and diffusers inside fewstep, against diffusers' own code (0.42), offline.

- the shipped DDPM UNet in DDPMPipeline with FewstepScheduler == fewstep.sample on from_diffusers(unet);
- a tiny StableDiffusionPipeline (random weights, byte-level CLIP tokenizer): FewstepScheduler latents ==
  fewstep.sample on from_diffusers(pipe, prompt, guidance_scale); the pipeline's own Euler and
  DPM-Solver++ given to_diffusers' sigmas / timesteps == fewstep's euler / dpmpp_2m;
- flow matching (SD3 / Flux shift): sigmas from to_diffusers stay the schedule's after the shift; the shipped
  flow UNet in an SD3-style loop with FlowMatchEulerDiscreteScheduler and with FewstepScheduler;
- tiny SD3 and Flux pipelines (random weights, offline): the wrapped denoiser is the pipeline's model at every
  state the pipeline's network saw (forward hooks), FewstepScheduler in them == fewstep.sample;
- diffusers' scheduler contract for every solver (the properties of its SchedulerCommonTest), from_config of
  other schedulers, compatibles, img2img and inpainting at strength < 1 and callbacks that edit latents
  (against diffusers' Euler and DPM-Solver++), from_tune, the rounding clip onto the trained range;
- clear errors for wrong prediction types, unmappable configs, sigmas outside the trained range.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.schedules import Schedule, ScheduleError, karras, logsnr_uniform

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, UNet2DModel,
)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

ASSETS = Path(fewstep.__file__).parent / "assets"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def shipped(name: str):
    unet = UNet2DModel.from_pretrained(ASSETS / name / "unet").eval().requires_grad_(False)
    config = json.loads((ASSETS / name / "scheduler" / "scheduler_config.json").read_text())
    return unet, config


@pytest.fixture(scope="module")
def digits_unet():
    return shipped("digits-unet")


@pytest.fixture(scope="module")
def digits_flow():
    return shipped("digits-flow")


# --------------------------------------------------------------------------------------------
# shipped models

def test_shipped_models_load_by_name_offline(digits_unet, digits_flow):
    unet, config = digits_unet
    assert config["_class_name"] == "DDPMScheduler" and config["prediction_type"] == "epsilon"
    for name, (_, cfg) in (("digits-unet", digits_unet), ("digits-flow", digits_flow)):
        den = fewstep.load_model(name)
        assert den.name == name and den.shape == (1, 8, 8)
        assert 0 < den.sigma_min < 0.05 and den.sigma_max > 100
        record = json.loads((ASSETS / name / "training.json").read_text())
        assert record["seed"] == 0 and record["loss_curve"][-1][1] == record["final_loss"]
    ac = DDPMScheduler.from_config(config).alphas_cumprod.double()
    vp = fewstep.load_model("digits-unet")
    assert vp.sigma_max == pytest.approx(float(((1 - ac[-1]) / ac[-1]).sqrt()))


def test_shipped_unet_denoises(digits_unet):
    """The trained UNet's D(x, sigma) beats the trivial estimates on held-out-noised digits."""
    from sklearn.datasets import load_digits

    den = fewstep.from_diffusers(*digits_unet)
    x0 = torch.tensor(load_digits().images[:64], dtype=torch.float32)[:, None] / 8 - 1
    g = torch.Generator().manual_seed(1)
    for sigma in (0.1, 0.5, 2.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        err = (den(x, torch.full((64,), sigma)) - x0).pow(2).mean()
        assert err < 0.8 * min((x - x0).pow(2).mean(), (x0.mean(0) - x0).pow(2).mean())


# --------------------------------------------------------------------------------------------
# FewstepScheduler in DDPMPipeline

@pytest.mark.parametrize("solver,steps", [("heun", 4), ("dpmpp_3m", 5), ("unipc", 5)])
def test_ddpm_pipeline_with_fewstep_scheduler(digits_unet, solver, steps):
    unet, config = digits_unet
    den = fewstep.from_diffusers(unet, config)
    sched = karras(steps, 0.02, 80.0)
    scheduler = fewstep.FewstepScheduler.from_schedule(sched, config, solver=solver)
    assert len(scheduler.timesteps) == fewstep.nfe(sched, solver)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
               output_type="pt").images
    n = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = fewstep.sample(den, n * math.sqrt(1 + 80.0 ** 2), sched, solver)
    # the pipeline feeds the network its noise n at the first call, fewstep.sample feeds (n / alpha) * alpha:
    # one float32 rounding, amplified by the network at sigma 80 (measured 1e-6 to 8e-6)
    assert rel(out, (ref / 2 + 0.5).clamp(0, 1)) <= 2e-5


def test_fewstep_scheduler_saves_and_loads_with_the_pipeline(digits_unet, tmp_path):
    unet, config = digits_unet
    sched = karras(4, 0.02, 80.0).with_metadata(solver="heun", solver_options={"orders": [1, 2, 2, 1]})
    pipe = DDPMPipeline(unet=unet, scheduler=fewstep.FewstepScheduler.from_schedule(sched, config))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "FewstepScheduler"
    assert loaded.scheduler.config.sigmas == sched.to_list() and loaded.scheduler.config.solver == "heun"
    assert torch.equal(loaded.scheduler.timesteps, pipe.scheduler.timesteps)
    assert len(pipe.scheduler.timesteps) == fewstep.nfe(sched)  # orders [1, 2, 2, 1]: 1 + 2 + 2 + 1 calls
    run = [p(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="pt").images
           for p in (pipe, loaded)]
    assert torch.equal(run[0], run[1])


def test_fewstep_scheduler_errors(digits_unet):
    unet, config = digits_unet
    scheduler = fewstep.FewstepScheduler.from_schedule(karras(4, 0.02, 80.0), config, solver="euler")
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        scheduler.set_timesteps(50)
    with pytest.raises(ValueError, match="outside the model's trained range"):
        fewstep.FewstepScheduler.from_schedule(karras(4, 0.002, 80.0), config, solver="euler")
    with pytest.raises(ValueError, match="no solver"):
        fewstep.FewstepScheduler.from_schedule(karras(4, 0.02, 80.0), config)
    with pytest.raises(ValueError, match="set_timesteps"):
        fewstep.FewstepScheduler.from_config(config).step(torch.zeros(1), 0, torch.zeros(1))
    scheduler.set_timesteps(4)
    x = torch.randn(2, 1, 8, 8)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="after the last of 4 network calls"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="sigmas= .one schedule. or schedules="):
        fewstep.FewstepScheduler(sigmas=[1.0, 0.0], schedules={})
    with pytest.raises(ValueError, match="from_schedule"):
        fewstep.FewstepScheduler(karras(4, 0.02, 80.0))


# --------------------------------------------------------------------------------------------
# from_diffusers: prediction types, errors, range

def test_prediction_types_follow_the_config(digits_unet):
    """Same network output read as eps, v or x0: D matches the VP formulas (Salimans & Ho 2022 for v)."""
    unet, config = digits_unet
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.full((2,), 3.0)
    out = unet(x / math.sqrt(10), fewstep.from_diffusers(unet, config).sigma_to_t(sigma)).sample
    alpha, s = 1 / math.sqrt(10), 3 / math.sqrt(10)
    expect = {"epsilon": x - 3 * out, "v_prediction": alpha * alpha * x - s * out, "sample": out}
    for pred, want in expect.items():
        got = fewstep.from_diffusers(unet, {**config, "prediction_type": pred})(x, sigma)
        assert rel(got, want) < 1e-5, pred


def test_from_diffusers_errors(digits_unet, digits_flow):
    unet, config = digits_unet
    with pytest.raises(ValueError, match="'eps'"):
        fewstep.from_diffusers(unet, config, prediction_type="eps")
    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        fewstep.from_diffusers(unet, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0})
    with pytest.raises(ValueError, match="flow-matching config.*'epsilon'"):
        fewstep.from_diffusers(digits_flow[0], digits_flow[1], prediction_type="epsilon")
    with pytest.raises(ValueError, match="beta_schedule|noise schedule"):
        fewstep.from_diffusers(unet, {**config, "beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="scheduler config"):
        fewstep.from_diffusers(unet)
    den = fewstep.from_diffusers(unet, config)
    with pytest.raises(ValueError, match="outside the model's trained range"):
        fewstep.sample(den, torch.randn(1, 1, 8, 8) * 80, karras(5, 0.002, 80.0), "euler")
    with pytest.raises(ValueError, match="given per sample .* and fixed"):
        fewstep.from_diffusers(unet, config, cond={"class_labels": torch.tensor([1])}, per_sample=("class_labels",))
    with pytest.raises(ValueError, match="per_sample= is for a bare network"):
        fewstep.from_diffusers(DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config)),
                               per_sample=("class_labels",))


# --------------------------------------------------------------------------------------------
# a tiny Stable Diffusion pipeline

def byte_level_clip_tokenizer(folder: Path):
    """CLIP's byte-to-unicode symbols (Radford et al. 2019's GPT-2 table) as the whole vocab, no merges."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sd(tok, channels=(32, 64), groups=8, hidden=32, layers=2):
    """A random-weight StableDiffusionPipeline on 8x8x4 latents (diffusers' own tests build theirs so)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden, norm_num_groups=groups, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=channels, in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=groups)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1,
        hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=layers,
        max_position_embeddings=77))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return tiny_sd(byte_level_clip_tokenizer(tmp_path_factory.mktemp("tokenizer")))


PROMPT, GUIDANCE = "a handwritten digit", 4.0


def sd_latents(pipe, scheduler, n, steps, **kwargs):
    pipe.scheduler = scheduler
    return pipe(PROMPT, num_images_per_prompt=n.shape[0], guidance_scale=GUIDANCE, latents=n.clone(),
                output_type="latent", num_inference_steps=steps, **kwargs).images


def test_sd_pipeline_fewstep_scheduler_matches_sample(sd_pipe):
    config = dict(sd_pipe.scheduler.config)
    den = fewstep.from_diffusers(sd_pipe, prompt=PROMPT, guidance_scale=GUIDANCE)
    assert den.shape == (4, 8, 8)
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for solver, steps in (("dpmpp_2m", 6), ("heun", 3)):
        sched = karras(steps, den.sigma_min, den.sigma_max)
        got = sd_latents(sd_pipe, fewstep.FewstepScheduler.from_schedule(sched, config, solver=solver), n, steps)
        want = fewstep.sample(den, n * math.sqrt(1 + den.sigma_max ** 2), sched, solver)
        assert rel(got, want) <= 1e-5, solver
    # a learned solver with the analytical first step, its first step learned: the first call's input is
    # kappa times the initial latents, which the pipeline takes from scale_model_input
    sigmas = karras(5, den.sigma_min, den.sigma_max).sigmas
    a, b = fewstep.solvers.chain("dpmpp_2m", sigmas)
    learned = Schedule(sigmas, solver="learned", solver_options={"a": (a * torch.tensor([1.03, 1, 1, 1, 1])).tolist(),
                                                                 "b": [row.tolist() for row in b], "afs": True})
    scheduler = fewstep.FewstepScheduler.from_schedule(learned, config)
    got = sd_latents(sd_pipe, scheduler, n, 5)
    assert rel(got, fewstep.sample(den, n * math.sqrt(1 + den.sigma_max ** 2), learned)) <= 1e-5
    scheduler.set_timesteps(5)
    assert rel(scheduler.scale_model_input(n, scheduler.timesteps[0]), n) > 1e-3  # not the identity at the first call
    sd_pipe.scheduler = EulerDiscreteScheduler.from_config(config)


def test_sd_pipeline_own_schedulers_given_the_schedule_agree_with_fewstep(sd_pipe):
    config = dict(sd_pipe.scheduler.config)
    den = fewstep.from_diffusers(sd_pipe, prompt=PROMPT, guidance_scale=GUIDANCE)
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # Euler takes sigmas= (EDM coordinates, init_noise_sigma sqrt(1 + sigma_max^2) for 'leading' spacing)
    sched = karras(8, den.sigma_min, den.sigma_max)
    euler = EulerDiscreteScheduler.from_config(config)
    kwargs = fewstep.to_diffusers(sched, sd_pipe)
    assert list(kwargs) == ["sigmas"]
    got = sd_latents(sd_pipe, euler, n, 8, **kwargs)
    want = fewstep.sample(den, n * math.sqrt(1 + den.sigma_max ** 2), sched, "euler")
    assert rel(got, want) < 1e-4
    # DPM-Solver++(2M) takes integer timesteps= only: a schedule on integer timesteps maps exactly
    ac = DDPMScheduler.from_config(config).alphas_cumprod.double()
    on_grid = Schedule(torch.cat([((1 - ac) / ac).sqrt()[[999, 600, 300, 120, 40, 10]], torch.zeros(1)]))
    dpm = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    kwargs = fewstep.to_diffusers(on_grid, dpm)
    assert kwargs == {"timesteps": [999, 600, 300, 120, 40, 10]}
    got = sd_latents(sd_pipe, dpm, n, 6, **kwargs)
    want = fewstep.sample(den, n * math.sqrt(1 + on_grid.sigma_max ** 2), on_grid, "dpmpp_2m")
    assert rel(got, want) < 1e-4
    sd_pipe.scheduler = EulerDiscreteScheduler.from_config(config)


def test_bare_network_with_cond_and_uncond_equals_the_pipeline_wrapping(sd_pipe):
    pos, neg = sd_pipe.encode_prompt(PROMPT, "cpu", 1, True)
    bare = fewstep.from_diffusers(sd_pipe.unet, sd_pipe.scheduler, guidance_scale=GUIDANCE,
                                  cond={"encoder_hidden_states": pos}, uncond={"encoder_hidden_states": neg})
    piped = fewstep.from_diffusers(sd_pipe, prompt=PROMPT, guidance_scale=GUIDANCE)
    plain = fewstep.from_diffusers(sd_pipe.unet, sd_pipe.scheduler, cond={"encoder_hidden_states": pos})
    x, sigma = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 2, torch.full((3,), 2.0)
    assert torch.equal(bare(x, sigma), piped(x, sigma))
    assert rel(bare(x, sigma), plain(x, sigma)) > 1e-3  # guidance changes the estimate
    with pytest.raises(ValueError, match="same keys"):
        fewstep.from_diffusers(sd_pipe.unet, sd_pipe.scheduler, guidance_scale=GUIDANCE,
                               cond={"encoder_hidden_states": pos}, uncond={"hidden": neg})
    with pytest.raises(ValueError, match="needs the unconditional inputs"):
        fewstep.from_diffusers(sd_pipe.unet, sd_pipe.scheduler, guidance_scale=GUIDANCE,
                               cond={"encoder_hidden_states": pos})


def test_a_pipeline_without_a_prompt_is_conditional_on_encoded_prompts(sd_pipe):
    """from_diffusers(pipe) with no prompt takes cond= rows of encode_prompts: each row is its own prompt, guided
    as the pipeline guides it; FewstepScheduler in the pipeline on a list of prompts == fewstep.sample with them."""
    config = dict(sd_pipe.scheduler.config)
    den = fewstep.from_diffusers(sd_pipe, guidance_scale=GUIDANCE)
    prompts = ["a cat", PROMPT, "seven"]
    pool = fewstep.encode_prompts(sd_pipe, prompts, batch_size=2)
    assert set(pool) == {"encoder_hidden_states"} and pool["encoder_hidden_states"].shape[0] == 3
    x, sigma = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 3, torch.full((3,), 3.0)
    out = den(x, sigma, cond=pool)
    for i, p in enumerate(prompts):
        fixed = fewstep.from_diffusers(sd_pipe, prompt=p, guidance_scale=GUIDANCE)
        assert rel(out[i:i + 1], fixed(x[i:i + 1], sigma[i:i + 1])) <= 1e-5, p
    assert den.name.endswith("@w4") and den.guidance == GUIDANCE
    # the embeddings hold no graph into the text encoder: a learned method backpropagates through them many times
    fixed = fewstep.from_diffusers(sd_pipe, prompt=PROMPT, guidance_scale=GUIDANCE)
    for d, c in ((den, pool), (fixed, None)):
        sched = fewstep.optimize(d, "ld3", "dpmpp_2m", 3, n=2, cond=c and fewstep.conditions.rows(c, slice(0, 2)),
                                 teacher=fewstep.Teacher(d, steps=8), iters=3)
        assert len(sched.sigmas) == 4
    fp = fewstep.models.info.fingerprint
    assert fp(den) != fp(fewstep.from_diffusers(sd_pipe, guidance_scale=2.0))
    with pytest.raises(TypeError, match="cond"):
        den(x, sigma)
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sched = karras(5, den.sigma_min, den.sigma_max)
    sd_pipe.scheduler = fewstep.FewstepScheduler.from_schedule(sched, config, solver="dpmpp_2m")
    got = sd_pipe(prompts[:2], guidance_scale=GUIDANCE, latents=n.clone(), output_type="latent",
                  num_inference_steps=5).images
    want = fewstep.sample(den, n * math.sqrt(1 + den.sigma_max ** 2), sched, "dpmpp_2m",
                          cond=fewstep.encode_prompts(sd_pipe, prompts[:2]))
    assert rel(got, want) <= 1e-5
    sd_pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    one = fewstep.encode_prompts(sd_pipe, "a cat")["encoder_hidden_states"]  # one prompt: one row
    assert one.shape[0] == 1  # equal to its row in a batch up to the rounding a batch of another size gives
    torch.testing.assert_close(one, pool["encoder_hidden_states"][:1], rtol=1e-5, atol=1e-5)
    for bad in ([], [1], ["a cat", None]):
        with pytest.raises(ValueError, match="non-empty list of strings"):
            fewstep.encode_prompts(sd_pipe, bad)
    with pytest.raises(ValueError, match="batch_size"):
        fewstep.encode_prompts(sd_pipe, prompts, batch_size=0)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A smaller random SD pipeline saved as a folder (save_pretrained), and a prompts file of four prompts."""
    folder = tmp_path_factory.mktemp("sd")
    tiny_sd(byte_level_clip_tokenizer(folder), channels=(8, 16), groups=4, hidden=16, layers=1).save_pretrained(
        folder / "pipe")
    (folder / "prompts.txt").write_text("a handwritten digit\na cat\n\nseven\nzero\n")
    return folder


def test_cli_tunes_a_pipeline_folder_over_its_prompts(sd_folder, tmp_path, monkeypatch, capsys):
    """fewstep tune --model FOLDER --prompts FILE --guidance-scale: calibrated on two prompts, scored on the two
    others; the best schedule samples the pipeline's model with the prompts in turn."""
    from fewstep import cli

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    model = ["--model", str(sd_folder / "pipe"), "--prompts", str(sd_folder / "prompts.txt"), "--guidance-scale", "4"]
    assert cli.main(["tune", *model, "--quick", "--json", "-o", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["guidance"] == 4.0 and results["key"]["conds"]
    status = {(c["method"], c["status"]) for c in results["cells"]}
    assert {s for _, s in status} <= {"ok", "skipped", "pruned"}  # none failed
    assert {m for m, s in status if s == "ok"} >= {"gits", "oss", "ld3", "karras"}
    assert ("instance", "skipped") not in status  # phi sees the prompt's embedding beside the noise
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Calibrated on 2 conditions; scored on 2 other conditions" in report
    assert "Plots not made" not in report  # the trajectories under the prompts' embeddings
    capsys.readouterr()
    assert cli.main(["sample", *model, "--schedule", str(tmp_path / "out" / "best" / "nfe-5.json"), "--n", "3",
                     "-o", str(tmp_path / "s.pt")]) == 0
    assert torch.load(tmp_path / "s.pt")["samples"].shape == (3, 4, 8, 8)


def test_cli_conditioning_errors(sd_folder, tmp_path, monkeypatch, capsys):
    from fewstep import cli

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    pipe, prompts = str(sd_folder / "pipe"), str(sd_folder / "prompts.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "one.txt").write_text("a cat\n")
    (tmp_path / "junk.pt").write_text("not a torch file")
    torch.save(torch.zeros(0, 10), tmp_path / "none.pt")
    tune = ["tune", "--nfe", "4", "--methods", "karras", "--solvers", "euler", "--n-calib", "2", "--n-test", "2",
            "-o", str(tmp_path / "out")]
    cases = [
        (["--model", pipe, "--prompts", str(tmp_path / "empty.txt")], "has no prompts"),
        (["--model", pipe, "--prompts", str(tmp_path / "missing.txt")], "could not be read"),
        (["--model", "gmm2d", "--prompts", prompts], "--prompts needs a diffusers pipeline folder"),
        (["--model", pipe, "--prompts", prompts, "--conds", str(tmp_path / "none.pt")], "not both"),
        (["--model", pipe], "conditional"),
        (["--model", pipe, "--prompts", str(tmp_path / "one.txt")], "at least 2 conditions"),
        (["--model", "gmm-cond", "--conds", str(tmp_path / "junk.pt")], "could not be read as a torch file"),
        (["--model", "gmm-cond", "--conds", str(tmp_path / "none.pt")], "holds no conditions"),
        (["--model", "gmm2d", "--negative-prompt", "blurry"], "--negative-prompt is for a diffusers pipeline"),
        (["--model", str(tmp_path), "--prompts", prompts], "--prompts needs a diffusers pipeline folder"),
    ]
    for args, match in cases:
        assert cli.main([*tune, *args]) == 2, args
        assert match in capsys.readouterr().err, (args, match)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_to_diffusers_errors(digits_unet, sd_pipe):
    unet, config = digits_unet
    sched = karras(6, 0.02, 80.0)
    with pytest.raises(ValueError, match="DDPMPipeline passes neither"):
        fewstep.to_diffusers(sched, DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config)))
    with pytest.raises(ValueError, match="DDIMScheduler takes neither"):
        fewstep.to_diffusers(sched, DDIMScheduler.from_config(config))
    with pytest.raises(ValueError, match="outside the model's trained range"):
        fewstep.to_diffusers(karras(6, 0.002, 80.0), EulerDiscreteScheduler.from_config(config))
    dpm = DPMSolverMultistepScheduler.from_config(config)  # integer timesteps= only
    with pytest.raises(ScheduleError, match="DPMSolverMultistepScheduler turned the schedule"):
        fewstep.to_diffusers(Schedule([0.05, 0.0165, 0.0]), dpm)  # between t = 1 (0.0148) and t = 2 (0.0190)
    with pytest.raises(ScheduleError, match="repeated integer timesteps"):
        fewstep.to_diffusers(logsnr_uniform(12, 0.011, 0.05), dpm)
    ddpm = DDPMScheduler.from_config(config)  # takes integer timesteps= only; nearest ones, within rtol
    with pytest.raises(ScheduleError, match="tolerance 0.05"):
        fewstep.to_diffusers(sched, ddpm)  # the nearest integer timestep to sigma 0.02 has sigma 0.01897
    assert len(fewstep.to_diffusers(sched, ddpm, rtol=0.06)["timesteps"]) == 6
    timesteps = fewstep.to_diffusers(karras(6, 0.05, 80.0), ddpm)["timesteps"]
    ddpm.set_timesteps(timesteps=timesteps)
    assert ddpm.timesteps.tolist() == timesteps and timesteps[0] > timesteps[-1]


# --------------------------------------------------------------------------------------------
# flow matching: the shift trap, and the shipped flow model in an SD3-style loop

@pytest.mark.parametrize("cfg,mu", [({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.8),
                                    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 2.5)])
def test_flow_sigmas_stay_the_schedules_after_the_shift(cfg, mu):
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg)
    sched = karras(7, 0.01, 200.0)
    t = sched.sigmas[:-1] / (1 + sched.sigmas[:-1])
    kwargs = fewstep.to_diffusers(sched, scheduler, mu=mu)
    scheduler.set_timesteps(**kwargs, mu=mu)
    assert torch.allclose(scheduler.sigmas.double(), torch.cat([t, t.new_zeros(1)]), rtol=1e-5, atol=1e-7)
    assert torch.allclose(scheduler.timesteps.double(), t * 1000, rtol=1e-5)
    scheduler.set_timesteps(sigmas=t.tolist(), mu=mu)  # the trap: handing the times over as they are
    assert not torch.allclose(scheduler.sigmas[:-1].double(), t, rtol=1e-2)


def test_flow_to_diffusers_errors():
    sched = karras(5, 0.01, 200.0)
    with pytest.raises(ValueError, match="pass mu="):
        fewstep.to_diffusers(sched, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="shift_terminal"):
        fewstep.to_diffusers(sched, FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1))
    with pytest.raises(ScheduleError, match="ends at sigma 0"):
        fewstep.to_diffusers(karras(5, 0.01, 200.0, final_zero=False), FlowMatchEulerDiscreteScheduler())


def sd3_loop(unet, scheduler, n, **kwargs):
    """The loop of diffusers' SD3 / Flux pipelines: latents = noise, no scale_model_input."""
    scheduler.set_timesteps(**kwargs)
    x = n.clone()
    for t in scheduler.timesteps:
        v = unet(x, t.expand(x.shape[0])).sample
        x = scheduler.step(v, t, x).prev_sample
    return x


def test_shipped_flow_model_in_an_sd3_style_loop(digits_flow):
    unet, config = digits_flow
    den = fewstep.from_diffusers(unet, config)
    n = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = karras(6, den.sigma_min, den.sigma_max)
    x_init = n * (1 + den.sigma_max)  # the loop's latents are x_t = x / (1 + sigma)
    want = fewstep.sample(den, x_init, sched, "euler")
    shifted = FlowMatchEulerDiscreteScheduler.from_config({**config, "shift": 3.0})
    got = sd3_loop(unet, shifted, n, **fewstep.to_diffusers(sched, shifted))
    assert rel(got, want) < 1e-4  # flow Euler on x_t and EDM Euler on x are the same steps (DDIM)
    for solver in ("dpmpp_2m", "heun"):
        got = sd3_loop(unet, fewstep.FewstepScheduler.from_schedule(sched, config, solver=solver), n,
                       num_inference_steps=6)
        assert rel(got, fewstep.sample(den, x_init, sched, solver)) < 1e-5, solver


def test_tune_best_schedule_drops_into_a_pipeline(digits_unet, tmp_path):
    """fewstep.tune's best/nfe-<N>.json runs in DDPMPipeline through FewstepScheduler, at exactly N calls; the
    whole run goes in with from_tune, which picks by num_inference_steps = NFE and says which budgets it has."""
    unet, config = digits_unet
    den = fewstep.load_model("digits-unet")
    fewstep.tune(den, nfe=[4, 5], methods=["karras", "oss"], solvers=["dpmpp_2m", "heun"], outdir=tmp_path,
                 n_calib=8, n_test=8, teacher=fewstep.Teacher(den, steps=64, sigma_min=den.sigma_min),
                 progress=False, report=False)
    best = fewstep.Schedule.load(tmp_path / "best" / "nfe-4.json")
    scheduler = fewstep.FewstepScheduler.from_schedule(best, config)
    assert len(scheduler.timesteps) == fewstep.nfe(best) == 4
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=best.steps,
               output_type="pt").images
    n = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = fewstep.sample(fewstep.from_diffusers(unet, config), n * math.sqrt(1 + best.sigma_max ** 2), best)
    assert rel(out, (ref / 2 + 0.5).clamp(0, 1)) <= 2e-5
    tuned = fewstep.FewstepScheduler.from_tune(tmp_path)  # the run was on digits-unet: its config is found
    assert tuned.budgets == [4, 5]
    pipe.scheduler = tuned
    for k in (4, 5):
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=k,
                   output_type="pt").images
        chosen = fewstep.Schedule.load(tmp_path / "best" / f"nfe-{k}.json")
        assert tuned.schedule.to_list() == chosen.to_list() and len(tuned.timesteps) == k
        ref = fewstep.sample(fewstep.from_diffusers(unet, config), n * math.sqrt(1 + chosen.sigma_max ** 2), chosen)
        assert rel(out, (ref / 2 + 0.5).clamp(0, 1)) <= 2e-5
    with pytest.raises(ValueError, match=r"tuned schedules for NFE \[4, 5\].*got 6"):
        pipe(batch_size=1, num_inference_steps=6)
    pipe.save_pretrained(tmp_path / "pipe")
    assert DDPMPipeline.from_pretrained(tmp_path / "pipe").scheduler.budgets == [4, 5]
    (tmp_path / "results.json").unlink()
    with pytest.raises(ValueError, match="pass its scheduler config"):
        fewstep.FewstepScheduler.from_tune(tmp_path)
    assert fewstep.FewstepScheduler.from_tune(tmp_path, config).budgets == [4, 5]
    with pytest.raises(FileNotFoundError, match="fewstep tune -o"):
        fewstep.FewstepScheduler.from_tune(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# flow pipelines diffusers ships: SD3 and Flux, tiny and random, against their own loops

def clip_config(tok, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
                          pad_token_id=len(tok) - 1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, **kw)


def tiny_vae(latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         norm_num_groups=8, shift_factor=0.0, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",))


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    """Two CLIP encoders with projection and no T5 (encode_prompt pads its part with zeros), shift 3."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok = byte_level_clip_tokenizer(tmp_path_factory.mktemp("sd3-tokenizer"))
    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                joint_attention_dim=32, pooled_projection_dim=64)
    pipe = StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config(tok, projection_dim=32)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tok, projection_dim=32)), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    """Flux with guidance embedding, dynamic shifting, a CLIP encoder and a one-layer T5 encoder (the byte-level
    tokenizer stands in for T5's: the pipeline only needs ids)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("flux-tokenizer")
    tok = byte_level_clip_tokenizer(folder)
    t5_tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=512)
    torch.manual_seed(0)
    net = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                 axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    pipe = FluxPipeline(
        transformer=net, vae=tiny_vae(1), text_encoder=CLIPTextModel(clip_config(tok)), tokenizer=tok,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                               num_heads=4, dropout_rate=0.0)), tokenizer_2=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def network_calls(net):
    """Record (hidden_states, timestep, output) of every forward of ``net`` (a forward hook)."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((kwargs.get("hidden_states", args[0] if args else None).clone(), kwargs["timestep"].clone(),
                      out[0] if isinstance(out, tuple) else out.sample))

    return calls, net.register_forward_hook(hook, with_kwargs=True)


def pipeline_denoised(calls, time_unit, guidance=None, batched=True):
    """(x_t, t, x0) the pipeline computed at each step: D = x_t - t v with the pipeline's guided velocity (the
    network's timestep is t * time_unit)."""
    out = []
    if not batched:  # Flux's true CFG: a conditional call, then an unconditional one
        calls = [(c[0], c[1], u[2] + guidance * (c[2] - u[2])) for c, u in zip(calls[::2], calls[1::2])]
    for x_in, t, v in calls:
        if guidance is not None and batched:
            x_in, t = x_in.chunk(2)[0], t.chunk(2)[0]
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        t = t.double() / time_unit
        out.append((x_in, t, x_in - t.reshape(-1, *[1] * (x_in.ndim - 1)) * v))
    return out


def check_denoiser_is_the_pipelines(den, calls, time_unit, **kwargs):
    """At every (x_t, t) the pipeline's network saw, D(x, sigma) == x_t - t v (relative 1e-5)."""
    worst, compared = 0.0, 0
    for x_t, t, want in pipeline_denoised(calls, time_unit, **kwargs):
        if (t >= 1).any():  # the pipelines' first call is at t = 1, sigma = inf: no EDM state to compare
            continue
        compared += 1
        sigma = t / (1 - t)
        got = den(x_t.double() * (1 + sigma).reshape(-1, *[1] * (x_t.ndim - 1)), sigma)
        worst = max(worst, rel(got, want))
    assert compared >= 2
    return worst


SD3_PROMPT = "a small red house"


def test_sd3_denoiser_is_the_pipelines_model(sd3_pipe):
    calls, handle = network_calls(sd3_pipe.transformer)
    try:
        sd3_pipe(SD3_PROMPT, height=8, width=8, num_inference_steps=4, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        handle.remove()
    den = fewstep.from_diffusers(sd3_pipe, prompt=SD3_PROMPT, guidance_scale=GUIDANCE)
    assert den.shape == (4, 8, 8) and len(calls) == 4
    assert check_denoiser_is_the_pipelines(den, calls, 1000, guidance=GUIDANCE) <= 1e-5
    unguided = fewstep.from_diffusers(sd3_pipe, prompt=SD3_PROMPT)  # guidance 1: the conditional estimate only
    assert check_denoiser_is_the_pipelines(unguided, calls, 1000, guidance=GUIDANCE) > 1e-3


def test_sd3_fewstep_scheduler_matches_sample(sd3_pipe):
    den = fewstep.from_diffusers(sd3_pipe, prompt=SD3_PROMPT, guidance_scale=GUIDANCE)
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for solver, steps in (("dpmpp_2m", 5), ("heun", 3)):
        sched = fewstep.schedules.flow_uniform(steps, den.sigma_min, den.sigma_max, shift=3.0)
        sd3_pipe.scheduler = fewstep.FewstepScheduler.from_schedule(sched, sd3_pipe.scheduler.config, solver=solver)
        got = sd3_pipe(SD3_PROMPT, num_images_per_prompt=2, guidance_scale=GUIDANCE, latents=n.clone(),
                       num_inference_steps=steps, output_type="latent").images
        want = fewstep.sample(den, n.double() * (1 + den.sigma_max), sched, solver)  # latents are x_t = x / (1 + sigma)
        assert rel(got, want) <= 1e-5, solver
    sd3_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)


FLUX_PROMPT, FLUX_GUIDANCE = "a handwritten seven", 3.5


def flux_run(pipe, **kwargs):
    return pipe(FLUX_PROMPT, height=8, width=8, guidance_scale=FLUX_GUIDANCE, max_sequence_length=16,
                output_type="latent", **kwargs).images


def test_flux_denoiser_is_the_pipelines_model(flux_pipe):
    """Flux's transformer takes t in [0, 1]: the wrapped denoiser equals the pipeline's model; wrapped as the
    scheduler's timesteps (t * 1000, fewstep 0.1's mistake) it is another model."""
    calls, handle = network_calls(flux_pipe.transformer)
    try:
        flux_run(flux_pipe, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
        flux_run(flux_pipe, num_inference_steps=3, generator=torch.Generator().manual_seed(0), true_cfg_scale=2.0,
                 negative_prompt="blurry")
    finally:
        handle.remove()
    plain, cfg = calls[:4], calls[4:]
    den = fewstep.from_diffusers(flux_pipe, prompt=FLUX_PROMPT, height=8, width=8, guidance_scale=FLUX_GUIDANCE,
                                 max_sequence_length=16)
    assert den.shape == (16, 4)  # packed latents: (8/2)(8/2) tokens of 2x2x1 channels
    assert check_denoiser_is_the_pipelines(den, plain, 1) <= 1e-5
    guided = fewstep.from_diffusers(flux_pipe, prompt=FLUX_PROMPT, height=8, width=8, guidance_scale=FLUX_GUIDANCE,
                                    max_sequence_length=16, true_cfg_scale=2.0, negative_prompt="blurry")
    assert check_denoiser_is_the_pipelines(guided, cfg, 1, guidance=2.0, batched=False) <= 1e-5
    wrong = fewstep.from_diffusers(flux_pipe, prompt=FLUX_PROMPT, height=8, width=8, guidance_scale=FLUX_GUIDANCE,
                                   max_sequence_length=16, time_scale=1000)
    assert check_denoiser_is_the_pipelines(wrong, plain, 1) > 1e-3
    # a bare transformer gets the same unit from its class, and the pipeline's mu sets the sigma range
    bare = fewstep.from_diffusers(flux_pipe.transformer, flux_pipe.scheduler, cond=guided.model.cond, mu=0.5)
    assert bare.model.net is flux_pipe.transformer and bare.time_scale == 1.0
    assert (bare.sigma_min, bare.sigma_max) == pytest.approx(fewstep.integrations.diffusers.flow_sigma_range(
        flux_pipe.scheduler, mu=0.5))


def test_flux_fewstep_scheduler_matches_sample(flux_pipe, caplog):
    den = fewstep.from_diffusers(flux_pipe, prompt=FLUX_PROMPT, height=8, width=8, guidance_scale=FLUX_GUIDANCE,
                                 max_sequence_length=16)
    n = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(2))
    sched = fewstep.schedules.karras(4, den.sigma_min, den.sigma_max)
    own = flux_pipe.scheduler
    flux_pipe.scheduler = fewstep.FewstepScheduler.from_schedule(sched, own.config, solver="unipc")
    try:
        with caplog.at_level("WARNING"):
            got = flux_run(flux_pipe, num_images_per_prompt=2, latents=n.clone(), num_inference_steps=4)
    finally:
        flux_pipe.scheduler = own
    assert "ignores" not in caplog.text  # FluxPipeline always passes sigmas=: not a user's mistake
    want = fewstep.sample(den, n.double() * (1 + den.sigma_max), sched, "unipc")
    assert rel(got, want) <= 1e-5


def test_flow_pipeline_errors(flux_pipe, sd3_pipe):
    import copy

    no_t5 = copy.copy(flux_pipe)
    no_t5.text_encoder_2 = None
    with pytest.raises(ValueError, match="no text_encoder_2 .* pass prompt_embeds= and pooled_prompt_embeds="):
        fewstep.from_diffusers(no_t5, prompt=FLUX_PROMPT)
    with pytest.raises(ValueError, match="unknown argument.*'num_inference_steps'.*prompt_3"):
        fewstep.from_diffusers(sd3_pipe, prompt=SD3_PROMPT, num_inference_steps=4)
    with pytest.raises(ValueError, match="need a pipeline"):
        fewstep.from_diffusers(sd3_pipe.transformer, sd3_pipe.scheduler, prompt=SD3_PROMPT)

    class MyTransformer2DModel(torch.nn.Module):  # a diffusers transformer fewstep has not checked
        pass

    MyTransformer2DModel.__module__ = "diffusers.models.transformers.my_transformer"
    with pytest.raises(ValueError, match="how MyTransformer2DModel takes its timestep: pass time_scale="):
        fewstep.from_diffusers(MyTransformer2DModel(), sd3_pipe.scheduler)
    assert fewstep.from_diffusers(MyTransformer2DModel(), sd3_pipe.scheduler, time_scale=1000).time_scale == 1000


# --------------------------------------------------------------------------------------------
# diffusers' scheduler contract (the properties of its SchedulerCommonTest, tests/schedulers/test_schedulers.py)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def sd_scheduler(solver, **kwargs):
    """A FewstepScheduler made as a user would from Stable Diffusion's Euler config, without a schedule of its own."""
    return fewstep.FewstepScheduler.from_config(EulerDiscreteScheduler(**SD_BETAS).config, solver=solver, **kwargs)


@pytest.mark.parametrize("solver", fewstep.solvers.PLANNED)
def test_scheduler_common_properties(solver, tmp_path):
    scheduler = sd_scheduler(solver)
    sample = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    residual = 0.1 * sample
    scheduler.set_timesteps(10)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.scale_model_input(sample, 0.0).shape == sample.shape
    assert len(scheduler.timesteps) == fewstep.nfe(scheduler.schedule) and scheduler.schedule.steps == 10
    # step_shape: two steps at timesteps that are not the schedule's, on the same sample
    out_0 = scheduler.step(residual, 0, sample).prev_sample
    out_1 = scheduler.step(residual, 1, sample).prev_sample
    assert out_0.shape == sample.shape == out_1.shape and scheduler.step_index == 2
    # outputs equivalence: return_dict=False gives the same tensor
    scheduler.set_timesteps(10)
    as_dict = scheduler.step(residual, scheduler.timesteps[0], sample).prev_sample
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.step(residual, scheduler.timesteps[0], sample, return_dict=False)[0], as_dict)
    # save / load: same config, same step
    scheduler.save_pretrained(tmp_path / "s")
    loaded = fewstep.FewstepScheduler.from_pretrained(tmp_path / "s")
    assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == \
        {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    loaded.set_timesteps(10)
    assert torch.equal(loaded.step(residual, loaded.timesteps[0], sample).prev_sample, as_dict)
    # add_noise_device: 100 steps, the 6th timestep
    scheduler.set_timesteps(100)
    noise = torch.randn_like(sample)
    assert scheduler.add_noise(sample, noise, scheduler.timesteps[5][None]).shape == sample.shape
    # trained_betas survive save / load
    betas = sd_scheduler(solver, trained_betas=np.array([0.1, 0.3]))
    betas.save_pretrained(tmp_path / "b")
    assert fewstep.FewstepScheduler.from_pretrained(tmp_path / "b").betas.tolist() == betas.betas.tolist() \
        == pytest.approx([0.1, 0.3])


def test_add_noise_and_indices_follow_diffusers():
    """add_noise is DDPM's sqrt(abar) x0 + sqrt(1 - abar) n (flow: (1 - t) x0 + t n) at the call's sigma, chosen as
    diffusers' schedulers choose it: by timestep, then the begin index (img2img), then the next call (inpainting)."""
    scheduler = sd_scheduler("dpmpp_2m")
    scheduler.set_timesteps(6)
    ddpm = DDPMScheduler(**SD_BETAS)
    x0, n = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    top = scheduler.timesteps[:1]  # the schedule starts at the trained top, t = 999
    assert top.item() == pytest.approx(999, abs=1e-3)
    assert rel(scheduler.add_noise(x0, n, top), ddpm.add_noise(x0, n, torch.tensor([999]))) < 1e-6
    assert scheduler.begin_index is None and scheduler.step_index is None
    scheduler.set_begin_index(2)
    at_begin = scheduler.add_noise(x0, n, scheduler.timesteps[:1])  # the begin index decides, as in Euler's
    assert torch.equal(at_begin, scheduler.add_noise(x0, n, scheduler.timesteps[2:3]))
    scheduler.step(torch.zeros_like(x0), scheduler.timesteps[2], at_begin)
    assert scheduler.begin_index == 2 and scheduler.step_index == 3
    s3 = scheduler.sigmas[3].double()
    assert rel(scheduler.add_noise(x0, n, scheduler.timesteps[3:4]), (x0 + s3 * n) / (1 + s3 ** 2).sqrt()) < 1e-6
    fresh = sd_scheduler("euler")
    fresh.set_timesteps(4)
    with pytest.raises(ValueError, match="not all among this scheduler's timesteps"):
        fresh.add_noise(x0, n, torch.tensor([500.5]))
    flow = fewstep.FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    flow.set_timesteps(5)
    t = flow.timesteps[1:2] / 1000
    assert rel(flow.scale_noise(x0, flow.timesteps[1:2], n), (1 - t) * x0 + t * n) < 1e-6


def test_heun_begin_index_must_start_a_step():
    odd = sd_scheduler("heun")  # every Heun step two calls, the last one: order 2, like diffusers' Heun
    odd.set_timesteps(4)
    assert odd.order == 2 and len(odd.timesteps) == 7
    odd.set_begin_index(2 * 2)
    even = fewstep.FewstepScheduler.from_schedule(karras(3, 0.03, 14.0).with_metadata(
        solver="heun", solver_options={"orders": [1, 2, 1]}), EulerDiscreteScheduler(**SD_BETAS).config)
    even.set_timesteps(3)
    with pytest.raises(ValueError, match=r"timesteps\[2\] is not the first network call of a step.*calls \[0, 1, 3\]"):
        even.set_begin_index(2)
    even.set_begin_index(1)


def test_from_config_of_other_schedulers():
    euler = EulerDiscreteScheduler(**SD_BETAS)
    vp = fewstep.FewstepScheduler.from_config(euler.config)
    assert vp.config.kind == "vp" and vp.config.solver == "dpmpp_2m" and vp.budgets is None
    assert vp.sigma_max == pytest.approx(14.6146, rel=1e-5)
    vp.set_timesteps(7)
    assert vp.schedule.metadata["method"] == "karras" and vp.schedule.sigma_max == vp.sigma_max
    for other in (FlowMatchEulerDiscreteScheduler(shift=3.0),
                  diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                    prediction_type="flow_prediction")):
        flow = fewstep.FewstepScheduler.from_config(other.config)
        assert flow.config.kind == "flow" and flow.config.shift == 3.0
        flow.set_timesteps(6)
        assert flow.schedule.metadata["params"]["shift"] == 3.0 and len(flow.timesteps) == 6
    flux = fewstep.FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="pass mu="):
        flux.set_timesteps(4)
    flux.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.9)  # as FluxPipeline calls it: 4 steps, shift e^0.9
    assert flux.schedule.steps == 4 and flux.schedule.metadata["params"]["shift"] == pytest.approx(math.exp(0.9))


def test_compatible_schedulers_round_trip(digits_unet):
    """A FewstepScheduler's config goes through every compatible scheduler and comes back unchanged."""
    fs = fewstep.FewstepScheduler.from_schedule(karras(5, 0.02, 80.0), digits_unet[1], solver="heun")
    assert set(fs._compatibles) >= {"EulerDiscreteScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler"}
    assert all(c is not None for c in fs.compatibles) and len(fs.compatibles) >= 15
    mine = {k: v for k, v in fs.config.items() if k != "_use_default_values"}
    for cls in fs.compatibles:
        back = fewstep.FewstepScheduler.from_config(cls.from_config(fs.config).config)
        assert {k: back.config[k] for k in mine} == mine, cls.__name__


def test_schedule_rounding_is_clipped_onto_the_trained_range(sd_pipe, tmp_path):
    """diffusers' own AYS list for SD starts at 14.615, SD's top sigma is 14.6146: clipped, and recorded."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    config = sd_pipe.scheduler.config
    published = Schedule(AysSchedules["StableDiffusionSigmas"], method="ays")  # ends at 0
    scheduler = fewstep.FewstepScheduler.from_schedule(published, config, solver="dpmpp_2m")
    top = fewstep.from_diffusers(sd_pipe).sigma_max
    assert scheduler.schedule.sigma_max == top and scheduler.schedule.metadata["method"] == "ays"
    assert scheduler.schedule.metadata["clipped_to_range"] == [[14.615, top]]
    scheduler.save_pretrained(tmp_path)
    assert fewstep.FewstepScheduler.from_pretrained(tmp_path).schedule.metadata["clipped_to_range"] == [[14.615, top]]
    assert fewstep.to_diffusers(published, EulerDiscreteScheduler.from_config(config))["sigmas"][0] == top
    with pytest.raises(ScheduleError, match="sigma 14.7 is outside the model's trained range .0.0291.*, 14.6146. by "
                                            "more than rounding"):
        fewstep.FewstepScheduler.from_schedule(Schedule([14.7, 1.0, 0.0]), config, solver="euler")


# --------------------------------------------------------------------------------------------
# img2img, inpainting, callbacks that edit latents: against diffusers' own Euler and DPM-Solver++

def unet_calls(pipe):
    """Record (latent input, timestep) of every UNet forward (the conditional half under CFG)."""
    seen = []

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append((x.chunk(2)[0].clone(), float(torch.as_tensor(t).flatten()[0])))

    return seen, pipe.unet.register_forward_hook(hook, with_kwargs=True)


def image_pipelines(sd_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    pipes = {"img2img": StableDiffusionImg2ImgPipeline(**sd_pipe.components),
             "inpaint": StableDiffusionInpaintPipeline(**sd_pipe.components)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def run_image_pipeline(pipe, scheduler, strength, steps, **kwargs):
    pipe.scheduler = scheduler
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    extra = {"mask_image": (torch.arange(8)[None, None, :, None] < 4).float().expand(1, 1, 8, 8)} \
        if "mask_image" in inspect.signature(pipe.__call__).parameters else {}
    return pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=g, output_type="latent", **extra, **kwargs).images


@pytest.mark.parametrize("kind,strength", [("img2img", 0.6), ("img2img", 1.0), ("inpaint", 0.6), ("inpaint", 1.0)])
def test_image_pipelines_run_the_tail_of_the_schedule(sd_pipe, kind, strength):
    """img2img / inpainting skip the schedule's first steps: FewstepScheduler runs the rest, with the UNet called
    as that tail says, and gives what diffusers' Euler gives on the same sigmas (its latents are EDM's x, ours
    x / sqrt(1 + sigma^2): adding noise, mask blending and stepping commute with that scale)."""
    pipe = image_pipelines(sd_pipe)[kind]
    config = sd_pipe.scheduler.config
    den = fewstep.from_diffusers(sd_pipe)
    sched = karras(5, den.sigma_min, den.sigma_max)
    euler = EulerDiscreteScheduler.from_config(config)
    want = run_image_pipeline(pipe, euler, strength, None, **fewstep.to_diffusers(sched, euler))
    for solver in ("euler", "dpmpp_2m", "heun"):
        scheduler = fewstep.FewstepScheduler.from_schedule(sched, config, solver=solver)
        seen, handle = unet_calls(pipe)
        try:
            got = run_image_pipeline(pipe, scheduler, strength, 5)
        finally:
            handle.remove()
        first = 5 - int(5 * strength)
        tail = Schedule(sched.sigmas[first:])
        assert len(seen) == fewstep.nfe(tail, solver), (solver, len(seen))
        assert [t for _, t in seen] == pytest.approx(scheduler.timesteps[scheduler.order * first:].tolist())
        if solver == "euler":
            assert rel(got * (1 + sched.sigmas[-1] ** 2) ** 0.5, want) < 1e-4
        elif kind == "img2img":  # no edits: exactly fewstep.sample on the tail from the noised image
            x_init = seen[0][0].double() * (1 + tail.sigma_max ** 2) ** 0.5
            assert rel(got, fewstep.sample(fewstep.from_diffusers(sd_pipe, prompt=PROMPT, guidance_scale=GUIDANCE),
                                           x_init, tail, solver)) < 1e-5
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)


def scale_latents_at(step, factor):
    def callback(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * factor} if i == step else {}

    return callback


def test_callbacks_that_edit_latents_are_followed(sd_pipe):
    """A callback_on_step_end that changes the latents: the solver goes on from them with its history, as
    diffusers' Euler and DPM-Solver++(2M) do (same sigmas, same edits)."""
    config = dict(sd_pipe.scheduler.config)
    den = fewstep.from_diffusers(sd_pipe)
    n = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ac = DDPMScheduler.from_config(config).alphas_cumprod.double()
    on_grid = Schedule(torch.cat([((1 - ac) / ac).sqrt()[[999, 700, 400, 200, 80, 20]], torch.zeros(1)]))
    karras6 = karras(6, den.sigma_min, den.sigma_max)
    edit = scale_latents_at(2, 0.8)
    cases = (("euler", karras6, EulerDiscreteScheduler.from_config(config)),
             ("dpmpp_2m", on_grid, DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")))
    for solver, sched, theirs in cases:
        want = sd_latents(sd_pipe, theirs, n, 6, callback_on_step_end=edit, **fewstep.to_diffusers(sched, theirs))
        plain = sd_latents(sd_pipe, fewstep.FewstepScheduler.from_schedule(sched, config, solver=solver), n, 6)
        got = sd_latents(sd_pipe, fewstep.FewstepScheduler.from_schedule(sched, config, solver=solver), n, 6,
                         callback_on_step_end=edit)
        assert rel(got, want) < 1e-4, solver
        assert rel(got, plain) > 1e-2  # the edit changed the result
    sd_pipe.scheduler = EulerDiscreteScheduler.from_config(config)


def test_sd3_img2img_runs_the_tail_like_flowmatch_euler(sd3_pipe):
    """Flow img2img noises with scale_noise, (1 - t) x0 + t n at the begin index: FewstepScheduler's Euler on the
    tail == diffusers' FlowMatchEuler on the same sigmas (flow Euler on x_t and EDM Euler on x are the same step)."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    den = fewstep.from_diffusers(sd3_pipe)
    sched = fewstep.schedules.flow_uniform(5, den.sigma_min, den.sigma_max, shift=3.0)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(scheduler, **kwargs):
        pipe.scheduler = scheduler
        return pipe(SD3_PROMPT, image=image, strength=0.6, guidance_scale=GUIDANCE, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    want = run(theirs, **fewstep.to_diffusers(sched, theirs))
    ours = fewstep.FewstepScheduler.from_schedule(sched, sd3_pipe.scheduler.config, solver="euler")
    got = run(ours, num_inference_steps=5)
    assert ours.begin_index == 2 and ours.step_index == 5
    assert rel(got, want) < 1e-4
