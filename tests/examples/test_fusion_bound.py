"""The (connected zone regions - 1) crossing bound: regions against a naive flood fill, the bound
against every Hamiltonian path of small grids and against the default dataset's teacher records."""
import itertools

import numpy as np
import pytest
from fusion.bound import crossing_bound, gap_closed, region_labels, zone_regions
from fusion.build_data import SIZES, plan_trajectories
from fusion.env import FusionEnv
from fusion.grid import ZONE_PATTERNS, count_crossings, init_path, make_zones
from fusion.teacher import replay, run_teacher


def flood_fill(zones):
    """Region id per cell by a stack flood fill over equal-zone 4-neighbours (ids in discovery order)."""
    h, w = len(zones), len(zones[0])
    label = [[-1] * w for _ in range(h)]
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if label[y0][x0] >= 0:
                continue
            stack = [(y0, x0)]
            label[y0][x0] = n
            while stack:
                y, x = stack.pop()
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and label[ny][nx] < 0 and zones[ny][nx] == zones[y][x]:
                        label[ny][nx] = n
                        stack.append((ny, nx))
            n += 1
    return np.array(label), n


def random_zone_grids(rng):
    for _ in range(150):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        yield rng.integers(0, int(rng.integers(1, 5)), size=(h, w))
    for pattern in ZONE_PATTERNS:  # the dataset's layouts
        for _ in range(5):
            yield make_zones(int(rng.integers(3, 20)), int(rng.integers(3, 20)), pattern, rng=rng,
                             num_zones=int(rng.integers(2, 6)))


def test_regions_match_a_naive_flood_fill():
    rng = np.random.default_rng(0)
    for zones in random_zone_grids(rng):
        ref, n = flood_fill(zones.tolist())
        labels = region_labels(zones)
        assert zone_regions(zones) == n and crossing_bound(zones) == n - 1
        # the same partition: each naive region maps to one label and back
        pairs = set(zip(ref.ravel().tolist(), labels.ravel().tolist()))
        assert len(pairs) == n == len({b for _, b in pairs})
        flat = np.arange(zones.size).reshape(zones.shape)
        for r in range(n):  # each label is its region's smallest flat index
            assert (labels[ref == r] == flat[ref == r].min()).all()


def test_batched_grids_are_counted_each_on_its_own():
    rng = np.random.default_rng(1)
    zones = rng.integers(0, 3, size=(6, 7, 5))
    zones[2] = 1  # one region; with labels leaking across grids of the batch it would merge with others
    counts = zone_regions(zones)
    assert counts.shape == (6,) and counts.dtype == np.int64
    assert counts.tolist() == [flood_fill(z.tolist())[1] for z in zones]
    np.testing.assert_array_equal(region_labels(zones), np.stack([region_labels(z) for z in zones]))
    np.testing.assert_array_equal(crossing_bound(zones), counts - 1)


def test_diagonal_neighbours_are_separate_regions():
    # path edges join 4-neighbours only: a checkerboard has one region per cell
    board = np.indices((4, 5)).sum(0) % 2
    assert zone_regions(board) == 20
    assert zone_regions(np.array([[0, 1], [1, 0]])) == 4 and zone_regions(np.zeros((3, 3), np.int64)) == 1
    # equal ids that never touch are two regions (islands share one id)
    assert zone_regions(np.array([[1, 0, 1]])) == 3


def hamiltonian_paths(h, w):
    """Every Hamiltonian path of an h x w grid as (H, V) edge arrays (each undirected path once)."""
    def walk(path, seen):
        if len(path) == h * w:
            if path[0] < path[-1]:
                yield list(path)
            return
        y, x = divmod(path[-1], w)
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            c = ny * w + nx
            if 0 <= ny < h and 0 <= nx < w and c not in seen:
                seen.add(c)
                path.append(c)
                yield from walk(path, seen)
                path.pop()
                seen.discard(c)

    for start in range(h * w):
        for cells in walk([start], {start}):
            H, V = np.zeros((h, w - 1), bool), np.zeros((h - 1, w), bool)
            for a, b in itertools.pairwise(cells):
                (ya, xa), yb = divmod(min(a, b), w), max(a, b) // w
                if ya == yb:
                    H[ya, xa] = True
                else:
                    V[ya, xa] = True
            yield H, V


