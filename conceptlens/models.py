"""Model specs, safe weight loading and layer-name validation.

A model spec is a string:

``demo:<weights.pt>``
    The built-in demo CNN; its sidecar ``<weights>.json`` carries classes and preprocessing.
``torchvision:<arch>[:<weights.pt>]``
    A torchvision architecture; without a weights file it is randomly initialised (seeded) and a
    warning says so. Nothing is downloaded.
``python:<module or file.py>:<factory>[:<weights.pt>]``
    ``factory()`` from the user's own code returns the ``nn.Module``.
``export:<program.pt2>``
    A ``torch.export`` program; ``torch.export.unflatten`` restores named submodules for hooks.

Weights are plain state dicts read with ``torch.load(weights_only=True)``. Any weights file may have
a JSON sidecar ``<weights>.json`` with ``classes`` (list of names in logit order) and
``preprocessing`` (``resize``, ``crop``, ``mean``, ``std``).

Preprocessing is never guessed: the demo model's comes from its sidecar, torchvision architectures
default to torchvision's ImageNet evaluation transform, and a ``python:``/``export:`` model without a
sidecar has none until the manifest's TOML sidecar, flags or the caller give at least ``mean`` and
``std`` (an exported program with a fixed input size supplies the size itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import nn

from .data import Preprocessing, partial_preprocessing
from .errors import ConceptLensError, did_you_mean

__all__ = [
    "LoadedModel",
    "load_model",
    "load_state_dict",
    "resolve_device",
    "list_layers",
    "trace_modules",
    "validate_layers",
]

logger = logging.getLogger(__name__)

_KINDS = ("demo", "torchvision", "python", "export")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for analysis, with what it came from.

    Attributes
    ----------
    module : nn.Module
        In ``eval()`` mode, on ``device``.
    spec : str
        The model spec it was loaded from.
    weights_hash : str
        SHA-256 over the state dict's names, shapes and bytes (identifies the actual weights).
    preprocessing : Preprocessing or None
        The model's default preprocessing; ``None`` when nothing says what the model expects (a
        ``python:``/``export:`` spec without a sidecar): see :meth:`preprocessing_for`.
    classes : list of str or None
        Class names in logit order, when known (demo model or a sidecar).
    input_size : tuple of int or None
        ``(height, width)`` the model requires (an exported program without dynamic spatial
        dimensions); ``None`` when any size runs.
    sidecar : Path or None
        Where the model's JSON sidecar is or would be (named in error messages).
    """

    module: nn.Module = field(repr=False)
    spec: str
    weights_hash: str
    preprocessing: Preprocessing | None
    classes: list | None
    device: torch.device
    input_size: tuple | None = None
    sidecar: Path | None = None

    def preprocessing_for(self, manifest=None, preprocessing=None, **overrides):
        """The preprocessing in force for ``manifest``'s images, checked against the model.

        ``preprocessing`` (a :class:`~conceptlens.data.Preprocessing`) is used as given; otherwise the
        model's default is updated by the manifest's TOML sidecar, then by ``overrides``
        (``resize``, ``crop``, ``mean``, ``std``; ``None`` = unset, ``0`` = no resize / no crop).
        A model without a default needs ``mean`` and ``std`` from one of those; an exported program
        with a fixed input size gives the size. The result is logged at INFO.

        Raises
        ------
        ConceptLensError
            When nothing says how the model's inputs are normalised, or the images would not come
            out at the size the model requires.
        """
        if preprocessing is None:
            preprocessing = self._resolve_preprocessing(manifest, overrides)
        self._check_input_size(preprocessing, manifest)
        logger.info("preprocessing in force: %s", preprocessing.describe())
        return preprocessing

    def _resolve_preprocessing(self, manifest, overrides):
        given, sources = {}, []
        if manifest is not None and manifest.preprocessing:
            sidecar = manifest.path.with_suffix(".toml")
            given.update(partial_preprocessing(manifest.preprocessing, str(sidecar)))
            sources.append(f"{', '.join(manifest.preprocessing)} from {sidecar.name}")
        flags = partial_preprocessing({k: v for k, v in overrides.items() if v is not None}, "preprocessing flags")
        if flags:
            given.update(flags)
            sources.append(f"{', '.join(flags)} given")
        base = self.preprocessing
        if base is None:
            if "mean" not in given or "std" not in given:
                raise ConceptLensError(self._no_preprocessing_message())
            base = _size_only(self.input_size)
        return dataclasses.replace(base, **given, source="; ".join([base.source, *sources]))

    def _no_preprocessing_message(self):
        where = f"; or write them into {self.sidecar} as \"preprocessing\"" if self.sidecar else ""
        if self.input_size:
            size = f"; its input size {self.input_size[0]}x{self.input_size[1]} comes from the exported program"
        else:
            size = "; add --resize N --crop N unless the images already have the model's input size"
        return (f"model {self.spec} does not say how its inputs are preprocessed: pass --mean R,G,B and --std R,G,B "
                f"(e.g. --mean 0,0,0 --std 1,1,1 for [0, 1] pixels; API: preprocessing=Preprocessing(...)){size}"
                f"{where}, or into the manifest's TOML sidecar [preprocessing]")

    def _check_input_size(self, prep, manifest):
        if self.input_size is None:
            return
        out = (prep.crop, prep.crop) if prep.crop else _first_image_size(manifest, prep.resize)
        if out is not None and tuple(out) != tuple(self.input_size):
            h, w = self.input_size
            hint = f"--resize {h} --crop {h}" if h == w else f"images of {h}x{w} with no resize or crop"
            raise ConceptLensError(
                f"model {self.spec} takes {h}x{w} inputs (the exported program fixes the size) but the preprocessing "
                f"in force gives {out[0]}x{out[1]} ({prep.describe()}); pass {hint}, or re-export with dynamic "
                "height and width"
            )

    def class_index(self, name):
        """Logit index of a class given by name (or by its index as a string)."""
        if self.classes is not None and name in self.classes:
            return self.classes.index(name)
        if str(name).isdigit():
            return int(name)
        known = f"known classes: {', '.join(self.classes)}" if self.classes else (
            "this model has no class names (add 'classes' to its weights sidecar JSON) - use logit indices"
        )
        raise ConceptLensError(f"class {name!r} is not a class of model {self.spec}; {known}")


