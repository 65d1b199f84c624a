import subprocess
import sys

import numpy as np
import pytest

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
    from conceptlens.representation.store import ActivationStore

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
