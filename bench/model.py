"""Model benchmarks: a GPT training step against the same model in PyTorch, KV-cached generation, BPE encoding.

1. One training step (forward, backward, AdamW update) of GPT with 4 layers, width 128, 4 heads, context 128,
   batch 32 and the corpus tokenizer's 4,096-token vocabulary: models.gpt on our engine, and `TorchGPT` below,
   the same model written in PyTorch (nanoGPT's layers, same weights, same AdamW settings), timed in the same
   run with the same threads. Target (transformers issue): ours ≤ 2× PyTorch's time.
2. Generating 256 tokens after a 16-token prompt with that GPT (context 512, so the whole sequence fits):
   with the key/value cache, each step runs one new position; without it, each step runs the whole prefix.
   Target: the cache ≥ 5× faster.
3. BPE encoding of the corpus' validation text (models.corpus) with the shipped tokenizer, in tokens/s.

FLOPs of a step count the matrix products only, the same for both implementations: per token 2·(12·L·d² + V·d)
in the forward (the four projections of each block and the tied head), per visible (query, key) pair 4·d_head
per head; the backward twice the forward. Generation is timed in wall time per call (its FLOPs are not the
point: the cached and uncached runs do different amounts of work by design).
"""

from __future__ import annotations

import numpy as np

from bench.harness import TORCH, Case, Impl, UnavailableError

FAMILY = "model"
STEP = dict(depth=4, dim=128, heads=4, context=128, batch_size=32, vocab_size=4096)
QUICK_STEP = dict(depth=1, dim=16, heads=2, context=16, batch_size=2, vocab_size=64)
GENERATE = dict(prompt=16, new=256, context=512)
QUICK_GENERATE = dict(prompt=4, new=8, context=16)
CACHED, UNCACHED = "kv-cache", "no-cache"
WARM, COLD = "warm-cache", "cold-cache"  # BPE: the tokenizer's word cache filled by the previous call, or empty


