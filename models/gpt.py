"""GPT: a decoder-only transformer trained as a causal language model (Radford et al. 2018, "Improving
Language Understanding by Generative Pre-Training"; Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), written in the tone of Karpathy's nanoGPT.

The model factorizes the probability of a token sequence left to right and maximizes its log-likelihood
(Radford et al. 2018, eq. 1):

    L(U) = Σ_i log P(u_i | u_{i−k}, …, u_{i−1}; Θ)

with the transformer decoder of Radford et al. 2018, eq. 2:

    h_0 = U W_e + W_p                                  token + learned position embeddings
    h_l = transformer_block(h_{l−1})   l = 1…n         masked (causal) self-attention
    P(u) = softmax(h_n W_eᵀ)                           the output layer is the token embedding (tied)

GPT-2's changes (Radford et al. 2019, §2.3), all kept here: layer norm at the input of each block
(pre-LN, in models.transformer) and after the last block (`ln_f`), weights drawn from N(0, 0.02), and the
residual projections scaled at initialization by 1/√N for N residual layers (two per block).

Generation appends one token at a time, drawn from softmax(logits / temperature) restricted to the k
likeliest tokens (top-k, Fan et al. 2018) and/or the smallest set whose mass reaches p (nucleus, top-p,
Holtzman et al. 2020). With a key/value cache each new token costs one position's work instead of a
forward over the whole prefix, and gives the same logits.

Evaluated by validation perplexity exp(mean NLL) beside add-k smoothed bigram and unigram models fitted on
the same training tokens.

    t2i train gpt --out /tmp/runs/gpt/ckpt.safetensors
    t2i sample gpt --ckpt /tmp/runs/gpt/ckpt.safetensors --prompt "def " --n 4
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import core
from core import F, init, nn
from models import train as loop
from models.registry import UsageError
from models.transformer import Transformer


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on the text corpus (see README)."""

    data: str = "text"
    steps: int = 800  # 1.6M tokens (4.8 epochs of the 338k training tokens): about 7 CPU minutes
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    context: int = 128  # tokens the model sees (GPT-2's n_ctx / nanoGPT's block_size)
    depth: int = 4  # transformer blocks
    dim: int = 128  # width of the residual stream
    heads: int = 4
    dropout: float = 0.1
    vocab_size: int | None = None  # None: the corpus tokenizer's
    weight_decay: float = 0.1  # AdamW, on the matrices only (nanoGPT)
    warmup: int = 100  # linear warmup steps, then a cosine decay to lr / 10
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    eval_tokens: int = 131072  # validation tokens scored by evaluate
    max_new_tokens: int = 200  # sample's defaults
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = 0.95

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"gpt.Config: dim {self.dim} must be a multiple of heads {self.heads}")
        for name in ("context", "depth", "dim", "heads", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"gpt.Config: {name} must be positive, got {getattr(self, name)}")


DATA = ("text",)


