"""Extraction with ``engine="ray"`` against ``engine="local"`` on this machine.

1. Writes a concept world of ``--n`` images (64 px) and trains the demo CNN for one epoch (the
   weights do not matter for timing).
2. Local side: ``conceptlens.core.extract.extract`` of ``conv3, conv4`` (mean-pooled, batch 64)
   into a fresh store, in this process with its default threads: hashing the manifest's images,
   reading and preprocessing them, the forward passes, writing the store.
3. Ray side: the same call with ``engine="ray"`` on a local Ray instance of ``--cpus`` CPUs,
   started before the timer (its start-up is printed separately, not counted): the same hashing
   in the driver, then one actor per CPU (one torch thread each) that loads the model and
   extracts its shards, the driver appending them to the store. Both stores are checked equal
   bit for bit.
4. ``ray_local_overhead``: Ray seconds / local seconds (target ≤ 1.3).

5. ``ray_shard_merge_seconds_topk``: the driver's share of a Ray top-k (``conceptlens --engine ray
   topk``): merging ``--shards`` per-shard ``TopK(k=16)`` accumulators of ``conv3, conv4`` in row
   order (the shards' accumulators are filled beforehand, locally, one per row range, and the
   merged result is checked equal to one pass over all rows). Dissection is not merged across
   shards yet, so its figure is not measured.

    python benchmarks/scale.py [--n 5000] [--cpus 2] [--shards 8]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from conceptlens.core.engine import shard_ranges
from conceptlens.core.extract import extract, iter_activations
from conceptlens.core.topk import TopK
from conceptlens.data import Manifest, make_loader
from conceptlens.demo_model import train_demo
from conceptlens.models import load_model
from conceptlens.world import generate_world


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = generate_world(tmp / "world", n=args.n, size=64, seed=0, n_concept=4, n_random=8, progress=False)
        train_demo(world.root, tmp / "demo.pt", epochs=1, progress=False, device="cpu")
        model = load_model(f"demo:{tmp / 'demo.pt'}", device="cpu")
        layers = ["conv3", "conv4"]

        t = time.perf_counter()
        local = extract(model, world.manifest, layers, tmp / "local", progress=False)
        local_s = time.perf_counter() - t

        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        startup_s = time.perf_counter() - t
        t = time.perf_counter()
        remote = extract(model, world.manifest, layers, tmp / "ray", progress=False, engine="ray", shards=args.shards)
        ray_s = time.perf_counter() - t
        ray.shutdown()
        same = local.meta == remote.meta and all(np.array_equal(local.array(n), remote.array(n)) for n in layers)
        print(f"{args.n} images, layers {', '.join(layers)} (mean-pooled), batch 64: local {local_s:.2f} s, ray "
              f"{ray_s:.2f} s ({args.cpus} actors, {args.shards} shards; Ray start-up {startup_s:.2f} s not counted); "
              f"stores identical: {same}")
        if not same:
            raise SystemExit("the Ray store differs from the local one")
        manifest = Manifest.read(world.manifest)

        def filled(rows):
            acc = TopK(16, "max", layers)
            batches = make_loader(manifest, model.preprocessing, batch_size=64, rows=rows)
            for r, _, raw in iter_activations(model, batches, layers, keep_raw=acc.reduce):
                acc.update(r, raw)
            return acc

        parts = [filled(range(a, b)) for a, b in shard_ranges(args.n, 64, args.shards)]
        t = time.perf_counter()
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        merge_s = time.perf_counter() - t
        whole = filled(range(args.n)).result()
        exact = all(np.array_equal(a, b) for layer in layers for a, b in zip(merged.result()[layer], whole[layer]))
        print(f"top-k (k=16) of {len(parts)} shards merged in {merge_s:.4f} s; equal to one pass: {exact}; "
              "dissection: not merged across shards yet")
        print(f"BENCH ray_local_overhead {ray_s / local_s:.2f}")
        print(f"BENCH ray_shard_merge_seconds_topk {merge_s:.4f}")


if __name__ == "__main__":
    main()
