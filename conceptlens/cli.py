"""``conceptlens <command>``: a thin layer that parses arguments and calls the Python API.

User errors (:class:`~conceptlens.errors.ConceptLensError`) print one line on stderr and exit with
status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import ConceptLensError

logger = logging.getLogger("conceptlens")


def _floats3(text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}")
    return values


def _csv_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_model_args(p, layers=True):
    p.add_argument("--model", required=True, help="model spec: demo:W.pt | torchvision:ARCH[:W.pt] | python:MOD:FACTORY[:W.pt] | export:P.pt2")
    p.add_argument("--num-classes", type=int, default=None, help="head size for torchvision architectures (default: from the weights, else 1000)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when present)")
    if layers:
        p.add_argument("--layers", required=True, type=_csv_list, help="comma-separated layer names (see `conceptlens layers MODEL`)")


def _add_data_args(p):
    p.add_argument("--data", required=True, help="data manifest CSV (column 'image', paths relative to the CSV)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted and listed) instead of failing")
    p.add_argument("--resize", type=int, default=None, help="resize the shorter side to N pixels (default: the model's)")
    p.add_argument("--crop", type=int, default=None, help="centre crop to N x N (0: no crop; default: the model's)")
    p.add_argument("--mean", type=_floats3, default=None, help="normalisation mean R,G,B (default: the model's)")
    p.add_argument("--std", type=_floats3, default=None, help="normalisation std R,G,B (default: the model's)")


def _preprocessing(args, model, manifest):
    import dataclasses

    prep = manifest.resolve_preprocessing(model.preprocessing, resize=args.resize, mean=args.mean, std=args.std)
    if args.crop is not None:
        prep = dataclasses.replace(prep, crop=args.crop or None)
    return prep


def _cmd_world(args):
    from .world import generate_world

    t0 = time.perf_counter()
    world = generate_world(
        args.out,
        preset=args.preset,
        n=args.n,
        size=args.size,
        seed=args.seed,
        tag_bias=args.tag_bias,
        subclass=not args.no_subclass,
        label_noise=args.label_noise,
        near_duplicates=args.near_duplicates,
    )
    print(f"concept world ({args.preset}, {args.n} images, {args.size} px, seed {args.seed}) in {world.root} "
          f"[{time.perf_counter() - t0:.1f} s]")
    print(f"  manifest: {world.manifest}\n  broden:   {world.broden}\n  concepts: {world.concepts}\n  random:   {world.random}")


def _cmd_train_demo(args):
    from .demo_model import train_demo

    side = train_demo(args.world, args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"demo CNN saved to {args.out} (+ sidecar {Path(args.out).with_suffix('.json')}): "
          f"test accuracy {side['test_accuracy']:.3f}, trained in {side['train_seconds']:.0f} s")


def _cmd_layers(args):
    from .models import list_layers, load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    frame = list_layers(model, input_size=args.input_size)
    with __import__("pandas").option_context("display.max_rows", None, "display.width", 200):
        print(frame.to_string(index=False))


def _cmd_extract(args):
    from .data import Manifest
    from .models import load_model
    from .representation.extract import extract

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    store = extract(
        model,
        manifest,
        args.layers,
        args.out,
        pool=args.pool,
        dtype=args.dtype,
        batch_size=args.batch_size,
        num_workers=args.workers,
        skip_bad=args.skip_bad,
        preprocessing=_preprocessing(args, model, manifest),
        progress=not args.quiet,
    )
    _print_store(store)


def _print_store(store):
    print(f"activation store {store.path}: {store.n_rows} rows, pool {store.pool}, dtype {store.meta['dtype']}")
    for layer in store.layers:
        print(f"  {layer:<24} {'x'.join(map(str, store.shape(layer)))}")
    if store.skipped:
        print(f"  skipped {len(store.skipped)} unreadable images:")
        for s in store.skipped:
            print(f"    {s['image']}: {s['error']}")


def _cmd_demo(args):
    from .data import Manifest
    from .demo_model import train_demo
    from .models import load_model
    from .representation.extract import extract
    from .world import generate_world

    out = Path(args.out)
    n, epochs = (1200, 12) if args.quick else (2000, 15)
    t0 = time.perf_counter()
    world = generate_world(out / "world", n=n, size=64, seed=args.seed)
    print(f"[{time.perf_counter() - t0:5.1f} s] concept world: {n} images in {world.root}")
    weights = out / "model" / "demo.pt"
    side = train_demo(world.root, weights, epochs=epochs, seed=args.seed, progress=not args.quiet)
    print(f"[{time.perf_counter() - t0:5.1f} s] demo CNN: test accuracy {side['test_accuracy']:.3f} ({weights})")
    model = load_model(f"demo:{weights}", device=args.device)
    layers = ["conv1", "conv2", "conv3", "conv4"]
    store = extract(model, Manifest.read(world.manifest), layers, out / "activations", pool="mean", progress=not args.quiet)
    print(f"[{time.perf_counter() - t0:5.1f} s] activations extracted")
    _print_store(store)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="conceptlens",
        description="Explain what a PyTorch vision model has learned: concepts, units, layers, attributions.",
    )
    parser.add_argument("--version", action="version", version=f"conceptlens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log automatic choices (INFO)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # The global flags are accepted after the command too (`conceptlens demo -q`); SUPPRESS keeps a
    # subcommand from resetting a flag given before it.
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log automatic choices (INFO)")
    flags.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = _Subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"), flags)

    p = sub.add_parser("world", help="generate a procedural concept world (images, manifest, Broden set, concepts)")
    p.add_argument("--preset", default="shapes", choices=["shapes"])
    p.add_argument("--n", type=int, default=1200, help="classification images (default 1200)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag-bias", type=float, default=0.9, help="tag/class association in training, 0 (none) to 1 (default 0.9)")
    p.add_argument("--no-subclass", action="store_true", help="no hidden sub-class")
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels flipped (default 0)")
    p.add_argument("--near-duplicates", type=int, default=0, help="test images planted as near-copies of train images")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("train-demo", help="train the demo CNN on a concept world")
    p.add_argument("--world", required=True, help="concept world directory")
    p.add_argument("--out", required=True, help="weights file to write (.pt; sidecar .json beside it)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_demo)

    p = sub.add_parser("layers", help="list a model's layers with output shapes")
    p.add_argument("model", help="model spec (see `conceptlens extract --help`)")
    p.add_argument("--input-size", type=int, default=224, help="square input side for the shape trace (default 224)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("extract", help="capture layer activations of a manifest into an activation store")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--pool", default="mean", help="none | mean | max | adaptive:K (default mean)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="auto: float32 pooled, float16 spatial")
    p.add_argument("--out", required=True, help="store directory (resumed if unfinished, rebuilt if stale)")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("demo", help="concept world → demo CNN → activations, on the embedded default")
    p.add_argument("--out", default="conceptlens-demo", help="output directory (default ./conceptlens-demo)")
    p.add_argument("--quick", action="store_true", help="smaller world and shorter training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)
    return parser


class _Subcommands:
    """``add_subparsers()`` whose parsers all inherit the global flags."""

    def __init__(self, action, flags):
        self.action, self.flags = action, flags

    def add_parser(self, name, **kw):
        return self.action.add_parser(name, parents=[self.flags], **kw)


class _OneLine(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.name == "py.warnings":  # "file:line: UserWarning: text\n  source" → "text"
            msg = msg.split("Warning: ", 1)[-1].splitlines()[0]
        return f"conceptlens: {record.levelname.lower()}: {msg}"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    try:
        args.func(args)
    except ConceptLensError as exc:
        print(f"conceptlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptlens: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
