"""core.optim: SGD, Adam, AdamW with PyTorch's exact update rules, gradient clipping, LR schedules, EMA.

An optimizer holds `param_groups` (each a dict of options plus its "params") and a per-parameter
`state` (momentum buffers, moment estimates). `step()` reads each parameter's `.grad` and updates
its array in place, so the Parameter objects a model holds stay the same. The arithmetic follows
PyTorch's single-tensor (for-loop) implementations operation for operation, so that a float64 run
reproduces PyTorch's weights to rounding.

    opt = optim.AdamW(model.parameters(), lr=3e-4)
    sched = optim.WarmupCosine(opt, warmup_steps=100, total_steps=10_000)
    for x, y in batches:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()
"""

from __future__ import annotations

import copy
import math
import types
from collections import OrderedDict

import numpy as np

from .autograd import enable_grad
from .tensor import Tensor

__all__ = ["SGD", "EMA", "Adam", "AdamW", "LRScheduler", "LambdaLR", "Optimizer", "WarmupCosine", "clip_grad_norm_",
           "clip_grad_value_"]


class _Required:
    def __repr__(self):
        return "<required parameter>"


required = _Required()  # a default that a param group must supply (like SGD's lr in old PyTorch)


def _numpy(a):
    """A NumPy copy of an array (brought over from the GPU if needed)."""
    return np.array(a if isinstance(a, (np.ndarray, np.generic)) else a.get())  # np.generic: a 0-d parameter's state


def _like(value, p):
    """value as an array of p's dtype on p's device."""
    a = np.asarray(value).astype(p.dtype)
    if isinstance(p.data, np.ndarray):
        return a
    from .ops import _move

    return _move(a, "cuda")


# --- Optimizer ------------------------------------------------------------------------------------


