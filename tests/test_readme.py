"""README.md as a new user reads it: every ```python block runs, every ```bash command parses
(the cheap ones run), and the figures it quotes are in the files it quotes them from."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from palette.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def commands() -> list[str]:
    """The bash blocks' commands, comments stripped."""
    lines = [line.split("  #")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_has_the_two_quick_start_commands() -> None:
    cmds = commands()
    assert cmds[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*palette demo$", makefile, re.M)
    assert re.search(r"^test:.*\n\t.*pytest", makefile, re.M)


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.splitlines()[0][:40])
def test_python_block_runs(code: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line, out in zip(_commented_prints(code), proc.stdout.splitlines()):
        assert out == line, f"README says {line!r}, the code prints {out!r}"


def _commented_prints(code: str) -> list[str]:
    """`print(...)   # expected` lines: the README's claimed output, in order (empty when not all
    prints carry one, so that only fully annotated blocks are checked)."""
    prints = [line for line in code.splitlines() if line.startswith("print(")]
    claims = [line.partition("   # ")[2] for line in prints]
    return claims if all(claims) else []


@pytest.mark.parametrize("cmd", [c for c in commands() if c.startswith("palette ")])
def test_cli_commands_parse(cmd: str) -> None:
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert callable(args.func)


def test_torchrun_commands_parse() -> None:
    """The README's torchrun lines run `-m palette` with arguments palette's parser takes."""
    found = re.findall(r"^\s*torchrun (.*?) -m palette (.*)$", README, flags=re.M)
    assert found, "README shows no torchrun command"
    for launcher, cmd in found:
        assert "--nproc_per_node" in launcher
        assert callable(build_parser().parse_args(shlex.split(cmd)).func)


def test_cheap_cli_commands_run(capsys) -> None:
    cheap = [c for c in commands() if c.startswith("palette ") and ("--list" in c or "--help" in c)]
    assert cheap
    for cmd in cheap:
        assert main(shlex.split(cmd)[1:]) == 0
    capsys.readouterr()


def test_linked_files_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_no_placeholders_left() -> None:
    assert "PLACEHOLDER" not in README and "TODO" not in README
