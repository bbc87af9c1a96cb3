"""XEC example: the positional encodings of the face tokens (--pos-enc) and the EMA warmup switch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun_helpers import run_example
from xec.geometry import BOTTOM, DS, INNER, TOP, US, build_geometry
from xec.model import IMAGE_GRIDS, TOKENS, XECEncoder
from xec.posenc import POS_ENCODINGS, face_alibi_bias, geometric_table, sinusoidal_table, token_centres

from blockyard.blocks import RotaryEmbedding, alibi_slopes

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "xec_mae.py"
TINY = {"dim": 8, "depth": 1, "token_dim": 16, "hex_dim": 8, "fusion_depth": 2, "heads": 4}


@pytest.fixture(scope="module")
def geometry():
    return build_geometry()


def seed_sinusoidal_pos_embed(num_positions, embed_dim):
    """The seed's implementation example (ML Techniques §6), as written there."""
    position = torch.arange(num_positions).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, embed_dim, 2) * (-np.log(10000.0) / embed_dim))
    pe = torch.zeros(num_positions, embed_dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0)


@pytest.mark.parametrize("dim", [8, 16, 64])
def test_sinusoidal_table_is_the_seeds_interleaved_formula(dim):
    ours = sinusoidal_table(torch.arange(7), dim)
    torch.testing.assert_close(ours, seed_sinusoidal_pos_embed(7, dim)[0], atol=1e-6, rtol=1e-6)
    for pos in range(7):  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert ours[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert ours[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_token_centres_are_each_faces_mean_sensor_position_in_token_order(geometry):
    centres = token_centres(geometry, IMAGE_GRIDS)
    assert centres.shape == (len(TOKENS), 3)

    def mean(ids):
        return geometry.position[ids].double().mean(0).float()

    face = geometry.face
    expected = {"inner": mean(face == INNER), "us": mean(face == US), "ds": mean(face == DS),
                "outer_coarse": mean(torch.arange(4092, 4308)),  # §1.1: the 216 coarse PMTs
                "outer_center": mean(geometry.outer_center.index_map.flatten()),  # 18 own + 12 shared ids
                "top": mean(face == TOP), "bottom": mean(face == BOTTOM)}
    torch.testing.assert_close(centres, torch.stack([expected[t] for t in TOKENS]))
    _, y, z = centres.T
    assert z[TOKENS.index("us")] < -30 < 30 < z[TOKENS.index("ds")]  # the end caps
    assert y[TOKENS.index("top")] > 50 > -50 > y[TOKENS.index("bottom")]
    radius = centres[:, :2].norm(dim=1)
    assert radius[TOKENS.index("inner")] < radius[TOKENS.index("outer_coarse")] < radius[TOKENS.index("outer_center")]


def test_geometric_table_is_the_sinusoid_of_each_centre_coordinate(geometry):
    centres = token_centres(geometry, IMAGE_GRIDS)
    table = geometric_table(centres, 64)  # 10 frequencies per coordinate: 3 x 20 channels, 4 zeros
    assert table.shape == (7, 64) and torch.all(table[:, 60:] == 0)
    for n in range(7):
        for k in range(3):
            for i in range(10):
                angle = centres[n, k].item() / 10000 ** (2 * i / 20)
                assert table[n, 20 * k + 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
                assert table[n, 20 * k + 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    gaps = torch.cdist(table, table) + torch.eye(7) * 1e9
    assert gaps.min() > 0.5  # every face its own vector


def test_face_alibi_bias_uses_centre_distances_in_units_of_the_closest_pair(geometry):
    centres = token_centres(geometry, IMAGE_GRIDS)
    bias = face_alibi_bias(centres, 4)
    slopes = alibi_slopes(4)
    d = torch.cdist(centres.double(), centres.double())
    closest = TOKENS.index("outer_coarse"), TOKENS.index("outer_center")
    assert d[closest].item() == pytest.approx(19.4, abs=0.05)  # the documented unit
    torch.testing.assert_close(bias, (-slopes[:, None, None] * d / d[closest]).float())
    for h in range(4):
        assert bias[h][closest].item() == pytest.approx(-slopes[h].item())
        assert torch.all(bias[h].diagonal() == 0) and torch.equal(bias[h], bias[h].T)


@pytest.mark.parametrize("bad", [
    (lambda: sinusoidal_table(torch.arange(7), 7), ValueError, r"dim: expected a positive even number, got 7"),
    (lambda: geometric_table(torch.zeros(7, 2), 64), ValueError, r"centres: expected \(N, 3\), got \(7, 2\)"),
    (lambda: geometric_table(torch.zeros(7, 3), 4), ValueError, r"dim: expected >= 6, got 4"),
    (lambda: XECEncoder(build_geometry(), **TINY, pos_enc="none"), ValueError,
     r"pos_enc: expected one of \('learned', 'sinusoidal', 'geometric', 'rope', 'alibi'\), got 'none'"),
])
def test_rejects_bad_input(bad):
    call, exc, match = bad
    with pytest.raises(exc, match=match):
        call()


def encoder(geometry, pos_enc):
    torch.manual_seed(0)
    model = XECEncoder(geometry, **TINY, pos_enc=pos_enc).eval()
    for p in model.fusion.parameters():  # leave the identity-at-init state: attention must carry signal
        torch.nn.init.normal_(p, std=0.3)
    return model


def face_swapped(tokens, a, b):
    perm = list(range(tokens.shape[1]))
    perm[a], perm[b] = b, a
    return tokens[:, perm]


@pytest.mark.parametrize("pos_enc", POS_ENCODINGS)
def test_every_encoding_tells_the_fused_faces_apart(geometry, pos_enc, one_thread):
    """Without position information the fusion is permutation-equivariant: swapping two faces' tokens swaps the
    outputs (the control below, with the learned table zeroed). With each encoding it is not."""
    model = encoder(geometry, pos_enc)
    tokens = torch.randn(3, len(TOKENS), TINY["token_dim"])
    a, b = TOKENS.index("inner"), TOKENS.index("top")
    with torch.no_grad():
        gap = (model.fuse(face_swapped(tokens, a, b)) - face_swapped(model.fuse(tokens), a, b)).abs().max()
        assert gap > 1e-2, pos_enc
        if pos_enc == "learned":  # control: the same check passes with no position information
            model.face_embed.weight.zero_()
            torch.testing.assert_close(model.fuse(face_swapped(tokens, a, b)), face_swapped(model.fuse(tokens), a, b))


@pytest.mark.parametrize("pos_enc", ["sinusoidal", "geometric"])
def test_fixed_tables_are_added_like_a_learned_table_holding_them(geometry, pos_enc, one_thread):
    fixed, learned = encoder(geometry, pos_enc), encoder(geometry, "learned")
    table = (sinusoidal_table(torch.arange(7), 16) if pos_enc == "sinusoidal"
             else geometric_table(token_centres(geometry, IMAGE_GRIDS), 16))
    torch.testing.assert_close(fixed.face_table, table)
    learned.fusion.load_state_dict(fixed.fusion.state_dict())
    with torch.no_grad():
        learned.face_embed.weight.copy_(table)
    tokens = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(fixed.fuse(tokens), learned.fuse(tokens))


def test_rope_and_alibi_reach_every_fusion_block(geometry, one_thread):
    rope, alibi = encoder(geometry, "rope"), encoder(geometry, "alibi")
    for block in rope.fusion:
        assert isinstance(block.attn.rope, RotaryEmbedding) and block.attn.rope.dim == 4
    torch.testing.assert_close(alibi.face_bias, face_alibi_bias(token_centres(geometry, IMAGE_GRIDS), 4))
    tokens, before_of = torch.randn(2, 7, 16), {}
    with torch.no_grad():
        for model in (rope, alibi):
            before = before_of[model] = model.fuse(tokens)
            for block in model.fusion:  # the manual attention path gives the same tokens
                block.attn.fused = False
            torch.testing.assert_close(model.fuse(tokens), before, atol=1e-5, rtol=1e-5)
        for block in rope.fusion:  # and each encoding matters: without it the tokens change
            block.attn.rope = None
        alibi.face_bias.zero_()
        for model in (rope, alibi):
            assert (model.fuse(tokens) - before_of[model]).abs().max() > 1e-2
    # the learned encoding keeps the seed's parameter name; the fixed ones add no parameter and no state
    names = {pe: set(encoder(geometry, pe).state_dict()) for pe in POS_ENCODINGS}
    assert "face_embed.weight" in names["learned"]
    for pe in POS_ENCODINGS[1:]:
        assert names[pe] == names["learned"] - {"face_embed.weight"}, pe


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "line"), [
    (("--pos-enc", "rope"), "positional encoding of the face tokens: rope; EMA decay 0.999, warmup on: "
                            "effective decay at the last step (8) 0.7500"),
    # the seed's constant 0.999 would keep the 8-step smoke run's EMA at the first step's weights (0.993 of it)
    (("--pos-enc", "alibi", "--ema-warmup", "off", "--ema", "0.5"),
     "positional encoding of the face tokens: alibi; EMA decay 0.5, warmup off: effective decay at the last step "
     "(8) 0.5000"),
])
def test_smoke_run_with_an_encoding_and_ema_setting_learns_and_reports_them(tmp_path, extra, line):
    out = tmp_path / "run"
    proc = run_example(SCRIPT, out, *extra, "--prior", "none", nproc=1)  # learning: see test_xec_mae.NETWORK_ALONE
    summary = json.loads((out / "summary.json").read_text())
    assert line in proc.stdout and line in summary["table"]
    assert summary["stages"]["finetune"]["ema_decay_last_step"] == pytest.approx(float(line.split()[-1]))
    for name in ("pretrain", "finetune", "scratch"):  # as test_xec_mae.assert_learned: the map head starts at
        # the light centroid, so its regression stages need only fall (a no-op step leaves them equal)
        records = [json.loads(r) for r in (out / name / "metrics.jsonl").read_text().splitlines()]
        drop = 0.03 if name == "pretrain" else 0.0
        assert records[-1]["val_loss"] < (1 - drop) * records[0]["val_loss"], (name, records)
