"""The model benchmarks (bench/model.py, `t2i bench model`): the PyTorch twin is the same GPT as ours (same
loss, same AdamW step, float64), the work counts, the targets' arithmetic, and a quick run end to end.

No assertion here is about speed: the numbers are the benchmark's output, not its correctness."""

import json

import numpy as np
import pytest
import torch

import core
from bench import cli, model
from models import gpt
from models.cli import main


def test_torch_twin_takes_the_same_training_step():
    """One forward, backward and AdamW update: the same loss and the same weights after it (float64)."""
    cfg = gpt.Config(vocab_size=50, context=8, depth=2, dim=16, heads=2, lr=0.01, dropout=0.0)
    core.manual_seed(0)
    ours = gpt.build(cfg).double()
    twin = model.torch_gpt(ours, cfg)
    assert next(twin.parameters()).dtype == torch.float64
    opt, topt = gpt.optimizer(ours, cfg), model.torch_optimizer(twin, cfg)
    x, y = model._batch(dict(batch_size=3, context=8, vocab_size=50))
    for _ in range(2):
        _, loss = ours(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _, tloss = twin(torch.from_numpy(x), torch.from_numpy(y))
        topt.zero_grad()
        tloss.backward()
        topt.step()
        assert loss.item() == pytest.approx(tloss.item(), rel=1e-12)
    theirs = dict(twin.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.numpy(), theirs[name].detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def test_work_counts():
    # one block: 12·d² weights per token (c_attn 3d², c_proj d², MLP 8d²), the head V·d; attention 4·d per pair
    assert model.step_flops(1, 4, 1, 2, 1, 10) == 3 * (2 * 2 * (12 * 16 + 40) + 3 * 4 * 4)
    # cached generation: prompt of 2 (3 causal pairs), then 1 more position run (it attends to 3 keys)
    body, head = 2 * 12 * 16, 2 * 10 * 4
    want = 2 * body + head + 4 * 4 * 3 + body + head + 4 * 4 * 3
    assert model.generate_flops(1, 4, 1, 10, prompt=2, new=2) == want


def _row(case, impl, ms, **kw):
    return dict(family="model", case=case, impl=impl, status="ok", median_ms=ms, **kw)


def test_targets_arithmetic():
    step, generate = model.case_names(model.STEP, model.GENERATE)
    report = {"results": [_row(step, "cpu", 30.0, ratio_to_torch=1.5),
                          _row(step, "torch", 20.0),
                          _row(generate, "kv-cache", 100.0),
                          _row(generate, "no-cache", 450.0),
                          _row("bpe encode corpus val text", "cold-cache", 500.0,
                               params=dict(tokens=1000, chars=4000))]}
    checks = {c["field"]: c for c in model.targets(report)}
    assert checks["ratio_to_torch"]["verdict"] == "met" and checks["ratio_to_torch"]["value"] == 1.5
    assert checks["speed-up"]["value"] == pytest.approx(4.5) and checks["speed-up"]["verdict"] == "missed"
    assert model.notes(report) == ["BPE encode (cold-cache): 2,000 tokens/s (1,000 tokens, 4,000 characters of "
                                   "the corpus' validation text)"]
    empty = model.targets({"results": []})
    assert [c["verdict"] for c in empty] == ["not measured", "not measured"]


def test_quick_model_bench_end_to_end(tmp_path, capsys, monkeypatch):
    from bench import peak

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(peak, "measure_peak", lambda device, quick: {"GFLOP/s": 1.0, "GB/s": 1.0})  # tested elsewhere
    assert "model" in cli.FAMILIES
    code = main(["bench", "model", "--quick", "--threads", "1", "--repeats", "1", "--json", "--out", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["families"] == {"model": "ok"}
    impls = {(r["case"].split()[0], r["impl"]) for r in report["results"] if r["status"] == "ok"}
    assert impls == {("train", "cpu"), ("train", "torch"), ("generate", "kv-cache"), ("generate", "no-cache"),
                     ("bpe", "warm-cache"), ("bpe", "cold-cache")}
    step = next(r for r in report["results"] if r["impl"] == "cpu" and r["case"].startswith("train"))
    assert step["ratio_to_torch"] == pytest.approx(step["median_ms"] / step["torch_ms"])
    fields = {c["field"]: c["verdict"] for c in report["targets"] if c["family"] == "model"}
    # the targets name the full sizes: a --quick run's tiny ones give no verdict (they gave "met" and "missed")
    assert fields == {"ratio_to_torch": "not measured", "speed-up": "not measured"}