def step_flops(depth, dim, heads, context, batch_size, vocab_size):
    """Matrix-product FLOPs of one training step (forward + backward = 3 × forward)."""
    tokens = batch_size * context
    forward = 2 * tokens * (12 * depth * dim * dim + vocab_size * dim)
    forward += depth * batch_size * heads * (context * (context + 1) // 2) * 4 * (dim // heads)
    return 3.0 * forward


def generate_flops(depth, dim, heads, vocab_size, prompt, new, **_):
    """Matrix-product FLOPs of cached generation, the least work it takes: the prompt's forward, then one
    position per new token (its projections, its head row, its attention to every earlier position)."""
    body = 2 * 12 * depth * dim * dim

    def attention(queries, start):  # queries at positions start..start+queries-1, causal
        return sum(4 * dim * depth * (p + 1) for p in range(start, start + queries))

    flops = prompt * body + 2 * vocab_size * dim + attention(prompt, 0)
    for p in range(prompt, prompt + new - 1):  # the last drawn token is never run through the model
        flops += body + 2 * vocab_size * dim + attention(1, p)
    return float(flops)


def _gpt(sizes, seed=0):
    try:
        import core
        from models import gpt
    except ImportError as e:
        raise UnavailableError(f"models.gpt is not importable: {e}") from e
    cfg = gpt.Config(dropout=0.0, **{k: v for k, v in sizes.items() if k != "batch_size"})  # the twin has none
    core.manual_seed(seed)
    return gpt, cfg, gpt.build(cfg)


def _batch(sizes, seed=0):
    rng = np.random.default_rng(seed)
    shape = (sizes["batch_size"], sizes["context"])
    return rng.integers(0, sizes["vocab_size"], shape), rng.integers(0, sizes["vocab_size"], shape)


def torch_gpt(model, cfg):
    """nanoGPT's GPT written in PyTorch, with models.gpt's parameter names and a copy of `model`'s weights."""
    import torch

    nn, tf = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
            self.attn, self.mlp = nn.Module(), nn.Module()
            self.attn.c_attn, self.attn.c_proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)
            self.mlp.c_fc, self.mlp.c_proj = nn.Linear(cfg.dim, 4 * cfg.dim), nn.Linear(4 * cfg.dim, cfg.dim)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = self.attn.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (t.view(B, T, cfg.heads, D // cfg.heads).transpose(1, 2) for t in (q, k, v))
            y = tf.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            x = x + self.attn.c_proj(y)
            return x + self.mlp.c_proj(tf.gelu(self.mlp.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.dim), nn.Embedding(cfg.context, cfg.dim)
            self.transformer = nn.Module()
            self.transformer.blocks = nn.ModuleList([Block() for _ in range(cfg.depth)])
            self.transformer.ln_f = nn.LayerNorm(cfg.dim)

        def forward(self, idx, targets):
            """(logits, mean cross-entropy), as models.gpt.GPT.forward."""
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.transformer.blocks:
                x = block(x)
            logits = self.transformer.ln_f(x) @ self.wte.weight.T  # the tied head
            return logits, tf.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    twin = GPT()
    twin.load_state_dict({k: torch.tensor(v.numpy()) for k, v in model.state_dict().items()}, strict=True)
    return twin.to(getattr(torch, str(model.wte.weight.dtype)))


def torch_optimizer(twin, cfg):
    """torch.optim.AdamW grouped as models.gpt.optimizer: weight decay on the matrices, betas (0.9, 0.95)."""
    import torch

    params = list(twin.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95))


def _step_ours(sizes):
    def setup():
        gpt, cfg, model = _gpt(sizes)
        opt = gpt.optimizer(model, cfg)
        x, y = _batch(sizes)

        def run():
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    return setup


def _step_torch(backend, sizes):
    def setup():
        torch = backend.torch()
        _, cfg, model = _gpt(sizes)
        twin = torch_gpt(model, cfg)
        opt = torch_optimizer(twin, cfg)
        x, y = (torch.from_numpy(a) for a in _batch(sizes))

        def run():
            _, loss = twin(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    return setup


def _generate(sizes, gen, use_cache):
    def setup():
        import core

        _, _, model = _gpt(dict(sizes, context=gen["context"]))
        prompt = _batch(dict(sizes, batch_size=1, context=gen["prompt"]))[0]
        return lambda: model.generate(prompt, gen["new"], generator=core.random.Generator(0), use_cache=use_cache)

    return setup


def _encode(text, cold=False):
    """Encode `text` with the shipped tokenizer; cold: with its word cache emptied first (what the first pass
    over a new text costs), else with the cache as the previous call left it."""

    def setup():
        from models import corpus

        tok = corpus.tokenizer()

        def run():
            if cold:
                tok._cache.clear()  # the tokenizer's memo of word -> ids
            return tok.encode(text, allowed_special="none")

        return run

    return setup


def _val_text(quick):
    try:
        from models import corpus
    except ImportError as e:
        raise UnavailableError(f"models.corpus is not importable: {e}") from e
    text = corpus.text("val")
    return text[:2000] if quick else text


def case_names(sizes, gen) -> tuple[str, str]:
    """The names of the training-step and generation cases at these sizes (the targets read the full sizes' only)."""
    name = "L{depth} d{dim} h{heads} T{context} B{batch_size} V{vocab_size}".format(**sizes)
    return f"train step GPT {name}", f"generate {gen['new']} tokens GPT {name.split(' T')[0]}"


def cases(backend, *, quick=False, full=False) -> list[Case]:
    """The training step (ours, PyTorch), generation (cached, uncached) and BPE encoding (quick: tiny sizes)."""
    if backend.device != "cpu":
        raise UnavailableError("the model benchmarks run on the CPU only (models run on NumPy arrays)")
    sizes, gen = (QUICK_STEP, QUICK_GENERATE) if quick else (STEP, GENERATE)
    _gpt(QUICK_STEP)  # UnavailableError: the whole family is reported unavailable
    step_case, generate_case = case_names(sizes, gen)
    out = [Case(FAMILY, step_case, step_flops(**sizes), "GFLOP/s",
                [Impl(backend.ours, _step_ours(sizes)), Impl(TORCH, _step_torch(backend, sizes))], dict(sizes)),
           Case(FAMILY, generate_case, generate_flops(**dict(sizes, **gen)), "GFLOP/s",
                [Impl(CACHED, _generate(sizes, gen, True)), Impl(UNCACHED, _generate(sizes, gen, False))],
                dict(sizes, **gen))]
    try:
        text = _val_text(quick)
    except UnavailableError:
        return out
    n_tokens = len(_encode(text)()())
    out.append(Case(FAMILY, "bpe encode corpus val text", float(len(text.encode("utf-8"))), "GB/s",
                    [Impl(WARM, _encode(text)), Impl(COLD, _encode(text, cold=True))],
                    dict(chars=len(text), tokens=n_tokens)))
    return out


def targets(report) -> list[dict]:
    """The transformers issue's targets in the form of bench.targets.check: the step ratio ≤ 2 and the
    cache's speed-up ≥ 5 (uncached / cached time); plus the BPE encoding speed in tokens/s (no target)."""
    rows = {(r["case"], r["impl"]): r for r in report["results"] if r["family"] == FAMILY and r.get("status") == "ok"}
    out = []

    def entry(text, field, bound, value, ok):
        verdict = "not measured" if value is None else ("met" if ok(value) else "missed")
        out.append({"target": text, "family": FAMILY, "case": None, "field": field, "bound": bound, "value": value,
                    "verdict": verdict})

    step_case, generate_case = case_names(STEP, GENERATE)  # a --quick run's tiny sizes are "not measured"
    step = rows.get((step_case, "cpu"))
    entry("GPT training step (L4 d128 T128 B32): ≤ 2× PyTorch's time", "ratio_to_torch", "<= 2",
          step and step.get("ratio_to_torch"), lambda v: v <= 2)
    cached, uncached = rows.get((generate_case, CACHED)), rows.get((generate_case, UNCACHED))
    speedup = uncached["median_ms"] / cached["median_ms"] if cached and uncached else None
    entry(f"generation of {GENERATE['new']} tokens: KV cache ≥ 5× faster than without", "speed-up", ">= 5",
          speedup, lambda v: v >= 5)
    return out


def notes(report) -> list[str]:
    """Lines to print under the targets: the BPE encoder's tokens/s."""
    out = []
    for r in report["results"]:
        if r["family"] == FAMILY and r["case"].startswith("bpe") and r.get("status") == "ok":
            tokens = r["params"]["tokens"]
            out.append(f"BPE encode ({r['impl']}): {tokens / (r['median_ms'] / 1e3):,.0f} tokens/s ({tokens:,} "
                       f"tokens, {r['params']['chars']:,} characters of the corpus' validation text)")
    return out
