"""ViT: an image is a sequence of patches, and a plain Transformer encoder classifies it (Dosovitskiy et
al. 2021, "An Image is Worth 16x16 Words").

The image x ∈ R^{H×W×C} is cut into N = HW/P² patches x_p ∈ R^{N×(P²·C)}, each flattened and mapped by
one linear projection E ∈ R^{(P²·C)×D}; a learnable class token x_class is prepended and learned 1-D
position embeddings E_pos ∈ R^{(N+1)×D} added (§3.1):

    z_0 = [x_class; x_p^1 E; x_p^2 E; ...; x_p^N E] + E_pos          (eq. 1)
    z'_ℓ = MSA(LN(z_{ℓ−1})) + z_{ℓ−1},   ℓ = 1..L                      (eq. 2)
    z_ℓ = MLP(LN(z'_ℓ)) + z'_ℓ                                         (eq. 3)
    y = LN(z_L^0)                                                      (eq. 4)

and a linear head classifies y. Patchify-then-project is exactly a convolution with kernel P and
stride P whose (D, C, P, P) weight, flattened, is Eᵀ (the paper's released code computes it so), which is
how `PatchEmbed` computes it (tests/test_vit.py checks the equality against `patchify` + a linear map).

Attention itself is permutation-equivariant: the position embeddings are the only place where the
encoder learns where a patch was (the tests check that without them the class token's output is the
same for any shuffling of the patches). The encoder (eqs. 2-4) is the project's pre-LN
`models.transformer.Transformer`, whose final LayerNorm is eq. 4's LN; CLIP (models/clip.py) reuses
`ViT` with no head as its image encoder.

ViT has little of a CNN's inductive bias and needs much data (§4.2); on the 1,437 training digits it
gets weight decay, dropout and random shifts of up to one pixel (DeiT's recipe in miniature,
Touvron et al. 2021). Data: 8×8 digits (patch 2: 16 patches), or 16×16 shapes (patch 4) classified
by the shape of the canonical first object (the left or upper one, `models.classifier.shapes_labels`).

    t2i train vit --out /tmp/runs/vit/ckpt.safetensors && t2i eval vit --ckpt /tmp/runs/vit/ckpt.safetensors
"""

from __future__ import annotations

import dataclasses

import numpy as np

import core
from core import F, init, nn
from models import train as loop
from models.registry import UsageError
from models.transformer import Transformer

DATA = ("digits", "shapes")


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on 8×8 digits (see README)."""

    data: str = "digits"
    resolution: int = 8
    patch: int = 2  # P: 8×8 digits → 16 patches of 2×2
    dim: int = 64  # D
    depth: int = 4  # L
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 200
    shift: int = 1  # augmentation: random translation by up to this many pixels (0: none)
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.resolution % self.patch:
            raise ValueError(f"vit.Config: resolution ({self.resolution}) must be a multiple of patch ({self.patch})")
        if self.dim % self.heads:
            raise ValueError(f"vit.Config: dim ({self.dim}) must be a multiple of heads ({self.heads})")


PRESETS = {"shapes": {"resolution": 16, "patch": 4, "steps": 2000, "shift": 0}}


# --- the model ------------------------------------------------------------------------------------


def patchify(x, patch):
    """(B, C, H, W) → (B, N, P²·C): the flattened patches x_p of §3.1 in raster order, each patch
    flattened in (C, P, P) order (the order of a convolution weight's (C, P, P) axes)."""
    B, C, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image {H}×{W} is not a whole number of {patch}×{patch} patches")
    h, w = H // patch, W // patch
    return x.reshape(B, C, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * patch * patch)


class PatchEmbed(nn.Module):
    """x_p E of eq. 1 as one stride-P convolution: (B, C, H, W) → (B, N, D), patches in raster order."""

    def __init__(self, channels, patch, dim):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)  # weight.reshape(D, C·P·P) = Eᵀ

    def forward(self, x):
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:  # a stride-P convolution would drop the rest
            raise ValueError(f"PatchEmbed: image {x.shape[-2]}×{x.shape[-1]} is not a whole number of "
                             f"{self.patch}×{self.patch} patches")
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Eqs. 1-4 and a linear head (none when num_classes = 0: then forward returns the features y)."""

    def __init__(self, resolution, patch, channels, dim, depth, heads, mlp_ratio=4, dropout=0.0, num_classes=0):
        super().__init__()
        if resolution % patch:
            raise ValueError(f"ViT: resolution {resolution} must be a multiple of patch {patch}")
        self.resolution, self.channels = resolution, channels
        self.patch_embed = PatchEmbed(channels, patch, dim)
        n = (resolution // patch) ** 2
        self.cls_token = nn.Parameter(core.zeros(1, 1, dim))  # x_class
        self.pos_embed = nn.Parameter(core.zeros(1, n + 1, dim))  # E_pos, learned 1-D (§3.1, App. D.4)
        init.trunc_normal_(self.cls_token, std=0.02)
        init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(depth, dim, heads, mlp_ratio, dropout)  # eqs. 2-3, its ln_f is eq. 4's LN
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        if self.head is not None:
            init.zeros_(self.head.weight)  # zero-initialized, as §3.2 attaches a new head for fine-tuning
            init.zeros_(self.head.bias)

    def embed(self, x):
        """z_0 of eq. 1: (B, C, H, W) → (B, N+1, D)."""
        shape = (self.channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"ViT: expected images (B, {', '.join(map(str, shape))}), got shape {tuple(x.shape)}")
        patches = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], 1, self.cls_token.shape[-1])
        return self.drop(core.cat([cls, patches], dim=1) + self.pos_embed)  # eq. 1

    def features(self, x):
        """y = LN(z_L^0) (eq. 4): the class token's output, (B, D)."""
        return self.transformer(self.embed(x))[:, 0]

    def forward(self, x):
        """Class logits (B, K), or the features y when the model has no head."""
        y = self.features(x)
        return y if self.head is None else self.head(y)


