"""TCAV: conceptlens vs captum on the same experiment, and against the compute floor.

torchvision resnet18 (random init, 10 classes), 64 px images, 1 concept set + 10 random sets x 50
images (550 images), 100 class inputs (target class 3), layers ``layer3`` and ``layer4``. Images are
synthetic PNGs written to a temporary folder; the experiment uses a seeded part of the random ones (a random-init network makes their content irrelevant
for timing; both tools read the same files with the same preprocessing).

The experiment is conceptlens' own (split design, 10 runs, ``null_runs=10`` so that captum can be
handed the same sets; our default is 200): 10 concept-vs-random CAVs plus 10 random-vs-random null
CAVs per layer, every set of 5 images (the concept's 50 split among the runs, random sets of equal
size). captum's
``captum.concept.TCAV`` gets exactly the same example sets as ``Concept`` objects and the same 20
experimental sets (``[positive, counter-examples]``), so both train 40 CAVs (ours also cross-fits
each CAV's accuracy: up to 4 more fits per CAV, captum one held-out split) and score them on the
same inputs. captum has no significance test; ours also runs the Mann-Whitney and equivalence
tests, the CAV gate, Holm correction and bootstrap CIs inside the timed region.

Times are CPU seconds of this process (``time.process_time``) with one torch thread, best of
``--repeats`` interleaved rounds: on a shared machine wall time mostly measures the neighbours.
Wall times are printed too.

Figures:

* ``tcav_speedup_vs_captum``: captum's time / ours, both with SGD CAVs (captum's default
  classifier; ours ``method="sgd"``, which also cross-fits each CAV's accuracy: 5 SGD fits per
  CAV to captum's 1). The same ratio with our default ``mean-diff`` CAVs is printed too.
* ``tcav_over_floor``: ours (default method) / floor, floor = one forward of the distinct images
  of the experiment's sets (those captum is handed; ours also reads the concept's and the pool
  sample's unused images) plus forward and backward of the 100 inputs capturing both layers, on
  tensors already in memory - target <= 1.3. A floor that also decodes the PNGs is printed too.
* ``tcav_max_score_diff_vs_captum``: max |score difference| over all 20 experimental sets and both
  layers when captum is handed our CAVs (a ``Classifier`` that returns them) - target ~0.

Usage: python benchmarks/tcav_vs_captum.py [--repeats 3]
"""

import argparse
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conceptlens.concepts import TCAV
from conceptlens.data import Manifest, Preprocessing, make_loader
from conceptlens.models import load_model

