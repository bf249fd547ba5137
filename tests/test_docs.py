"""The documentation stays true: the site builds with no broken link, and its examples run.

Every fenced block right after a ``<!-- runs-on-sample -->`` line in README.md or docs/*.md (the comment is not
shown to a reader) is run on the embedded sample, in a fresh folder that holds what the block reads and does not
make itself: ``~/data/histopathologic-cancer-detection`` (the sample, in the competition's layout; ``~`` is a
temporary home), ``stores/hcd`` (its store), ``runs/lite0`` (a tiny run on it) and ``tumor_001.tif`` (a small
slide of its real patches). ``bash`` blocks run each ``histodetect`` line through the CLI; a ``train`` line gets
flags appended that make it one epoch of 16 patches of the baseline CNN (flags beside a preset win, so the
documented flags are still parsed and applied). ``python`` blocks run as they are. Blocks that need the full data,
a GPU or a network are simply not marked.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histodetect.data.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runs-on-sample -->"
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
QUICK_TRAIN = [
    "--model", "baseline-cnn", "--pretrained", "none", "--image-size", "96", "--epochs", "1", "--batch-size", "8",
    "--limit-train", "16", "--epoch-patches", "16", "--val-patches", "16", "--num-workers", "0",
]  # fmt: skip


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def marked_blocks() -> list[Block]:
    """The fenced blocks that follow a ``MARK`` line (blank lines between are allowed); a block that repeats an
    earlier one word for word (the README's tour is the docs' too) is run once."""
    blocks: list[Block] = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for k, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            start = next(j for j in range(k + 1, len(lines)) if lines[j].strip())
            opening = re.fullmatch(r"```(\w+)", lines[start].strip())
            assert opening, f"{page.name}:{k + 1}: {MARK} must be followed by a fenced block with its language"
            end = next(j for j in range(start + 1, len(lines)) if lines[j].strip() == "```")
            text = "\n".join(lines[start + 1 : end])
            if all(text != block.text for block in blocks):
                blocks.append(Block(page.relative_to(REPO_ROOT).as_posix(), start + 1, opening.group(1), text))
    return blocks


def commands(text: str) -> list[list[str]]:
    """The ``histodetect`` command lines of a bash block as argument lists (continuations joined, comments and
    other lines dropped), ``~`` expanded."""
    joined = text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["histodetect"]:
            found.append([os.path.expanduser(w) if w.startswith("~") else w for w in words[1:]])
    return found


def globbed(args: list[str]) -> list[str]:
    """``args`` with each pattern replaced by what it matches now, in the current folder, as a shell does."""
    return [match for arg in args for match in (sorted(glob.glob(arg)) or [arg] if "*" in arg else [arg])]


BLOCKS = marked_blocks()


def test_the_docs_mark_examples_to_run() -> None:
    pages = {block.page for block in BLOCKS}
    assert "README.md" in pages and "docs/data.md" in pages, pages
    assert any(b.language == "python" for b in BLOCKS), "the library example is run too"


def test_the_site_builds_with_no_broken_link(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site/architecture/index.html").is_file()


def test_the_readmes_links_and_pictures_exist() -> None:
    """README.md is outside the site that mkdocs checks: its relative links are checked here."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (REPO_ROOT / t).exists()]
    assert targets and not missing, missing


def test_the_list_of_problem_kinds_is_the_table_ingest_reads() -> None:
    from histodetect.data.problems import markdown_table

    text = (REPO_ROOT / "docs/data.md").read_text(encoding="utf-8")
    listed = re.search(r"<!-- problem-kinds:[^>]*-->\n(.*?)\n<!-- /problem-kinds -->", text, re.S)
    assert listed, "docs/data.md: the problem-kinds markers are gone"
    assert listed.group(1) == markdown_table(), "docs/data.md: paste histodetect.data.problems.markdown_table()"


@pytest.fixture(scope="module")
def provided(
    tmp_path_factory: pytest.TempPathFactory, sample_store: Store, sample_dir: Path, mosaic, make_slide
) -> dict[str, Path]:
    """What a block may read without making it, by the name the docs use; the run is trained by the CLI itself,
    with the flags a ``train`` line gets."""
    from histodetect.cli import app

    root = tmp_path_factory.mktemp("docs-inputs")
    result = CliRunner().invoke(app, ["train", str(sample_store.path), "--out", str(root / "lite0"), *QUICK_TRAIN])
    assert result.exit_code == 0, result.output
    make_slide(root / "tumor_001.tif", mosaic.image, 0.972)
    return {
        "stores/hcd": sample_store.path,
        "runs/lite0": root / "lite0",
        "runs/cnn": root / "lite0",  # the tiny run is a baseline CNN: a second run to ensemble with
        "tumor_001.tif": root / "tumor_001.tif",
        "some_patch.tif": sorted((sample_dir / "test").glob("*.tif"))[0],
    }


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_dir: Path) -> Path:
    """A fresh folder as the current one, and a home holding the competition folder (the sample)."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data/histopathologic-cancer-detection").symlink_to(sample_dir)
    monkeypatch.setenv("HOME", str(home))
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def fill(here: Path, block: Block, provided: dict[str, Path]) -> None:
    """Puts into ``here`` what ``block`` reads and does not make (its ``--out``)."""
    for name, source in provided.items():
        if name not in block.text or re.search(rf"--out\s+{re.escape(name)}(\s|$)", block.text):
            continue
        if block.language == "python" and name.startswith("runs/"):  # the library example trains its own
            continue
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("runs/"):  # commands may write into a run (evaluate --out RUN/evaluation)
            shutil.copytree(source, here / name)
        else:
            (here / name).symlink_to(source)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.slow
def test_a_marked_example_runs_on_the_sample(block: Block, workspace: Path, provided: dict[str, Path]) -> None:
    fill(workspace, block, provided)
    if block.language == "python":
        exec(compile(block.text, str(block), "exec"), {"__name__": "__docs__"})
        return
    assert block.language in ("bash", "sh"), f"{block}: only bash and python blocks can be marked"
    from histodetect.cli import app

    lines = commands(block.text)
    assert lines, f"{block}: a marked block with no histodetect command"
    for args in map(globbed, lines):
        if args[:1] == ["train"]:
            args = [*args, *QUICK_TRAIN]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{block}: histodetect {shlex.join(args)}\n{result.output}\n{result.exception!r}"
