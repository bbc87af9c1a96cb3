"""XEC detector geometry and synthetic events: ids, shapes, normals, grids, hex graph, generator physics."""
import math

import pytest
import torch
from xec.events import (
    LIGHT_SPEED,
    TARGET_NAMES,
    Events,
    Sources,
    dead_channels,
    denormalize_npho,
    expected_photons,
    generate,
    normalize_npho,
    sample_sources,
    simulate,
)
from xec.geometry import BOTTOM, DS, INNER, N_SENSORS, OUTER, TOP, US, build_geometry

from blockyard.blocks import GraphAttention

pytestmark = pytest.mark.usefixtures("one_thread")

# research table §1.1: (face, first id, end id)
ID_TABLE = [(INNER, 0, 4092), (OUTER, 4092, 4308), (US, 4308, 4452), (DS, 4452, 4596),
            (TOP, 4596, 4669), (BOTTOM, 4669, 4742), (OUTER, 4742, 4760)]
# xec-ml-wl's OUTER_CENTER_INDEX_MAP literal (6 phi x 5 z), transposed to (z, phi)
CENTER_LITERAL = torch.tensor([
    [4185, 4742, 4186, 4743, 4187], [4744, 4745, 4746, 4747, 4748], [4194, 4749, 4195, 4750, 4196],
    [4203, 4751, 4204, 4752, 4205], [4753, 4754, 4755, 4756, 4757], [4212, 4758, 4213, 4759, 4214]]).T
GRIDS = ["inner", "us", "ds", "outer", "outer_coarse", "outer_center"]


@pytest.fixture(scope="module")
def geo():
    return build_geometry()


def in_xenon(p):
    """Inside the active volume bounded by the six faces (§1.1 / §5 parameters)."""
    r = p[:, :2].norm(dim=1)
    phi = torch.rad2deg(torch.atan2(p[:, 1], p[:, 0])) % 360
    cap = 35.1 + 0.35 * (r - 69.5)
    return (r > 64.8) & (r < 106.2) & (p[:, 2].abs() < cap) & (phi > 117.2) & (phi < 242.8)


# -- geometry -----------------------------------------------------------------------------------

def test_face_counts_and_id_ranges_match_the_research_table(geo):
    assert torch.equal(geo.sensor_id, torch.arange(4760)) and N_SENSORS == 4760
    assert torch.bincount(geo.face).tolist() == [4092, 216 + 18, 144, 144, 73, 73]
    for face, lo, hi in ID_TABLE:
        assert (geo.face[lo:hi] == face).all()
    assert torch.equal(geo.top_ids, torch.arange(4596, 4669)) and torch.equal(geo.bottom_ids, torch.arange(4669, 4742))


def test_grids_cover_each_face_exactly_once(geo):
    assert geo.inner.shape == (93, 44) and geo.us.shape == geo.ds.shape == (24, 6)
    assert geo.outer.shape == (45, 72) and geo.outer_coarse.shape == (9, 24) and geo.outer_center.shape == (5, 6)
    assert torch.equal(geo.inner.index_map, torch.arange(4092).reshape(93, 44))
    assert torch.equal(geo.us.index_map, torch.arange(4308, 4452).reshape(24, 6))
    assert torch.equal(geo.outer_center.index_map, CENTER_LITERAL)
    outer = torch.cat([torch.arange(4092, 4308), torch.arange(4742, 4760)])
    assert torch.equal(geo.outer.sensor_ids, outer)
    primary = torch.cat([geo.inner.sensor_ids, geo.us.sensor_ids, geo.ds.sensor_ids, geo.outer.sensor_ids,
                         geo.top_ids, geo.bottom_ids])
    assert torch.equal(primary.sort().values, torch.arange(4760))  # unique and contiguous
    # fine grid (§1.2): 15 cells per coarse PMT, 6 per centre-patch PMT
    count = dict(zip(geo.outer.sensor_ids.tolist(), geo.outer.cells_per_sensor.tolist()))
    assert {count[i] for i in CENTER_LITERAL.flatten().tolist()} == {6}
    assert {c for i, c in count.items() if i not in CENTER_LITERAL} == {15}


