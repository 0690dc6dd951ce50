"""Device handling that a CPU-only machine can check: where a denoiser computes, moving one, bad devices.
The same pipeline on a GPU is run by bench/gpu.py (it compares every stage with the CPU)."""

import pytest
import torch
from torch import nn

import fewstep
from fewstep.cli import main
from fewstep.models.device import model_device, resolve_device, to_device


class _Wrapped:
    """A fewstep-style wrapper two levels above a torch module (like den.model.net for diffusers)."""

    def __init__(self, net):
        self.model = type("Inner", (), {})()
        self.model.net = net

    def __call__(self, x, sigma):
        return self.model.net(x)


def test_model_device_finds_a_wrapped_module_and_to_device_moves_it():
    net = nn.Linear(2, 2).double()
    den = _Wrapped(net)
    assert model_device(den) == torch.device("cpu")
    to_device(den, "meta")  # a second device every machine has (no data): the module goes there
    assert net.weight.device == torch.device("meta") and model_device(den) == torch.device("meta")
    assert model_device(lambda x, s: x) == torch.device("cpu")  # a plain function: the CPU


def test_builtin_models_report_and_move_their_tensors():
    gmm = fewstep.load_model("gmm2d", device="cpu")
    assert gmm.device == torch.device("cpu") and fewstep.models.model_info(gmm)["device"] == "cpu"
    assert to_device(gmm, "meta").means.device == torch.device("meta")
    digits = fewstep.load_model("digits")
    assert to_device(digits, "meta").data.device == torch.device("meta")


def test_a_cpu_calibration_batch_goes_where_the_model_is(monkeypatch):
    """optimize moves the calibration states to the model's device: seen through the denoiser's inputs."""
    gmm = fewstep.load_model("gmm2d")
    seen = []

    class Spy:
        shape, sigma_min, sigma_max, name, device = gmm.shape, gmm.sigma_min, gmm.sigma_max, "spy", "cpu"

        def __call__(self, x, sigma):
            seen.append((x.device, sigma.device, sigma.shape))
            return gmm(x, sigma)

    fewstep.optimize(Spy(), "oss", "euler", 3, n=4, grid=8, teacher=fewstep.Teacher(Spy(), steps=16))
    assert seen and all(d == torch.device("cpu") and s == d and shp == (shp[0],) for d, s, shp in seen)


@pytest.mark.parametrize("device,msg", [("tpu:7", "unknown device 'tpu:7'")] + (
    [] if torch.cuda.is_available() else [("cuda", "sees no CUDA device")]))
def test_bad_devices_are_named(device, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_device(device)
    with pytest.raises(ValueError, match=msg):
        fewstep.load_model("gmm2d", device=device)


def test_auto_device_is_cuda_only_when_there_is_one():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) is None


def test_cli_device_option(capsys):
    assert main(["evaluate", "--model", "gmm2d", "--device", "cpu", "--builtin", "karras", "--nfe", "4",
                 "--solver", "euler", "--n", "8", "--teacher-steps", "32", "--json"]) == 0
    assert '"nfe": 4' in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["evaluate", "--model", "gmm2d", "--device", "cuda", "--builtin", "karras", "--nfe", "4",
                     "--solver", "euler"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