@pytest.mark.parametrize("shape", [(3, 3), (3, 4), (4, 4)])
def test_no_hamiltonian_path_has_fewer_crossings_than_the_bound(shape):
    paths = list(hamiltonian_paths(*shape))
    assert len(paths) > 0
    rng = np.random.default_rng(shape[1])
    tight = 0
    for k in range(60):
        zones = rng.integers(0, 2 + k % 3, size=shape)
        best = min(count_crossings(H, V, zones) for H, V in paths)
        assert best >= crossing_bound(zones)
        tight += best == crossing_bound(zones)
    assert tight >= 10  # the bound is often exact on small grids: a bound one too low would fail here


def test_bound_is_attained_on_left_right_by_the_vertical_zigzag():
    for w, h in ((16, 16), (24, 16), (17, 9)):
        zones = make_zones(w, h, "left_right")
        env = FusionEnv(zones, *init_path(w, h, "vertical_zigzag"))
        assert crossing_bound(zones) == 1 == env.crossings
        zigzag = FusionEnv(zones, *init_path(w, h, "zigzag"))
        assert zigzag.crossings == h  # the horizontal start: every row crosses once


def test_gap_closed_is_a_ratio_of_sums():
    assert gap_closed([10], [4], [2]) == pytest.approx(0.75)
    assert gap_closed([10, 6], [4, 6], [2, 2]) == pytest.approx(6 / 12)  # not the mean of 0.75 and 0
    assert gap_closed([10], [2], [2]) == 1.0 and gap_closed([10], [10], [2]) == 0.0
    assert gap_closed([3, 1], [3, 1], [3, 1]) is None  # nothing to close
    with pytest.raises(ValueError, match="bound"):
        gap_closed([10], [1], [2])
    with pytest.raises(ValueError, match="shapes"):
        gap_closed([10, 9], [1], [2])


def test_rejects_bad_zones():
    with pytest.raises(ValueError, match=r"zones: expected \(h, w\)"):
        zone_regions(np.zeros(5, np.int64))
    with pytest.raises(TypeError, match="zones: expected integer"):
        zone_regions(np.zeros((3, 3)))


@pytest.mark.slow
def test_bound_never_above_the_default_datasets_recorded_crossings():
    """The default dataset's 560 trajectories (build_data's plan, seed 0): the bound is at most every
    start's crossings (a teacher run of 1 proposal records the same zones and start as the full run)
    and, on the first trajectory of every (size, pattern) cell, at most every count the full teacher
    run passes through, its recorded final included."""
    specs = plan_trajectories(SIZES, ZONE_PATTERNS, per_cell=20, seed=0, iters=3000)
    assert len(specs) == 560

    def teacher(spec, iters):
        return run_teacher(spec.width, spec.height, spec.zone_pattern, spec.seed, iters=iters,
                           init_pattern=spec.init_pattern, num_zones=spec.num_zones, num_islands=spec.num_islands)

    starts = [teacher(s, 1) for s in specs]
    bounds = np.array([crossing_bound(np.reshape(r["zone_grid"], (r["grid_H"], r["grid_W"]))) for r in starts])
    initial = np.array([r["initial_crossings"] for r in starts])
    assert (bounds <= initial).all() and (bounds >= 1).all()
    for spec, bound in zip(specs[:len(SIZES) * len(ZONE_PATTERNS)], bounds):
        rec = teacher(spec, spec.iters)
        assert min(replay(rec).crossings) == rec["final_crossings"] >= bound
