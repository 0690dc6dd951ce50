"""The code's shape (docs/architecture.md): no import cycles, functions that fit a screen, one schedule
protocol, public names that do not shadow modules, and registries complete on import."""

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import fewstep

SRC = Path(fewstep.__file__).resolve().parent
MAX_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The fewstep modules ``name`` imports explicitly, anywhere in its body (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["fewstep.methods"] >= {"fewstep.methods.gits", "fewstep.methods.base"}  # the parser sees imports
    assert _cycles(graph) == []


def test_functions_fit_a_screen():
    long = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


PROTOCOL_ATTRS = {"sigmas_for", "plan_for", "for_batch", "to_list", "to_dict", "sigmas", "solver", "per_sample"}


def test_schedule_objects_are_used_through_the_protocol():
    """No hasattr on a schedule's attributes outside schedules.py, the protocol's own module."""
    found = []
    for f in SRC.rglob("*.py"):
        if f.name == "schedules.py" and f.parent == SRC:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and len(node.args) == 2
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in PROTOCOL_ATTRS):
                found.append(f"{f.relative_to(SRC)}:{node.lineno}")
    assert found == []


def test_public_names_do_not_shadow_modules():
    modules = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    for name in fewstep.__all__:
        if name in modules:
            assert isinstance(getattr(fewstep, name), types.ModuleType), name


def test_registries_complete_on_import():
    code = "import fewstep; print(','.join(sorted(fewstep.METHODS))); print(','.join(fewstep.SOLVERS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    registered = sorted(f.stem for f in (SRC / "methods").glob("*.py") if re.search(r"^@register\(", f.read_text(), re.M))
    assert out[0].split(",") == registered == ["gits", "instance", "ld3", "oss", "pas", "s4s", "sdm"]
    assert set(out[1].split(",")) >= {"euler", "heun", "dpmpp_2m", "unipc", "ipndm", "deis"}


def test_no_graph_through_a_network_outside_training(small_gmm):
    """A network whose weights require grad builds no graph in the teacher, sample or a DP method."""
    import torch

    class Net(torch.nn.Module):  # the exact denoiser times a trainable scale of 1
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.shape, self.sigma_min, self.sigma_max = (4,), 0.002, 80.0

        def forward(self, x, sigma):
            return small_gmm(x, sigma) * self.scale

    net = Net()
    x = fewstep.noise(3, (4,), 80.0, seed=0)
    assert not fewstep.Teacher(net, steps=16).solve(x).requires_grad
    assert not fewstep.sample(net, x, fewstep.schedules.karras(4), "dpmpp_2m").requires_grad
    sched = fewstep.optimize(net, "oss", "euler", 3, n=4, grid=8, teacher=fewstep.Teacher(net, steps=16))
    assert not sched.sigmas.requires_grad and net.scale.grad is None
