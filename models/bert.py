"""BERT: a bidirectional transformer encoder pre-trained by masked language modelling and next-sentence
prediction (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding"), on the project's shared pre-LN transformer.

Input (§3, Figure 2): one sequence  [CLS] A [SEP] B [SEP]  of two segments A and B, and its embedding

    E = E_token + E_position + E_segment          segment 0 for [CLS] A [SEP], 1 for B [SEP]

padded with [PAD] to the batch's longest sequence; the padding mask keeps every position from attending to
a [PAD] key, so padding never changes what a real position computes.

Two tasks, trained together (§3.1; the loss is their sum, Appendix A.2):
- Masked LM (Task #1): 15% of the tokens of each sequence are chosen (here exactly max(1, round(p n)) of
  its n non-special tokens, as in BERT's create_pretraining_data.py; p = cfg.mask_prob, see below); a
  chosen token is replaced by [MASK] 80% of the time, by a random token 10%, and left unchanged 10%, and
  the model predicts the original token at the chosen positions only (cross-entropy over the vocabulary).
  The output layer is the token embedding matrix (weight-tied) plus a bias per token, after a dense +
  GELU + LayerNorm transform (BERT's run_pretraining.py, get_masked_lm_output).
- Next sentence prediction (Task #2): 50% of the time B is the text that follows A in the same document
  (IsNext), 50% a span of another document (NotNext); a 2-way classifier reads C, the final hidden vector
  of [CLS] after the pooler (dense + tanh, BERT's modeling.py).

Segments are spans of consecutive sentences (§3.1: a "sentence" can be any span of contiguous text): A is
the first part of a chunk of a document and B the rest, the chunk filling the context 90% of the time and a
random shorter length 10% (BERT's short_seq_prob; the pair is trimmed to that length, where BERT's
create_pretraining_data.py trims it to the context only, so a long sentence still gives a short pair). A
document of one sentence (e.g. a caption) is cut inside the sentence. A NotNext B has the length the true
B would have had, so the length of B tells nothing.

Differences from the paper, for a 15-minute CPU run: pre-LN blocks with a final LayerNorm (the shared
models.transformer, Xiong et al. 2020) instead of post-LN, so the embeddings are summed without their own
LayerNorm; a byte-level BPE (models.bpe) instead of WordPiece; a random replacement token is drawn from the
ordinary tokens only (not the special ones); masks are drawn anew at every step (dynamic masking, Liu et al.
2019) from a generator seeded by (seed, step), so a resumed run equals an uninterrupted one; training masks
40% of the tokens, not 15% (Wettig et al. 2023, "Should You Mask 15% in Masked Language Modeling?": 2.7x the
predictions per sequence for about the same compute, which a short run needs), while `evaluate` masks BERT's
15% of the held-out tokens.

    t2i train bert --out /tmp/runs/bert/ckpt.safetensors
    t2i sample bert --ckpt /tmp/runs/bert/ckpt.safetensors --prompt "a small [MASK] circle" --n 4
    t2i eval bert --ckpt /tmp/runs/bert/ckpt.safetensors
"""

from __future__ import annotations

import dataclasses

import numpy as np

import core
from core import F, init, nn
from models import train as loop
from models.registry import UsageError
from models.transformer import Transformer

