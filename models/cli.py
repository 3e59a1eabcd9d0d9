"""The `t2i` command line.

    t2i --version
    t2i verify [--trials N] [--seed S] [--op NAME ...] [--json]
    t2i bench [family ...] [--device cpu|cuda] [--threads N] [--quick] [--full] [--json] [--out DIR]
    t2i train MODEL [--data digits|shapes|text] [--steps N] [--seed S] [--batch-size B] --out CKPT
    t2i sample MODEL --ckpt CKPT [--n 64] [--label K] [--guidance W] [--steps N] [--seed S] -o grid.png
    t2i sample gpt --ckpt CKPT --prompt "a red" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    t2i eval MODEL --ckpt CKPT [--json]

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and sets
`run=<function(args) -> exit code>`; `main` parses and dispatches. To add a command, write the pair
and list the adder in `COMMANDS`.

Exit codes: 0 success, 1 a check failed (or a requirement is missing), 2 bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import warnings


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("t2i")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def _non_negative_int(text):
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {n}")
    return n


# --- t2i verify -------------------------------------------------------------------------------


def _add_verify(sub):
    p = sub.add_parser(
        "verify",
        help="check every op against PyTorch (forward and gradient)",
        description="Run every op of core on random float64 inputs and compare its output and input "
        "gradients with PyTorch's on the same inputs. Prints one row per op with its worst error "
        "over the trials; exits 1 if any op fails.",
    )
    p.add_argument("--trials", type=_positive_int, default=3, metavar="N",
                   help="random inputs per op (default: 3)")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                   help="seed of the random inputs (default: 0)")
    p.add_argument("--op", action="extend", nargs="+", metavar="NAME", dest="ops",
                   help="check only these ops (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of a table")
    p.set_defaults(run=_verify, parser=p)


def _verify(args) -> int:
    try:
        import torch  # noqa: F401 - only to fail early with a useful message
    except ImportError:
        print("t2i verify needs PyTorch: pip install -e '.[test]'", file=sys.stderr)
        return 1
    from core import verify

    if args.ops:
        known = {c.name: c for c in verify.all_cases()}
        unknown = [n for n in args.ops if n not in known]
        if unknown:
            args.parser.error(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        untestable = [n for n in args.ops if not known[n].torch]
        if untestable:
            args.parser.error(f"op(s) {', '.join(untestable)} have no PyTorch equivalent (random ops); "
                              "they are checked by the statistical tests instead")
    with warnings.catch_warnings():  # PyTorch's own deprecation notices say nothing about our ops
        warnings.filterwarnings("ignore", module=r"torch(\.|$)")
        results = verify.verify(trials=args.trials, seed=args.seed, names=args.ops)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps(_json_report(results, args), indent=2, allow_nan=False))
    else:
        print(_table(results))
        for r in failed:
            print(f"FAILED {r.name}: {r.message}")
        print(f"{len(results)} ops, {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _finite(x):
    """A float for JSON: None where the error is not finite (the op crashed or shapes differ)."""
    return float(x) if math.isfinite(x) else None


def _json_report(results, args):
    return {
        "trials": args.trials,
        "seed": args.seed,
        "ops": len(results),
        "passed": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "results": [
            {"op": r.name, "max_abs_error": _finite(r.max_abs), "max_rel_error": _finite(r.max_rel),
             "pass": bool(r.ok), "message": r.message}
            for r in results
        ],
    }


def _table(results) -> str:
    """Aligned columns: op | max abs error | max rel error | pass."""
    header = ("op", "max abs error", "max rel error", "pass")
    rows = [(r.name, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", "ok" if r.ok else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row):
        # names left-aligned, numbers right-aligned so their exponents line up
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2]), row[3].ljust(widths[3])]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# --- t2i bench --------------------------------------------------------------------------------


def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="benchmark the kernels against NumPy, PyTorch and this machine's peak",
        description="Time each kernel family (attention, conv, gumbel, schedule) over a sweep of sizes: our "
        "kernel, the NumPy reference, the engine op and PyTorch, with GFLOP/s or GB/s, the fraction of this "
        "machine's measured peak, the ratio to PyTorch and the peak memory. Prints a table and writes "
        "<device>-<date>.json and PNG plots (default: bench/results/).",
    )
    from bench.cli import add_arguments  # argparse only: the benchmarks import numba/torch when they run

    add_arguments(p)
    p.set_defaults(run=_bench)


def _bench(args) -> int:
    from bench.cli import run

    return run(args)


# --- t2i train / sample / eval (the models of models/registry.py) --------------------------------

# = models.registry.MODELS and DATASETS (not imported: --help stays fast; a test checks they agree)
_MODELS = ("gan", "vae", "glow", "ddpm", "gpt", "bert", "vit", "clip", "vqvae", "dvae", "vqgan")
_DATASETS = ("digits", "shapes", "text")


def _float_where(ok, what):
    """An argparse type: a finite float x with ok(x), else the message "must be <what>"."""

    def parse(text):
        x = float(text)
        if not (math.isfinite(x) and ok(x)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return x

    return parse


_positive_float = _float_where(lambda x: x > 0, "a positive number")
_probability = _float_where(lambda x: x <= 1 and x > 0, "in (0, 1]")
_finite_float = _float_where(lambda x: True, "a finite number")


def _key_value(text):
    """KEY=VALUE with VALUE parsed as JSON when it can be (numbers, true/false, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_model_argument(p):
    p.add_argument("model", choices=_MODELS, metavar="MODEL", help=f"one of: {', '.join(_MODELS)}")


def _load(args):
    """(module, model, cfg) of `args.model` from `args.ckpt`; a missing or foreign file is a usage error."""
    import os

    from models import registry
    from models.train import read_checkpoint

    module = registry.get(args.model)
    if not os.path.isfile(args.ckpt):
        raise registry.UsageError(f"--ckpt {args.ckpt}: no such file" + (" (a directory)" if os.path.isdir(args.ckpt)
                                                                           else ""))
    saved = read_checkpoint(args.ckpt)["model"]
    if saved != args.model:
        raise registry.UsageError(f"--ckpt {args.ckpt} holds a {saved!r} model, not {args.model!r}")
    model, cfg = module.load(args.ckpt)
    return module, model, cfg


def _usage_errors(run):
    """Run `run(args)`, turning a UsageError (or a core.serialize error about the file) into exit code 2."""

    def wrapped(args):
        from core.serialize import SerializationError
        from models.registry import UsageError

        try:
            return run(args)
        except (UsageError, SerializationError) as e:
            args.parser.error(str(e))

    return wrapped


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a model (gan, vae, glow, ddpm, gpt, bert, vit, clip, vqvae, dvae, vqgan)",
        description="Train MODEL from scratch with its default (measured) configuration, showing a progress "
        "bar with the loss and speed. The checkpoint --out is written atomically every few hundred steps and "
        "at the end; running the same command again resumes from it (a resumed run equals an uninterrupted "
        "one), and a larger --steps continues training.",
    )
    _add_model_argument(p)
    p.add_argument("--data", choices=_DATASETS, help="dataset (default: the model's own: digits for the image "
                   "generators and vit, text for gpt and bert, shapes for clip and the tokenizers)")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="training steps (default: the model's)")
    p.add_argument("--seed", type=_non_negative_int, metavar="S", help="seed of weights, noise and batches")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="batch size (default: the model's)")
    p.add_argument("--lr", type=_positive_float, metavar="LR", help="learning rate (default: the model's)")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="any other field of the model's Config, e.g. --set conditional=false (repeatable)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint path, e.g. gan.safetensors")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_usage_errors(_train), parser=p)


