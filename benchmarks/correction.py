"""RRR (Ross et al. 2017) on decoy digits: accuracy it recovers, and what it costs per epoch.

1. Writes decoy digits and their clean twin (sklearn's 1,797 real 8x8 scans upsampled to SIZE px;
   a class-coloured corner patch in train, a random class's colour in test) for each seed.
2. Trains the demo CNN three ways with the same schedule, data, batch size, epochs and seed:
   plain on decoy digits, plain on clean digits (the baseline), and with the RRR penalty
   (``conceptlens.correction.train_rrr``'s loss, λ = ``--weight``) on decoy digits.
3. ``rrr_decoy_acc_gain``: mean over seeds of RRR test accuracy − plain test accuracy on decoy
   digits, in percentage points (Ross et al. on decoy MNIST: 96.1 − 51.6 = 44.5 points). The clean
   baseline and RRR's gap to it are printed too (the paper's criterion: RRR ≈ clean).
4. ``rrr_train_overhead``: RRR seconds per epoch / plain seconds per epoch, both on decoy digits.
   Each side times only the training loop's epochs (``demo_model._fit``: batch order, shift
   augmentation, forward, loss, backward, optimiser step; for RRR also the input-gradient with
   ``create_graph=True``, the masked penalty and its double backward, and shifting the masks) —
   not reading images, normalising, evaluating or saving. Per side, the median epoch over all
   seeds is used (the first epoch, which pays allocator warm-up, counts like any other).
   Anchor: Ross et al.-style RRR costs about 13x on EfficientNet (deeper nets pay more for
   double backward than this 4-layer CNN).

    python benchmarks/correction.py [--size 16] [--epochs 4] [--seeds 0,1,2] [--weight 10]

λ = 10 is tuned at 16 px; at 32 px use ``--weight 100`` (λ = 10 there recovers far less).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from conceptlens.correction.rrr import DEFAULT_RRR_WEIGHT, _load_masks, rrr_penalty
from conceptlens.demo_model import _train
from conceptlens.world.digits import generate_decoy_digits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--weight", type=float, default=DEFAULT_RRR_WEIGHT)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    acc = {"plain": [], "clean": [], "rrr": []}
    secs = {"plain": [], "rrr": []}
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=3e-3, device=args.device, progress=False,
                  manifest=None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in seeds:
            decoy = generate_decoy_digits(tmp / f"decoy{seed}", size=args.size, seed=seed)
            clean = generate_decoy_digits(tmp / f"clean{seed}", size=args.size, seed=seed, decoy=False)
            side, ep = _train(decoy, tmp / "plain.pt", seed=seed, **common)
            acc["plain"].append(side["test_accuracy"])
            secs["plain"] += ep
            side, _ = _train(clean, tmp / "clean.pt", seed=seed, **common)
            acc["clean"].append(side["test_accuracy"])
            side, ep = _train(decoy, tmp / "rrr.pt", seed=seed, **common,
                              penalty=lambda model, x, y, mask: rrr_penalty(model, x, mask, args.weight),
                              aux=lambda m: _load_masks(m, "mask"))
            acc["rrr"].append(side["test_accuracy"])
            secs["rrr"] += ep
            print(f"seed {seed}: test accuracy plain {acc['plain'][-1]:.3f}, clean {acc['clean'][-1]:.3f}, "
                  f"rrr {acc['rrr'][-1]:.3f}", flush=True)
    mean = {k: 100 * float(np.mean(v)) for k, v in acc.items()}
    print(f"size {args.size} px, {args.epochs} epochs, batch {args.batch_size}, λ {args.weight:g}, seeds {seeds}, "
          f"{args.device}: mean test accuracy plain {mean['plain']:.1f} %, clean {mean['clean']:.1f} %, "
          f"rrr {mean['rrr']:.1f} % (rrr − clean {mean['rrr'] - mean['clean']:+.1f} points); "
          f"median epoch plain {np.median(secs['plain']):.3f} s, rrr {np.median(secs['rrr']):.3f} s")
    print(f"BENCH rrr_decoy_acc_gain {mean['rrr'] - mean['plain']:.1f}")
    print(f"BENCH rrr_train_overhead {np.median(secs['rrr']) / np.median(secs['plain']):.2f}")


if __name__ == "__main__":
    main()
