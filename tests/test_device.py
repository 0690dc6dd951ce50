"""Device handling that a CPU-only machine can check: where a denoiser computes, moving one, bad devices.
The same pipeline on a GPU is run by bench/gpu.py (it compares every stage with the CPU)."""

import json
from pathlib import Path

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


class _Float32Net(nn.Module):
    """A user's float32 network D(x, sigma): an exact mixture's denoiser plus a small float32 layer, so a float64
    input fails inside it (``mat1 and mat2 must have the same dtype``) unless fewstep casts."""

    def __init__(self, gmm, dtype=torch.float32):
        super().__init__()
        self.gmm, self.layer = gmm, nn.Linear(gmm.means.shape[1] + 1, gmm.means.shape[1]).to(dtype)

    def forward(self, x, sigma):
        feats = torch.cat([x / (1 + sigma[:, None] ** 2).sqrt(), sigma.log()[:, None].to(x.dtype)], 1)
        return self.gmm(x.double(), sigma.double()).to(x.dtype) + 0.01 * self.layer(feats)


def test_model_dtype_is_the_networks():
    from fewstep.models.device import model_dtype

    assert model_dtype(nn.Linear(2, 2)) == torch.float32 and model_dtype(nn.Linear(2, 2).half()) == torch.float16
    assert model_dtype(_Wrapped(nn.Linear(2, 2).to(torch.bfloat16))) == torch.bfloat16  # found through a wrapper
    assert model_dtype(lambda x, s: x) is None and model_dtype(fewstep.load_model("gmm2d")) is None
    assert model_dtype(type("Declares", (), {"dtype": torch.float64})()) == torch.float64
    # fewstep's wrappers take any dtype (their arithmetic in the state's) and cast at their network
    assert model_dtype(fewstep.FlowDenoiser(nn.Linear(2, 2))) is None


def test_a_float32_network_samples_trains_and_tunes_in_its_own_dtype(small_gmm, tmp_path):
    """The state stays float64; the network gets float32 inputs: exactly what casting by hand gives."""
    net = _Float32Net(small_gmm)
    net.shape = (small_gmm.means.shape[1],)
    x = fewstep.noise(8, net.shape, 80.0, seed=0)
    sched = fewstep.schedules.karras(5)
    by_hand = fewstep.sample(lambda x, s: net(x.float(), s.float()).double(), x, sched, "dpmpp_2m")
    out = fewstep.sample(net, x, sched, "dpmpp_2m")
    assert out.dtype == torch.float64 and torch.equal(out, by_hand)
    learned = fewstep.optimize(net, "ld3", "euler", 3, n=4, iters=2)  # its gradient flows through the cast
    assert torch.isfinite(learned.sigmas).all() and learned.metadata["training"]["iters"] == 2
    summary = fewstep.tune(net, nfe=[3], methods="karras,gits", solvers="euler", quick=True, outdir=tmp_path,
                           progress=False, report=False)
    assert {c["status"] for c in summary["cells"]} == {"ok"}


def test_a_vp_wrapper_calls_a_bfloat16_network_in_bfloat16(small_gmm):
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    seen = []

    class Eps(nn.Module):  # eps of the exact mixture, through a bfloat16 identity layer
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
            nn.init.eye_(self.layer.weight)

        def forward(self, x_vp, t):
            seen.append((x_vp.dtype, t.dtype))
            a = ac[t.double().round().long()][:, None]
            x, s = x_vp.double() / a.sqrt(), ((1 - a) / a).sqrt()
            return self.layer(((x - small_gmm(x, s[:, 0])) / s).to(x_vp.dtype))

    den = fewstep.VPDiscreteDenoiser(Eps(), ac)
    x = torch.randn(4, 4, dtype=torch.float64) * 3
    sigma = fewstep.VPDiscreteDenoiser(lambda x, t: x, ac).sigmas[[100, 300, 500, 700]]
    out = den(x, sigma)
    assert seen == [(torch.bfloat16, torch.float32)] and out.dtype == torch.float64
    assert torch.allclose(out, small_gmm(x, sigma), rtol=0.05, atol=0.05)


class _Small:
    """A model that runs out of memory (here: raises) on more than ``limit`` rows a call, with a max_batch."""

    def __init__(self, den, limit):
        self.den, self.limit, self.max_batch, self.shape, self.widest = den, limit, limit, den.shape, 0

    def __call__(self, x, sigma):
        if x.shape[0] > self.limit:
            raise RuntimeError(f"CUDA out of memory (a batch of {x.shape[0]})")
        self.widest = max(self.widest, x.shape[0])
        return self.den(x, sigma)


