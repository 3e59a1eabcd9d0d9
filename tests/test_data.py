"""Tests of the datasets (digits, shapes) and of the batching iterator."""

import time

import numpy as np
import pytest
import torch

import core
from models import shapes as S
from models.data import Batches, digits, digits_split, parse_caption, render, resize_bilinear, shapes

# --- digits ---------------------------------------------------------------------------------------


def test_digits_split_sizes_balance_and_disjointness():
    x, y = digits("all")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    train, test = digits_split()
    assert len(train) == 1437 and len(test) == 360
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).size == 1797
    counts = np.bincount(y, minlength=10)
    assert (np.bincount(y[test], minlength=10) == 36).all()  # the test set is exactly balanced
    assert (np.bincount(y[train], minlength=10) == counts - 36).all()
    xtr, ytr = digits("train")
    xte, yte = digits("test")
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(xtr, x[train])
    np.testing.assert_array_equal(yte, y[test])


def test_digits_split_is_the_documented_one():
    # Recompute the documented rule independently, and pin a fingerprint of the result so that a change
    # of the rule (or of NumPy's permutation stream) cannot silently move images between the sets.
    from sklearn.datasets import load_digits

    labels = load_digits().target
    expected = np.sort(np.concatenate([
        np.flatnonzero(labels == d)[np.random.default_rng(d).permutation((labels == d).sum())[:36]] for d in range(10)
    ]))  # fmt: skip
    _, test = digits_split()
    np.testing.assert_array_equal(test, expected)
    assert test[:8].tolist() == PINNED_TEST_HEAD and int(test.sum()) == PINNED_TEST_SUM


PINNED_TEST_HEAD = [22, 27, 41, 47, 48, 51, 52, 58]  # the split as first computed (NumPy 2, PCG64)
PINNED_TEST_SUM = 329382


def test_digits_pixel_values():
    from sklearn.datasets import load_digits

    x, _ = digits("all")
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(x[:, 0], (load_digits().images / 8 - 1).astype(np.float32))  # v / 8 - 1