class Optimizer:
    """Base class: param groups with per-group options, per-parameter state, zero_grad, state_dict.

    params is an iterable of Tensors, or of dicts {"params": [...], **options} whose options override
    `defaults` for that group (e.g. no weight decay on biases).
    """

    def __init__(self, params, defaults):
        self.defaults = defaults
        self.state = {}  # Parameter -> dict (Tensors hash by identity)
        self.param_groups = []
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                            f"but got {type(params).__name__}")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, param_group):
        """Add a group (a dict with "params"); missing options are taken from the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, (set, frozenset)):  # their order changes between runs: state_dict indices would too
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs. Please use a list instead.")
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        for p in group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            raise ValueError("optimizer: a parameter group contains the same parameter twice")
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise ValueError(f"parameter group didn't specify a value of required optimization parameter {name}")
            group.setdefault(name, default)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in group["params"]):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    def zero_grad(self, set_to_none=True):
        """Clear the gradients of every parameter (to None, or to zeros)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None if set_to_none else np.zeros_like(p.grad)

    def step(self, closure=None):
        """Update every parameter that has a gradient; closure (optional) recomputes and returns the loss."""
        raise NotImplementedError

    def _closure(self, closure):
        if closure is None:
            return None
        with enable_grad():
            return closure()

    def _params_with_grad(self, group):
        return [p for p in group["params"] if p.grad is not None]

    # --- state_dict -------------------------------------------------------------------------------
    def state_dict(self):
        """{"state": {index: {name: value}}, "param_groups": [{options..., "params": [indices]}]}, as PyTorch.

        Parameters are numbered in group order; arrays are NumPy copies (a snapshot).
        """
        index = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in g["params"]]
            groups.append(packed)
        state = {}
        for p, s in self.state.items():
            if id(p) in index:
                state[index[id(p)]] = {k: _numpy(v) if hasattr(v, "shape") else v for k, v in s.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore options and state saved by state_dict(), checking group sizes and state shapes."""
        state_dict = copy.deepcopy(state_dict)
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"loaded state dict has a different number of parameter groups ({len(saved)}) than "
                             f"the optimizer ({len(self.param_groups)})")
        by_index = {}
        for i, (g, s) in enumerate(zip(self.param_groups, saved)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(f"loaded state dict contains a parameter group ({i}) that doesn't match the size of "
                                 f"optimizer's group: {len(s['params'])} vs {len(g['params'])} parameters")
            by_index.update(zip(s["params"], g["params"]))
        state = {}
        for idx, s in state_dict["state"].items():
            idx = int(idx)  # a checkpoint format may have turned keys into strings
            if idx not in by_index:
                raise ValueError(f"loaded state dict has state for parameter {idx}, which is in no parameter group")
            p = by_index[idx]
            entry = {}
            for k, v in s.items():
                if k == "step":  # a count (PyTorch saves a float tensor)
                    v = int(np.asarray(v))
                elif hasattr(v, "shape"):  # an array (0-d too: a 0-d parameter's state), as p's dtype and device
                    if tuple(v.shape) != p.shape:
                        raise ValueError(f"loaded state dict: state '{k}' of parameter {idx} has shape "
                                         f"{tuple(v.shape)}, but the parameter has shape {p.shape}")
                    v = _like(v, p)
                entry[k] = v
            state[p] = entry
        self.state = state
        for g, s in zip(self.param_groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])

    def __repr__(self):
        lines = [type(self).__name__ + " ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params"]
        return "\n".join(lines) + "\n)"


# --- SGD ------------------------------------------------------------------------------------------


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (Polyak), Nesterov momentum and L2 weight decay.

    Per parameter, with g its gradient (PyTorch's formulation, lr outside the buffer):
        g ← g + wd·p                       (weight_decay)
        b ← g at the first step, else μ·b + (1 − dampening)·g
        g ← g + μ·b if nesterov else b     (Sutskever et al. 2013 for Nesterov)
        p ← p − lr·g
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def step(self, closure=None):
        """One SGD update of every parameter that has a gradient."""
        loss = self._closure(closure)
        for group in self.param_groups:
            lr, mu, damp = group["lr"], group["momentum"], group["dampening"]
            wd, nesterov = group["weight_decay"], group["nesterov"]
            for p in self._params_with_grad(group):
                g = -p.grad if group["maximize"] else p.grad
                if wd != 0:
                    g = g + wd * p.data
                if mu != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    buf = g.copy() if buf is None else buf * mu + (1 - damp) * g
                    state["momentum_buffer"] = buf
                    g = g + mu * buf if nesterov else buf
                p.data -= lr * g
        return loss


# --- Adam and AdamW -------------------------------------------------------------------------------


def _lerp(start, end, weight):
    """start + weight·(end − start), evaluated as PyTorch's CPU lerp does (from the nearer end)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1), AMSGrad (Reddi et al. 2018) and, with decoupled weight decay, AdamW.

    Per parameter at step t, with g its gradient:
        p ← p·(1 − lr·wd)  if decoupled (AdamW, Loshchilov & Hutter 2019), else g ← g + wd·p
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        v̂ ← max(v̂, v) with amsgrad, else v̂ = v
        p ← p − lr/(1 − β1ᵗ) · m / (√v̂ / √(1 − β2ᵗ) + ε)
    (the bias corrections are folded in as in PyTorch, so ε is added after the √ correction).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def step(self, closure=None):
        """One Adam(W) update of every parameter that has a gradient."""
        loss = self._closure(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in self._params_with_grad(group):
                g = -p.grad if group["maximize"] else p.grad
                state = self.state.setdefault(p, {})
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = np.zeros_like(p.data)
                    state["exp_avg_sq"] = np.zeros_like(p.data)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = np.zeros_like(p.data)
                state["step"] += 1
                t = state["step"]
                if wd != 0:
                    if group["decoupled_weight_decay"]:
                        p.data *= 1 - lr * wd
                    else:
                        g = g + wd * p.data
                m = state["exp_avg"] = _lerp(state["exp_avg"], g, 1 - beta1)
                v = state["exp_avg_sq"] = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
                if group["amsgrad"]:
                    v = state["max_exp_avg_sq"] = np.maximum(state["max_exp_avg_sq"], v)
                step_size = lr / (1 - beta1**t)
                denom = np.sqrt(v) / (1 - beta2**t) ** 0.5 + eps
                p.data += -step_size * m / denom
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): p ← p·(1 − lr·wd) before the Adam step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)


# --- gradient clipping ----------------------------------------------------------------------------


