"""Shapes: a captioned, procedurally generated dataset of colored shapes and the relation between them.

Each image shows one or two objects on a plain black background. An object has a shape, a color, a
size and a position; two objects also have a spatial relation, and every image has an English caption
made from a few templates:

    "a small red circle in the top left"
    "there is a large blue square to the left of a small yellow triangle"

The text-to-image models of later issues learn from the captions; the attribute labels (integer
arrays) let a classifier judge whether a generated image shows what its prompt asked for.

How a scene is made (all geometry in image units: the image is the square [0, 1]², y pointing down):
- Each object fills a box of half-side r centred on (x, y): r = 0.115 (small) or 0.205 (large), times
  a jitter of ±5%. At 16×16 that is a box of about 3.7 or 6.6 pixels. Shapes are scaled to their box,
  so the same shape is 3.2 times larger in area when large, and any small object (at most 12 pixels
  of area at 16×16) is smaller than any large one (at least 19), whatever the shapes.
- One object: its position (one of a 3×3 grid of regions) is drawn uniformly, then its centre
  uniformly inside that region (kept 0.03 away from the region's borders, so the caption's
  "top left" is never a coin toss) with the whole object inside the image.
- Two objects: the relation "A left of / right of / above / below B" is drawn first and the boxes are
  placed so that it holds unambiguously: along the relation's axis A's box ends at least GAP = 1/8
  before B's begins (two pixels at 16×16, so at least one row or column of pure background lies
  between the objects: they never touch); across it their centres differ by at most half the sum of
  the half-sides, so the boxes overlap in that direction and no second relation is also true.
- Drawing is anti-aliased: each object's inside test runs on a grid `supersample`² times finer than
  the image and each pixel's coverage is the mean over its sub-samples (at 16×16 a hard-edged small
  circle and small square are often the very same pixels). Objects never overlap, so the image is the
  background plus each color times its coverage.

Scene parameters are drawn in blocks of BLOCK images, each from its own NumPy generator seeded by
(seed, split, block): the same seed gives the same images bitwise, the first n images of a larger set
are the n images of a smaller one, and the same scene can be rendered at 16×16 or 32×32.

Hold-out (compositional generalization): `holdout=[("green", "triangle")]` names combinations of
attribute values. No object of the "train" or "test" split has every value of a held-out combination;
every image of the "heldout" split has at least one object that does (its other attributes, and the
other object, are drawn as usual).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "test", "heldout")

RGB = np.array(
    [(220, 40, 40), (245, 140, 30), (240, 220, 50), (40, 180, 60),
     (40, 200, 210), (40, 80, 230), (150, 60, 200), (245, 245, 245)], dtype=np.float32) / 255  # fmt: skip
BACKGROUND = np.zeros(3, dtype=np.float32)  # black, a color no object has
RADIUS = np.array([0.115, 0.205])  # half-side of the object's box per size, in image units
JITTER = 0.05  # radius is scaled by a uniform factor in [1 - JITTER, 1 + JITTER]
GAP = 1 / 8  # least distance between the two boxes along the relation's axis (2 pixels at 16×16)
MARGIN = 0.03  # a single object's centre keeps this far from the borders of its position region
BLOCK = 1024  # scene parameters are drawn in blocks of this many images (see the module docstring)

# Every template states every label it covers, so `parse_caption` can invert it.
# Caption pieces, one per entry of POSITIONS and of RELATIONS.
WHERE = ("in the top left", "at the top", "in the top right", "on the left", "in the center", "on the right",
         "in the bottom left", "at the bottom", "in the bottom right")  # fmt: skip
PHRASE = ("to the left of", "to the right of", "above", "below")
ONE = ("a {a} {where}", "there is a {a} {where}", "{where} there is a {a}")
TWO = ("a {a} {rel} a {b}", "there is a {a} {rel} a {b}", "a {a} is {rel} a {b}")


# --- what each shape is: an inside test in the unit box [-1, 1]² ------------------------------------

_SQUARE = np.sqrt(np.pi) / 2  # half-side of a square with the unit circle's area
_ARM = 0.34  # half-width of the cross's arms


def _inside(shape, u, v):
    """Boolean mask of the points (u, v) (broadcast together) that lie inside `shape` of box [-1, 1]²."""
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1
    if name == "square":
        return (np.abs(u) <= _SQUARE) & (np.abs(v) <= _SQUARE)
    if name == "triangle":  # apex at the top (v = -1), base along the bottom (v = 1)
        return (2 * np.abs(u) <= v + 1) & (v <= 1)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if name == "cross":  # a plus sign: a horizontal and a vertical bar
        a, b = np.abs(u), np.abs(v)
        return ((a <= 1) & (b <= _ARM)) | ((a <= _ARM) & (b <= 1))
    raise AssertionError(name)


@dataclass
class Shapes:
    """A generated set of N images with captions and labels.

    Per-object arrays have two columns (object 0 is the caption's subject "A" in "A left of B");
    where an image has one object, column 1 holds -1 (NaN for the float arrays).
    """

    images: np.ndarray  # (N, 3, R, R) float32 in [-1, 1]
    captions: list  # N English strings
    n_objects: np.ndarray  # (N,) int64: 1 or 2
    shape: np.ndarray  # (N, 2) int64 index into SHAPES
    color: np.ndarray  # (N, 2) int64 index into COLORS
    size: np.ndarray  # (N, 2) int64 index into SIZES
    position: np.ndarray  # (N, 2) int64 index into POSITIONS: the 3×3 region holding the object's centre
    relation: np.ndarray  # (N,) int64 index into RELATIONS (object 0 <relation> object 1); -1 with one object
    center: np.ndarray  # (N, 2, 2) float64 (x, y) of each object's centre, image units
    radius: np.ndarray  # (N, 2) float64 half-side of each object's box, image units

    def __len__(self):
        """Number of images."""
        return len(self.captions)


def shapes(n, resolution=32, *, seed=0, split="train", holdout=(), p_two=0.5, supersample=4):
    """Generate `n` captioned images of `resolution`² pixels (see the module docstring).

    split: "train" or "test" (two independent streams without the held-out combinations) or "heldout"
    (every image shows a held-out combination). holdout: combinations of attribute value names, e.g.
    [("green", "triangle"), ("large", "cross")]. p_two: probability that an image has two objects.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"shapes: n must be a non-negative int, got {n!r}")
    if not isinstance(resolution, (int, np.integer)) or resolution < 4:
        raise ValueError(f"shapes: resolution must be an int >= 4, got {resolution!r}")
    if split not in SPLITS:
        raise ValueError(f"shapes: split must be one of {SPLITS}, got {split!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"shapes: seed must be a non-negative int, got {seed!r}")
    if not 0 <= p_two <= 1:
        raise ValueError(f"shapes: p_two must be in [0, 1], got {p_two!r}")
    if not isinstance(supersample, (int, np.integer)) or not 1 <= supersample <= 15:  # s² sub-samples fit a uint8
        raise ValueError(f"shapes: supersample must be an int in [1, 15], got {supersample!r}")
    combos = _parse_holdout(holdout)
    if split == "heldout" and not combos:
        raise ValueError("shapes: split='heldout' needs at least one holdout combination")
    blocks = [_sample(np.random.default_rng([seed, SPLITS.index(split), b]), split, combos, p_two)
              for b in range(max(1, -(-n // BLOCK)))]  # fmt: skip
    s = {k: np.concatenate([blk[k] for blk in blocks])[:n] for k in _FIELDS}
    images = render(s["center"], s["radius"], s["shape"], s["color"], s["n_objects"], resolution, supersample)
    captions = [_caption(s, i) for i in range(n)]
    s.pop("template")
    return Shapes(images=images, captions=captions, **s)


# --- scene sampling -------------------------------------------------------------------------------

_FIELDS = ("n_objects", "shape", "color", "size", "position", "relation", "center", "radius", "template")
_ATTRS = {"shape": SHAPES, "color": COLORS, "size": SIZES}


def _parse_holdout(holdout):
    """[("green", "triangle")] -> [{"color": 3, "shape": 2}], checking every name."""
    combos = []
    for combo in holdout:
        if isinstance(combo, str):
            raise TypeError(f"shapes: each holdout entry must be a tuple of names, got the string {combo!r}")
        spec = {}
        for name in combo:
            attr = next((a for a, names in _ATTRS.items() if name in names), None)
            if attr is None:
                raise ValueError(f"shapes: unknown attribute value {name!r} in holdout {combo!r}; "
                                 f"known: {SHAPES + COLORS + SIZES}")  # fmt: skip
            if attr in spec:
                raise ValueError(f"shapes: holdout {combo!r} names two values of {attr}")
            spec[attr] = _ATTRS[attr].index(name)
        if not spec:
            raise ValueError("shapes: empty holdout combination")
        combos.append(spec)
    # Every object kind excluded would leave nothing to draw for train/test.
    grid = np.stack(np.meshgrid(*[np.arange(len(v)) for v in _ATTRS.values()], indexing="ij"), -1).reshape(-1, 3)
    if combos and _matches(combos, *grid.T).all():
        raise ValueError("shapes: the holdout combinations exclude every object")
    return combos


def _matches(combos, shape, color, size):
    """True where an object (arrays of label indices) has every value of some held-out combination."""
    labels = {"shape": shape, "color": color, "size": size}
    hit = np.zeros(np.shape(shape), bool)
    for spec in combos:
        hit |= np.logical_and.reduce([labels[a] == v for a, v in spec.items()])
    return hit


def _sample(rng, split, combos, p_two):
    """Scene parameters for one block of BLOCK images, drawn from `rng` in a fixed order."""
    m = BLOCK
    n_objects = 1 + (rng.random(m) < p_two)
    shape = rng.integers(0, len(SHAPES), (m, 2))
    color = rng.integers(0, len(COLORS), (m, 2))
    size = rng.integers(0, len(SIZES), (m, 2))
    if split == "heldout":  # put a held-out combination on one object of each image
        slot = np.where(n_objects == 2, rng.integers(0, 2, m), 0)
        pick = rng.integers(0, len(combos), m)
        labels = {"shape": shape, "color": color, "size": size}
        for c, spec in enumerate(combos):
            rows = np.flatnonzero(pick == c)
            for attr, value in spec.items():
                labels[attr][rows, slot[rows]] = value
    elif combos:  # rejection: redraw every object that shows a held-out combination until none does
        while (bad := _matches(combos, shape, color, size)).any():
            k = int(bad.sum())
            shape[bad], color[bad], size[bad] = (rng.integers(0, len(v), k) for v in _ATTRS.values())
    radius = RADIUS[size] * rng.uniform(1 - JITTER, 1 + JITTER, (m, 2))

    # One object: a region of the 3×3 grid, then a centre inside it (and inside the image).
    region = rng.integers(0, len(POSITIONS), m)
    row, col = np.divmod(region, 3)
    r = radius[:, 0]
    x1 = rng.uniform(np.maximum(r, col / 3 + MARGIN), np.minimum(1 - r, (col + 1) / 3 - MARGIN))
    y1 = rng.uniform(np.maximum(r, row / 3 + MARGIN), np.minimum(1 - r, (row + 1) / 3 - MARGIN))

    # Two objects: coordinate u runs along the relation's axis, v across it. "first" is the object
    # with the smaller u: A for "left of" and "above", B for "right of" and "below".
    relation = rng.integers(0, len(RELATIONS), m)
    a_first = (relation == 0) | (relation == 2)
    rf = np.where(a_first, radius[:, 0], radius[:, 1])
    rs = np.where(a_first, radius[:, 1], radius[:, 0])
    uf = rng.uniform(rf, 1 - rf - GAP - 2 * rs)  # leave room for the gap and the second box
    us = rng.uniform(uf + rf + GAP + rs, 1 - rs)  # boxes apart by >= GAP along u
    vf = rng.uniform(rf, 1 - rf)
    reach = (rf + rs) / 2  # |v difference| <= reach: the boxes overlap across the axis
    vs = rng.uniform(np.maximum(rs, vf - reach), np.minimum(1 - rs, vf + reach))
    ua, ub = np.where(a_first, uf, us), np.where(a_first, us, uf)
    va, vb = np.where(a_first, vf, vs), np.where(a_first, vs, vf)
    horizontal = relation < 2
    a = np.stack([np.where(horizontal, ua, va), np.where(horizontal, va, ua)], -1)
    b = np.stack([np.where(horizontal, ub, vb), np.where(horizontal, vb, ub)], -1)

    two = n_objects == 2
    center = np.stack([np.where(two[:, None], a, np.stack([x1, y1], -1)), np.where(two[:, None], b, np.nan)], 1)
    third = np.clip(np.floor(np.nan_to_num(center) * 3), 0, 2).astype(np.int64)  # (column, row) of the 3×3 grid
    position = 3 * third[..., 1] + third[..., 0]
    template = rng.integers(0, len(TWO), m)
    one = ~two
    for arr in (shape, color, size, position):
        arr[one, 1] = -1
    radius[one, 1] = np.nan
    relation[one] = -1
    return dict(n_objects=n_objects.astype(np.int64), shape=shape, color=color, size=size, position=position,
                relation=relation, center=center, radius=radius, template=template)  # fmt: skip


# --- drawing --------------------------------------------------------------------------------------


def render(center, radius, shape, color, n_objects, resolution, supersample=4, chunk=256):
    """Draw the scenes anti-aliased: (N, 3, resolution, resolution) float32 in [-1, 1].

    Coverage of a pixel = the fraction of its supersample² sub-pixel centres inside the object.
    Work proceeds in chunks of images so the supersampled masks stay small.
    """
    n, R, s = len(n_objects), resolution, supersample
    grid = (np.arange(R * s) + 0.5) / (R * s)  # sub-pixel centres along one axis, image units
    out = np.empty((n, 3, R, R), np.float32)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        img = np.broadcast_to(BACKGROUND[None, :, None, None], (hi - lo, 3, R, R)).copy()
        for k in range(2):
            for sh in range(len(SHAPES)):
                rows = np.flatnonzero((n_objects[lo:hi] > k) & (shape[lo:hi, k] == sh))
                if rows.size == 0:
                    continue
                c, r = center[lo + rows, k], radius[lo + rows, k, None, None]
                u = ((grid[None, None, :] - c[:, 0, None, None]) / r).astype(np.float32)  # (m, 1, R·s)
                v = ((grid[None, :, None] - c[:, 1, None, None]) / r).astype(np.float32)  # (m, R·s, 1)
                mask = _inside(sh, u, v).view(np.uint8)  # (m, R·s, R·s)
                # Sum the s sub-rows of each pixel row, then the s sub-columns of each pixel column.
                hits = mask.reshape(-1, R, s, R * s).sum(2, dtype=np.uint8).reshape(-1, R, R, s).sum(3, dtype=np.uint8)
                alpha = hits.astype(np.float32) / (s * s)
                rgb = RGB[color[lo + rows, k]]  # objects never overlap: add each color over the background
                img[rows] += alpha[:, None] * (rgb[:, :, None, None] - BACKGROUND[None, :, None, None])
        out[lo:hi] = img * 2 - 1
    return out


# --- captions -------------------------------------------------------------------------------------


def _phrase(s, i, k):
    return f"{SIZES[s['size'][i, k]]} {COLORS[s['color'][i, k]]} {SHAPES[s['shape'][i, k]]}"


def _caption(s, i):
    """The caption of image i from its labels and its drawn template."""
    t = s["template"][i]
    if s["n_objects"][i] == 1:
        return ONE[t].format(a=_phrase(s, i, 0), where=WHERE[s["position"][i, 0]])
    return TWO[t].format(a=_phrase(s, i, 0), rel=PHRASE[s["relation"][i]], b=_phrase(s, i, 1))


_OBJ = rf"({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_REL = "|".join(PHRASE)
_WHERE = "|".join(WHERE)
_TWO_RE = re.compile(rf"^(?:there is )?a {_OBJ} (?:is )?({_REL}) a {_OBJ}$")
_ONE_RE = re.compile(rf"^(?:there is )?a {_OBJ} ({_WHERE})$|^({_WHERE}) there is a {_OBJ}$")


def parse_caption(text):
    """Invert a caption to its labels: a dict with n_objects, shape, color, size (lists of indices),
    position (one index, for one object) and relation (an index, or -1). ValueError if not a caption.

    Used by the tests, and to turn a prompt into the attributes an image should show.
    """
    text = text.strip().lower()
    if m := _TWO_RE.match(text):
        g = m.groups()
        objs = [g[0:3], g[4:7]]
        out = dict(n_objects=2, position=None, relation=PHRASE.index(g[3]))
    elif m := _ONE_RE.match(text):
        g = m.groups()
        obj, where = (g[0:3], g[3]) if g[0] else (g[5:8], g[4])
        objs = [obj]
        out = dict(n_objects=1, position=WHERE.index(where), relation=-1)
    else:
        raise ValueError(f"parse_caption: not a shapes caption: {text!r}")
    out["size"] = [SIZES.index(o[0]) for o in objs]
    out["color"] = [COLORS.index(o[1]) for o in objs]
    out["shape"] = [SHAPES.index(o[2]) for o in objs]
    return out


# --- a picture of samples -------------------------------------------------------------------------


def save_grid(path, n=32, resolution=32, seed=0, cols=8):
    """Save a grid of `n` samples with their captions underneath (the picture in the README)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = shapes(n, resolution, seed=seed)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 2.0))
    for ax, i in zip(axes.flat, range(rows * cols)):
        ax.axis("off")
        if i < n:
            ax.imshow((data.images[i].transpose(1, 2, 0) + 1) / 2, interpolation="nearest")
            caption = textwrap.fill(data.captions[i], 22)
            ax.text(0.5, -0.04, caption, transform=ax.transAxes, ha="center", va="top", fontsize=6.5)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.06, wspace=0.08, hspace=0.45)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # python -m models.shapes docs/shapes.png
    save_grid(sys.argv[1] if len(sys.argv) > 1 else "docs/shapes.png")
