import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conceptlens.cli import build_parser, main

COMMANDS = ["world", "train-demo", "layers", "extract", "report", "demo", "probe", "embed", "neighbors", "topk",
            "attribute", "spray", "tcav", "dissect"]


def run_cli(*args):
    """The CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "conceptlens", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: conceptlens " + command in capsys.readouterr().out


def test_help_lists_all_commands():
    text = build_parser().format_help()
    assert all(c in text for c in COMMANDS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["layers", "torchvision:resnet19"], "torchvision has no architecture 'resnet19'; did you mean"),
        (["layers", "nonsense"], "model spec 'nonsense' is not understood"),
        (["extract", "--model", "torchvision:resnet18", "--data", "missing.csv", "--layers", "layer4", "--out", "x"],
         "manifest missing.csv does not exist"),
        (["train-demo", "--world", "no-world-here", "--out", "m.pt"], "is not a concept world"),
        (["report", "missing.toml", "--out", "r"], "report spec missing.toml does not exist"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "conceptlens", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("conceptlens: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_unknown_layer_from_cli_suggests(tmp_path, image_manifest):
    proc = run_cli("-q", "extract", "--model", "torchvision:resnet18", "--num-classes", "10", "--data", str(image_manifest),
                   "--layers", "layer3,layr4", "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "layer 'layr4' is not a module of the model; did you mean 'layer4'" in proc.stderr
    assert "random initialisation" in proc.stderr  # the warning is one line too


def test_layers_and_extract_commands(tmp_path, image_manifest):
    proc = run_cli("layers", "torchvision:resnet18", "--num-classes", "10", "--input-size", "64")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.split()[0] == "layer4")
    assert "512x2x2" in line
    proc = run_cli("-q", "extract", "--model", "torchvision:resnet18", "--num-classes", "10", "--data", str(image_manifest),
                   "--layers", "layer3,layer4", "--resize", "32", "--crop", "32", "--pool", "max", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert "20 rows, pool max" in proc.stdout
    from conceptlens.core.store import ActivationStore

    store = ActivationStore.open(tmp_path / "s")
    assert store.load("layer4").shape == (20, 512) and np.isfinite(store.load("layer3")).all()
    assert store.meta["request"]["preprocessing"]["crop"] == 32


def test_world_train_demo_and_demo_commands(tmp_path):
    proc = run_cli("-q", "world", "--n", "48", "--size", "16", "--seed", "2", "--out", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w" / "manifest.csv").is_file() and (tmp_path / "w" / "broden" / "index.csv").is_file()
    proc = run_cli("-q", "train-demo", "--world", str(tmp_path / "w"), "--epochs", "1", "--out", str(tmp_path / "m" / "demo.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and (tmp_path / "m" / "demo.json").is_file()
    proc = run_cli("layers", f"demo:{tmp_path / 'm' / 'demo.pt'}", "--input-size", "16")
    assert proc.returncode == 0 and "conv4" in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- validation before work

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_demo import build_tiny_demo

    return build_tiny_demo(tmp_path_factory.mktemp("tiny"))


def _one_error(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("conceptlens: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_on_an_absent_device_fails_before_any_work(tmp_path, capsys):
    t0 = time.perf_counter()
    line = _one_error(capsys, main(["-q", "demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "d")]))
    assert "CUDA is not available" in line and time.perf_counter() - t0 < 30
    assert not (tmp_path / "d").exists()


def test_dissect_unknown_layer_fails_before_creating_folders(tmp_path, tiny, capsys):
    world, weights = tiny
    out = tmp_path / "dissect"
    line = _one_error(capsys, main(["-q", "dissect", "--model", f"demo:{weights}", "--broden", str(world / "broden"),
                                    "--layers", "nope", "--out", str(out)]))
    assert "layer 'nope' is not a module of the model" in line
    assert not out.exists()


@pytest.mark.parametrize("command, flags, message", [
    ("probe", ["--targets", "label,colour"], "names column 'colour', which manifest"),
    ("neighbors", ["--label-column", "lable"], "names column 'lable', which manifest"),
    ("embed", ["--layer", "conv3"], "--layer 'conv3' is not one of --layers (conv4)"),
])
def test_store_analyses_check_their_inputs_before_extracting(tmp_path, tiny, capsys, command, flags, message):
    world, weights = tiny
    line = _one_error(capsys, main(["-q", command, "--model", f"demo:{weights}", "--data", str(world / "manifest.csv"),
                                    "--layers", "conv4", "--out", str(tmp_path / "o"), *flags]))
    assert message in line
    assert not (tmp_path / "o" / "activations").exists()


def test_spray_checks_class_and_clusters_before_attributing(tmp_path, tiny, capsys):
    world, weights = tiny
    base = ["-q", "spray", "--model", f"demo:{weights}", "--data", str(world / "manifest.csv"), "--out", str(tmp_path / "o")]
    assert "has no images of class 'oval'" in _one_error(capsys, main(base + ["--class", "oval"]))
    assert "n_clusters must be 'auto' or an integer in 1..11" in _one_error(capsys, main(base + ["--class", "circle",
                                                                                                 "--clusters", "40"]))
    assert not (tmp_path / "o").exists()


def test_weights_messages(tmp_path, capsys):
    line = _one_error(capsys, main(["layers", f"demo:{tmp_path / 'missing.pt'}"]))
    assert f"demo weights file {tmp_path / 'missing.pt'} does not exist" in line and "sidecar" not in line
    bad = tmp_path / "pickled.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": _NotATensor()}, bad)
    line = _one_error(capsys, main(["layers", f"torchvision:resnet18:{bad}"]))
    assert "\x1b" not in line
    assert "(torch.load weights_only=True: Unsupported global: GLOBAL test_cli._NotATensor was not an allowed global " \
           "by default.); re-save it with torch.save(model.state_dict(), path)" in line


class _NotATensor:
    pass


def test_interrupt_starts_a_new_line_and_faiss_loader_is_quiet(monkeypatch, capsys):
    import logging

    from conceptlens import cli

    def interrupted(args):
        assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING  # even at -v
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_layers", interrupted)
    assert main(["-v", "layers", "demo:x.pt"]) == 130
    assert capsys.readouterr().err.endswith("\nconceptlens: interrupted\n")


def test_missing_spec_error_points_at_something_installed(tmp_path, capsys):
    line = _one_error(capsys, main(["report", str(tmp_path / "none.toml"), "--out", str(tmp_path / "r")]))
    assert "conceptlens demo --quick" in line and "data_manifests" not in line
