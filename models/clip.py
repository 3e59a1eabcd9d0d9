"""CLIP: an image encoder and a text encoder trained together so that an image and its caption land
close in one embedding space, and no other caption of the batch does (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision").

Training (§2.3 and Fig. 3's pseudocode): for a batch of N (image, text) pairs

    I_e = l2_normalize(I_f W_i),   T_e = l2_normalize(T_f W_t)          (joint multimodal embedding)
    logits = I_e T_eᵀ · exp(t)                                         (N, N): row n = image n
    loss = (CE(logits, arange(N)) + CE(logitsᵀ, arange(N))) / 2        (symmetric cross-entropy)

where I_f is the image encoder's feature, T_f the text encoder's, W_i, W_t linear projections
(no bias) and t a learnable log-inverse temperature, initialized to log(1/0.07) and clipped so
that the logits are never scaled by more than 100 (§2.5).

Encoders (§2.4). Image: the ViT of models/vit.py without its head (its eq. 4 output LN(z_L^0) is
I_f, as in CLIP's ViT). Text: a Transformer with *masked* (causal) self-attention over BPE tokens
(the project's tokenizer, models/corpus.py) with the sequence ending in the end-of-text token, whose
top-layer activation, layer-normalized (the Transformer's ln_f), is T_f. Because attention is causal,
the [PAD] tokens after the end-of-text token can never reach it: no padding mask is needed.

Use: `encode_image`, `encode_text` (L2-normalized embeddings), `score(images, texts)` (cosine
similarities, what DALL·E re-ranks its samples with and DALL·E 2's prior predicts), zero-shot
classification from prompt templates (§3.1.4's mean text embedding per class, and the class's share of
the image→text softmax over all prompts, `zero_shot_marginal`, which suits templates that also name the
other attributes) and retrieval recall@k. Data: captioned 16×16 shapes (models/shapes.py), trained with
some attribute combinations held out (`holdout`), so that evaluate can report them separately.

    t2i train clip --out /tmp/runs/clip/ckpt.safetensors && t2i eval clip --ckpt /tmp/runs/clip/ckpt.safetensors
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

import core
from core import F, init, nn
from models import train as loop
from models.registry import UsageError
from models.transformer import Transformer
from models.vit import ViT, param_groups

DATA = ("shapes",)


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on 16×16 shapes (see README)."""

    data: str = "shapes"
    resolution: int = 16
    patch: int = 4  # the image encoder's ViT: 16 patches of 4×4
    vision_dim: int = 64
    vision_depth: int = 4
    vision_heads: int = 4
    text_dim: int = 64
    text_depth: int = 2
    text_heads: int = 4
    context: int = 24  # text length in tokens, end-of-text token included
    embed_dim: int = 64  # the joint embedding space
    steps: int = 1300
    batch_size: int = 512  # the in-batch negatives that differ from a pair only in shape make the shape signal
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 80
    init_temperature: float = 0.07  # §2.5: τ initialized to 0.07 (Wu et al. 2018)
    max_logit_scale: float = 100.0  # §2.5: logits never scaled by more than 100
    holdout: tuple = (("green", "triangle"), ("blue", "circle"), ("red", "square"), ("yellow", "cross"),
                      ("purple", "diamond"))  # attribute combinations never shown in training
    n_train: int = 32768  # training images (captioned shapes, train split)
    eval_images: int = 1000  # test images per figure in evaluate
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self):
        self.holdout = tuple(tuple(c) for c in self.holdout)  # JSON gives lists back
        if self.resolution % self.patch:
            raise ValueError(f"clip.Config: resolution ({self.resolution}) must be a multiple of patch ({self.patch})")
        for w, h in ((self.vision_dim, self.vision_heads), (self.text_dim, self.text_heads)):
            if w % h:
                raise ValueError(f"clip.Config: width {w} is not a multiple of its heads {h}")
        if not (self.init_temperature > 0 and 1 / self.init_temperature <= self.max_logit_scale):
            raise ValueError(f"clip.Config: need 1/init_temperature <= max_logit_scale, got {self.init_temperature}"
                             f" and {self.max_logit_scale}")


# --- text -----------------------------------------------------------------------------------------


@functools.cache
def tokenizer():
    """The project's byte-level BPE tokenizer (models/corpus.py), shared by every text model."""
    from models import corpus

    return corpus.tokenizer()


