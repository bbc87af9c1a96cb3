"""Design decomposition data: the generator, the renderer (against a per-pixel loop) and what it reveals."""
import json

import numpy as np
import pytest
import torch
from design.generator import design_latents, sample_design, sample_designs
from design.glyphs import glyph_boxes
from design.latents import sample_latents
from design.layout import compose
from design.render import render
from design.vocab import (
    FORMATS,
    GOALS,
    HIERARCHY_SCALE,
    LAYOUTS,
    NUM_COLORS,
    PALETTE_BACKGROUNDS,
    PALETTES,
    color_rgb,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def designs():
    return sample_designs(2000, seed=5)


@pytest.fixture(scope="module")
def rendered(designs):
    return render(designs, 64)


def test_designs_are_deterministic_json_dicts():
    a, b = sample_design(3, 17), sample_design(3, 17)
    assert a == b and json.loads(json.dumps(a)) == a
    assert sample_design(3, 18) != a and sample_design(4, 17) != a
    assert sample_designs(3, seed=3, start=16)[1] == a
    with pytest.raises(ValueError, match="index: expected an int >= 0, got -1"):
        sample_design(3, -1)


def test_2000_draws_give_1990_distinct_images_covering_every_category(designs, rendered):
    distinct = {img.numpy().tobytes() for img in rendered.image}
    assert len(distinct) >= 1990
    for key, names in (("goal", GOALS), ("format", FORMATS), ("layout", LAYOUTS), ("palette", PALETTES)):
        assert {d[key] for d in designs} == set(names), key
    counts = {design_latents(d).revealed()[2:] for d in designs}  # (sub, cta, body, images) combinations
    assert len(counts) >= 40  # of 2 * 2 * 4 * 3 = 48


def naive_render(design, height, width):
    """Per pixel, per shape, in painting order: fill, motif, ink (float64 pixel centres)."""
    color = np.zeros((height, width), np.int64)
    level = np.zeros((height, width))
    text, image = np.zeros((height, width), bool), np.zeros((height, width), bool)

    def inside(box, y, x):
        cy, cx = (y + 0.5) / height, (x + 0.5) / width
        return box[0] <= cx < box[2] and box[1] <= cy < box[3]

    for y in range(height):
        for x in range(width):
            cx, cy = (x + 0.5) / width, (y + 0.5) / height
            for el in design["elements"]:
                if not inside(el["box"], y, x):
                    continue
                level[y, x] = el["hierarchy"] / HIERARCHY_SCALE
                color[y, x] = el.get("fill", 0)
                if el["type"] == "image":
                    image[y, x] = True
                    mx, my, r = el["motif"]
                    if (cx - mx) ** 2 + (cy - my) ** 2 < r * r:
                        color[y, x] = el["motif_color"]
                if "text" in el and any(inside(g, y, x) for g in glyph_boxes(el)):
                    text[y, x] = True
                    color[y, x] = el["ink"]
    return color, level, text, image


@pytest.mark.parametrize("size", [(40, 40), (24, 56)])
def test_render_matches_a_per_pixel_loop(designs, size):
    picked = [designs[i] for i in (0, 1, 2, 3, 7, 11)] + [d for d in designs if d["layout"] == "split"][:2]
    r = render(picked, size)
    for b, design in enumerate(picked):
        color, level, text, image = naive_render(design, *size)
        np.testing.assert_array_equal(r.color[b].numpy(), color)
        np.testing.assert_array_equal(r.text_mask[b].numpy(), text)
        np.testing.assert_array_equal(r.image_mask[b].numpy(), image)
        np.testing.assert_allclose(r.hierarchy[b].numpy(), level, rtol=0, atol=1e-7)


def test_masks_and_colour_classes_agree_with_the_rgb(designs, rendered):
    lut = torch.tensor([[0, 0, 0], *[color_rgb(c) for c in range(1, NUM_COLORS)]], dtype=torch.uint8)
    image, color = rendered.image.permute(0, 2, 3, 1), rendered.color
    background = torch.tensor([d["background"] for d in designs], dtype=torch.uint8)
    on_bg = color == 0
    assert on_bg.any(dim=(1, 2)).all()
    # background pixels carry the design's jittered background, every other pixel its class's palette colour
    assert (image == background[:, None, None, :]).all(dim=-1)[on_bg].all()
    assert (image == lut[color])[~on_bg].all()
    # text ink has a text colour of the design; images are the fill or the motif colour
    inks = torch.zeros(len(designs), NUM_COLORS, dtype=torch.bool)
    for b, d in enumerate(designs):
        for el in d["elements"]:
            if "text" in el:
                inks[b, el["ink"]] = True
    assert rendered.text_mask.any(dim=(1, 2)).all()
    assert torch.gather(inks, 1, color.flatten(1))[rendered.text_mask.flatten(1)].all()
    palette = torch.tensor([PALETTES.index(d["palette"]) for d in designs])
    slot = color - 1 - 3 * palette[:, None, None]
    assert ((slot >= 1) & (slot <= 2))[rendered.image_mask].all()
    assert ((slot >= 0) & (slot <= 2) | on_bg).all()  # only the design's palette is used
    # the background RGB is never one of the palette's colours, so it is a class of its own
    base = torch.tensor(PALETTE_BACKGROUNDS)[palette]
    assert ((background.int() - base.int()).abs() <= 22).all()
    assert not (background[:, None, :] == lut[1:][None]).all(-1).any()


def test_glyphs_lie_inside_their_box_and_never_overlap(designs):
    for d in designs[:300]:
        for el in d["elements"]:
            if "text" not in el:
                continue
            boxes = np.array(glyph_boxes(el)).reshape(-1, 4)
            x0, y0, x1, y1 = el["box"]
            assert (boxes[:, 0] >= x0 - 1e-12).all() and (boxes[:, 2] <= x1 + 1e-12).all()
            assert (boxes[:, 1] >= y0 - 1e-12).all() and (boxes[:, 3] <= y1 + 1e-12).all()
            ox = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
            oy = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
            overlap = (ox > 1e-12) & (oy > 1e-12)
            np.fill_diagonal(overlap, False)
            assert not overlap.any()


def read_latents(color, hierarchy):
    """The revealed latents read off one F the slow obvious way (no generator code involved)."""
    levels = set(np.unique(np.round(hierarchy.numpy() * HIERARCHY_SCALE)).astype(int).tolist())
    ids = np.unique(color.numpy())
    palette = int((ids[ids > 0][0] - 1) // 3)
    cols = np.flatnonzero((np.round(hierarchy.numpy() * HIERARCHY_SCALE) == 20).any(axis=0))
    w = hierarchy.shape[1]
    x0, x1 = cols[0] / w, (cols[-1] + 1) / w
    layout = 0 if x0 < 0.12 else 3 if x0 > 0.485 else 2 if x1 > 0.88 else 1
    return (palette, layout, int(16 in levels), int(18 in levels), len(levels & {10, 9, 8}), len(levels & {12, 11}))


def test_rendering_reveals_the_discrete_latents(designs, rendered):
    for b, d in enumerate(designs):
        assert read_latents(rendered.color[b], rendered.hierarchy[b]) == design_latents(d).revealed(), b


def test_design_latents_read_back_what_was_sampled():
    for i in range(300):
        rng = np.random.default_rng([9, i])
        lat = sample_latents(rng)
        assert design_latents(compose(lat, rng)) == lat
