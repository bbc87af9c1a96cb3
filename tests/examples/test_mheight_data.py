"""System A data: exact m-heights (examples/mheight/heights.py) and the dataset builder (build_data.py)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from mheight.build_data import SPLITS, build, format_table, main
from mheight.heights import GROUPS, NK, generator_matrix, group_index, group_indices, mheights

from blockyard.data import ShardDataset

# The course's test case (research A1): h_1, h_2, h_3 of G = [I_2 | P].
COURSE_G = np.array([[1, 0, 0.4759809, 0.9938236, 0.819425], [0, 1, -0.8960798, -0.7442706, 0.3345122]])
COURSE_H = (1.44982, 1.9242386, 5.43904)


def naive_heights(P: np.ndarray) -> np.ndarray:
    """Slow obvious vertex enumeration of one code: solve for every (S, sigma), sort the full codeword."""
    k, r = P.shape
    G = np.hstack([np.eye(k), P])
    best = np.ones(r)
    for S in itertools.combinations(range(k + r), k):
        for tail in itertools.product((1.0, -1.0), repeat=k - 1):
            u = np.linalg.solve(G[:, S].T, np.array((1.0, *tail)))
            mags = np.sort(np.abs(u @ G))[::-1]
            best = np.maximum(best, mags[0] / mags[1:r + 1])
    return best


def lp_height(G: np.ndarray, m: int) -> float:
    """Reduced exact LP (research A2): max s0 c_a s.t. c_b = 1, |c_j| <= 1 on Y, over (a, b, Y, s0)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    k, n = G.shape
    best = 1.0
    for a, b in itertools.permutations(range(n), 2):
        rest = [j for j in range(n) if j not in (a, b)]
        for X in itertools.combinations(rest, m - 1):
            Y = [j for j in rest if j not in X]
            A = np.vstack([G[:, Y].T, -G[:, Y].T])
            for s0 in (1.0, -1.0):
                res = linprog(-s0 * G[:, a], A_ub=A, b_ub=np.ones(2 * len(Y)), A_eq=G[:, b][None], b_eq=[1.0],
                              bounds=[(None, None)] * k, method="highs")
                if res.status == 3:
                    return math.inf
                if res.status == 0:
                    best = max(best, -res.fun)
    return best


def codeword_heights(c: torch.Tensor, r: int) -> torch.Tensor:
    """h_1 .. h_r of individual codewords ``c (N, n)``."""
    mags = c.abs().sort(dim=-1, descending=True).values
    return mags[:, :1] / mags[:, 1:r + 1]


def random_codes(count: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-100, 100, (count, k, n - k)))


# --- groups -------------------------------------------------------------------------------------


def test_groups_are_the_21_documented_triples_in_order():
    assert len(GROUPS) == 21 and len(NK) == 6
    assert list(GROUPS) == sorted(GROUPS)
    assert set(GROUPS) == {(n, k, m) for n in (9, 10) for k in (4, 5, 6) for m in range(2, n - k + 1)}
    assert list(NK) == list(dict.fromkeys((n, k) for n, k, _ in GROUPS))
    assert [group_index(*g) for g in GROUPS] == list(range(21))
    with pytest.raises(ValueError, match=r"\(n, k, m\): expected"):
        group_index(9, 4, 6)  # m > n - k: not a group


def test_group_indices_matches_group_index_and_flags_the_rest():
    side = torch.tensor([[*g] for g in GROUPS] + [[9, 4, 6], [11, 4, 2], [9, 4, 2.5], [9, 3, 2], [-1, 4, 2]],
                        dtype=torch.float32)
    expected = torch.tensor([*range(21), -1, -1, -1, -1, -1])
    torch.testing.assert_close(group_indices(side), expected)
    truncated = expected.clone()
    truncated[23] = 0  # (9, 4, 2.5) cast to int is (9, 4, 2)
    torch.testing.assert_close(group_indices(side.long()), truncated)
    torch.testing.assert_close(group_indices(side.view(13, 2, 3)), expected.view(13, 2))
    with pytest.raises(ValueError, match="side: expected"):
        group_indices(torch.zeros(4, 2))