def tokenize(texts, context, tok=None):
    """(N, context) int64 token ids: each text's BPE tokens, then the end-of-text token, then [PAD]s.
    A text longer than context − 1 tokens is an error (nothing is silently cut)."""
    tok = tok or tokenizer()
    if isinstance(texts, str):
        raise TypeError("tokenize: texts must be a list of strings, got one string")
    eot, pad = tok.special["<|endoftext|>"], tok.special["[PAD]"]
    out = np.full((len(texts), context), pad, np.int64)
    for i, text in enumerate(texts):
        ids = tok.encode(text) + [eot]
        if len(ids) > context:
            raise ValueError(f"tokenize: text {i} {text!r} is {len(ids)} tokens with end-of-text, more than the "
                             f"context of {context}")
        out[i, : len(ids)] = ids
    return out


# --- the model ------------------------------------------------------------------------------------


class CLIP(nn.Module):
    """The two encoders, their projections W_i, W_t into the joint space, and the temperature t."""

    def __init__(self, cfg, vocab_size, tok=None):
        super().__init__()
        self.cfg, self.tok = cfg, tok
        self.visual = ViT(cfg.resolution, cfg.patch, 3, cfg.vision_dim, cfg.vision_depth, cfg.vision_heads)
        self.token_embedding = nn.Embedding(vocab_size, cfg.text_dim)
        self.positional_embedding = nn.Parameter(core.zeros(cfg.context, cfg.text_dim))
        self.transformer = Transformer(cfg.text_depth, cfg.text_dim, cfg.text_heads)
        self.visual_projection = nn.Linear(cfg.vision_dim, cfg.embed_dim, bias=False)  # W_i
        self.text_projection = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)  # W_t
        self.logit_scale = nn.Parameter(core.tensor(np.float32(math.log(1 / cfg.init_temperature))))  # t
        init.normal_(self.token_embedding.weight, std=0.02)  # the initializations of CLIP's released code
        init.normal_(self.positional_embedding, std=0.01)
        init.normal_(self.visual_projection.weight, std=cfg.vision_dim**-0.5)
        init.normal_(self.text_projection.weight, std=cfg.text_dim**-0.5)

    def encode_image(self, images):
        """I_e: (N, 3, R, R) images in [-1, 1] (array or Tensor) → (N, embed_dim) unit vectors."""
        x = images if isinstance(images, core.Tensor) else core.tensor(np.asarray(images, np.float32))
        return F.normalize(self.visual_projection(self.visual.features(x)), dim=-1)

    def encode_text(self, texts):
        """T_e: a list of N strings, or (N, context) token ids from `tokenize` → (N, embed_dim) unit vectors."""
        tokens = tokenize(texts, self.cfg.context, self.tok) if isinstance(texts, (list, tuple)) else np.asarray(texts)
        if tokens.ndim != 2 or tokens.shape[1] > self.cfg.context:
            raise ValueError(f"encode_text: tokens must be (N, L <= {self.cfg.context}), got shape {tokens.shape}")
        eot = (self.tok or tokenizer()).special["<|endoftext|>"]
        has = tokens == eot
        if not has.any(1).all():
            raise ValueError(f"encode_text: rows {np.flatnonzero(~has.any(1)).tolist()} have no end-of-text token")
        end = has.argmax(1)
        tokens = tokens[:, : end.max() + 1]  # causal: what follows the last end-of-text token changes nothing
        x = self.token_embedding(core.tensor(tokens)) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer(x, is_causal=True)  # masked self-attention (§2.4), then ln_f
        feats = x[np.arange(len(tokens)), end]  # T_f: the activation at the (first) end-of-text token
        return F.normalize(self.text_projection(feats), dim=-1)

    def temperature_scale(self):
        """exp(t), with t clipped at log(max_logit_scale) (§2.5); no gradient flows to t while clipped, so
        `train` also clips t's value after each step, which keeps it at the clip, not past it."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, images, texts):
        """logits (N_img, N_txt) = exp(t) · I_e T_eᵀ (Fig. 3)."""
        return self.temperature_scale() * (self.encode_image(images) @ self.encode_text(texts).transpose(0, 1))

    def score(self, images, texts):
        """(N_img, N_txt) cosine similarities I_e · T_e of images (N, 3, R, R) and a list of strings, as a
        float32 array (no temperature): the re-ranking score of DALL·E and the embedding space of DALL·E 2."""
        self.eval()
        with core.no_grad():
            img = _batched(self.encode_image, np.asarray(images, np.float32))
            txt = _batched(self.encode_text, list(texts))
        return (img @ txt.T).astype(np.float32)


def _batched(encode, items, size=512):
    """encode(items) in chunks, as one (N, E) array."""
    return np.concatenate([encode(items[i : i + size]).numpy() for i in range(0, len(items), size)])


def build(cfg, tok=None):
    """The (untrained) CLIP of a config, sized to the tokenizer's vocabulary."""
    tok = tok or tokenizer()
    return CLIP(cfg, tok.vocab_size, tok)


# --- loss -----------------------------------------------------------------------------------------