DATA = ("text",)
IGNORE = -100  # label of a position that is not predicted (F.cross_entropy's ignore_index)
EVAL_MASK_PROB = 0.15  # evaluate masks BERT's 15% of held-out tokens, whatever rate training used


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on the text corpus (see README)."""

    data: str = "text"
    steps: int = 1500  # 14.1 CPU-min on this 2-core machine (bar run)
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    context: int = 64  # max_seq_length: [CLS] A [SEP] B [SEP] and padding
    depth: int = 4
    dim: int = 128
    heads: int = 4
    dropout: float = 0.0
    vocab_size: int | None = None  # None: the corpus tokenizer's
    mask_prob: float = 0.4  # §3.1 chooses 15%; 40% learns faster per step (Wettig et al. 2023)
    short_prob: float = 0.1  # a chunk gets a random shorter length this often (BERT's short_seq_prob)
    examples: int = 65536  # sequence pairs pre-built from the training documents (masks drawn per step)
    weight_decay: float = 0.01  # Appendix A.2
    warmup: int = 100  # linear warmup steps, then a cosine decay to lr / 10
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    eval_examples: int = 2048  # held-out pairs scored by evaluate
    temperature: float = 1.0  # sample's default: draw each [MASK] from softmax(logits / T); 0 = argmax

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"bert.Config: dim {self.dim} must be a multiple of heads {self.heads}")
        for name in ("context", "depth", "dim", "heads", "steps", "batch_size", "examples", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"bert.Config: {name} must be positive, got {getattr(self, name)}")
        if self.context < 5:
            raise ValueError(f"bert.Config: context must be >= 5 ([CLS] A [SEP] B [SEP]), got {self.context}")
        if not 0 < self.mask_prob < 1 or not 0 <= self.short_prob <= 1:
            raise ValueError(f"bert.Config: mask_prob must be in (0, 1) and short_prob in [0, 1], got "
                             f"{self.mask_prob}, {self.short_prob}")


class Specials:
    """The special ids BERT uses, read from the tokenizer; ordinary tokens are the ids below all of them."""

    def __init__(self, tok):
        s = tok.special
        self.cls, self.sep, self.pad, self.mask = s["[CLS]"], s["[SEP]"], s["[PAD]"], s["[MASK]"]
        self.ordinary = min(s.values())  # ids 0 .. ordinary-1 are bytes and merges
        if sorted(s.values()) != list(range(self.ordinary, tok.vocab_size)):
            raise ValueError("bert: the tokenizer's special ids must be its last ids")


# --- the model ------------------------------------------------------------------------------------


class BERT(nn.Module):
    """Embeddings (token + position + segment) → bidirectional Transformer → MLM head and NSP head."""

    def __init__(self, cfg, pad_id):
        super().__init__()
        self.context, self.pad_id = cfg.context, pad_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)  # also the MLM output layer (tied)
        self.position_embeddings = nn.Embedding(cfg.context, cfg.dim)
        self.token_type_embeddings = nn.Embedding(2, cfg.dim)  # segment A / B (§3, Figure 2)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.depth, cfg.dim, cfg.heads, dropout=cfg.dropout)
        self.mlm_dense = nn.Linear(cfg.dim, cfg.dim)  # the MLM transform: dense → GELU → LayerNorm
        self.mlm_ln = nn.LayerNorm(cfg.dim)
        self.mlm_bias = nn.Parameter(core.zeros(cfg.vocab_size))  # output bias per token
        self.pooler = nn.Linear(cfg.dim, cfg.dim)  # C = tanh(W h_[CLS] + b)
        self.nsp = nn.Linear(cfg.dim, 2)  # IsNext (1) / NotNext (0)
        self.reset_parameters()

    def reset_parameters(self):
        """BERT's initialization (modeling.py, initializer_range 0.02): weights ~ N(0, 0.02), biases 0,
        layer norms 1 and 0."""
        norms = {id(m.weight) for m in self.modules() if isinstance(m, nn.LayerNorm)}
        for name, p in self.named_parameters():
            if id(p) in norms:
                init.ones_(p)
            elif name.endswith("bias"):
                init.zeros_(p)
            else:
                init.normal_(p, 0.0, 0.02)

    def forward(self, ids, segments):
        """Final hidden vectors (B, L, dim) of token ids (B, L) and segment ids (B, L) (0 = A, 1 = B)."""
        ids, segments = np.asarray(ids), np.asarray(segments)
        if ids.ndim != 2 or ids.shape != segments.shape:
            raise ValueError(f"BERT.forward: ids and segments must be (batch, length) of one shape, got "
                             f"{ids.shape} and {segments.shape}")
        if ids.shape[1] > self.context:
            raise ValueError(f"BERT.forward: length {ids.shape[1]} exceeds the context {self.context}")
        x = self.word_embeddings(ids) + self.position_embeddings(np.arange(ids.shape[1]))
        x = self.drop(x + self.token_type_embeddings(segments))  # E_token + E_position + E_segment (Figure 2)
        keep = core.tensor((ids != self.pad_id)[:, None, None, :])  # (B, 1, 1, L): no query sees a [PAD] key
        return self.transformer(x, attn_mask=keep)

    def mlm_logits(self, h):
        """Logits over the vocabulary (..., V) of hidden vectors h (..., dim): the transform, then the tied
        output layer h Eᵀ + b (run_pretraining.py, get_masked_lm_output)."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return F.linear(h, self.word_embeddings.weight, self.mlm_bias)

    def nsp_logits(self, h):
        """IsNext/NotNext logits (B, 2) from C, the pooled hidden vector of [CLS] (§3.1, Task #2)."""
        return self.nsp(F.tanh(self.pooler(h[:, 0])))