def _vector_norm(a, p):
    """‖a‖_p over all elements (p = inf: max |a|, p = 0: number of non-zeros).

    An empty a has no inf, -inf or negative-order norm (no identity), so that raises, as in PyTorch.
    """
    a = np.abs(np.asarray(a))
    if a.size == 0 and (p < 0 or p == math.inf):
        raise RuntimeError(f"linalg.vector_norm cannot compute the {p:g} norm on an empty tensor because the "
                           "operation does not have an identity")
    if p == math.inf:
        return a.max()
    if p == -math.inf:
        return a.min()
    if p == 0:
        return float(np.count_nonzero(a))
    if p == 2:
        return np.sqrt(np.sum(a * a))
    return np.sum(a**p) ** (1.0 / p)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Scale all gradients together so that their total norm is at most max_norm; returns the total norm.

    The total norm is the norm of the vector of per-parameter norms, i.e. of all gradients
    concatenated; the scale is min(1, max_norm / (total + 1e-6)) (Pascanu et al. 2013), as in PyTorch.
    foreach is accepted for PyTorch's signature; there is one implementation.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not params:
        return Tensor(np.array(0.0, dtype=np.float32))
    dtype = np.result_type(*[p.grad.dtype for p in params])
    norms = [_vector_norm(_numpy(p.grad), norm_type) for p in params]
    total = np.asarray(_vector_norm(np.array(norms, dtype=dtype), norm_type), dtype=dtype)
    if error_if_nonfinite and not np.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coef = min(float(max_norm / (total + 1e-6)), 1.0)
    for p in params:
        p.grad = p.grad * coef  # a new array: a grad may be shared with another tensor's
    return Tensor(total)


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp every gradient elementwise to [-clip_value, clip_value]; foreach as in clip_grad_norm_."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    clip_value = float(clip_value)
    for p in parameters:
        if p.grad is not None:
            p.grad = p.grad.clip(-clip_value, clip_value)  # a new array, as in clip_grad_norm_


# --- learning-rate schedules ----------------------------------------------------------------------


class LRScheduler:
    """Base of the schedules: sets each group's "lr" from its base lr ("initial_lr") and the step count.

    Construction applies step 0; call `step()` once after each `optimizer.step()`.
    """

    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        for i, g in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                g.setdefault("initial_lr", g["lr"])
            elif "initial_lr" not in g:
                raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] when resuming an optimizer")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def get_lr(self):
        """The learning rate of each group at step self.last_epoch."""
        raise NotImplementedError

    def step(self):
        """Advance one step and write the new learning rates into the optimizer."""
        self.last_epoch += 1
        self._last_lr = list(self.get_lr())
        for g, lr in zip(self.optimizer.param_groups, self._last_lr):
            g["lr"] = lr

    def get_last_lr(self):
        """The learning rates the last step() set."""
        return list(self._last_lr)

    _unsaved = ("optimizer",)

    def state_dict(self):
        """Everything but the optimizer (and functions)."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in self._unsaved}

    def load_state_dict(self, state_dict):
        """Restore the step count and settings saved by state_dict()."""
        self.__dict__.update(copy.deepcopy(state_dict))


class LambdaLR(LRScheduler):
    """lr = base_lr · lr_lambda(step), with one function or one per group."""

    _unsaved = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"Expected {n} lr_lambdas, but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base * f(self.last_epoch) for base, f in zip(self.base_lrs, self.lr_lambdas)]

    def state_dict(self):
        """As LRScheduler's, plus "lr_lambdas": the attributes of each lambda that is a callable object
        (None for a plain function), as PyTorch saves them."""
        state = super().state_dict()
        state["lr_lambdas"] = [None if isinstance(f, types.FunctionType) or not hasattr(f, "__dict__")
                               else copy.deepcopy(f.__dict__) for f in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict):
        """Restore the step count and settings, and the attributes of callable-object lambdas."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("lr_lambdas", None) or []
        super().load_state_dict(state_dict)
        for f, attrs in zip(self.lr_lambdas, saved):
            if attrs is not None:
                f.__dict__.update(copy.deepcopy(attrs))