def clip_loss(logits):
    """Symmetric cross-entropy of Fig. 3: the mean of CE over rows (each image picks its text) and over
    columns (each text picks its image); pair n is the positive of row n and of column n."""
    n = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] != n:
        raise ValueError(f"clip_loss: logits must be square (N, N), got shape {tuple(logits.shape)}")
    labels = core.tensor(np.arange(n))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(0, 1), labels)) / 2


# --- data -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def captioned(n, resolution, split, holdout, p_two=0.5):
    """n captioned shapes of a split (seed 0), without (train, test) or only with (heldout) the
    held-out attribute combinations. p_two: the probability of a second object (0: one object each)."""
    from models.data import shapes

    return shapes(n, resolution, seed=0, split=split, holdout=holdout, p_two=p_two)


# --- zero-shot classification and retrieval --------------------------------------------------------


def prompts(attribute, value):
    """The prompt ensemble of one class (§3.1.4) on shapes: every one-object caption template with the
    class's value filled in and each value of the other attributes (size, color or shape, position),
    e.g. for color "red": "a small red circle in the top left", "there is a large red cross at the top", ..."""
    from models.shapes import COLORS, ONE, SHAPES, SIZES, WHERE

    colors, shapes = ([value], SHAPES) if attribute == "color" else (COLORS, [value])
    if attribute not in ("color", "shape"):
        raise ValueError(f"prompts: attribute must be 'color' or 'shape', got {attribute!r}")
    return [t.format(a=f"{s} {c} {h}", where=w) for t in ONE for s in SIZES for c in colors for h in shapes
            for w in WHERE]


def zero_shot_weights(model, class_prompts):
    """(K, E) zero-shot classifier: per class, the mean of its prompts' text embeddings, renormalized
    (§3.1.4: ensembling in embedding space)."""
    model.eval()
    with core.no_grad():
        w = np.stack([_batched(model.encode_text, list(p)).mean(0) for p in class_prompts])
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def zero_shot(model, images, weights):
    """Predicted class (N,) of each image: the class whose averaged text embedding is the most similar."""
    model.eval()
    with core.no_grad():
        return (_batched(model.encode_image, np.asarray(images, np.float32)) @ weights.T).argmax(1)


def zero_shot_marginal(model, images, class_prompts):
    """Predicted class (N,) of each image by marginalizing CLIP's image→text distribution over the prompts:
    p(class | image) = Σ_{prompts of the class} softmax_{all prompts}(exp(t) · I_e T_e).

    Radford et al.'s templates ("a photo of a {}") describe the same image whatever the template; ours
    fill in the *other* attributes too (size, color or shape, position), so most prompts of a class
    contradict the image, and their mean embedding (`zero_shot_weights`) is dominated by them. Summing
    the probabilities of the prompts instead lets the prompt that matches the whole image decide."""
    sizes = [len(p) for p in class_prompts]
    logits = model.score(images, [p for ps in class_prompts for p in ps]).astype(np.float64)
    logits *= model.temperature_scale().item()
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits)
    return np.stack([c.sum(1) for c in np.split(probs, np.cumsum(sizes)[:-1], axis=1)], 1).argmax(1)


def recall_at_k(sim, ks=(1, 5)):
    """{k: recall@k} of a square similarity matrix whose diagonal holds the true pairs: row i's query is
    found in the top k if fewer than k candidates score strictly higher than its own (identical captions
    tie, and a tie counts as found)."""
    rank = (sim > np.diag(sim)[:, None]).sum(1)
    return {k: float((rank < k).mean()) for k in ks}


def retrieval(model, images, captions, pool=100, ks=(1, 5)):
    """Image→text and text→image recall@k among `pool` candidates: the images are cut into consecutive
    pools, each image ranked against the pool's captions (and each caption against its images)."""
    n = len(images) // pool * pool
    if n == 0:
        raise ValueError(f"retrieval: need at least pool={pool} images, got {len(images)}")
    i2t, t2i = [], []
    for lo in range(0, n, pool):
        sim = model.score(images[lo : lo + pool], captions[lo : lo + pool])
        i2t.append(recall_at_k(sim, ks))
        t2i.append(recall_at_k(sim.T, ks))
    mean = lambda rs: {k: float(np.mean([r[k] for r in rs])) for k in ks}  # noqa: E731
    return mean(i2t), mean(t2i)


# --- training -------------------------------------------------------------------------------------


