"""Every code block of README.md and docs/**/*.md runs as written.

Each fence names its language: ``python`` blocks run in order in one namespace per file, ``bash`` blocks run
each ``fewstep ...`` command through the CLI's ``main`` (in order, ``&&`` and line continuations as in a
shell), ``text`` blocks (output, diagrams) are not code. An HTML comment just before a fence can say, with
its reason, ``<!-- docs-test: skip (reason) -->`` or ``<!-- docs-test: instead "fewstep ..." (reason) -->``
(the commands run in place of the block's, e.g. a smaller run of a job that takes minutes). All of a file's
blocks run in one temporary folder, with a temporary teacher cache.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fewstep.cli import main

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"((?:<!--.*?-->[ \t]*\n)*)```([\w-]*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|instead\s+\"(?P<cmd>[^\"]+)\")\s*\((?P<why>[^)]+)\)\s*-->")
LANGUAGES = {"python", "bash", "text"}


def blocks(path: Path) -> list[tuple[int, str, str, re.Match | None]]:
    """(line, language, code, docs-test marker) of each fenced block."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start(2)) + 1
        out.append((line, m.group(2), m.group(3), MARKER.search(m.group(1))))
    return out


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at &&."""
    commands = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        current: list[str] = []
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token == "&&":
                commands += [current] if current else []
                current = []
            else:
                current.append(token)
    return commands


def run_shell(commands: list[list[str]], where: str) -> None:
    for argv in commands:
        if argv[0] != "fewstep":
            raise AssertionError(f"{where}: {' '.join(argv)!r} is not a fewstep command: run it, or mark the block "
                                 "<!-- docs-test: skip (reason) -->")
        assert main(argv[1:]) == 0, f"{where}: {' '.join(argv)} failed"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_doc_code_blocks_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": f"docs:{path.name}"}
    for line, lang, code, marker in blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        assert lang in LANGUAGES, f"{where}: fence language {lang!r}; say python, bash or text"
        if lang == "text" or (marker and marker.group(1) == "skip"):
            continue
        if marker:  # instead "..."
            run_shell([shlex.split(c) for c in marker.group("cmd").split(" && ")], where)
        elif lang == "bash":
            run_shell(shell_commands(code), where)
        else:
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as e:  # name the block that failed
                raise AssertionError(f"{where} failed: {e!r}\n{code}") from e
    out = capsys.readouterr().out
    if path.name == "integrations.md":  # the printed errors are the ones the comments announce
        assert "unknown prediction_type 'eps'" in out and "DDPMPipeline passes neither" in out


def test_markers_give_reasons_and_skips_stay_rare():
    skips = []
    for path in FILES:
        text = path.read_text()
        assert len(re.findall(r"docs-test:", text)) == len(MARKER.findall(text)), f"{path}: a malformed marker"
        skips += [(path.name, line) for line, _, _, m in blocks(path) if m and m.group(1) == "skip"]
    assert len(skips) <= 5, skips
    assert blocks(ROOT / "README.md")  # the parser sees fences
