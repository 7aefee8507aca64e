"""The README's quickstart commands and its Python code run, read from README.md itself.

The quickstart is written for an official checkpoint (``vim_t_midclstok_76p1acc.pth``) and ImageNet's
validation folder; here they are a small Vim saved in the official format and a generated ImageNet-layout
folder (``standins.py``). The quickstart's own no-download variant (``--model vim_digits``, ``digits``)
runs as the README states it.
"""
import re
import shlex
from pathlib import Path

import pytest
import standins

from vimtr.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
CHECKPOINT = "vim_t_midclstok_76p1acc.pth"
VAL = "/data/imagenet/val"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def quickstart_commands() -> list[str]:
    text = section(README.read_text(), "Quickstart")
    lines = [ln.split("  #")[0].strip() for block in blocks(text, "bash") for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    return {"root": root, CHECKPOINT: standins.official_checkpoint(root / CHECKPOINT),
            VAL: str(Path(standins.image_folder(root / "imagenet")) / "val")}


def test_the_first_screen():
    text = README.read_text()
    head = text.splitlines()[:40]
    assert any(ln.startswith("make demo") for ln in head) and any(ln.startswith("make test") for ln in head)
    assert any("pip install" in ln for ln in head) and any("Python ≥ 3.11" in ln for ln in head)
    # A user with a checkpoint finds how to reduce it within the first 40 lines.
    assert any(ln.startswith("vimtr eval --checkpoint") and "--method mtr" in ln for ln in head)
    assert "train mode" in section(text, "API") and "eval mode" in section(text, "API")
    commands = quickstart_commands()
    assert {c.split()[1] for c in commands} >= {"info", "eval", "bench"}
    assert len(blocks(section(text, "Quickstart"), "python")) == 1


@pytest.mark.parametrize("variant", ["checkpoint", "bundled"])
def test_quickstart_commands(standin, variant, monkeypatch, capsys):
    monkeypatch.chdir(standin["root"])
    commands = quickstart_commands()
    assert commands and all(c.startswith("vimtr ") for c in commands)
    for command in commands:
        if variant == "bundled":  # as the README says: --model vim_digits for --checkpoint …, digits for the data
            command = command.replace(f"--checkpoint {CHECKPOINT}", "--model vim_digits").replace(VAL, "digits")
        else:
            command = command.replace(CHECKPOINT, standin[CHECKPOINT]).replace(VAL, standin[VAL])
        assert main(shlex.split(command)[1:]) in (0, None), command
        out = capsys.readouterr().out
        assert out.strip(), command
        if " eval " in f" {command} ":
            assert re.search(r"top-1\s+\d+\.\d+ %", out), out


def _python_blocks():
    return [(i, code) for i, code in enumerate(blocks(README.read_text(), "python"))]


@pytest.mark.parametrize("index, code", _python_blocks(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_python_runs(index, code, standin, monkeypatch, capsys):
    monkeypatch.chdir(standin["root"])
    variants = [code.replace(CHECKPOINT, standin[CHECKPOINT]).replace(VAL, standin[VAL])]
    if CHECKPOINT in code and VAL in code:  # the quickstart: its no-download variant too
        variants.append(code.replace(CHECKPOINT, "vim_digits").replace(VAL, "digits"))
    for source in variants:
        exec(compile(source, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
        if "print(" in source:
            assert capsys.readouterr().out.strip()