class WarmupCosine(LRScheduler):
    """Linear warmup from 0 to the base lr over warmup_steps, then a cosine decay to min_lr at total_steps.

        lr(t) = base · t / warmup                                    for t < warmup
        lr(t) = min_lr + (base − min_lr) · ½(1 + cos(π · progress)),  progress = (t − warmup) / (total − warmup)

    progress is clamped to 1, so lr stays at min_lr after total_steps (SGDR's cosine, Loshchilov &
    Hutter 2017, without restarts; the schedule of Hugging Face's get_cosine_schedule_with_warmup).
    min_lr is one value or one per group.
    """

    def __init__(self, optimizer, warmup_steps, total_steps, min_lr=0.0, last_epoch=-1):
        if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
            raise ValueError(f"WarmupCosine: need 0 <= warmup_steps <= total_steps and total_steps > 0, got "
                             f"warmup_steps={warmup_steps}, total_steps={total_steps}")
        n = len(optimizer.param_groups)
        self.min_lrs = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * n
        if len(self.min_lrs) != n:
            raise ValueError(f"WarmupCosine: expected {n} min_lr values, got {len(self.min_lrs)}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t, w = self.last_epoch, self.warmup_steps
        if t < w:
            return [base * t / w for base in self.base_lrs]
        progress = min(1.0, (t - w) / max(1, self.total_steps - w))
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return [lo + (base - lo) * cos for base, lo in zip(self.base_lrs, self.min_lrs)]


# --- EMA of weights -------------------------------------------------------------------------------


class EMA:
    """An exponential moving average of a model's parameters: shadow ← decay·shadow + (1 − decay)·param.

    Call `update()` after each optimizer step. To evaluate with the averaged weights:
        ema.store(); ema.copy_to(); evaluate(model); ema.restore()
    Buffers (e.g. BatchNorm running statistics) are not averaged; the model's own are used.
    """

    def __init__(self, model, decay=0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        self.model, self.decay, self.num_updates = model, decay, 0
        self.shadow = OrderedDict((name, p.data.copy()) for name, p in model.named_parameters())
        self.backup = None

    def _params(self, model):
        params = OrderedDict((model or self.model).named_parameters())
        if list(params) != list(self.shadow):
            raise ValueError("EMA: the model's parameter names differ from those the EMA was made with")
        return params

    def update(self, model=None):
        """Move every shadow weight a step (1 − decay) toward the current weight."""
        for name, p in self._params(model).items():
            self.shadow[name] = self.decay * self.shadow[name] + (1 - self.decay) * p.data
        self.num_updates += 1

    def copy_to(self, model=None):
        """Write the averaged weights into the model's parameters (in place)."""
        for name, p in self._params(model).items():
            p.data[...] = self.shadow[name]

    def store(self, model=None):
        """Keep a copy of the model's current weights, to put back with restore()."""
        self.backup = OrderedDict((name, p.data.copy()) for name, p in self._params(model).items())

    def restore(self, model=None):
        """Put back the weights saved by store()."""
        if self.backup is None:
            raise RuntimeError("EMA.restore: nothing stored; call store() first")
        for name, p in self._params(model).items():
            p.data[...] = self.backup[name]
        self.backup = None

    def state_dict(self):
        """{"decay", "num_updates", "shadow": {name: ndarray}} (copies)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": OrderedDict((k, _numpy(v)) for k, v in self.shadow.items())}

    def load_state_dict(self, state_dict):
        """Restore decay, count and shadow weights, checking names and shapes."""
        shadow = state_dict["shadow"]
        if list(shadow) != list(self.shadow):
            missing = [k for k in self.shadow if k not in shadow]
            unexpected = [k for k in shadow if k not in self.shadow]
            raise ValueError(f"EMA.load_state_dict: missing {missing}, unexpected {unexpected}")
        for k, v in shadow.items():
            if tuple(np.shape(v)) != self.shadow[k].shape:
                raise ValueError(f"EMA.load_state_dict: {k} has shape {tuple(np.shape(v))}, "
                                 f"expected {self.shadow[k].shape}")
        params = OrderedDict(self.model.named_parameters())
        self.shadow = OrderedDict((k, _like(v, params[k])) for k, v in shadow.items())
        self.decay, self.num_updates = state_dict["decay"], int(state_dict["num_updates"])