def loss(model, inputs, segments, labels, is_next):
    """(total, masked-LM, NSP) losses: the mean cross-entropy of the original tokens at the chosen
    positions (labels != IGNORE) plus the mean NSP cross-entropy (Appendix A.2: their sum)."""
    h = model(inputs, segments)
    labels = np.asarray(labels)
    rows, cols = np.nonzero(labels != IGNORE)
    mlm = F.cross_entropy(model.mlm_logits(h[rows, cols]), core.tensor(labels[rows, cols]))  # chosen ones only
    nsp = F.cross_entropy(model.nsp_logits(h), core.tensor(np.asarray(is_next, dtype=np.int64)))
    return mlm + nsp, mlm, nsp


# --- the data: sequence pairs and masks -----------------------------------------------------------


def mask_tokens(ids, sp, rng, prob=0.15, replace=(0.8, 0.1)):
    """(inputs, labels) for the masked LM (§3.1, Task #1) of sequences ids (B, L): in each row exactly
    max(1, round(prob · n)) of its n ordinary (non-special) tokens are chosen uniformly; a chosen token
    becomes [MASK] with probability replace[0], a uniformly random ordinary token with replace[1], and stays
    itself otherwise. labels holds the original token at the chosen positions and IGNORE elsewhere."""
    if not 0 < prob <= 1:  # above 1, k would exceed n and the specials' keys would be chosen too
        raise ValueError(f"mask_tokens: prob must be in (0, 1], got {prob}")
    if len(replace) != 2 or min(replace) < 0 or sum(replace) > 1:
        raise ValueError(f"mask_tokens: replace must be two probabilities ([MASK], random) summing to <= 1, "
                         f"got {replace}")
    ids = np.asarray(ids)
    ordinary = ids < sp.ordinary
    n = ordinary.sum(1)
    k = np.where(n > 0, np.maximum(1, np.rint(prob * n)), 0)[:, None]
    keys = np.where(ordinary, rng.random(ids.shape), 2.0)  # the k smallest keys of a row are its chosen
    chosen = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable") < k
    u = rng.random(ids.shape)
    to_mask = chosen & (u < replace[0])
    to_random = chosen & (u >= replace[0]) & (u < replace[0] + replace[1])
    inputs = np.where(to_mask, sp.mask, ids)
    inputs = np.where(to_random, rng.integers(0, sp.ordinary, ids.shape), inputs).astype(ids.dtype)
    return inputs, np.where(chosen, ids, IGNORE).astype(np.int64)


