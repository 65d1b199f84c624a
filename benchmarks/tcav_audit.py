"""TCAV bias audits on seeded concept worlds: power against a planted shortcut, false fails without one.

For each of ``--worlds`` seeds, two concept worlds are generated and a demo CNN is trained on each
(``train_demo``, ``--epochs``):

* **biased**: ``tag_bias=0.95`` (in training, 95 % of the way from the base rate to "every circle
  carries the tag"), ``--biased-images`` (40) images per concept folder;
* **unbiased**: ``tag_bias=0`` (the tag as common in every class), ``--unbiased-images`` (100).

On each model the default audit runs as a user would type it: ``TCAV(model, ["conv3", "conv4"])``
with every default (split design, runs chosen from the concept images, 200 null runs,
Mann-Whitney test, margin 0.1), concept ``tag`` against the world's random pool, class ``circle``
with all its manifest rows as inputs, then ``result.audit(["tag:circle"])``.

Figures (fractions of worlds; nothing here is timed):

* ``tcav_audit_power``: biased worlds whose audit is ``fail`` (target >= 0.95);
* ``tcav_audit_false_fail``: unbiased worlds whose audit is ``fail`` (target <= 0.05);
* ``tcav_audit_unbiased_pass``: unbiased worlds whose audit is ``pass`` (insensitivity shown);
  the rest are ``inconclusive``.

A model trained without the shortcut may still respond to the tag a little (nothing forbids it),
so ``false_fail`` measures the audit and the training together; the calibration of the test itself
on concepts with no signal at all is checked in ``tests/test_tcav.py``.

Worlds: ``--n`` images at ``--size`` px (default 800 at 48 px) and 240 random-pool images; each
world and model is built in a temporary folder. Usage:
python benchmarks/tcav_audit.py [--worlds 20] [--epochs 10]
"""

import argparse
import logging
import tempfile
import time
from pathlib import Path


from conceptlens.concepts import TCAV
from conceptlens.demo_model import train_demo
from conceptlens.models import load_model
from conceptlens.world import generate_world


def audit_world(root, seed, tag_bias, n_concept, args):
    world = generate_world(root / "world", n=args.n, size=args.size, seed=seed, n_concept=n_concept, n_random=240,
                           tag_bias=tag_bias, progress=False)
    side = train_demo(world.root, root / "demo.pt", epochs=args.epochs, seed=seed, progress=False)
    model = load_model(f"demo:{root / 'demo.pt'}")
    result = TCAV(model, ["conv3", "conv4"], seed=seed, progress=False).run(
        world.concepts, world.root / "random", ["circle"], world.root / "manifest.csv", concept_names=["tag"])
    row = result.audit(["tag:circle"]).iloc[0]
    return row, side["test_accuracy"], result.provenance["parameters"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--biased-images", type=int, default=40)
    parser.add_argument("--unbiased-images", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    counts = {"biased": {}, "unbiased": {}}
    t0 = time.perf_counter()
    for k in range(args.worlds):
        for kind, bias, images in (("biased", 0.95, args.biased_images), ("unbiased", 0.0, args.unbiased_images)):
            with tempfile.TemporaryDirectory() as d:
                row, accuracy, params = audit_world(Path(d), 100 + k, bias, images, args)
            counts[kind][row.verdict] = counts[kind].get(row.verdict, 0) + 1
            print(f"world {k:2d} {kind:8s} test acc {accuracy:.3f}  {params['runs']} runs x {params['concept_size']}: "
                  f"{row.verdict.upper():12s} {row.evidence}", flush=True)
    n = args.worlds
    print(f"{n} worlds of each kind in {time.perf_counter() - t0:.0f} s; verdicts: {counts}")
    print(f"BENCH tcav_audit_power {counts['biased'].get('fail', 0) / n:.3f}")
    print(f"BENCH tcav_audit_false_fail {counts['unbiased'].get('fail', 0) / n:.3f}")
    print(f"BENCH tcav_audit_unbiased_pass {counts['unbiased'].get('pass', 0) / n:.3f}")


if __name__ == "__main__":
    main()