def _train(args) -> int:
    from models import registry

    module = registry.get(args.model)
    flags = dict(steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    overrides = dict(args.overrides, **{k: v for k, v in flags.items() if v is not None})  # (unset flags: --set's)
    from models.train import check_out_path

    check_out_path(args.out)
    try:
        cfg = registry.config(module, args.data, **overrides)
    except (TypeError, ValueError) as e:
        raise registry.UsageError(str(e)) from None
    summary = module.train(cfg, args.out, resume=not args.no_resume, progress=not args.quiet)
    speed = f", {summary['it_per_s']:.2f} steps/s" if summary.get("it_per_s") else ""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("loss", {}).items())
    print(f"{args.model} on {cfg.data}: steps {summary['start']}->{summary['steps']} in "
          f"{summary['seconds'] / 60:.1f} min{speed}; {losses or 'no new steps'}; checkpoint {args.out}")
    return 0


def _add_sample(sub):
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained model (a PNG grid of images, or text)",
        description="Load MODEL from --ckpt, draw --n samples (for a conditional model: of class --label, or "
        "all classes in turn) and write them as one PNG grid; an image tokenizer shows originals above their "
        "reconstructions; a text model prints its continuations of --prompt (and writes them to -o if given).",
    )
    _add_model_argument(p)
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint written by t2i train")
    p.add_argument("--n", type=_positive_int, default=64, metavar="N", help="number of samples (default: 64)")
    p.add_argument("--label", type=_non_negative_int, metavar="K", help="class of every sample (conditional models)")
    p.add_argument("--guidance", type=_finite_float, metavar="W", help="classifier-free guidance weight w (diffusion): "
                   "(1+w)·ε(x,c) − w·ε(x), so w = 0 is the plain conditional model")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="sampling steps (diffusion)")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the noise (default: 0)")
    p.add_argument("--prompt", metavar="TEXT", help="text to continue or fill in (text models)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N", help="tokens to generate (gpt)")
    p.add_argument("--temperature", type=_positive_float, metavar="T", help="softmax temperature (gpt)")
    p.add_argument("--top-k", type=_positive_int, metavar="K", help="sample among the K likeliest tokens (gpt)")
    p.add_argument("--top-p", type=_probability, metavar="P", help="nucleus sampling mass in (0, 1] (gpt)")
    p.add_argument("--nrow", type=_positive_int, metavar="K", help="images per row (default: about √n)")
    p.add_argument("-o", "--output", metavar="PATH", help="where to write the grid (PNG; required for images)")
    p.set_defaults(run=_usage_errors(_sample), parser=p)


