"""User-facing text names systems, never the project's internal paths.

A user's clone has no ``../shared`` folder: the system documents and research notes the project
was built from are cited by the system's name (e.g. "the FusionNet v2 document"). Checked on what a
user reads: every example script's ``--help`` output, and the text of README.md, CONTRIBUTING.md
and every file under examples/ (slurm scripts and notebooks included), src/ and benchmarks/.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/..., /work/shared/..., shared/seeds/..., seeds/000_....txt, research/seed_xec.md
INTERNAL = re.compile(r"(?:\.\./|/work/)?\bshared/|\bseeds/|\bresearch/seed_\w+")
TEXT_SUFFIXES = {".py", ".md", ".sbatch", ".sh", ".ipynb", ".txt", ".toml", ".cfg"}


def _hits(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if INTERNAL.search(line)]


def _scripts() -> list[Path]:
    """Every example that runs as a script with a command line."""
    return sorted(p for p in (ROOT / "examples").rglob("*.py")
                  if "__main__" in (text := p.read_text()) and "argparse" in text)


def _text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    for top in ("examples", "src", "benchmarks"):
        files += [p for p in sorted((ROOT / top).rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and ".ipynb_checkpoints" not in p.parts and "__pycache__" not in p.parts]
    return files


def test_the_pattern_flags_internal_paths_and_nothing_else():
    for bad in ("see ../shared/seeds/000_bfc0f795d7b4992e.txt", "/work/shared/research/seed_xec.md §2",
                "research/seed_xec.md", "shared/DESIGN.md", "seeds/README.md"):
        assert _hits(bad), bad
    for fine in ("the FusionNet v2 document", "a shared filesystem", "shared out over the ranks",
                 "the seed's JSONL format", "--seeds 0,1,2", "runs/fusion/data"):
        assert not _hits(fine), fine


# Runs every script's --help in ONE fresh interpreter (torch is imported once, not 15 times):
# run_path as __main__ with argv [script, --help]; argparse prints the help and exits 0.
_HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    buf, code = io.StringIO(), None
    sys.argv = [path, "--help"]
    saved = list(sys.path)
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    sys.path[:] = saved
    out[path] = [code, buf.getvalue()]
print(json.dumps(out))
"""


@pytest.mark.slow  # imports every example script once, torch with them
def test_every_example_help_cites_no_internal_path():
    scripts = _scripts()
    names = {p.relative_to(ROOT).as_posix() for p in scripts}
    assert {"examples/fusion_ddp.py", "examples/xec_mae.py", "examples/fusion/build_data.py"} <= names
    proc = subprocess.run([sys.executable, "-c", _HELP_RUNNER, *map(str, scripts)], cwd=ROOT, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(helps) == len(scripts)
    bad = {}
    for path, (code, out) in helps.items():
        assert code == 0 and "usage:" in out, f"{path} --help failed (exit {code}):\n{out}"
        if hits := _hits(out):
            bad[Path(path).name] = hits
    assert not bad, f"--help cites internal paths (name the system instead): {bad}"


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_user_facing_files_cite_no_internal_path(path):
    hits = _hits(path.read_text(errors="replace"))
    assert not hits, f"{path.relative_to(ROOT)} cites internal paths (name the system instead): {hits}"