LAYERS = ["layer3", "layer4"]
SIZE, N_CONCEPT, N_RANDOM_SETS, SET_SIZE, N_INPUTS, TARGET, RUNS, BATCH = 64, 50, 10, 50, 100, 3, 10, 64
PREP = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def write_images(root):
    """Concept images (noise + bright stripes), random images (noise), class inputs (noise)."""
    rng = np.random.default_rng(0)
    folders = {"concepts/stripes": N_CONCEPT, "random": N_RANDOM_SETS * SET_SIZE, "inputs": N_INPUTS}
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            if folder.startswith("concepts"):
                img[:, ::8] = 255
            Image.fromarray(img).save(root / folder / f"{i:04d}.png", compress_level=1)
    lines = ["image,label"] + [f"inputs/{i:04d}.png,{TARGET}" for i in range(N_INPUTS)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def _timed(fn, *args, **kw):
    """``((cpu seconds, wall seconds), result)``."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kw)
    return (time.process_time() - c0, time.perf_counter() - w0), out


def ours(model, root, method):
    return TCAV(model, LAYERS, method=method, runs=RUNS, null_runs=RUNS, preprocessing=PREP, batch_size=BATCH, progress=False).run(
        root / "concepts", root / "random", [str(TARGET)], root / "manifest.csv")


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths, self.transform = list(paths), PREP.transform()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def captum_sets(res):
    """Our example sets as captum Concepts, and our 20 (positive, counter) pairs as experimental sets."""
    from captum.concept import Concept

    concepts = {}
    for k, (name, grp) in enumerate(res.sets.groupby("set", sort=True)):
        safe = name.replace("/", "_").replace("<", "").replace(">", "")
        loader = torch.utils.data.DataLoader(_Files(grp.image), batch_size=BATCH)
        concepts[name] = Concept(k, safe, loader)
    cavs = res.cavs[res.cavs.layer == LAYERS[0]].sort_values("cav")
    experimental = [[concepts[p], concepts[n]] for p, n in zip(cavs.positive_set, cavs.negative_set)]
    return concepts, experimental, cavs


def run_captum(model, experimental, inputs, classifier=None):
    from captum.concept import TCAV as CaptumTCAV

    random.seed(0)  # captum's default classifier shuffles with the global `random`
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tcav = CaptumTCAV(model.module, LAYERS, model_id="bench", classifier=classifier, save_path=d)
        return tcav.interpret(inputs, experimental, target=TARGET)


def given_cavs_classifier(res, cavs):
    """A captum Classifier that returns our CAVs (matched by the pair's concept ids and the feature size)."""
    from captum.concept._utils.classifier import Classifier

    dims = {layer: res.cav_vectors[layer].shape[1] for layer in LAYERS}
    layer_of_dim = {d: layer for layer, d in dims.items()}

    class Given(Classifier):
        def __init__(self):
            self.current = None

        def train_and_eval(self, dataloader, **kwargs):
            xs, ys = zip(*dataloader)
            ids = sorted(set(torch.cat(ys).tolist()))
            self.current = (ids, layer_of_dim[xs[0].shape[1]])
            return {"accs": torch.tensor(float("nan"))}

        def weights(self):
            ids, layer = self.current
            v = torch.from_numpy(res.cav_vectors[layer][self.lookup[tuple(ids)]])
            return torch.stack([v if i == self.positive[tuple(ids)] else -v for i in ids])

        def classes(self):
            return self.current[0]

    g = Given()
    g.lookup, g.positive = {}, {}
    return g


def floor_steps(model, root, set_paths):
    """``load()`` and ``compute(sets, inputs)``: forward of the set images, forward/backward of the 100 inputs."""
    module = model.module
    inputs_manifest = Manifest.read(root / "manifest.csv")

    def load():
        sets = torch.cat([x for _, x in make_loader(Manifest.from_images(set_paths), PREP, batch_size=BATCH)])
        inputs = torch.cat([x for _, x in make_loader(inputs_manifest, PREP, batch_size=BATCH)])
        return sets, inputs

    def compute(sets, inputs):
        with torch.inference_mode():
            for i in range(0, len(sets), BATCH):
                module(sets[i:i + BATCH])
        captured = {}
        handles = [module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in LAYERS]
        try:
            for i in range(0, len(inputs), BATCH):
                out = module(inputs[i:i + BATCH].clone().requires_grad_(True))
                torch.autograd.grad(out[:, TARGET].sum(), [captured[n] for n in LAYERS])
        finally:
            for h in handles:
                h.remove()

    return load, compute


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("torchvision:resnet18", num_classes=10, device="cpu")
    print(f"resnet18 random init, {SIZE} px, 1 concept x {N_CONCEPT} + {N_RANDOM_SETS} x {SET_SIZE} random images, "
          f"{N_INPUTS} inputs, layers {','.join(LAYERS)}, {RUNS} runs (split design), torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_images(root)
        res = ours(model, root, "mean-diff")  # warm-up; its sets define the experiment for captum and the floor
        load, compute = floor_steps(model, root, sorted(res.sets.image.unique()))
        sets, inputs = load()
        concepts, experimental, cavs = captum_sets(res)
        print(f"experimental sets: {len(experimental)} per layer ({len(concepts)} example sets, "
              f"{res.sets.image.nunique()} distinct images)")
        times = {k: [] for k in ("ours_md", "ours_sgd", "captum", "floor", "floor_load")}
        for _ in range(args.repeats):  # interleaved, so load changes hit every contender alike
            times["ours_md"].append(_timed(ours, model, root, "mean-diff")[0])
            times["ours_sgd"].append(_timed(ours, model, root, "sgd")[0])
            times["captum"].append(_timed(run_captum, model, experimental, inputs)[0])
            times["floor"].append(_timed(compute, sets, inputs)[0])
            times["floor_load"].append(_timed(load)[0])
        cpu = {k: min(t[0] for t in v) for k, v in times.items()}
        wall = {k: min(t[1] for t in v) for k, v in times.items()}

        given = given_cavs_classifier(res, cavs)
        for p, n in experimental:
            key = tuple(sorted((p.id, n.id)))
            given.lookup[key] = len(given.lookup)
            given.positive[key] = p.id
        scores = run_captum(model, experimental, inputs, classifier=given)
        from captum.concept._utils.common import concepts_to_str

        diff = 0.0
        for layer in LAYERS:
            ours_scores = res.runs[(res.runs.layer == layer)].sort_values("cav").score.to_numpy()
            theirs = np.array([scores[concepts_to_str(e)][layer]["sign_count"][0].item() for e in experimental])
            diff = max(diff, float(np.abs(ours_scores - theirs).max()))

    for name, t in (("cpu", cpu), ("wall", wall)):
        print(f"{name:>4} s: ours mean-diff {t['ours_md']:.2f}, ours sgd {t['ours_sgd']:.2f}, captum (SGD) {t['captum']:.2f}, "
              f"floor {t['floor']:.2f} (+ PNG decoding {t['floor_load']:.2f})")
    print(f"speedup vs captum with our default mean-diff CAVs: {cpu['captum'] / cpu['ours_md']:.2f}x; "
          f"ours / (floor + decoding): {cpu['ours_md'] / (cpu['floor'] + cpu['floor_load']):.2f}; "
          f"captum / floor: {cpu['captum'] / cpu['floor']:.2f}")
    print(f"BENCH tcav_speedup_vs_captum {cpu['captum'] / cpu['ours_sgd']:.2f}")
    print(f"BENCH tcav_over_floor {cpu['ours_md'] / cpu['floor']:.2f}")
    print(f"BENCH tcav_max_score_diff_vs_captum {diff:.3g}")


if __name__ == "__main__":
    main()
