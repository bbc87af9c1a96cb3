"""Rows of ``benchmarks/peers.py`` for assembled pieces: U-Net, sampler, experts, masked stage, checkpoints."""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from typing import Callable

import torch
from _peer_blocks import Case, check_same, convnext_peer, fwd_bwd, peer_import
from torch import nn

from blockyard.blocks import (
    MLP,
    ConvNeXtV2Block,
    DDPMScheduler,
    MixtureOfExperts,
    TopKGate,
    UNet,
    count_parameters,
    random_mask,
    timestep_embedding,
)
from blockyard.data._safetensors import fsync_dir
from blockyard.train import CheckpointManager


class TimeUNet(nn.Module):
    """Our U-Net as a noise predictor: sinusoidal timestep -> MLP -> FiLM ``cond`` (what UNet2DModel has inside)."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.width = width
        self.time = MLP(width, hidden=(4 * width,), out_dim=4 * width)
        self.unet = UNet(3, 3, widths=(width, 2 * width, 4 * width), cond_dim=4 * width, attention=True,
                         blocks_per_level=blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.time(timestep_embedding(t, self.width)))


def case_unet() -> Case:
    UNet2DModel = peer_import("diffusers", "UNet2DModel")
    peer = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(32, 64, 128),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    target = count_parameters(peer)
    # the width (a multiple of 4) whose parameter count is nearest the peer's
    counts = {w: count_parameters(TimeUNet(w, 2)) for w in range(32, 72, 4)}
    width = min(counts, key=lambda w: abs(counts[w] - target))
    ours = TimeUNet(width, 2)
    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    t = torch.randint(0, 1000, (8,))
    g = torch.randn_like(x)
    o = fwd_bwd(lambda: ours(x, t), [x, *ours.parameters()], g)
    p = fwd_bwd(lambda: peer(x, t).sample, [x, *peer.parameters()], g)
    return Case(f"UNet widths ({width},{2 * width},{4 * width}) x2 blocks (B8 3x32x32)",
                "diffusers UNet2DModel (32,64,128) x2", o, p,
                f"equal parameters: {counts[width] / 1e6:.2f}M vs {target / 1e6:.2f}M (different networks)")


def case_ddpm() -> Case:
    Peer = peer_import("diffusers", "DDPMScheduler")
    shape = (16, 3, 32, 32)
    ours = DDPMScheduler(1000)
    peer = Peer(num_train_timesteps=1000)  # linear 1e-4..0.02, epsilon, fixed_small, clip_sample: our defaults
    peer.set_timesteps(1000)

    def model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:  # a stand-in noise predictor
        return 0.1 * x

    def run_ours() -> torch.Tensor:
        return ours.sample(model, shape, generator=torch.Generator().manual_seed(0))

    def run_peer() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            for t in peer.timesteps:
                x = peer.step(model(x, t), t, x, generator=gen).prev_sample
        return x

    a, b = run_ours(), run_peer()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return Case("DDPMScheduler.sample, 1000 ancestral steps (B16 3x32x32)", "diffusers DDPMScheduler.step loop",
                run_ours, run_peer, f"same samples, same generator (max diff {float((a - b).abs().max()):.1e})")


def case_moe() -> Case:
    dim, experts, rows = 64, 8, 4096
    moe = MixtureOfExperts([nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                            for _ in range(experts)], TopKGate(dim, experts, k=2))
    x = torch.randn(rows, dim, requires_grad=True)
    g = torch.randn_like(x)
    params = [x, *moe.parameters()]

    def dense() -> torch.Tensor:  # every expert on every row, weighted by the same gate (zeros off the top 2)
        w = moe.gate(x).weights
        return sum(w[:, e, None] * expert(x) for e, expert in enumerate(moe.experts))

    o = fwd_bwd(lambda: moe(x).output, params, g)
    p = fwd_bwd(dense, params, g)
    return Case("MixtureOfExperts + TopKGate (8 experts, k=2, 4096x64)", "dense mixture (all 8 experts)", o, p,
                check_same(o, p, rtol=1e-4, atol=1e-4))


def case_masked_stage() -> Case:
    c, depth = 96, 3
    ours = nn.ModuleList(ConvNeXtV2Block(c, zero_init_last=False) for _ in range(depth))
    for blk in ours:
        with torch.no_grad():
            blk.grn.gamma.normal_(0, 0.5)
            blk.grn.beta.normal_(0, 0.5)
    peer = nn.Sequential(*(convnext_peer(blk) for blk in ours))
    x = torch.randn(16, c, 32, 32, requires_grad=True)
    g = torch.randn_like(x)
    mask = random_mask(16, 32 * 32, 0.6, generator=torch.Generator().manual_seed(0)).view(16, 32, 32)

    def stage(m: torch.Tensor | None) -> torch.Tensor:
        h = x
        for blk in ours:
            h = blk(h, m)
        return h

    unmasked = check_same(fwd_bwd(lambda: stage(None), [x, *ours.parameters()], g),
                          fwd_bwd(lambda: peer(x), [x, *peer.parameters()], g), rtol=1e-4, atol=1e-4)
    keep = (~mask)[:, None].float()
    o = fwd_bwd(lambda: stage(mask), [x, *ours.parameters()], g)
    p = fwd_bwd(lambda: peer(x * keep), [x, *peer.parameters()], g)  # the seed's masking: input only, leaks
    return Case("masked ConvNeXtV2 stage (3 blocks, B16 C96 32x32, 60%)", "timm blocks on the masked input", o, p,
                f"unmasked: {unmasked}")


def _checkpoint_state() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = UNet(3, 3, widths=(64, 128, 256, 256), attention=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    opt.step()
    return model, opt


def _scratch(name: str) -> str:
    folder = tempfile.mkdtemp(prefix=f"peers-{name}-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _checkpoint_setup() -> tuple[nn.Module, CheckpointManager, str, dict]:
    """A model + AdamW state, our manager in one scratch folder, the peer's file path in another."""
    model, opt = _checkpoint_state()
    manager = CheckpointManager(_scratch("ours"), keep_last=1)
    return model, manager, os.path.join(_scratch("peer"), "ckpt.pt"), {"model": model, "optimizer": opt}