def train(cfg, out, *, resume=True, progress=True):
    """Minimize the symmetric cross-entropy over in-batch pairs with AdamW, warmup and cosine decay
    (§2.5), both encoders and the temperature from scratch."""
    s = captioned(cfg.n_train, cfg.resolution, "train", cfg.holdout)
    tok = tokenizer()
    tokens = tokenize(s.captions, cfg.context, tok)
    core.manual_seed(cfg.seed)
    model = build(cfg, tok)
    opt = core.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)  # App. F
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps)

    def step(xb, tb):
        logits = model(core.tensor(xb), tb)
        loss = clip_loss(logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = model.logit_scale.data  # t itself is clipped (as OpenCLIP does), so it never dies above the clip
        t[...] = t.clip(max=math.log(cfg.max_logit_scale))
        sched.step()
        return {"loss": loss.item(), "scale": model.temperature_scale().item()}

    return loop.fit(cfg, out, model=model, optimizer=opt, scheduler=sched, step=step, data=(s.images, tokens),
                    resume=resume, progress=progress, name="clip")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    from models.registry import from_dict

    ckpt = loop.read_checkpoint(path)
    cfg = from_dict(Config, ckpt["config"], path)
    tok = tokenizer()
    rows = ckpt["weights"]["token_embedding.weight"].shape[0]
    if rows != tok.vocab_size:
        raise UsageError(f"clip.load: {path} was trained with a vocabulary of {rows} tokens, the tokenizer now has "
                         f"{tok.vocab_size}; retrain")
    return loop.load_weights(build(cfg, tok), ckpt), cfg


# --- evaluation -----------------------------------------------------------------------------------


def sample(model, cfg, n, *, seed=0, **options):
    """CLIP scores images against texts; it has nothing to sample."""
    raise UsageError("clip has nothing to sample (it scores images against texts); use `t2i eval clip`")


def evaluate(model, cfg, *, seed=0):
    """Zero-shot color and shape accuracy on one-object test images (`zero_shot_marginal`, beside chance
    and beside Radford et al.'s mean prompt embedding, `zero_shot`), and image→text recall@1/@5 among 100
    candidates on test images (one or two objects, as in training), each beside chance; then the same on
    the held-out attribute combinations (images each showing one), reported separately."""
    from models.shapes import COLORS, SHAPES

    weights = {a: zero_shot_weights(model, [prompts(a, v) for v in names])
               for a, names in (("color", COLORS), ("shape", SHAPES))}
    figures, n = [], cfg.eval_images
    splits = [("test", "")] + ([("heldout", " [held-out combinations]")] if cfg.holdout else [])
    for split, tag in splits:
        one = captioned(n, cfg.resolution, split, cfg.holdout, p_two=0.0)
        for a, names in (("color", COLORS), ("shape", SHAPES)):
            truth = getattr(one, a)[:, 0]
            marginal = (zero_shot_marginal(model, one.images, [prompts(a, v) for v in names]) == truth).mean()
            ensemble = (zero_shot(model, one.images, weights[a]) == truth).mean()
            figures.append(loop.figure(f"zero-shot {a} accuracy{tag}", 100 * marginal, better="higher", unit="%",
                                       chance=100 / len(names), mean_prompt_embedding=100 * ensemble))
        mixed = captioned(n, cfg.resolution, split, cfg.holdout)
        i2t, t2i = retrieval(model, mixed.images, mixed.captions)
        for k in (1, 5):
            figures.append(loop.figure(f"image→text recall@{k} of 100{tag}", 100 * i2t[k], better="higher", unit="%",
                                       chance=k))
        figures.append(loop.figure(f"text→image recall@1 of 100{tag}", 100 * t2i[1], better="higher", unit="%",
                                   chance=1))
    return {"figures": figures, "holdout": [list(c) for c in cfg.holdout], "eval_images": n,
            "logit_scale": model.temperature_scale().item()}


def retrieval_grid(model, cfg, path, texts=None, k=8, n=1000):
    """Save a picture: for each text (default: a few one-object captions, one with a held-out combination),
    the k test images CLIP scores highest among n, left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = texts or ["a large red circle in the center", "a small blue square on the left",
                      "there is a large yellow triangle at the top", "a small white cross in the bottom right",
                      f"a large {' '.join(cfg.holdout[0])} in the center" if cfg.holdout else "a small cyan diamond"]
    pool = np.concatenate([captioned(n, cfg.resolution, split, cfg.holdout).images
                           for split in (("test", "heldout") if cfg.holdout else ("test",))])
    top = np.argsort(-model.score(pool, texts).T, axis=1)[:, :k]
    fig, axes = plt.subplots(len(texts), k, figsize=(k * 0.9, len(texts) * 1.05), squeeze=False)
    for r, text in enumerate(texts):
        axes[r, 0].set_title(text, loc="left", fontsize=7, pad=3)
        for c in range(k):
            axes[r, c].imshow((pool[top[r, c]].transpose(1, 2, 0) + 1) / 2, interpolation="nearest")
            axes[r, c].axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.35)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