class GPT(nn.Module):
    """Token and position embeddings → dropout → causal Transformer (with ln_f) → tied LM head."""

    def __init__(self, cfg):
        super().__init__()
        self.context, self.vocab_size = cfg.context, cfg.vocab_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)  # W_e, also the output layer
        self.wpe = nn.Embedding(cfg.context, cfg.dim)  # W_p
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.depth, cfg.dim, cfg.heads, dropout=cfg.dropout)
        self.reset_parameters(cfg.depth)

    def reset_parameters(self, depth):
        """GPT-2's initialization (Radford et al. 2019, §2.3): every weight ~ N(0, 0.02), biases 0, layer
        norms 1 and 0, and the projections that write into the residual stream ~ N(0, 0.02/√(2·depth))."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                init.zeros_(p)
            elif ".ln_" in name:
                init.ones_(p)
            else:  # c_proj: the attention's and the MLP's projections back into the residual stream
                init.normal_(p, 0.0, 0.02 / math.sqrt(2 * depth) if name.endswith("c_proj.weight") else 0.02)

    def hidden(self, idx, cache=None):
        """The last block's normalized output (B, T, dim) for token ids idx (B, T); with a cache, idx holds
        the new tokens only, at positions cache.length…"""
        idx = idx.numpy() if isinstance(idx, core.Tensor) else np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"GPT.forward: idx must be (batch, time) token ids, got shape {idx.shape}")
        start = 0 if cache is None else cache.length
        if start + idx.shape[1] > self.context:
            raise ValueError(f"GPT.forward: {start} cached + {idx.shape[1]} new tokens exceed the context "
                             f"{self.context}; crop the input")
        pos = np.arange(start, start + idx.shape[1])
        x = self.drop(self.wte(idx) + self.wpe(pos))  # h_0 = U W_e + W_p (Radford et al. 2018, eq. 2)
        return self.transformer(x, is_causal=True, cache=cache)  # blocks, then ln_f

    def forward(self, idx, targets=None, cache=None):
        """(logits (B, T, vocab), mean cross-entropy over the targets (B, T) or None)."""
        logits = F.linear(self.hidden(idx, cache), self.wte.weight)  # P(u) = softmax(h_n W_eᵀ) (eq. 2)
        loss = None
        if targets is not None:
            targets = targets.numpy() if isinstance(targets, core.Tensor) else np.asarray(targets)
            if targets.shape != logits.shape[:2]:
                raise ValueError(f"GPT.forward: targets {targets.shape} must match idx {logits.shape[:2]}")
            # −L(U) / tokens (Radford et al. 2018, eq. 1)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), core.tensor(targets.reshape(-1)))
        return logits, loss

    @core.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 use_cache=True):
        """idx (B, T) followed by max_new_tokens sampled tokens, (B, T + max_new_tokens) int64.

        Each step conditions on the last `context` tokens. temperature 0 takes the argmax. With use_cache,
        keys and values of the tokens seen are kept and only the newest token is run through the model,
        as long as the whole sequence fits the context; past it the window slides, every position
        embedding changes, and the window is recomputed (exactly what the uncached path computes).
        """
        idx = np.array(idx.numpy() if isinstance(idx, core.Tensor) else idx, dtype=np.int64)
        if idx.ndim != 2 or idx.shape[1] < 1:
            raise ValueError(f"GPT.generate: idx must be (batch, time >= 1) token ids, got shape {idx.shape}")
        if max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        gen = generator if generator is not None else core.random.default_generator
        training, cache = self.training, None
        self.eval()  # no dropout while generating; the mode is restored at the end
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.length < self.context:
                h = self.hidden(idx[:, -1:], cache)  # one new position against the cached keys and values
            else:
                cache = self.transformer.new_cache() if use_cache and idx.shape[1] <= self.context else None
                h = self.hidden(idx[:, -self.context :], cache)
            logits = F.linear(h[:, -1], self.wte.weight).numpy()  # the head on the last position only
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            idx = np.concatenate([idx, nxt[:, None]], axis=1)
        self.train(training)
        return idx


# --- sampling -------------------------------------------------------------------------------------


def top_k_filter(logits, k):
    """logits (B, V) with every entry below the row's k-th largest set to −inf (ties with it are kept)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"top_k_filter: k must be an integer >= 1 (or None), got {k!r}")
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, [-k]]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits, p):
    """logits (B, V) keeping, per row, the smallest set of likeliest tokens whose probability reaches p
    (nucleus sampling, Holtzman et al. 2020, eq. 3); the rest set to −inf. p = 1 keeps every token."""
    if not (p is None or 0 < p <= 1):
        raise ValueError(f"top_p_filter: p must be in (0, 1], got {p}")
    if p is None or p == 1:  # every token: the running sum can reach 1.0 in floating point before the last one
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = np.take_along_axis(_softmax(logits), order, axis=-1)
    before = np.cumsum(probs, axis=-1) - probs  # mass of the likelier tokens
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, order, before < p, axis=-1)  # a token is kept while the mass before it is < p
    return np.where(keep, logits, -np.inf)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) after the top-k, then the top-p filter (int64 (B,))."""
    if not temperature >= 0:  # NaN too
        raise ValueError(f"sample_next: temperature must be >= 0, got {temperature}")
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:  # the filters keep the argmax; they run to check their arguments
        return top_p_filter(top_k_filter(logits, top_k), top_p).argmax(-1)
    probs = _softmax(top_p_filter(top_k_filter(logits / temperature, top_k), top_p))
    u = (generator or core.random.default_generator).uniform((len(probs), 1))
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf <= u * cdf[:, -1:]).sum(-1), probs.shape[-1] - 1)  # inverse CDF


# --- training -------------------------------------------------------------------------------------


def build(cfg):
    """The (untrained) GPT of a config whose vocab_size is set."""
    if cfg.vocab_size is None:
        raise ValueError("gpt.build: cfg.vocab_size is None; train() sets it from the tokenizer")
    return GPT(cfg)


def windows(tokens, starts, context):
    """(inputs, targets), each (len(starts), context) int64: tokens[s : s+context] and the next token of each."""
    i = np.asarray(starts)[:, None] + np.arange(context + 1)
    w = np.asarray(tokens)[i].astype(np.int64)
    return w[:, :-1], w[:, 1:]


def optimizer(model, cfg):
    """AdamW with weight decay on the matrices (embeddings and linear weights) and none on biases and
    layer norms (nanoGPT's grouping), β2 = 0.95 as in GPT-3."""
    return core.optim.AdamW(loop.decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))


