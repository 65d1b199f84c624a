"""A user's own model, two ways (not a test module): a small 48 px ``nn.Sequential`` CNN as a
``torch.export`` program (``export:`` spec) and as model code plus a state dict (``python:`` spec).

Layers are numbered ``'0'``..``'12'`` as in any ``nn.Sequential``; the program has a static 48x48
input size and a dynamic batch dimension. Both specs get a JSON sidecar saying the inputs are used
as they are (no resize or crop, mean 0, std 1), so tests may also load images through a manifest.
"""

import json
import textwrap

import torch
from torch import nn

SIZE = 48
N_CLASSES = 4
PREPROCESSING = {"resize": None, "crop": None, "mean": [0, 0, 0], "std": [1, 1, 1]}

# The model code a user would write; the python: spec imports it from a file of this text.
SOURCE = textwrap.dedent('''
    from torch import nn


    def make_cnn(n_classes=4):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, n_classes),
        )
''')


def make_cnn(n_classes=N_CLASSES):
    """The network of :data:`SOURCE`, built from that very text."""
    namespace = {}
    exec(SOURCE, namespace)  # noqa: S102 - our own constant source, shared with the python: spec file
    return namespace["make_cnn"](n_classes)


def seeded_cnn(seed=0, biases=True):
    """:func:`make_cnn` in eval mode with fixed random weights, BatchNorm scales and running statistics
    (so BatchNorm does something a wrong merge would show). ``biases=False``: every bias and running
    mean is zero, so that BatchNorm folds into the convolutions with zero bias and LRP must conserve
    relevance exactly."""
    gen = torch.Generator().manual_seed(seed)
    model = make_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if not biases:
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.zero_()
    return model.eval()


def images(n=4, seed=1):
    """``n`` random images ``[n, 3, 48, 48]`` in ``[0, 1]`` (preprocessed as the sidecar says: as they are)."""
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def export_program(model, path):
    """Save ``model`` with ``torch.export`` at the static input size 48x48 and a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (images(2),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def write_specs(directory, model):
    """Write ``model`` as both specs into ``directory``, each with its sidecar.

    Returns
    -------
    dict
        ``export``: ``"export:<dir>/cnn.pt2"``; ``python``: ``"python:<dir>/cnn_code.py:make_cnn:<dir>/cnn_weights.pt"``.
    """
    program = export_program(model, directory / "cnn.pt2")
    code = directory / "cnn_code.py"
    code.write_text(SOURCE)
    weights = directory / "cnn_weights.pt"
    torch.save(model.state_dict(), weights)
    for target in (program, weights):
        target.with_suffix(".json").write_text(json.dumps({"preprocessing": PREPROCESSING}))
    return {"export": f"export:{program}", "python": f"python:{code}:make_cnn:{weights}"}