def test_positions_lie_on_their_surfaces(geo):
    p, r = geo.position, geo.position[:, :2].norm(dim=1)
    torch.testing.assert_close(r[geo.face == INNER], torch.full((4092,), 64.8))
    torch.testing.assert_close(r[geo.face == OUTER], torch.full((234,), 106.2))
    for face, sign in ((US, -1), (DS, 1)):
        sel = geo.face == face
        torch.testing.assert_close(p[sel, 2], sign * (35.1 + 0.35 * (r[sel] - 69.5)))
    for ids, phi in ((geo.top_ids, 117.2), (geo.bottom_ids, 242.8)):  # flat planes containing the z axis
        rad = math.radians(phi)
        off_plane = p[ids, 0] * -math.sin(rad) + p[ids, 1] * math.cos(rad)
        torch.testing.assert_close(off_plane, torch.zeros(73), atol=1e-4, rtol=0)


def test_normals_are_unit_and_point_as_documented(geo):
    n, p = geo.normal, geo.position
    torch.testing.assert_close(n.norm(dim=1), torch.ones(4760))
    r_hat = torch.nn.functional.pad(p[:, :2], (0, 1)) / p[:, :2].norm(dim=1, keepdim=True)
    torch.testing.assert_close(n[geo.face == INNER], r_hat[geo.face == INNER])
    torch.testing.assert_close(n[geo.face == OUTER], -r_hat[geo.face == OUTER])
    for face, z_sign in ((US, 1), (DS, -1)):  # cone normals 0.33 r + 0.944 z (us), mirrored (ds)
        sel = geo.face == face
        torch.testing.assert_close((n[sel] * r_hat[sel]).sum(1), torch.full((144,), 0.330), atol=1e-3, rtol=0)
        torch.testing.assert_close(n[sel, 2], torch.full((144,), 0.944 * z_sign), atol=1e-3, rtol=0)
    for ids in (geo.top_ids, geo.bottom_ids):  # perpendicular to the plane, towards phi = 180 deg
        tangent = p[ids] - p[ids[0]]
        torch.testing.assert_close(tangent @ n[ids[0]], torch.zeros(73), atol=1e-4, rtol=0)
        assert (n[ids, 0] < -0.8).all()
    # every sensor looks into the xenon: 3 cm in front of it is inside the active volume
    assert in_xenon(p + 3 * n).all()
    assert not in_xenon(p - 3 * n).any()


@pytest.mark.parametrize("name", GRIDS)
def test_face_image_round_trip_is_exact(geo, name):
    grid = getattr(geo, name)
    values = torch.randn(3, 2, 4760)
    image = grid.to_image(values)
    assert image.shape == (3, 2, *grid.shape)
    torch.testing.assert_close(grid.to_sensors(image), values[..., grid.sensor_ids], rtol=0, atol=0)
    torch.testing.assert_close(grid.to_sensors(image, reduce="mean"), values[..., grid.sensor_ids])
    torch.testing.assert_close(grid.to_sensors(image, reduce="sum"),
                               values[..., grid.sensor_ids] * grid.cells_per_sensor)
    with pytest.raises(ValueError, match="values: expected"):
        grid.to_image(torch.randn(2, 4759))
    with pytest.raises(ValueError, match="image: expected"):
        grid.to_sensors(torch.randn(2, 5, 5))


def adjacent_and_far(positions):
    """Largest distance between 4-neighbour cells; smallest between cells >= 2 apart (Chebyshev)."""
    h, w, _ = positions.shape
    adj = max((positions[1:] - positions[:-1]).norm(dim=-1).max(),
              (positions[:, 1:] - positions[:, :-1]).norm(dim=-1).max())
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cheb = torch.maximum((yy.flatten()[:, None] - yy.flatten()).abs(), (xx.flatten()[:, None] - xx.flatten()).abs())
    flat = positions.reshape(-1, 3)
    return adj, torch.cdist(flat, flat)[cheb >= 2].min()


