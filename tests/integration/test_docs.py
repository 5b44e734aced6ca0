"""The README and the documentation pages: what they show runs as written.

* every ``bash`` / ``sh`` / ``shell`` / ``console`` block parses (``bash -n``) and no line ends a continuation with a
  comment (``\\  # ...`` ends the command there when pasted);
* every training command uses only flags its script accepts, and every ``... --help`` shown runs;
* every ``python`` block compiles; the README's one-line scheduler swaps and its checkpoint-settings snippet run as
  written on tiny offline pipelines, with a short sampling call each;
* the README's test command is what ``.ci/run`` runs, its relative links resolve, it stays under 15,000 bytes, and
  no table row of any page is longer than 300 characters.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_ztsnr.testing.tiny import make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
README_MAX_BYTES = 15_000
TABLE_ROW_MAX_CHARS = 300

_FENCE = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^[ \t]*(?P=fence)[ \t]*$", re.M | re.S
)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_CONTINUATION_COMMENT = re.compile(r"\\[ \t]+(#.*)?$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, with the line of their opening fence."""
    source = path.read_text(encoding="utf-8")
    return [
        Block(path, source.count("\n", 0, m.start()) + 1, m.group("lang").lower(), textwrap.dedent(m.group("body")))
        for m in _FENCE.finditer(source)
    ]


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def shell_source(block: Block) -> str:
    """What a reader pastes: for ``console`` blocks the ``$ `` commands and their continuation lines."""
    if block.lang != "console":
        return block.text
    kept, continued = [], False
    for line in block.text.splitlines():
        if line.startswith("$ ") or continued:
            kept.append(line[2:] if line.startswith("$ ") else line)
            continued = line.rstrip().endswith("\\")
    return "\n".join(kept) + "\n"


BLOCKS = [block for page in PAGES for block in code_blocks(page)]
SHELL_BLOCKS = [block for block in BLOCKS if block.lang in SHELL_LANGUAGES]
PYTHON_BLOCKS = [block for block in BLOCKS if block.lang in ("python", "py")]


def test_the_pages_have_code_to_check():
    assert len(SHELL_BLOCKS) >= 4 and len(PYTHON_BLOCKS) >= 4
    assert {block.path for block in SHELL_BLOCKS} >= {README}


def test_readme_is_short():
    assert README.stat().st_size <= README_MAX_BYTES, f"README.md is {README.stat().st_size} bytes"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_shell_block_parses(block):
    source = shell_source(block)
    for number, line in enumerate(source.splitlines(), 1):
        assert not _CONTINUATION_COMMENT.search(line), (
            f"{block}: line {number} of the block has text after its line continuation: {line!r}")
    result = subprocess.run(["bash", "-n"], input=source, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{block}: bash -n says {result.stderr}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_python_block_compiles(block):
    compile(block.text, str(block), "exec")


# --- commands -------------------------------------------------------------------------------------------------


def shell_commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, ``&&`` chains split, comments dropped)."""
    joined = re.sub(r"\\\n", " ", shell_source(block))
    commands = []
    for line in joined.splitlines():
        for part in re.split(r"&&|\|\||;", line):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def _script_help(script: str, argv: list[str], capsys, monkeypatch) -> str:
    """``python SCRIPT ARGV`` run in this process; returns what it printed, after checking it exited with 0."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_info.value.code in (0, None), f"python {script} {' '.join(argv)} exited with {exit_info.value.code}"
    return capsys.readouterr().out


def _entry_point_help(command: list[str], capsys) -> str:
    """An installed console script run in this process with its arguments."""
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name=command[0])
    with pytest.raises(SystemExit) as exit_info:
        entry_point.load()(command[1:])
    assert exit_info.value.code in (0, None), f"{' '.join(command)} exited with {exit_info.value.code}"
    return capsys.readouterr().out


def help_commands() -> list[str]:
    """Every ``... --help`` the pages show, in shell blocks or inline code."""
    shown = {" ".join(words) for block in SHELL_BLOCKS for words in shell_commands(block)}
    shown |= {span for page in PAGES for span in _INLINE_CODE.findall(prose(page))}
    return sorted(command for command in shown if command.endswith(" --help") and "..." not in command)


def test_every_help_command_shown_runs(capsys, monkeypatch):
    commands = help_commands()
    assert any(command.startswith("diffusers-ztsnr demo") for command in commands)
    for command in commands:
        words = shlex.split(command)
        if words[0] == "python":
            output = _script_help(words[1], words[2:], capsys, monkeypatch)
        else:
            output = _entry_point_help(words, capsys)
        assert "usage:" in output, command


def test_training_commands_use_flags_the_scripts_accept(capsys, monkeypatch):
    checked = 0
    for block in SHELL_BLOCKS:
        for words in shell_commands(block):
            scripts = [word for word in words if re.fullmatch(r"train_scripts/\w+\.py", word)]
            if not scripts:
                continue
            accepted = set(re.findall(r"--\w+", _script_help(scripts[0], ["--help"], capsys, monkeypatch)))
            shown = {word for word in words[words.index(scripts[0]):] if word.startswith("--")}
            assert shown <= accepted, f"{block}: {scripts[0]} has no {sorted(shown - accepted)}"
            checked += 1
    assert checked >= 2


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.startswith("python ")]