@pytest.mark.parametrize("method,options", [("gits", {}), ("oss", {"grid": 10}), ("sdm", {}), ("ld3", {"iters": 3}),
                                            ("s4s", {"iters": 3}), ("instance", {"iters": 2, "ld3_iters": 2}),
                                            ("pas", {})])
def test_max_batch_splits_every_call_and_changes_no_result(method, options):
    """Methods, scoring and training (a training step back-propagates max_batch samples at a time) on a model that
    takes at most 3 rows a call give what the model without a limit gives."""
    gmm = fewstep.load_model("gmm2d")
    small = _Small(gmm, 3)
    kw = dict(n=8, teacher=fewstep.Teacher(gmm, steps=16), **options)
    whole, split = fewstep.optimize(gmm, method, "dpmpp_2m", 4, **kw), fewstep.optimize(small, method, "dpmpp_2m", 4, **kw)
    x = fewstep.noise(7, gmm.shape, 80.0, seed=5)
    a, b = fewstep.sample(gmm, x, whole), fewstep.sample(small, x, split)
    assert small.widest == 3 and torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_max_batch_is_checked_and_the_cli_sets_it(tmp_path, capsys):
    gmm = fewstep.load_model("gmm2d")
    bad = _Small(gmm, 3)
    bad.max_batch = 0
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        fewstep.sample(bad, fewstep.noise(2, gmm.shape, 80.0, 0), fewstep.schedules.karras(3), "euler")
    f = tmp_path / "small.py"
    f.write_text("import fewstep, sys\nsys.path.insert(0, %r)\nfrom test_device import _Small\n\n"
                 "def make():\n    small = _Small(fewstep.load_model('gmm2d'), 100)\n    small.limit = 2\n    return small\n"
                 % str(Path(__file__).parent))
    assert main(["tune", "--model", f"{f}:make", "--nfe", "3", "--quick", "--max-batch", "2", "--teacher-steps", "16",
                 "-o", str(tmp_path / "out"), "--json"]) == 0
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert {c["status"] for c in cells} <= {"ok", "pruned", "skipped"} and sum(c["status"] == "ok" for c in cells) > 10


def test_out_of_memory_says_what_splits_the_batch_and_tune_goes_on(tmp_path, monkeypatch):
    gmm = fewstep.load_model("gmm2d")

    class Tight(_Small):  # a GPU that runs out of memory on more than 16 rows
        def __call__(self, x, sigma):
            if x.shape[0] > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.den(x, sigma)

    tight = Tight(gmm, 16)
    tight.max_batch = None
    with pytest.raises(torch.OutOfMemoryError, match="a call of 32 rows; give the model max_batch"):
        fewstep.sample(tight, fewstep.noise(32, gmm.shape, 80.0, 0), fewstep.schedules.karras(3), "euler")
    released = []
    monkeypatch.setattr("fewstep.tuning.release_cached_memory", lambda: released.append(1))
    summary = fewstep.tune(tight, nfe=[3], methods=["karras", "oss"], solvers=["euler"], n_calib=8, n_test=16,
                           outdir=tmp_path, progress=False, report=False, method_options={"oss": {"grid": 8}})
    cells = {c["method"]: c for c in summary["cells"]}
    assert cells["karras"]["status"] == "ok" and cells["oss"]["status"] == "failed" and released
    assert cells["oss"]["error"] == "OutOfMemoryError" and "max_batch" in cells["oss"]["reason"]


def test_the_timing_probe_calls_the_model_as_every_evaluation_does():
    """A conditional model with max_batch: the probe's calls are split, each with its own rows' conditions."""
    from fewstep.costs import seconds_per_row
    from fewstep.zoo import simplex_conditions

    gmm, seen = fewstep.load_model("gmm-cond"), []

    def den(x, sigma, cond):
        seen.append((len(x), len(cond)))
        return gmm(x, sigma, cond=cond)
    den.max_batch = 3
    x = fewstep.noise(8, gmm.shape, 80.0, 0)
    assert seconds_per_row(den, x, 80.0, simplex_conditions(8, seed=1)) > 0
    assert seen == [(3, 3), (3, 3), (2, 2)] * 2