def channels_of(data):
    """Image channels of a dataset."""
    return 1 if data == "digits" else 3


def build(cfg):
    """The (untrained) classifier of a config."""
    return ViT(cfg.resolution, cfg.patch, channels_of(cfg.data), cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio,
               cfg.dropout, num_classes=loop.NUM_CLASSES[cfg.data])


# --- data -----------------------------------------------------------------------------------------


def labelled(data, resolution, split):
    """(images, labels) to classify: digits and their digit; shapes and the shape of the canonical first
    object (the left or upper one, which the image shows, unlike the caption's word order)."""
    if data == "digits":
        return loop.dataset(data, resolution, split)
    from models.classifier import shapes_labels
    from models.data import shapes

    s = shapes(loop.SHAPES_N[split], resolution, seed=0, split=split)
    return s.images, shapes_labels(s)["shape0"]


def shift(x, offsets, fill=-1.0):
    """Translate each image x[i] (B, C, H, W) by offsets[i] = (dy, dx) pixels, filling with `fill`
    (the background, black = −1)."""
    s = int(np.abs(offsets).max(initial=0))
    if s == 0:
        return x
    B, _, H, W = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=fill)
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, :, s - dy : s - dy + H, s - dx : s - dx + W]
    return out


# --- training -------------------------------------------------------------------------------------


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on the weight matrices and convolution kernels only, not on biases,
    LayerNorm gains, embeddings or tokens (the usual split, as in nanoGPT and timm)."""
    skip = ("pos_embed", "cls_token", "token_embedding", "positional_embedding")

    def decays(name, p):
        return p.ndim >= 2 and not any(k in name for k in skip)

    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def train(cfg, out, *, resume=True, progress=True):
    """Cross-entropy on the class logits, AdamW with linear warmup and cosine decay (§4.1, App. B.1)."""
    x, y = labelled(cfg.data, cfg.resolution, "train")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    opt = core.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps)

    def step(xb, yb):
        if cfg.shift:  # offsets from the default generator, whose state the checkpoint keeps (bitwise resume)
            xb = shift(xb, core.randint(-cfg.shift, cfg.shift + 1, (len(xb), 2)).numpy())
        loss = F.cross_entropy(model(core.tensor(xb)), core.tensor(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    return loop.fit(cfg, out, model=model, optimizer=opt, scheduler=sched, step=step, data=(x, y), resume=resume,
                    progress=progress, name="vit")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- use and evaluation ---------------------------------------------------------------------------


def sample(model, cfg, n, *, seed=0, **options):
    """ViT is a classifier: there is nothing to sample."""
    raise UsageError("vit is a classifier: it has nothing to sample; use `t2i eval vit` for its test accuracy")


def predict(model, images, batch_size=500):
    """Class predictions (N,) of images (N, C, H, W)."""
    model.eval()
    with core.no_grad():
        return np.concatenate([model(core.tensor(images[i : i + batch_size])).numpy().argmax(1)
                               for i in range(0, len(images), batch_size)])


def evaluate(model, cfg, *, seed=0):
    """Test accuracy beside baselines fitted in the same call on the same training set: multinomial
    logistic regression on the raw pixels (scikit-learn) and the majority class."""
    from sklearn.linear_model import LogisticRegression

    x, y = labelled(cfg.data, cfg.resolution, "train")
    xt, yt = labelled(cfg.data, cfg.resolution, "test")
    acc = float((predict(model, xt) == yt).mean())
    logreg = LogisticRegression(max_iter=2000).fit(x.reshape(len(x), -1), y)
    base = float((logreg.predict(xt.reshape(len(xt), -1)) == yt).mean())
    majority = float((yt == np.bincount(y).argmax()).mean())
    name = "test accuracy" if cfg.data == "digits" else "test accuracy (shape of object 0)"
    return {"figures": [loop.figure(name, 100 * acc, better="higher", unit="%", logistic_regression=100 * base,
                                    majority_class=100 * majority)],
            "test_images": len(xt), "train_accuracy": float((predict(model, x) == y).mean())}


def position_similarity(model, path):
    """Save the picture of Dosovitskiy et al. 2021, Fig. 7 (centre): for each patch position, the cosine
    similarity of its position embedding to every other position's, drawn as a small image on the patch grid
    (learned 1-D embeddings come to encode the 2-D layout: rows and columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = model.pos_embed.numpy()[0, 1:]  # the patches' embeddings (the class token's left out)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    g = int(round(np.sqrt(len(e))))
    sim = (e @ e.T).reshape(g, g, g, g)
    fig, axes = plt.subplots(g, g, figsize=(g * 0.8, g * 0.8))
    for i in range(g):
        for j in range(g):
            axes[i, j].imshow(sim[i, j], vmin=-1, vmax=1, cmap="viridis")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.suptitle("position embedding similarity", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.92, bottom=0.02, wspace=0.08, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