def test_readme_test_command_is_what_ci_runs():
    blocks = [block for block in SHELL_BLOCKS if block.path == README and "pytest" in block.text]
    assert len(blocks) == 1
    assert blocks[0].text.strip().splitlines() == _ci_commands()
    assert any("mkdocs build --strict" in line and "--quiet" not in line for line in _ci_commands()), (
        "mkdocs build --strict --quiet does not fail on warnings")


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(README)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README.md links to a missing {target}"


def test_no_overlong_table_rows():
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("|"):
                assert len(line) <= TABLE_ROW_MAX_CHARS, f"{page.relative_to(ROOT)}:{number}: {len(line)} chars"


# --- the README's Python snippets, run ----------------------------------------------------------------------------

FAMILIES = {"sd15": r"SD ?1\.5", "sdxl": r"SDXL", "sd3": r"SD3", "flux": r"Flux"}


def readme_python_block(containing: str) -> Block:
    found = [block for block in PYTHON_BLOCKS if block.path == README and containing in block.text]
    assert len(found) == 1, f"expected one README python block with {containing!r}, found {len(found)}"
    return found[0]


def swap_statements(block: Block) -> tuple[str, list[tuple[str, set[str]]]]:
    """The block's imports, and each ``pipe.scheduler = ...`` statement with the families its comment names."""
    lines = block.text.splitlines()
    imports, swaps = [], []
    for node in ast.parse(block.text).body:
        source = ast.get_source_segment(block.text, node)
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.append(source)
            continue
        comment, row = [], node.lineno - 2
        while row >= 0 and lines[row].startswith("#"):
            comment.insert(0, lines[row])
            row -= 1
        named = {kind for kind, pattern in FAMILIES.items() if re.search(pattern, " ".join(comment))}
        swaps.append((source, named))
    return "\n".join(imports), swaps


def sample_two_steps(pipe) -> np.ndarray:
    return pipe("a photo of a cat in a dark room", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def as_saved(pipe):
    """``pipe`` with its scheduler as ``from_pretrained`` loads it from a saved copy: diffusers writes the defaults it
    filled in (SD 1.5's ``timestep_spacing="leading"``), and ``from_config`` only drops unsaved defaults."""
    pipe.scheduler = type(pipe.scheduler).from_config(json.loads(pipe.scheduler.to_json_string()))
    if "beta_schedule" in pipe.scheduler.config:
        assert pipe.scheduler.config.timestep_spacing == "leading"
    return pipe


def test_readme_scheduler_swaps_run_as_written():
    imports, swaps = swap_statements(readme_python_block("pipe.scheduler = ZTSNRFlowMatchScheduler"))
    assert all(len(named) == 1 for _, named in swaps), "each swap's comment names exactly one family"
    assert {kind for _, named in swaps for kind in named} == set(FAMILIES)
    for statement, (kind,) in ((statement, tuple(named)) for statement, named in swaps):
        pipe = as_saved(make_tiny_pipeline(kind))
        namespace = {"pipe": pipe}
        exec(imports, namespace)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(statement, namespace)
        assert not caught, f"{kind}: the swap warns: {[str(w.message) for w in caught]}"
        assert type(pipe.scheduler).__module__ == "diffusers_ztsnr", kind
        images = sample_two_steps(pipe)
        assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all(), kind
        if kind in ("sd15", "sdxl"):
            first = int(pipe.scheduler.timesteps[0])
            assert pipe.scheduler.alphas_cumprod[first] == 0, f"{kind}: the first step is not at SNR 0"
        if kind == "flux":  # our grid, not the pipeline's sigmas (linspace(1, 0.5) shifted: 0.5 -> about 0.8)
            assert float(pipe.scheduler.sigmas[0]) == 1.0 and float(pipe.scheduler.sigmas[1]) > 0.99


def test_readme_checkpoint_settings_snippet_runs(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from diffusers_ztsnr.markers import V_PRED_KEY, ZTSNR_KEY

    block = readme_python_block("scheduler_settings_from_checkpoint(")
    monkeypatch.chdir(tmp_path)
    save_file({V_PRED_KEY: torch.tensor([]), ZTSNR_KEY: torch.tensor([]), "weight": torch.zeros(2)},
              "model.safetensors")
    namespace = {"pipe": as_saved(make_tiny_pipeline("sd15"))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(block.text, str(block), "exec"), namespace)
    assert not caught, [str(w.message) for w in caught]
    shown = re.search(r"^# (\{.*\})$", block.text, re.M).group(1)
    assert namespace["settings"] == ast.literal_eval(shown)
    assert namespace["pipe"].scheduler.config.prediction_type == "v_prediction"
    assert np.isfinite(sample_two_steps(namespace["pipe"])).all()