def make_pairs(docs, n, context, sp, rng, short_prob=0.1):
    """n examples (ids (n, context) int32 padded with [PAD], segments (n, context) int8, is_next (n,) int8)
    of [CLS] A [SEP] B [SEP] from `docs` (documents as lists of sentences, each a list of token ids); see
    the module docstring for how A and B are chosen."""
    flat = [[i for s in d for i in s] for d in docs]
    ends = [np.cumsum([len(s) for s in d if len(s)], dtype=np.int64) for d in docs]  # sentence ends in flat
    sizes = np.array([len(f) for f in flat], dtype=np.float64)
    if (sizes >= 2).sum() < 2:
        raise ValueError("bert.make_pairs: need at least two documents of >= 2 tokens")
    p = np.where(sizes >= 2, sizes, 0.0)
    picks, others = rng.choice(len(docs), size=(2, n), p=p / p.sum())  # a document per token it holds
    while (same := picks == others).any():  # NotNext's document must be another one
        others[same] = rng.choice(len(docs), size=int(same.sum()), p=p / p.sum())
    budget = context - 3  # room for A and B besides [CLS], [SEP], [SEP]
    ids = np.full((n, context), sp.pad, np.int32)
    segments = np.zeros((n, context), np.int8)
    is_next = (rng.random(n) < 0.5).astype(np.int8)  # §3.1: 50% IsNext
    short = rng.random(n) < short_prob
    for i in range(n):
        f, e = flat[picks[i]], ends[picks[i]]
        target = int(rng.integers(2, budget + 1)) if short[i] else budget
        starts = np.concatenate([[0], e[:-1]])
        begin = int(starts[rng.integers(int((starts <= len(f) - 2).sum()))])  # leaves at least two tokens
        stop = int(e[np.searchsorted(e, begin + min(target, len(f) - begin))])  # whole sentences to >= target
        inner = e[(e > begin) & (e < stop)]  # sentence breaks inside the chunk
        cut = int(rng.choice(inner)) if len(inner) else int(rng.integers(begin + 1, stop))  # else cut a sentence
        a, b = f[begin:cut], f[cut:stop]
        if not is_next[i]:  # NotNext: a span of another document, as long as the true B
            o, oe = flat[others[i]], ends[others[i]]
            j = int(np.concatenate([[0], oe[:-1]])[rng.integers(len(oe))])
            b = o[j : j + len(b)] if len(o) - j >= len(b) else o[: len(b)]
        while len(a) + len(b) > target:  # BERT's truncate_seq_pair (to the target): trim the longer at a random end
            longer = a if len(a) > len(b) else b
            del longer[0 if rng.random() < 0.5 else -1]
        seq = [sp.cls, *a, sp.sep, *b, sp.sep]
        ids[i, : len(seq)] = seq
        segments[i, len(a) + 2 : len(seq)] = 1
    return ids, segments, is_next


def trim(*arrays, pad_id):
    """The arrays (B, L, ...) cut to the batch's longest sequence (the first array's last non-[PAD] column + 1):
    the cut columns are padding only, which no real position sees."""
    length = int((np.asarray(arrays[0]) != pad_id).any(0).nonzero()[0].max()) + 1
    return tuple(a[:, :length] for a in arrays)


# --- training -------------------------------------------------------------------------------------


def build(cfg, sp=None):
    """The (untrained) BERT of a config whose vocab_size is set."""
    from models import corpus

    if cfg.vocab_size is None:
        raise ValueError("bert.build: cfg.vocab_size is None; train() sets it from the tokenizer")
    sp = sp or Specials(corpus.tokenizer())
    return BERT(cfg, sp.pad)


def optimizer(model, cfg):
    """Adam with decoupled weight decay 0.01 on the matrices (Appendix A.2; BERT's AdamWeightDecay skips
    LayerNorm and bias parameters), β = (0.9, 0.999)."""
    return core.optim.AdamW(loop.decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))


def train(cfg, out, *, resume=True, progress=True):
    """Minimize the masked-LM + NSP loss on pairs pre-built from the training documents (a fixed array,
    drawn from a generator seeded by cfg.seed), with masks drawn at every step from a generator seeded by
    (cfg.seed, step)."""
    from models import corpus

    tok = corpus.tokenizer()
    if cfg.vocab_size is None:
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    if cfg.vocab_size != tok.vocab_size:
        raise UsageError(f"bert: vocab_size {cfg.vocab_size} differs from the corpus tokenizer's {tok.vocab_size}")
    sp = Specials(tok)
    data = make_pairs(corpus.sentence_ids("train"), cfg.examples, cfg.context, sp,
                      np.random.default_rng([cfg.seed, 0]), cfg.short_prob)
    core.manual_seed(cfg.seed)
    model = build(cfg, sp)
    opt = optimizer(model, cfg)
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps, min_lr=cfg.lr / 10)

    def step(ids, segments, is_next):
        t = sched.last_epoch  # the step about to be taken (restored with the scheduler on resume)
        ids, segments = trim(ids, segments, pad_id=sp.pad)
        inputs, labels = mask_tokens(ids, sp, np.random.default_rng([cfg.seed, 1, t]), cfg.mask_prob)
        total, mlm, nsp = loss(model, inputs, segments, labels, is_next)
        opt.zero_grad()
        total.backward()
        core.optim.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        return {"loss": total.item(), "mlm": mlm.item(), "nsp": nsp.item()}

    return loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=data, scheduler=sched,
                    resume=resume, progress=progress, name="bert")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling and evaluation ----------------------------------------------------------------------