def test_digits_upscaled_to_16():
    x8, y8 = digits("test")
    x16, y16 = digits("test", resolution=16)
    assert x16.shape == (360, 1, 16, 16) and x16.dtype == np.float32
    np.testing.assert_array_equal(y8, y16)
    assert x16.min() >= -1 and x16.max() <= 1
    ref = torch.nn.functional.interpolate(torch.from_numpy(x8).double(), size=16, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(x16, ref.numpy(), atol=1e-6)
    xn, _ = digits("test", resolution=16, upscale="nearest")
    np.testing.assert_array_equal(xn, torch.nn.functional.interpolate(torch.from_numpy(x8), size=16).numpy())
    np.testing.assert_array_equal(xn[..., ::2, ::2], x8)


@pytest.mark.parametrize(("h", "w", "size"), [(8, 8, 16), (8, 8, 12), (5, 7, 9), (9, 9, 4), (3, 1, 6)])
def test_resize_bilinear_matches_pytorch(h, w, size):
    x = np.random.default_rng(0).normal(size=(2, 3, h, w))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(x, size), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        digits("validation")
    with pytest.raises(ValueError, match="resolution"):
        digits(resolution=4)
    with pytest.raises(ValueError, match="upscale"):
        digits(resolution=16, upscale="bicubic")
    with pytest.raises(ValueError, match="multiple of 8"):
        digits(resolution=12, upscale="nearest")


# --- shapes ---------------------------------------------------------------------------------------

N = 10_000


@pytest.fixture(scope="module")
def big():
    """10,000 images at 32×32 (and how long they took), shared by the tests below."""
    start = time.perf_counter()
    data = shapes(N, 32, seed=1)
    return data, time.perf_counter() - start


@pytest.fixture(scope="module")
def small():
    return shapes(4000, 16, seed=2)


def test_shapes_generation_is_fast(big):
    # Seconds, not minutes: about 2 s on a 2-core laptop CPU; the bound only catches a lost vectorization.
    assert big[1] < 20


def test_shapes_arrays_shapes_dtypes_and_range(big):
    data, _ = big
    assert len(data) == N and len(data.captions) == N
    assert data.images.shape == (N, 3, 32, 32) and data.images.dtype == np.float32
    assert data.images.min() == -1 and data.images.max() <= 1
    for k in ("shape", "color", "size", "position"):
        a = getattr(data, k)
        assert a.shape == (N, 2) and a.dtype == np.int64
    assert data.relation.shape == (N,) and data.n_objects.shape == (N,)
    one, two = data.n_objects == 1, data.n_objects == 2
    assert (one | two).all() and 0.45 < two.mean() < 0.55
    assert (data.shape[one, 1] == -1).all() and (data.relation[one] == -1).all()
    assert np.isnan(data.center[one, 1]).all() and np.isnan(data.radius[one, 1]).all()
    assert (data.shape[:, 0] >= 0).all() and (data.shape[two] >= 0).all() and (data.relation[two] >= 0).all()
    # Objects lie entirely inside the image.
    present = ~np.isnan(data.radius)
    c, r = data.center[present], data.radius[present][:, None]
    assert (c - r >= 0).all() and (c + r <= 1).all()


def test_shapes_deterministic_for_a_seed():
    a, b = shapes(300, 16, seed=7), shapes(300, 16, seed=7)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    np.testing.assert_array_equal(a.center, b.center)
    assert shapes(300, 16, seed=8).captions != a.captions
    assert shapes(300, 16, seed=7, split="test").captions != a.captions
    # The first n images of a larger set are the n images of a smaller one (scenes drawn in blocks).
    c = shapes(2500, 16, seed=7)
    assert c.images[:300].tobytes() == a.images.tobytes() and c.captions[:300] == a.captions
    # The same scene at two resolutions.
    np.testing.assert_array_equal(shapes(300, 32, seed=7).center, a.center)


def test_shapes_attributes_are_balanced(big):
    data, _ = big
    objects = data.shape >= 0
    for k, names in (("shape", S.SHAPES), ("color", S.COLORS), ("size", S.SIZES)):
        freq = np.bincount(getattr(data, k)[objects], minlength=len(names)) / objects.sum()
        np.testing.assert_allclose(freq, 1 / len(names), rtol=0.15)
    one = data.n_objects == 1
    freq = np.bincount(data.position[one, 0], minlength=9) / one.sum()
    np.testing.assert_allclose(freq, 1 / 9, rtol=0.2)
    freq = np.bincount(data.relation[~one], minlength=4) / (~one).sum()
    np.testing.assert_allclose(freq, 1 / 4, rtol=0.1)


def test_captions_parse_back_to_the_labels(big):
    data, _ = big
    seen = set()
    for i, text in enumerate(data.captions):
        p = parse_caption(text)
        k = p["n_objects"]
        assert k == data.n_objects[i], text
        assert p["shape"] == data.shape[i, :k].tolist(), text
        assert p["color"] == data.color[i, :k].tolist(), text
        assert p["size"] == data.size[i, :k].tolist(), text
        assert p["relation"] == data.relation[i], text
        if k == 1:
            assert p["position"] == data.position[i, 0], text
        if text.startswith("there is"):
            seen.add((k, "there is a ..."))
        elif text.startswith(("in ", "on ", "at ")):
            seen.add((k, "<where> there is a ..."))
        else:
            seen.add((k, "a ... is <rel> a ..." if " is " in text else "a ..."))
    # Every template was used, and no other form appeared.
    assert seen == {(1, "a ..."), (1, "there is a ..."), (1, "<where> there is a ..."),
                    (2, "a ..."), (2, "there is a ..."), (2, "a ... is <rel> a ...")}  # fmt: skip


def test_parse_caption_examples_and_errors():
    p = parse_caption("a small red circle to the left of a large blue square")
    assert p == dict(n_objects=2, position=None, relation=0, size=[0, 1], color=[0, 5], shape=[0, 1])
    p = parse_caption("In the top right there is a large white cross")
    assert p == dict(n_objects=1, position=2, relation=-1, size=[1], color=[7], shape=[4])
    for bad in ("a red circle", "a small red circle next to a large blue square", "a huge red circle on the left"):
        with pytest.raises(ValueError, match="not a shapes caption"):
            parse_caption(bad)


def test_positions_match_the_centers(big):
    data, _ = big
    present = data.shape >= 0
    x, y = data.center[present].T
    col, row = np.minimum((x * 3).astype(int), 2), np.minimum((y * 3).astype(int), 2)
    np.testing.assert_array_equal(data.position[present], 3 * row + col)
    # A single object sits clearly inside its region, not on a border.
    one = data.n_objects == 1
    frac = (data.center[one, 0, 0] * 3) % 1, (data.center[one, 0, 1] * 3) % 1
    assert all(((f >= S.MARGIN * 3 - 1e-9) & (f <= 1 - S.MARGIN * 3 + 1e-9)).all() for f in frac)


def test_relation_geometry_matches_the_centers(big):
    data, _ = big
    two = np.flatnonzero(data.n_objects == 2)
    a, b = data.center[two, 0], data.center[two, 1]
    ra, rb = data.radius[two, 0], data.radius[two, 1]
    d = b - a  # from A to B; y points down
    rel = data.relation[two]
    # "A left of B": B lies to the right, and so on.
    along = np.select([rel == 0, rel == 1, rel == 2, rel == 3], [d[:, 0], -d[:, 0], d[:, 1], -d[:, 1]])
    across = np.where(rel < 2, d[:, 1], d[:, 0])
    assert (along >= ra + rb + S.GAP - 1e-12).all()  # boxes apart along the axis
    assert (np.abs(across) <= (ra + rb) / 2 + 1e-12).all()  # and overlapping across it: one relation only
    assert (along > np.abs(across)).all()


def _alone(data, i, k, resolution):
    """Coverage of object k of image i drawn by itself."""
    img = render(data.center[i : i + 1, k : k + 1].repeat(2, 1), data.radius[i : i + 1, k : k + 1].repeat(2, 1),
                 data.shape[i : i + 1, k : k + 1].repeat(2, 1), data.color[i : i + 1, k : k + 1].repeat(2, 1),
                 np.array([1]), resolution)  # fmt: skip
    return (img[0] + 1) / 2 / S.RGB[data.color[i, k]][:, None, None]


def test_objects_never_touch_at_16(small):
    data = small
    for i in np.flatnonzero(data.n_objects == 2)[:300]:
        a, b = (_alone(data, i, k, 16)[0] > 0 for k in range(2))
        assert a.any() and b.any()
        grown = a.copy()  # A grown by one pixel in all 8 directions must still miss B
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= np.roll(np.roll(np.pad(a, 1), dy, 0), dx, 1)[1:-1, 1:-1]
        assert not (grown & b).any(), data.captions[i]


def test_image_is_background_plus_colored_coverage(small):
    data = small
    i = np.flatnonzero(data.n_objects == 1)[:200]
    x = (data.images[i] + 1) / 2  # background is black: pixel = coverage · color
    alpha = x / S.RGB[data.color[i, 0]][:, :, None, None]
    np.testing.assert_allclose(alpha, alpha[:, :1].repeat(3, 1), atol=1e-6)  # one coverage for all channels
    assert alpha.min() >= 0 and alpha.max() <= 1 + 1e-6
    assert ((alpha > 0.01) & (alpha < 0.99)).any(axis=(1, 2, 3)).all()  # every object has anti-aliased edges
    corners = data.images[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == -1).mean() > 0.9  # plain background


def test_small_and_large_areas_are_separated_at_16(small):
    data = small
    i = np.flatnonzero(data.n_objects == 1)
    area = ((data.images[i] + 1) / 2 / S.RGB[data.color[i, 0]][:, :, None, None])[:, 0].sum((1, 2))  # pixels
    large = data.size[i, 0] == 1
    assert area[~large].max() * 1.3 < area[large].min()  # any small object is smaller than any large one
    for sh in range(len(S.SHAPES)):
        mine = data.shape[i, 0] == sh
        assert area[mine & large].mean() > 2.5 * area[mine & ~large].mean()


@pytest.mark.parametrize("shape", S.SHAPES)
def test_drawn_area_matches_the_shape(shape):
    # Coverage summed over pixels approximates the shape's true area (a wrong inside-test or scale fails).
    true = {"circle": np.pi, "square": np.pi, "triangle": 2.0, "diamond": 2.0, "cross": 4 * 2 * S._ARM - 4 * S._ARM**2}
    n = 40
    rng = np.random.default_rng(0)
    r = np.full((n, 2), 0.3)
    center = np.stack([rng.uniform(0.3, 0.7, (n, 2)), np.full((n, 2), np.nan)], 1)
    img = render(center, r, np.full((n, 2), S.SHAPES.index(shape)), np.full((n, 2), 7), np.ones(n, int), 32)
    area = ((img + 1) / 2 / S.RGB[7][:, None, None])[:, 0].sum((1, 2)) / 32**2 / 0.3**2
    np.testing.assert_allclose(area, true[shape], rtol=0.03)


def test_anti_aliasing_separates_small_circle_and_square():
    center = np.array([[[0.5, 0.5], [np.nan, np.nan]]] * 2)
    r = np.array([[0.12, np.nan]] * 2)
    img = render(center, r, np.array([[0, -1], [1, -1]]), np.zeros((2, 2), int), np.ones(2, int), 16)
    assert np.abs(img[0] - img[1]).max() > 0.1


def test_render_resolutions_agree(small):
    # A 32×32 image with 4×4 sub-samples, average-pooled 2×2, is the 16×16 image with 8×8 sub-samples:
    # the same sub-sample points, summed in the same pixels.
    d = small
    args = (d.center[:200], d.radius[:200], d.shape[:200], d.color[:200], d.n_objects[:200])
    big = render(*args, 32, supersample=4)
    pooled = big.reshape(200, 3, 16, 2, 16, 2).mean((3, 5))
    np.testing.assert_allclose(pooled, render(*args, 16, supersample=8), atol=1e-6)


def test_holdout_never_in_train_always_in_heldout():
    holdout = [("green", "triangle"), ("large", "cross")]
    green, tri, large, cross = S.COLORS.index("green"), S.SHAPES.index("triangle"), 1, S.SHAPES.index("cross")
    hit = lambda d: ((d.color == green) & (d.shape == tri)) | ((d.size == large) & (d.shape == cross))
    for split in ("train", "test"):
        d = shapes(3000, 16, seed=3, split=split, holdout=holdout)
        assert not hit(d).any()
        assert not any("green triangle" in c or "large cross" in c for c in d.captions)
        assert ((d.color == green) & (d.shape >= 0)).any() and (d.shape == tri).any()  # the parts still appear
    h = shapes(3000, 16, seed=3, split="heldout", holdout=holdout)
    assert hit(h).any(axis=1).all()
    per_image = ((h.color == green) & (h.shape == tri)).any(1), ((h.size == large) & (h.shape == cross)).any(1)
    assert all(0.4 < m.mean() < 0.6 for m in per_image)  # both combinations, equally often
    assert (h.n_objects == 1).any() and (h.n_objects == 2).any()
    assert sum("green triangle" in c for c in h.captions) > 1000
    # The held-out object is either of the two in two-object images.
    two = h.n_objects == 2
    assert hit(h)[two, 0].any() and hit(h)[two, 1].any()


def test_holdout_of_three_values_and_without_holdout():
    d = shapes(3000, 16, seed=4, holdout=[("small", "red", "circle")])
    assert not ((d.size == 0) & (d.color == 0) & (d.shape == 0)).any()
    assert ((d.size == 1) & (d.color == 0) & (d.shape == 0)).any()  # large red circles are still drawn
    assert shapes(2000, 16, seed=4).captions[:5] != shapes(2000, 16, seed=4, split="test").captions[:5]


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="unknown attribute value 'pink'"):
        shapes(10, holdout=[("pink", "circle")])
    with pytest.raises(ValueError, match="two values of color"):
        shapes(10, holdout=[("red", "green")])
    with pytest.raises(TypeError, match="tuple of names"):
        shapes(10, holdout=["red"])
    with pytest.raises(ValueError, match="exclude every object"):
        shapes(10, holdout=[("small",), ("large",)])
    with pytest.raises(ValueError, match="needs at least one holdout"):
        shapes(10, split="heldout")
    with pytest.raises(ValueError, match="split"):
        shapes(10, split="val")
    with pytest.raises(ValueError, match="resolution"):
        shapes(10, resolution=2)
    with pytest.raises(ValueError, match="seed"):
        shapes(10, seed=-1)
    with pytest.raises(ValueError, match="supersample"):
        shapes(10, supersample=16)
    with pytest.raises(ValueError, match="p_two"):
        shapes(10, p_two=1.5)
    assert len(shapes(0)) == 0 and shapes(0).images.shape == (0, 3, 32, 32)