# --- heights: numerics ----------------------------------------------------------------------------


def test_course_example():
    P = COURSE_G[None, :, 2:]
    for given in (P, torch.from_numpy(P), torch.from_numpy(P).float().double()):
        h = mheights(given)
        assert h.shape == (1, 3) and h.dtype == torch.float64
        assert abs(float(h[0, 1]) - COURSE_H[1]) < 1e-6
        np.testing.assert_allclose(h[0].numpy(), COURSE_H, rtol=1e-5)


def test_dimension_one_codes_have_closed_form_heights():
    # k = 1: the code is the line through g = (1, p), so h_m = |g|_(0) / |g|_(m).
    P = random_codes(5, 7, 1, seed=3)
    g = torch.cat([torch.ones(5, 1, dtype=torch.float64), P[:, 0]], dim=1)
    torch.testing.assert_close(mheights(P), codeword_heights(g, 6), rtol=1e-14, atol=0)


@pytest.mark.parametrize("nk", [*NK, (5, 2), (7, 3), (6, 5)])
def test_batched_matches_naive_loop(nk):
    n, k = nk
    P = random_codes(2 if k == 6 else 3, n, k, seed=n * 10 + k)
    ref = np.stack([naive_heights(p) for p in P.numpy()])
    np.testing.assert_allclose(mheights(P).numpy(), ref, rtol=1e-9)


def test_chunking_does_not_change_results():
    P = random_codes(7, 10, 5, seed=1)
    torch.testing.assert_close(mheights(P, chunk=3), mheights(P), rtol=0, atol=0)
    torch.testing.assert_close(mheights(P[4:5]), mheights(P)[4:5], rtol=0, atol=0)


@pytest.mark.slow
def test_matches_reduced_lp():
    pytest.importorskip("scipy")
    cases = [(COURSE_G, (1, 2, 3)),
             (generator_matrix(random_codes(1, 6, 3, seed=5))[0].numpy(), (1, 2, 3)),
             (generator_matrix(random_codes(1, 7, 4, seed=6))[0].numpy(), (2,))]
    for G, ms in cases:
        k = G.shape[0]
        h = mheights(G[None, :, k:])[0]
        for m in ms:
            assert float(h[m - 1]) == pytest.approx(lp_height(G, m), rel=1e-7), (G.shape, m)


@pytest.mark.parametrize("nk", NK)
def test_heights_are_monotone_and_bound_every_codeword(nk):
    n, k = nk
    P = random_codes(4, n, k, seed=k)
    h = mheights(P)
    assert bool((h[:, 0] >= 1).all()) and bool((h[:, 1:] >= h[:, :-1]).all())
    gen = torch.Generator().manual_seed(0)
    for i in range(len(P)):
        u = torch.cat([torch.randn(3000, k, generator=gen, dtype=torch.float64),
                       torch.eye(k, dtype=torch.float64)])  # random messages and the rows of G
        c = u @ generator_matrix(P[i:i + 1])[0]
        sampled = codeword_heights(c, n - k).amax(0)
        assert bool((sampled <= h[i] * (1 + 1e-12)).all()), (sampled, h[i])


def test_equivalent_codes_have_equal_heights():
    P = random_codes(4, 10, 5, seed=11)
    h = mheights(P)
    cols, rows = torch.randperm(5), torch.randperm(5)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    variants = {
        "permute parity columns": P[:, :, cols],
        "negate a parity column": P * sign[None, None, :],
        # [D | D P] with D a signed permutation is [I | D P] after permuting/negating the first k coordinates.
        "permute rows": P[:, rows, :],
        "negate rows": P * sign[None, :, None],
    }
    for name, Q in variants.items():
        torch.testing.assert_close(mheights(Q), h, rtol=1e-10, atol=0, msg=name)
    scaled = P.clone()
    scaled[:, :, 0] *= 3.0  # rescaling one coordinate is not an equivalence: heights move
    assert not torch.allclose(mheights(scaled), h, rtol=1e-3)