@core.no_grad()
def sample(model, cfg, n, *, seed=0, prompt=None, temperature=None, top_k=None):
    """n fillings of the [MASK] tokens of `prompt` (e.g. "a small [MASK] circle"), a list of n strings.

    The prompt is read as [CLS] prompt [SEP] (one segment) and every [MASK] is drawn, independently, from
    the model's softmax(logits / temperature) over the ordinary tokens (top-k filtered if given; temperature
    0 takes the argmax). A [MASK] stands for one token; the space before it is folded into it (" [MASK]" is
    read as a token that starts with a space, as the BPE's words do)."""
    from models import corpus
    from models.gpt import sample_next

    if not prompt or "[MASK]" not in prompt:
        raise UsageError('bert.sample: give a --prompt holding at least one [MASK], e.g. "a small [MASK] circle"')
    tok = corpus.tokenizer()
    sp = Specials(tok)
    ids = tok.encode(prompt.replace(" [MASK]", "[MASK]"), allowed_special={"[MASK]"})
    if len(ids) + 2 > cfg.context:
        raise UsageError(f"bert.sample: the prompt is {len(ids)} tokens; at most {cfg.context - 2} fit the context")
    seq = np.array([[sp.cls, *ids, sp.sep]], dtype=np.int64)
    model.eval()
    where = np.nonzero(seq[0] == sp.mask)[0]
    logits = model.mlm_logits(model(seq, np.zeros_like(seq))[0, where]).numpy()[:, : sp.ordinary]
    gen = core.random.Generator(seed)
    temperature = cfg.temperature if temperature is None else temperature
    out = []
    for _ in range(n):
        filled = seq[0].copy()
        filled[where] = sample_next(logits, temperature, top_k, None, gen)
        out.append(tok.decode(filled[1:-1]))
    return out


@core.no_grad()
def predict(model, ids, segments, labels, batch_size=128):
    """(MLM argmax ids at the chosen positions (labels != IGNORE, in row-major order), NSP IsNext
    probabilities (B,)) of examples, batch by batch."""
    model.eval()
    preds, probs = [], []
    for i in range(0, len(ids), batch_size):
        x, s, y = trim(ids[i : i + batch_size], segments[i : i + batch_size], labels[i : i + batch_size],
                       pad_id=model.pad_id)
        h = model(x, s)
        preds.append(model.mlm_logits(h[np.nonzero(y != IGNORE)]).numpy().argmax(-1))
        probs.append(F.softmax(model.nsp_logits(h), dim=-1).numpy()[:, 1])
    return np.concatenate(preds), np.concatenate(probs)


def evaluate(model, cfg, *, seed=0):
    """On cfg.eval_examples pairs built from the held-out documents: masked-token accuracy (15% of the
    tokens chosen, whatever cfg.mask_prob, and every chosen token replaced by [MASK]) beside the accuracy of
    always guessing the most frequent training token, and NSP accuracy beside chance (50%) and the majority
    class of these pairs."""
    from models import corpus

    tok = corpus.tokenizer()
    sp = Specials(tok)
    ids, segments, is_next = make_pairs(corpus.sentence_ids("val"), cfg.eval_examples, cfg.context, sp,
                                        np.random.default_rng([seed, 2]), cfg.short_prob)
    inputs, labels = mask_tokens(ids, sp, np.random.default_rng([seed, 3]), EVAL_MASK_PROB, replace=(1.0, 0.0))
    preds, p_next = predict(model, inputs, segments, labels)
    chosen = labels != IGNORE
    train_tokens = corpus.tokens("train")
    frequent = np.bincount(train_tokens[train_tokens < sp.ordinary]).argmax()
    majority = max(is_next.mean(), 1 - is_next.mean())
    return {"figures": [
        loop.figure("masked-token accuracy", (preds == labels[chosen]).mean(), better="higher",
                    most_frequent_token=(labels[chosen] == frequent).mean()),
        loop.figure("NSP accuracy", ((p_next > 0.5) == is_next).mean(), better="higher", chance=0.5,
                    majority_class=majority),
    ], "masked_tokens": int(chosen.sum()), "pairs": len(ids), "most_frequent_token": tok.decode([frequent]),
        "samples": sample(model, cfg, 3, seed=seed, prompt="a small [MASK] circle at the [MASK]", temperature=0)}