# --- batching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "bs", "shuffle"), [(10, 3, True), (10, 3, False), (12, 4, True), (5, 8, True)])
def test_batches_cover_every_index_once_per_epoch(n, bs, shuffle):
    x, y = np.arange(n) * 10, [f"s{i}" for i in range(n)]
    loader = Batches(x, y, batch_size=bs, shuffle=shuffle, seed=0)
    assert len(loader) == -(-n // bs)
    orders = []
    for _ in range(3):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(xb) == bs for xb, _ in batches[:-1]) and 1 <= len(batches[-1][0]) <= bs
        seen = np.concatenate([xb for xb, _ in batches]) // 10
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # each index exactly once
        assert all([f"s{i}" for i in xb // 10] == yb for xb, yb in batches)  # arrays stay aligned
        orders.append(seen)
    if shuffle and n > 5:
        assert not np.array_equal(orders[0], orders[1])  # a new permutation each epoch
    if not shuffle:
        np.testing.assert_array_equal(orders[0], np.arange(n))


def test_batches_drop_last():
    loader = Batches(np.arange(10), batch_size=3, drop_last=True, seed=1)
    assert len(loader) == 3
    batches = [b for (b,) in loader]
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)
    assert len(np.unique(np.concatenate(batches))) == 9
    assert len(Batches(np.arange(2), batch_size=3, drop_last=True, seed=0)) == 0


def test_batches_reproducible_and_resumable():
    x = np.arange(50)
    run = lambda loader, epochs: [b.tolist() for _ in range(epochs) for (b,) in loader]
    assert run(Batches(x, batch_size=8, seed=3), 3) == run(Batches(x, batch_size=8, seed=3), 3)
    assert run(Batches(x, batch_size=8, seed=3), 1) != run(Batches(x, batch_size=8, seed=4), 1)
    resumed = Batches(x, batch_size=8, seed=3)
    resumed.epoch = 2  # what a checkpoint restores
    assert run(resumed, 1) == run(Batches(x, batch_size=8, seed=3), 3)[-len(resumed) :]
    loader = Batches(x, batch_size=8, seed=3)
    iter(loader)  # an epoch begins at iter(), not at the first batch
    assert loader.epoch == 1
    core.manual_seed(5)
    a = run(Batches(x, batch_size=8), 2)
    core.manual_seed(5)
    assert run(Batches(x, batch_size=8), 2) == a


def test_batches_bad_arguments():
    with pytest.raises(ValueError, match="same length"):
        Batches(np.arange(3), np.arange(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(np.arange(3), batch_size=0)
    with pytest.raises(ValueError, match="at least one array"):
        Batches(batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        Batches(np.arange(3), batch_size=2, seed=-3)


def test_batches_keep_tuples_of_captions_aligned():
    x = np.arange(5)
    caps = tuple(f"c{i}" for i in range(5))
    for xb, cb in Batches(x, caps, batch_size=2, seed=0):
        assert list(cb) == [f"c{i}" for i in xb]