@pytest.mark.parametrize("name", ["inner", "us", "ds", "outer_coarse"])
def test_grid_neighbours_are_closer_than_non_neighbours(geo, name):
    adj, far = adjacent_and_far(geo.position[getattr(geo, name).index_map])
    assert adj < far


def test_outer_orientation_fix(geo):
    adj, _ = adjacent_and_far(geo.position[geo.outer_coarse.index_map])
    assert adj < 10.4  # z pitch 10.35 cm, phi pitch 9.7 cm
    buggy, _ = adjacent_and_far(geo.position[torch.arange(4092, 4308).reshape(9, 24)])  # the repo's map
    assert buggy > 80  # the test would catch the bug
    fine = geo.outer.index_map
    distinct = fine[1:] != fine[:-1]
    assert (geo.position[fine[1:]] - geo.position[fine[:-1]]).norm(dim=-1)[distinct].max() < 11
    # the fine-grid paste (coarse cell (3, 10) -> fine rows 15-29, cols 30-41) covers the 12 central coarse ids
    assert set(fine[15:30, 30:42].unique().tolist()) == set(CENTER_LITERAL.flatten().tolist())
    assert not set(fine[:15].unique().tolist()) & set(CENTER_LITERAL.flatten().tolist())


def test_hex_edge_index_is_the_distance_graph(geo):
    ei = geo.hex_edge_index
    assert ei.dtype == torch.long and ei.shape == (2, 366)
    assert ei.min() >= 0 and ei.max() < 73 and not (ei[0] == ei[1]).any()
    pairs = set(map(tuple, ei.T.tolist()))
    assert len(pairs) == 366 and pairs == {(j, i) for i, j in pairs}
    deg = torch.bincount(ei[1], minlength=73)
    interior = (geo.hex_row > 0) & (geo.hex_row < 5) & (geo.hex_col > 0)
    interior &= geo.hex_col < torch.tensor([11, 12, 11, 12, 13, 14])[geo.hex_row] - 1
    assert deg.max() == 6 and deg.min() == 2 and (deg[interior] == 6).all() and interior.sum() > 30
    for ids in (geo.top_ids, geo.bottom_ids):  # neighbours = sensors closer than 8 cm (6.12 in-row, 7.55 across)
        d = torch.cdist(geo.position[ids].double(), geo.position[ids].double())
        near = {(i, j) for i, j in ((d > 0) & (d < 8)).nonzero().tolist()}
        assert pairs == near
    # each node has at most one neighbour per direction, and reversing an edge turns it by 180 deg
    key = ei[1] * 6 + geo.hex_edge_direction
    assert key.unique().numel() == 366
    direction = dict(zip(map(tuple, ei.T.tolist()), geo.hex_edge_direction.tolist()))
    assert all(direction[(j, i)] == (k + 3) % 6 for (i, j), k in direction.items())


def test_hex_graph_feeds_graph_attention(geo):
    moved = geo.to("cpu")  # Geometry.to reaches the nested grids
    assert isinstance(moved.outer, type(geo.outer)) and torch.equal(moved.outer.cell_sensor, geo.outer.cell_sensor)
    layer = GraphAttention(2, 4)
    out = layer(torch.randn(3, 4760, 2)[:, geo.top_ids], geo.hex_edge_index)
    out = getattr(out, "output", out)
    assert out.shape == (3, 73, 4)


# -- events -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def events(geo):
    return generate(400, geo, torch.Generator().manual_seed(0))


