"""Finished run folders of the earlier design stages for the decoder stages' tests.

The decoder stages read their critics with ``load_encoder`` / ``load_abstractor`` and stages 4-5
their decoder with ``load_decoder``. :func:`make_critics` and :func:`make_decoder` write folders
holding what those read (``model.json``, a finished ``run.json``, a checkpoint) with small
random models, fixed by ``seed`` and off the identity-at-init state (every weight matters), in
milliseconds. :func:`train_encoder` runs stage 1 itself (``design_encoder.py --smoke``) where a
random encoder will not do: its soft F is nearly flat, so the grammar reward has nothing to climb.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from design.diffusion import DECODER_DIR, DECODER_KIND, DesignDenoiser
from design.models import MODEL_FILE, DesignAbstractor, DesignEncoder
from gradients import leave_identity_init

from blockyard.train import CheckpointManager

ENCODER = {"widths": [8, 16], "blocks_per_level": 1, "head_depth": 1}
ABSTRACTOR = {"color_dim": 4, "hidden": 32}
DECODER = {"widths": [8, 16], "meta": "cross_attention", "meta_dim": 8, "heads": 2, "context_levels": 2,
           "blocks_per_level": 1}


def finished_run(folder: Path, kind: str, kwargs: dict, model: torch.nn.Module,
                 checkpoints: str = "checkpoints") -> Path:
    """``folder`` as a finished stage's run folder holding ``model`` (``kind`` and ``kwargs`` in model.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_text(json.dumps({"kind": kind, "kwargs": kwargs}))
    CheckpointManager(folder / checkpoints, rng=False, is_main=True).save(1, {"model": model}, metric=0.0)
    (folder / "run.json").write_text(json.dumps({"status": "finished", "config": {}, "files": [], "checkpoints": []}))
    return folder


def make_critics(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(encoder_dir, abstractor_dir)`` under ``root``: finished runs of random small critics."""
    torch.manual_seed(seed)
    encoder, abstractor = DesignEncoder(**ENCODER), DesignAbstractor(**ABSTRACTOR)
    leave_identity_init(encoder, seed=seed)
    leave_identity_init(abstractor, seed=seed)
    return (finished_run(root / "encoder", "design-encoder", ENCODER, encoder),
            finished_run(root / "abstractor", "design-abstractor", ABSTRACTOR, abstractor))


def make_decoder(root: Path, seed: int = 0) -> Path:
    """``root/decoder``: a finished decoder run of a random small denoiser (what stages 4 and 5 read)."""
    torch.manual_seed(seed)
    decoder = DesignDenoiser(**DECODER)
    leave_identity_init(decoder, std=0.3, seed=seed)
    return finished_run(root / "decoder", DECODER_KIND, DECODER, decoder, checkpoints=DECODER_DIR)


def train_encoder(root: Path, timeout: float = 300) -> Path:
    """``root/encoder``: stage 1 at ``--smoke`` (one process; its data in ``root/data-smoke``)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "design_encoder.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(root / "encoder")], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"design_encoder.py --smoke failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return root / "encoder"