def train(cfg, out, *, resume=True, progress=True):
    """Minimize the next-token cross-entropy (Radford et al. 2018, eq. 1) on random windows of the training
    tokens, with AdamW, gradient clipping and a warmup + cosine learning rate."""
    from models import corpus

    tokens = corpus.tokens("train")
    if cfg.vocab_size is None:
        cfg = dataclasses.replace(cfg, vocab_size=corpus.tokenizer().vocab_size)
    if len(tokens) <= cfg.context + cfg.batch_size:
        raise UsageError(f"gpt: {len(tokens)} training tokens are too few for context {cfg.context}")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    opt = optimizer(model, cfg)
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps, min_lr=cfg.lr / 10)
    starts = np.arange(len(tokens) - cfg.context, dtype=np.int64)  # every window; fit's Stream shuffles them

    def step(s):
        x, y = windows(tokens, s, cfg.context)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        core.optim.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    return loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(starts,), scheduler=sched,
                    resume=resume, progress=progress, name="gpt")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling and evaluation ----------------------------------------------------------------------


def sample(model, cfg, n, *, seed=0, prompt=None, max_new_tokens=None, temperature=None, top_k=None, top_p=None):
    """n continuations of `prompt` (default: the start of a document, <|endoftext|>), each cut at the first
    <|endoftext|> it generates: a list of n strings, the prompt included."""
    from models import corpus

    tok = corpus.tokenizer()
    eot = tok.special["<|endoftext|>"]
    ids = tok.encode(prompt) if prompt else []
    if len(ids) >= cfg.context:
        ids = ids[-(cfg.context - 1) :]
    max_new = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
    temperature = cfg.temperature if temperature is None else temperature
    top_k = cfg.top_k if top_k is None else top_k
    top_p = cfg.top_p if top_p is None else top_p
    start = np.array([ids or [eot]] * n, dtype=np.int64)
    out = model.generate(start, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=core.random.Generator(seed))
    texts = []
    for row in out[:, start.shape[1] :].tolist():
        row = row[: row.index(eot)] if eot in row else row
        texts.append((prompt or "") + tok.decode(row))
    return texts


@core.no_grad()
def nll(model, tokens, context, batch_size=16):
    """Mean negative log-likelihood (nats/token) of `tokens` under the model, scored in consecutive
    non-overlapping windows of `context` tokens (each window predicts its context tokens after the first
    input), and the number of tokens scored."""
    model.eval()
    n = (len(tokens) - 1) // context
    starts = np.arange(n) * context
    total = 0.0
    for i in range(0, n, batch_size):
        x, y = windows(tokens, starts[i : i + batch_size], context)
        _, loss = model(x, y)
        total += loss.item() * y.size
    return total / (n * context), n * context


def ngram_nll(train_tokens, val_tokens, vocab_size, order, ks):
    """{k: mean NLL (nats/token) of val_tokens[1:]} under the add-k smoothed unigram (order 1) or bigram
    (order 2) model of the training tokens, P(b | a) = (c(a, b) + k) / (c(a) + k·V), for each k in ks."""
    train_tokens, val_tokens = np.asarray(train_tokens, np.int64), np.asarray(val_tokens, np.int64)
    V, y = vocab_size, val_tokens[1:]
    if order == 1:
        c = np.bincount(train_tokens, minlength=V).astype(np.float64)
        return {k: float(-np.mean(np.log((c[y] + k) / (c.sum() + k * V)))) for k in ks}
    pairs, counts = np.unique(train_tokens[:-1] * V + train_tokens[1:], return_counts=True)  # sparse c(a, b)
    rows = np.bincount(train_tokens[:-1], minlength=V).astype(np.float64)  # c(a)
    keys = val_tokens[:-1] * V + y
    at = np.minimum(np.searchsorted(pairs, keys), len(pairs) - 1)
    c = np.where(pairs[at] == keys, counts[at], 0).astype(np.float64)
    a = val_tokens[:-1]
    return {k: float(-np.mean(np.log((c + k) / (rows[a] + k * V)))) for k in ks}


def evaluate(model, cfg, *, seed=0):
    """Validation perplexity and bits/token of the model on the first cfg.eval_tokens validation tokens,
    beside add-k bigram and unigram models of the training tokens scored on the same tokens (each with
    the k in {1e-3, …, 1} that scores best on them: the baselines get every advantage)."""
    from models import corpus

    train_tokens, val = corpus.tokens("train"), corpus.tokens("val")
    model_nll, scored = nll(model, val[: cfg.eval_tokens + 1], cfg.context)
    val = val[: scored + 1]  # the tokens the model scored: every one of val[1:]
    ks = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    bigram = min(ngram_nll(train_tokens, val, cfg.vocab_size, 2, ks).values())
    unigram = min(ngram_nll(train_tokens, val, cfg.vocab_size, 1, ks).values())
    ppl, bits = math.exp, lambda nats: nats / math.log(2)  # noqa: E731
    return {"figures": [
        loop.figure("val perplexity", ppl(model_nll), better="lower", bigram=ppl(bigram), unigram=ppl(unigram)),
        loop.figure("val bits/token", bits(model_nll), better="lower", unit="bits", bigram=bits(bigram),
                    unigram=bits(unigram)),
    ], "val_tokens": scored, "samples": sample(model, cfg, 3, seed=seed, max_new_tokens=64)}