def _plain(state: dict) -> dict:
    return {name: obj.state_dict() for name, obj in state.items()}


def _label(model: nn.Module) -> str:
    return f"UNet {count_parameters(model) / 1e6:.1f}M + AdamW"


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _peer_load(path: str, state: dict) -> None:
    loaded = torch.load(path, weights_only=True)
    for name, obj in state.items():
        obj.load_state_dict(loaded[name])


def case_checkpoint_save() -> Case:
    model, manager, path, state = _checkpoint_setup()
    return Case(f"CheckpointManager.save ({_label(model)})", "torch.save (no fsync, no checksum)",
                lambda: manager.save(1, state), lambda: torch.save(_plain(state), path),
                "same state (load row checks the round trip)")


def case_checkpoint_load() -> Case:
    model, manager, path, state = _checkpoint_setup()
    manager.save(1, state)
    torch.save(_plain(state), path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    m2, o2 = _checkpoint_state()
    fresh = {"model": m2, "optimizer": o2}

    def load_ours() -> None:
        manager.load_latest(fresh)

    def load_peer() -> None:
        _peer_load(path, fresh)

    for fn in (load_ours, load_peer):
        with torch.no_grad():
            for p in m2.parameters():
                p.zero_()
        fn()
        for k, v in m2.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    return Case(f"CheckpointManager.load_latest ({_label(model)})", "torch.load + load_state_dict",
                load_ours, load_peer, "both restore the weights bit for bit")


def _durable_torch_save(obj: object, path: str) -> str:
    """torch.save with our guarantees: temp file, fsync, sha256 of what is on disk, atomic rename, fsync dir."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    if _sha256(path) != digest:  # read back and verified before anything older would be deleted
        raise RuntimeError(f"{path} fails its checksum")
    return digest


def case_checkpoint_save_durable() -> Case:
    model, manager, path, state = _checkpoint_setup()
    return Case(f"CheckpointManager.save ({_label(model)})", "torch.save + fsync + sha256 + rename + read-back",
                lambda: manager.save(1, state), lambda: _durable_torch_save(_plain(state), path),
                "same state, same guarantees")


def case_checkpoint_load_verified() -> Case:
    model, manager, path, state = _checkpoint_setup()
    manager.save(1, state)
    digest = _durable_torch_save(_plain(state), path)
    m2, o2 = _checkpoint_state()
    fresh = {"model": m2, "optimizer": o2}

    def load_peer() -> None:
        if _sha256(path) != digest:
            raise RuntimeError(f"{path} fails its checksum")
        _peer_load(path, fresh)

    return Case(f"CheckpointManager.load_latest ({_label(model)})", "sha256 check + torch.load + load_state_dict",
                lambda: manager.load_latest(fresh), load_peer, "same state, same guarantees")


SYSTEM_CASES: dict[str, Callable[[], Case]] = {
    "UNet": case_unet,
    "DDPMScheduler": case_ddpm,
    "MoE": case_moe,
    "masked_stage": case_masked_stage,
    "checkpoint_save": case_checkpoint_save,
    "checkpoint_load": case_checkpoint_load,
    "checkpoint_save_durable": case_checkpoint_save_durable,
    "checkpoint_load_verified": case_checkpoint_load_verified,
}
