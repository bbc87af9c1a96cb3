"""design_all.py: the five design stages in order, each given the earlier stages' run folders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from design_all import STAGES, parse_args, plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "design_all.py"


def test_plan_gives_every_stage_the_earlier_folders_the_shared_data_and_the_flags(tmp_path):
    steps = plan(list(STAGES), tmp_path, flags=["--smoke"], data=tmp_path / "data")
    assert [s.stage for s in steps] == ["encoder", "abstractor", "decoder", "reward", "latent"]
    for step in steps:
        script, needs = STAGES[step.stage]
        assert step.command[:2] == [sys.executable, str(EXAMPLES / script)]
        assert step.command[2:7] == ["--out", str(tmp_path / step.stage), "--smoke", "--data", str(tmp_path / "data")]
        given = dict(zip(step.command[7::2], step.command[8::2]))
        assert given == {f"--{n}": str(tmp_path / n) for n in needs}, step.stage
    assert STAGES["reward"][1] == ("decoder", "encoder", "abstractor") and STAGES["abstractor"][1] == ("encoder",)
    torchrun = plan(["abstractor", "encoder"], tmp_path, nproc=2)  # listed out of order: run in stage order
    assert [s.stage for s in torchrun] == ["encoder", "abstractor"]
    assert torchrun[0].command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2"]


def test_a_missing_stage_script_is_refused_by_name(tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    for script in ("design_encoder.py", "design_abstractor.py"):
        (examples / script).write_text("")
    assert len(plan(["encoder", "abstractor"], tmp_path / "out", examples=examples)) == 2
    with pytest.raises(FileNotFoundError, match=r"stage 'decoder': .*design_decoder.py does not exist"):
        plan(list(STAGES), tmp_path / "out", examples=examples)


def test_a_needed_stage_neither_run_nor_finished_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 'abstractor' needs a finished 'encoder' stage"):
        plan(["abstractor"], tmp_path)
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "run.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(FileNotFoundError, match="needs a finished 'encoder'"):
        plan(["abstractor"], tmp_path)
    (tmp_path / "encoder" / "run.json").write_text(json.dumps({"status": "finished"}))
    assert plan(["abstractor"], tmp_path)[0].command[-2:] == ["--encoder", str(tmp_path / "encoder")]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "fresh"), "--stages",
                           "decoder"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "stage 'decoder' needs a finished 'encoder' stage" in proc.stderr
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_smoke_runs_the_five_stages_in_order_into_one_folder(tmp_path):
    """The one command, end to end under --smoke: every stage finishes in OUT/<stage> on the shared OUT/data-smoke,
    the abstractor evaluates the encoder's F, and every stage's table is printed at the end."""
    out = tmp_path / "design"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for stage in STAGES:
        assert json.loads((out / stage / "run.json").read_text())["status"] == "finished", stage
        assert f"--- {stage} (" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([*STAGES, "data-smoke"])
    abstractor = json.loads((out / "abstractor" / "summary.json").read_text())
    assert abstractor["encoder"] == str(out / "encoder") and "encoder soft F" in abstractor["test"]
    assert "all 5 stages in" in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_runs_design_all_at_the_seeds_scale_with_one_process_per_gpu(tmp_path):
    """The job's command line (``PYTHON=echo``, an ``srun`` that runs its arguments), parsed by design_all.py."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)

    def argv(**env: str) -> list[str]:
        full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "echo", "SLURM_SUBMIT_DIR": str(tmp_path), **env}
        proc = subprocess.run(["bash", str(EXAMPLES / "slurm" / "design_all.sbatch")], capture_output=True, text=True,
                              env=full, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1].split()

    default = argv()
    assert default[0] == "examples/design_all.py"
    args = parse_args(default[1:])
    assert (args.out, args.nproc, args.seed_scale, args.workers, args.resume) == ("runs/design256", 4, True, 8, None)
    assert args.stages == list(STAGES)
    args = parse_args(argv(SCALE="cpu", GPUS="2", STAGES="encoder,abstractor", RESUME="auto", SEED="3",
                           SLURM_CPUS_PER_TASK="16")[1:])
    assert (args.nproc, args.seed_scale, args.stages, args.resume, args.seed, args.workers) == \
        (2, False, ["encoder", "abstractor"], "auto", 3, 16)