def test_shapes_dtypes_and_targets(events):
    assert isinstance(events, Events)
    assert events.npho.shape == events.time.shape == events.time_mask.shape == (400, 4760)
    assert events.npho.dtype == events.time.dtype == torch.float32 and events.time_mask.dtype == torch.bool
    assert events.dead.shape == (4760,) and events.dead.dtype == torch.bool
    assert events.targets.shape == (400, len(TARGET_NAMES)) and events.source.shape == (400, 3)
    t = dict(zip(TARGET_NAMES, events.targets.T))
    s = events.source
    r = s[:, :2].norm(dim=1)
    torch.testing.assert_close(t["u"], s[:, 2])
    torch.testing.assert_close(t["w"], r - 64.8, atol=1e-4, rtol=0)
    phi = torch.atan2(s[:, 1], s[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(t["v"], 64.8 * (phi - math.pi), atol=1e-3, rtol=0)
    assert (t["w"] >= 2).all() and (t["w"] <= 35).all() and (t["energy"] >= 20).all() and (t["energy"] <= 60).all()
    assert t["t0"].abs().max() <= 2 and in_xenon(s).all()
    assert (events.time[events.time_mask] == 0).all() and (events.npho >= 0).all()


def test_reproducible_with_a_generator(geo, events):
    again = generate(400, geo, torch.Generator().manual_seed(0))
    for a, b in zip(events, again):
        assert torch.equal(a, b)
    other = generate(400, geo, torch.Generator().manual_seed(1))
    assert not torch.equal(events.npho, other.npho)


def test_dead_channels_fixed_and_invalid_in_every_event(geo, events):
    assert events.dead.sum() == 48  # round(1 % of 4760)
    assert torch.equal(events.dead, dead_channels())
    assert torch.equal(generate(3, geo, torch.Generator().manual_seed(5)).dead, events.dead)
    assert events.time_mask[:, events.dead].all() and (events.npho[:, events.dead] == 0).all()


def test_time_valid_fraction_in_documented_range(events):
    valid = (~events.time_mask).float()
    assert 0.07 < valid.mean() < 0.13  # ~10 % (§5); 9.9 % measured over 10k events
    assert (valid.mean(1) > 0.01).all() and (valid.mean(1) < 0.25).all()
    assert (events.npho[~events.time_mask] >= 50).all()


def naive_mu(source, energy, geo, i):
    p = geo.position[i].tolist()
    n = geo.normal[i].tolist()
    d = math.dist(source, p)
    cos = sum((s - q) * m for s, q, m in zip(source, p, n)) / d
    omega = 0.5 * (1 - d / math.sqrt(d * d + geo.area[i].item() / math.pi)) * max(cos, 0.0)
    return 6000.0 * energy * omega * math.exp(-d / 100.0)


def test_expected_photons_matches_a_naive_loop(geo):
    src = sample_sources(2, torch.Generator().manual_seed(3))
    mu = expected_photons(src.xyz, geo, src.energy)
    assert mu.shape == (2, 4760)
    sensors = [0, 2000, 4091, 4100, 4310, 4500, 4600, 4700, 4750]
    for b in range(2):
        for i in sensors:
            ref = naive_mu(src.xyz[b].tolist(), src.energy[b].item(), geo, i)
            assert mu[b, i].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert (mu[:, sensors] > 0).any() and (mu == 0).any()
    with pytest.raises(ValueError, match="source: expected"):
        expected_photons(torch.zeros(2, 2), geo, src.energy)


def fixed(xyz, energy, n):
    xyz = torch.tensor(xyz, dtype=torch.float32).expand(n, 3)
    return Sources(xyz, torch.full((n,), float(energy)), torch.zeros(n), torch.zeros(n, 5))


def polar(r, phi, z):
    return [r * math.cos(math.radians(phi)), r * math.sin(math.radians(phi)), z]


@pytest.mark.parametrize(("where", "face"), [((67.0, 150.0, -10.0), INNER), ((75.0, 181.0, 3.0), INNER),
                                             ((100.0, 200.0, 12.0), OUTER), ((80.0, 185.0, -32.0), US)])
def test_nearest_sensor_gets_the_most_photons_on_average(geo, where, face):
    src = fixed(polar(*where), 40, 100)
    alive = torch.zeros(4760, dtype=torch.bool)
    npho, _, _ = simulate(src, geo, alive, torch.Generator().manual_seed(0))
    mean = npho.mean(0)
    d = (geo.position - src.xyz[0]).norm(dim=1)
    ids = (geo.face == face).nonzero().flatten()  # within one face: same sensor size and orientation
    assert d[ids].min() < 12
    assert ids[mean[ids].argmax()] == ids[d[ids].argmin()]


def test_total_npho_is_linear_in_energy(geo):
    xyz = polar(72.0, 170.0, 5.0)
    alive = torch.zeros(4760, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    totals = {e: simulate(fixed(xyz, e, 50), geo, alive, gen)[0].sum(1).double() for e in (20, 40, 60)}
    mu20 = expected_photons(fixed(xyz, 20, 1).xyz, geo, torch.tensor([20.0])).sum().double()
    for e, total in totals.items():
        mu = mu20 * e / 20
        assert abs(total.mean() - mu) < 5 * math.sqrt(mu / 50)  # Poisson: var(sum) = mu
        assert total.std() < 2 * math.sqrt(mu)


def test_npho_is_zero_on_sensors_facing_away(geo, events):
    facing = ((events.source[:, None] - geo.position) * geo.normal).sum(-1)  # (s - p) . n
    away = facing < -1e-3
    assert away.sum() > 1000
    assert (events.npho[away] == 0).all()
    assert (events.npho[facing > 1.0].float().mean() > 0)


def test_times_increase_with_distance(geo, events):
    valid = ~events.time_mask
    d = (events.source[:, None] - geo.position).norm(dim=-1)[valid].double()
    t = (events.time - events.targets[:, 4:5])[valid].double()
    slope = ((d - d.mean()) * (t - t.mean())).sum() / ((d - d.mean()) ** 2).sum()
    assert slope.item() == pytest.approx(1 / LIGHT_SPEED, rel=0.05)
    bins = torch.bucketize(d, torch.tensor([5.0, 10, 20, 30, 45], dtype=torch.float64))
    means = [t[bins == b].mean().item() for b in range(6) if (bins == b).sum() > 20]
    assert len(means) >= 4 and means == sorted(means)


@pytest.mark.parametrize("scheme", ["log1p", "sqrt"])
def test_normalize_npho_round_trip(scheme):
    x = torch.tensor([0.0, 1.0, 50.0, 1000.0, 2.0e4])
    y = normalize_npho(x, scheme)
    torch.testing.assert_close(denormalize_npho(y, scheme), x)
    assert (y.diff() > 0).all() and y[0] == 0
    expected = torch.log1p(x / 1000) / 4.08 if scheme == "log1p" else torch.sqrt(x / 1000)
    torch.testing.assert_close(y, expected)
    assert normalize_npho(torch.tensor([-2000.0]), scheme) == 0  # below the domain -> 0 photons
    with pytest.raises(ValueError, match="scheme"):
        normalize_npho(x, "linear")


def test_split_alive_twin_adds_only_the_truth_behind_the_dead_channels(geo):
    """``Split.alive_inputs``: the same events with every sensor alive; equal to ``x`` at every live sensor (a wrong
    seed or chunking breaks it), new counts at the dead ones; a ``head`` gets the first rows of its parent's twin."""
    from xec.batches import Split

    split = Split(24, geo, seed=5, chunk_size=8)
    alive = split.alive_inputs(geo)
    live = ~split.dead
    assert alive.shape == split.x.shape and split.dead.sum() == 48
    torch.testing.assert_close(alive[:, :, live], split.x[:, :, live], rtol=0, atol=0)
    assert (split.x[:, :, split.dead] == 0).all() and (alive[:, 0, split.dead] > 0).float().mean() > 0.25
    torch.testing.assert_close(split.head(10).alive_inputs(geo), alive[:10], rtol=0, atol=0)