# --- heights: bad input -------------------------------------------------------------------------


def test_rejects_bad_input():
    P = random_codes(3, 9, 4)
    with pytest.raises(ValueError, match=r"P: expected \(B, k, n-k\).*\(4, 5\)"):
        mheights(P[0])
    with pytest.raises(ValueError, match=r"P: expected \(B, k, n-k\)"):
        mheights(torch.zeros(2, 0, 3))
    bad = P.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="code 1"):
        mheights(bad)
    with pytest.raises(TypeError, match="P: expected real numbers"):
        mheights(P.to(torch.complex128))
    with pytest.raises(TypeError, match="P: expected a"):
        mheights(P.tolist())
    for kwargs, name in (({"chunk": 0}, "chunk"), ({"rcond": 1.0}, "rcond"), ({"on_singular": "skip"}, "on_singular")):
        with pytest.raises(ValueError, match=f"{name}: expected"):
            mheights(P, **kwargs)
    assert mheights(P[:0]).shape == (0, 5)


def test_non_mds_codes_are_never_given_a_number():
    P = random_codes(4, 9, 4, seed=2)
    zero = P.clone()
    zero[2, 1, 3] = 0.0  # a zero entry: [I | P] has a singular 4 x 4 submatrix
    with pytest.raises(ValueError, match="code 2 is not MDS"):
        mheights(zero)
    dependent = P.clone()
    dependent[3, :, 1] = 2.5 * dependent[3, :, 0]  # two proportional parity columns
    with pytest.raises(ValueError, match="code 3 is not MDS"):
        mheights(dependent, chunk=2)
    h = mheights(zero, on_singular="nan")
    assert bool(h[2].isnan().all()) and not bool(h[[0, 1, 3]].isnan().any())
    torch.testing.assert_close(h[[0, 1, 3]], mheights(P[[0, 1, 3]]), rtol=0, atol=0)


# --- dataset builder ----------------------------------------------------------------------------

CODES = 8  # per (n, k): 6 / 1 / 1 codes per split


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mheight") / "data"
    return out, build(out, codes_per_group=CODES, seed=3)


def _load(out):
    return {split: ShardDataset(out / split) for split in SPLITS}