def _first_image_size(manifest, resize):
    """``(height, width)`` of the manifest's first image after ``resize``; None when it cannot be read.

    Read from the header only; an unreadable image is left to the loader's bad-image policy.
    """
    if manifest is None or len(manifest) == 0:
        return None
    try:
        with Image.open(manifest.image_paths()[0]) as im:
            w, h = im.size
    except OSError:
        return None
    if resize is None:
        return h, w
    short, long = (h, w) if h <= w else (w, h)
    long = int(resize * long / short)  # torchvision's Resize(int) rule
    return (resize, long) if h <= w else (long, resize)


def resolve_device(device="auto"):
    """``auto`` → CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("device auto → %s", chosen)
        return chosen
    if device == "cpu" or str(device).startswith("cuda"):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConceptLensError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        return torch.device(device)
    raise ConceptLensError(f"device must be auto, cpu or cuda[:N]; got {device!r}")


def _is_torchscript(path):
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_state_dict(path):
    """Read a state dict with ``torch.load(weights_only=True)``, refusing pickled objects.

    Checkpoints that wrap the weights under ``state_dict`` or ``model`` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptLensError(f"weights file {path} does not exist")
    if _is_torchscript(path):
        raise ConceptLensError(
            f"{path} is a TorchScript archive; TorchScript modules refuse forward hooks, so conceptlens "
            "cannot analyse them - save the eager model's state_dict, or a torch.export program (export:FILE)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConceptLensError(
            f"weights file {path} holds Python objects beyond tensors and is refused "
            f"(torch.load weights_only=True: {_refusal_reason(exc)}); re-save it with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise ConceptLensError(f"weights file {path} cannot be read as a torch state dict: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            logger.info("using the '%s' entry of checkpoint %s", key, path)
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConceptLensError(
            f"weights file {path} is not a state dict (a mapping of names to tensors); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return obj


def _refusal_reason(exc):
    """The one sentence of torch's ``weights_only`` refusal that names the offending object, without
    the terminal colour codes torch puts in it (``Unsupported global: GLOBAL mod.Cls was not an allowed
    global by default.``); else the message's first sentence."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    match = re.search(r"WeightsUnpickler error: (.+?\.)(?:\s|$)", text)
    if match:
        return match.group(1)
    first = re.match(r"(.+?\.)(?:\s|$)", text.splitlines()[0]) if text else None
    return first.group(1) if first else (text.splitlines()[0] if text else type(exc).__name__)


def _state_hash(module, projection=None):
    """SHA-256 of the state dict; with a sidecar's activation projection, of that too (the same
    weights with and without it are different models, and cached results must not mix them)."""
    h = hashlib.sha256(json.dumps(projection, sort_keys=True).encode() if projection else b"")
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_sidecar(weights):
    if not weights:
        return {}
    side = Path(weights).with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise ConceptLensError(f"weights sidecar {side} is not valid JSON: {exc}") from None


def _load_into(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ConceptLensError(f"weights file {path} does not fit the model: {detail}") from None


def _split_spec(spec):
    kind, sep, rest = str(spec).partition(":")
    if not sep or kind not in _KINDS or not rest:
        raise ConceptLensError(
            f"model spec {spec!r} is not understood; expected demo:WEIGHTS.pt, torchvision:ARCH[:WEIGHTS.pt], "
            "python:MODULE:FACTORY[:WEIGHTS.pt] or export:PROGRAM.pt2"
        )
    return kind, rest


def _demo(rest):
    from .demo_model import DEMO_ARCHITECTURE, DemoCNN

    if not Path(rest).is_file():
        raise ConceptLensError(f"demo weights file {rest} does not exist; train one with `conceptlens train-demo` "
                               "(or `conceptlens demo`, which writes <out>/model/demo.pt)")
    side = _read_sidecar(rest)
    if side.get("architecture") != DEMO_ARCHITECTURE:
        raise ConceptLensError(
            f"demo model {rest} needs its sidecar {Path(rest).with_suffix('.json')} "
            "(written by `conceptlens train-demo`)"
        )
    module = DemoCNN(len(side["classes"]), widths=side.get("widths", (16, 32, 64, 64)))
    _load_into(module, load_state_dict(rest), rest)
    return module, rest, side


def _last_linear(module):
    name = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def _torchvision(rest, num_classes, seed):
    import torchvision

    arch, _, weights = rest.partition(":")
    available = torchvision.models.list_models()
    if arch not in available:
        raise ConceptLensError(f"torchvision has no architecture {arch!r}{did_you_mean(arch, available)}")
    state = load_state_dict(weights) if weights else None
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif state is not None:
        # Infer the head size from the weights so fine-tuned checkpoints load without extra flags.
        probe = torchvision.models.get_model(arch, weights=None)
        head = _last_linear(probe)
        if head is not None and f"{head}.weight" in state:
            kwargs["num_classes"] = int(state[f"{head}.weight"].shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = torchvision.models.get_model(arch, weights=None, **kwargs)
    if state is None:
        warnings.warn(
            f"torchvision:{arch} has no weights file: using random initialisation (seed {seed})", stacklevel=3
        )
    else:
        _load_into(module, state, weights)
    return module, weights or None, _read_sidecar(weights)


def _python(rest):
    parts = rest.split(":")
    if len(parts) not in (2, 3):
        raise ConceptLensError(f"python model spec needs python:MODULE:FACTORY[:WEIGHTS.pt]; got python:{rest}")
    mod_name, factory_name = parts[0], parts[1]
    weights = parts[2] if len(parts) == 3 else None
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ConceptLensError(f"model code file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"conceptlens_user_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ConceptLensError(f"cannot import model module {mod_name!r}: {exc}") from None
    factory = getattr(mod, factory_name, None)
    if not callable(factory):
        raise ConceptLensError(f"module {mod_name!r} has no callable {factory_name!r}")
    module = factory()
    if not isinstance(module, nn.Module):
        raise ConceptLensError(f"{mod_name}:{factory_name}() returned {type(module).__name__}, not a torch nn.Module")
    if weights:
        _load_into(module, load_state_dict(weights), weights)
    return module, weights, _read_sidecar(weights)


def _export(rest):
    path = Path(rest)
    if not path.is_file():
        raise ConceptLensError(f"exported program {path} does not exist")
    if _is_torchscript(path):
        raise ConceptLensError(
            f"{path} is a TorchScript archive, not a torch.export program; TorchScript modules refuse forward "
            "hooks - export the model with torch.export.export(...) and torch.export.save(...)"
        )
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        raise ConceptLensError(f"{path} cannot be loaded with torch.export.load: {exc}") from None
    input_size = _export_input_size(program, path)
    module = torch.export.unflatten(program)
    return module, input_size, _read_sidecar(path)


def _export_input_size(program, path):
    """``(H, W)`` fixed by the program, or None when height and width are dynamic.

    Checked at load so a program that cannot take our batches fails before any work starts.
    """
    user = {s.arg.name for s in program.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    shapes = [tuple(n.meta["val"].shape) for n in program.graph.nodes
              if n.op == "placeholder" and n.name in user and "val" in n.meta]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ConceptLensError(
            f"exported program {path} takes {len(shapes)} input(s) of shape {shapes}; conceptlens feeds one image "
            "batch [N, 3, H, W] - export a module whose forward takes one image tensor"
        )
    batch, channels, height, width = (d if isinstance(d, int) else None for d in shapes[0])
    if batch is not None:
        raise ConceptLensError(
            f"exported program {path} fixes the batch size to {batch}; re-export it with a dynamic batch dimension: "
            "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))"
        )
    if channels not in (None, 3):
        raise ConceptLensError(f"exported program {path} takes {channels}-channel images; conceptlens feeds RGB (3 channels)")
    return (height, width) if height is not None and width is not None else None


def load_model(spec, device="auto", num_classes=None, seed=0):
    """Load a model spec (see module docstring) in ``eval()`` mode on ``device``.

    Parameters
    ----------
    spec : str
        Model spec.
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]``.
    num_classes : int, optional
        Head size for torchvision architectures (default: inferred from the weights, else 1000).
    seed : int
        Seed of the random initialisation when no weights file is given.
    """
    if isinstance(spec, LoadedModel):
        return spec
    kind, rest = _split_spec(spec)
    device = resolve_device(device)
    input_size = None
    if kind == "demo":
        module, weights, side = _demo(rest)
        default_prep = Preprocessing.from_dict(side["preprocessing"], source=f"sidecar of {rest}")
    elif kind == "torchvision":
        module, weights, side = _torchvision(rest, num_classes, seed)
        default_prep = dataclasses.replace(Preprocessing.imagenet(), source="torchvision's ImageNet default")
    elif kind == "python":
        module, weights, side = _python(rest)
        default_prep = None  # the user's own code: nothing says what it expects
    else:
        module, input_size, side = _export(rest)
        weights, default_prep = rest, None
    sidecar = Path(weights).with_suffix(".json") if weights else None
    if kind != "demo" and "preprocessing" in side:
        default_prep = _sidecar_preprocessing(side["preprocessing"], default_prep, sidecar, input_size)
    if "projection" in side:
        _attach_projection(module, side["projection"], sidecar)
    module.eval()
    module.to(device)
    classes = side.get("classes")
    return LoadedModel(
        module=module,
        spec=str(spec),
        weights_hash=_state_hash(module, side.get("projection")),
        preprocessing=default_prep,
        classes=list(classes) if classes else None,
        device=device,
        input_size=input_size,
        sidecar=sidecar,
    )


def _attach_projection(module, table, sidecar):
    """Re-attach the activation projection a sidecar records (a P-ClArC-corrected model,
    ``conceptlens correct --method p-clarc``)."""
    from .core.projection import attach_projection

    if not isinstance(table, dict) or not {"layer", "vector", "level"} <= set(table):
        raise ConceptLensError(f"sidecar {sidecar}: \"projection\" needs layer, vector and level")
    validate_layers(module, [table["layer"]])
    attach_projection(module, table["layer"], table["vector"], float(table["level"]))


def _size_only(input_size):
    """What a model without stated preprocessing implies: the size a program fixes, else none.

    Its mean and std are placeholders that the caller must replace with given ones.
    """
    size = input_size[0] if input_size and input_size[0] == input_size[1] else None
    return Preprocessing(resize=size, crop=size, source=(
        f"input size {size} from the exported program" if size else "no resize or crop: images as they are"))


def _sidecar_preprocessing(table, default, sidecar, input_size):
    """A model sidecar's (possibly partial) preprocessing over ``default``; mean and std needed where
    there is no default."""
    source = f"sidecar {sidecar}"
    given = partial_preprocessing(table, source)
    if default is None:
        missing = [k for k in ("mean", "std") if k not in given]
        if missing:
            raise ConceptLensError(f"{source}: preprocessing gives no {' or '.join(missing)}; add them "
                                   "(e.g. \"mean\": [0, 0, 0], \"std\": [1, 1, 1] for [0, 1] pixels)")
        default = _size_only(input_size)
    return dataclasses.replace(default, **given, source=f"{default.source}; {', '.join(given)} from {source}")


def _module_of(model):
    return model.module if isinstance(model, LoadedModel) else model


def layer_names(model):
    """All hookable layer names (``named_modules`` without the root)."""
    return [n for n, _ in _module_of(model).named_modules() if n]


def validate_layers(model, layers):
    """Return ``layers`` as a list, or raise naming the closest valid names for each unknown one."""
    if isinstance(layers, str):
        layers = [s for s in layers.split(",") if s]
    layers = list(layers or [])
    if not layers:
        raise ConceptLensError("no layers given; list valid names with `conceptlens layers MODEL`")
    valid = layer_names(model)
    valid_set = set(valid)
    for name in layers:
        if name not in valid_set:
            raise ConceptLensError(f"layer {name!r} is not a module of the model{did_you_mean(name, valid)} "
                                   "(list them with `conceptlens layers MODEL`)")
    if len(set(layers)) != len(layers):
        raise ConceptLensError(f"layers contain duplicates: {layers}")
    return layers


def trace_modules(module, x):
    """One forward of ``x`` with a hook on every named submodule (the hooks always removed).

    Returns ``{name: {"type", "output_shape", "calls"}}`` in the order the modules first completed;
    ``output_shape`` is the output's shape tuple (its type name when it is not a tensor) and
    ``calls`` how often the module ran. The one module walk behind :func:`list_layers` and
    attribution's ``auto_layer``.
    """
    found, handles = {}, []

    def hook(name):
        def fn(mod, inputs, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            found.setdefault(name, {"type": type(mod).__name__, "output_shape": shape, "calls": 0})["calls"] += 1

        return fn

    try:
        for name, mod in module.named_modules():
            if name:
                handles.append(mod.register_forward_hook(hook(name)))
        with torch.inference_mode():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return found


def list_layers(model, input_size=None, device=None):
    """Table of layers (``name``, ``type``, ``output_shape``, ``calls``) for a ``3 x S x S`` input.

    ``input_size`` defaults to the size an exported program fixes, else 224. ``calls`` counts how
    often the module runs in one forward pass; layers called more than once (e.g. a shared ReLU)
    cannot be captured unambiguously.
    """
    fixed = model.input_size if isinstance(model, LoadedModel) else None
    if input_size is None:
        input_size = fixed[0] if fixed and fixed[0] == fixed[1] else 224
    if fixed and tuple(fixed) != (input_size, input_size):
        raise ConceptLensError(f"model {model.spec} takes {fixed[0]}x{fixed[1]} inputs (the exported program fixes "
                               f"the size); got --input-size {input_size}")
    module = _module_of(model)
    if device is None:
        device = model.device if isinstance(model, LoadedModel) else next(module.parameters()).device
    try:
        rows = trace_modules(module, torch.zeros(1, 3, input_size, input_size, device=device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConceptLensError(
            f"the model's forward pass failed on a 1x3x{input_size}x{input_size} input ({first}); "
            "pass the input size it expects (--input-size); torch.export programs need a dynamic batch dimension"
        ) from None
    names = layer_names(module)
    for name in names:
        rows.setdefault(name, {"type": type(module.get_submodule(name)).__name__, "output_shape": "not run", "calls": 0})
    frame = pd.DataFrame([{"name": n, **rows[n]} for n in names], columns=["name", "type", "output_shape", "calls"])
    frame["output_shape"] = frame["output_shape"].map(lambda s: "x".join(map(str, s[1:])) if isinstance(s, tuple) else s)
    return frame


def random_init_copy(model, seed=0):
    """A copy of ``model`` with every parameter re-initialised under a fixed seed (probe baseline).

    The module is deep-copied and each submodule that owns parameters is reset with its own
    ``reset_parameters()`` (``_reset_parameters()`` for ``nn.MultiheadAttention``), in
    ``named_modules()`` order, under ``torch.random.fork_rng`` seeded with ``seed``: the result is
    the same architecture with the same layer names and preprocessing, but weights that never saw
    data - the baseline a linear probe is compared with (Hewitt & Liang's question: is it the
    representation or the probe?). BatchNorm layers also reset their running statistics. The
    caller's model and the global RNG state are left as they came in.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    seed : int
        Seed of the re-initialisation.

    Returns
    -------
    LoadedModel or nn.Module
        Same type as ``model``; a ``LoadedModel`` gets spec ``<spec>#random-init:seed=<seed>`` and
        the new weights' hash.

    Raises
    ------
    ConceptLensError
        When a submodule owns parameters but has no ``reset_parameters`` (e.g. the modules of a
        ``torch.export`` program, which carry no initialisers): there is no sound random init.
    """
    import copy

    module = _module_of(model)
    clone = copy.deepcopy(module)
    resets = []
    for name, sub in clone.named_modules():
        if not any(True for _ in sub.parameters(recurse=False)):
            continue
        reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
        if not callable(reset):
            spec = model.spec if isinstance(model, LoadedModel) else type(module).__name__
            raise ConceptLensError(
                f"cannot build a random-init copy of {spec}: module {name or '<root>'!r} ({type(sub).__name__}) owns "
                "parameters but has no reset_parameters(); load the architecture from code (python:MODULE:FACTORY) "
                "to get a random-init baseline, or probe without one")
        resets.append(reset)
    cuda = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(int(seed))
        for reset in resets:
            reset()
    clone.eval()
    if not isinstance(model, LoadedModel):
        return clone
    return dataclasses.replace(model, module=clone, spec=f"{model.spec}#random-init:seed={int(seed)}",
                               weights_hash=_state_hash(clone))


__all__ += ["random_init_copy"]