_TEXT_MODELS = ("gpt", "bert")  # their samples are text; every other model's an image grid
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SAMPLE_OPTIONS = ("label", "guidance", "steps", "prompt", "max_new_tokens", "temperature", "top_k", "top_p")


def _sample(args) -> int:
    from models.registry import UsageError
    from models.train import check_out_path, limit_threads, save_grid

    module, model, cfg = _load(args)
    if args.output:
        check_out_path(args.output, "-o")
        if args.model not in _TEXT_MODELS and not args.output.lower().endswith(_IMAGE_SUFFIXES):
            raise UsageError(f"-o {args.output}: {args.model} draws an image grid, which needs an image file name "
                             "(grid.png)")
    options = {k: getattr(args, k) for k in _SAMPLE_OPTIONS if getattr(args, k) is not None}
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    pairs = "nrow" in inspect.signature(module.sample).parameters  # a tokenizer: originals above reconstructions
    if pairs:
        options["nrow"] = nrow
    try:
        with limit_threads(1):
            out = module.sample(model, cfg, args.n, seed=args.seed, **options)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        flag = str(e).rsplit("'", 2)[-2].replace("_", "-") if str(e).count("'") >= 2 else "this option"
        raise UsageError(f"{args.model} does not take --{flag}") from None
    if isinstance(out, list):  # text
        text = "\n\n".join(out)
        print(text)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return 0
    if not args.output:
        raise UsageError(f"{args.model} draws images: give -o grid.png")
    save_grid(out, args.output, nrow=nrow)
    what = "originals above their reconstructions" if pairs else "images"
    print(f"{args.n} {what} of {args.model} ({cfg.data}) -> {args.output}")
    return 0


def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="measure a trained generator beside baselines measured in the same run",
        description="Load MODEL from --ckpt and print its figures (FD-classifier, class agreement, ELBO, "
        "bits/dim, ... whichever the model has), each beside its baselines measured in the same run.",
    )
    _add_model_argument(p)
    p.add_argument("--ckpt", required=True, metavar="PATH", help="checkpoint written by t2i train")
    p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the samples (default: 0)")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of a table")
    p.set_defaults(run=_usage_errors(_eval), parser=p)


def _eval(args) -> int:
    from models.train import format_figures, limit_threads

    module, model, cfg = _load(args)
    with limit_threads(1):  # as in training: a second BLAS thread only spins on these sizes
        result = module.evaluate(model, cfg, seed=args.seed)
    print(json.dumps(result, indent=2) if args.json else format_figures(result))
    return 0


# --- entry point ------------------------------------------------------------------------------

COMMANDS = [_add_verify, _add_bench, _add_train, _add_sample, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="t2i",
        description="A from-scratch text-to-image codebase: autograd engine, kernels and models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen command and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