def test_build_round_trip(built):
    out, summary = built
    codes_seen = {}
    for split, ds in _load(out).items():
        assert len(ds) == summary["rows"][split]
        assert ds.max_shape == (6, 6) and ds.fields["matrix"] == "float32" and ds.fields["side"] == "float32"
        assert ds.fields["target"] == "float64" and ds.fields["group"] == "int64" and ds.fields["code"] == "int64"
        batch = ds.get_batch(np.arange(len(ds)))
        n, k, m = batch["side"].long().unbind(1)
        torch.testing.assert_close(batch["shape"], torch.stack([k, n - k], 1))
        assert bool(((m >= 2) & (m <= n - k)).all())
        torch.testing.assert_close(batch["group"], group_indices(batch["side"]))
        assert not bool(batch["matrix"][batch["pad_mask"]].any())  # raw P, zero padded
        for g, (gn, gk) in enumerate(NK):
            rows = torch.nonzero((n == gn) & (k == gk)).flatten()
            assert bool((batch["code"][rows] // CODES == g).all())
            P = batch["matrix"][rows, :gk, :gn - gk].double()
            h = mheights(P)  # targets are the heights of the stored float32 matrix, recomputed
            torch.testing.assert_close(batch["target"][rows], h.gather(1, m[rows, None] - 1)[:, 0],
                                       rtol=1e-12, atol=0)
            for code in batch["code"][rows].unique().tolist():
                mine = rows[batch["code"][rows] == code]
                assert sorted(m[mine].tolist()) == list(range(2, gn - gk + 1))  # every m of a code, once
                assert code not in codes_seen, f"code {code} in {codes_seen.get(code)} and {split}"
                codes_seen[code] = split
    assert sorted(codes_seen) == list(range(CODES * len(NK)))


def test_build_counts_and_statistics(built):
    out, summary = built
    assert summary["codes"] == {"train": 36, "val": 6, "test": 6}
    assert summary["rows"] == {"train": 6 * 21, "val": 21, "test": 21}
    datasets = _load(out)
    for row in summary["groups"]:
        assert (row["n"], row["k"], row["m"]) == GROUPS[row["group"]]
        for split, ds in datasets.items():
            assert row["rows"][split] == int((ds.column("group") == row["group"]).sum())
        assert row["rows"] == {"train": 6, "val": 1, "test": 1}
        train = datasets["train"]
        log2h = torch.log2(train.targets[train.column("group") == row["group"]])
        assert row["log2h_mean"] == pytest.approx(float(log2h.mean()), rel=1e-12)
        assert row["log2h_std"] == pytest.approx(float(log2h.std(unbiased=False)), rel=1e-9)
    assert json.loads((out / "build.json").read_text()) == summary
    assert "log2h mean" in format_table(summary)


def test_build_json_is_written_last(built):
    out, _ = built
    others = [p for p in out.rglob("*") if p.is_file() and p.name not in ("build.json", ".build.lock")]
    assert len(others) >= 3 * 7  # 6 shards and an index per split
    assert (out / "build.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in others)


def test_finished_build_is_returned_never_overwritten(built):
    out, summary = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert build(out, codes_per_group=CODES, seed=3, workers=2) == summary  # no pool started: nothing to do
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    with pytest.raises(ValueError, match=f"out: {out}"):
        build(out, codes_per_group=CODES, seed=4)
    assert json.loads((out / "build.json").read_text()) == summary


def test_half_finished_build_is_rebuilt(built, tmp_path):
    out, summary = built
    partial = tmp_path / "data"
    (partial / "train").mkdir(parents=True)
    (partial / "train" / "n9_k4.safetensors").write_bytes(b"half a shard")
    (partial / "notes.txt").write_text("not ours")
    assert build(partial, codes_per_group=CODES, seed=3)["groups"] == summary["groups"]
    assert (partial / "notes.txt").read_text() == "not ours"
    for split in SPLITS:
        for shard in (out / split).glob("*.safetensors"):
            assert (partial / split / shard.name).read_bytes() == shard.read_bytes()


def test_seed_changes_the_codes(built, tmp_path):
    out, _ = built
    build(tmp_path / "other", codes_per_group=CODES, seed=4)
    assert not torch.equal(ShardDataset(tmp_path / "other" / "train").column("matrix"),
                           ShardDataset(out / "train").column("matrix"))


def test_builder_rejects_bad_settings(tmp_path):
    for kwargs, name in (({"codes_per_group": 0}, "codes_per_group"), ({"val_fraction": 0.0}, "val_fraction"),
                         ({"workers": 0}, "workers"), ({"seed": -1}, "seed"),
                         ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
                         ({"codes_per_group": 2}, "codes_per_group")):
        with pytest.raises(ValueError, match=f"{name}: expected|{name}: 2 codes"):
            build(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # rejected before touching the disk


@pytest.mark.slow
def test_workers_do_not_change_the_data(built, tmp_path):
    out, summary = built
    two = build(tmp_path / "two", codes_per_group=CODES, seed=3, workers=2)
    assert two["groups"] == summary["groups"] and two["workers"] == 2
    for split in SPLITS:
        shards = sorted((out / split).glob("*.safetensors"))
        assert len(shards) == 6
        for shard in shards:
            assert (tmp_path / "two" / split / shard.name).read_bytes() == shard.read_bytes()


def test_cli_smoke(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--smoke"])
    printed = capsys.readouterr().out
    assert "840 rows from 240 codes" in printed and printed.count("\n") > 21
    assert json.loads((tmp_path / "cli" / "build.json").read_text())["settings"]["codes_per_group"] == 40
