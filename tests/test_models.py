import os
import textwrap

import pytest
import torch
from torch import nn

from conceptlens.errors import ConceptLensError
from conceptlens.models import list_layers, load_model, load_state_dict, validate_layers


def test_torchvision_random_init_warns_and_is_seeded():
    with pytest.warns(UserWarning, match="random initialisation"):
        a = load_model("torchvision:resnet18", num_classes=10, device="cpu", seed=1)
    with pytest.warns(UserWarning):
        b = load_model("torchvision:resnet18", num_classes=10, device="cpu", seed=1)
    with pytest.warns(UserWarning):
        c = load_model("torchvision:resnet18", num_classes=10, device="cpu", seed=2)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert not a.module.training
    assert a.preprocessing.crop == 224 and a.preprocessing.resize == 256


def test_torchvision_weights_file_round_trip_infers_head(tmp_path, resnet18):
    path = tmp_path / "r18.pt"
    torch.save(resnet18.module.state_dict(), path)
    (tmp_path / "r18.json").write_text('{"classes": ' + str([f"c{i}" for i in range(10)]).replace("'", '"') + "}")
    m = load_model(f"torchvision:resnet18:{path}", device="cpu")
    assert m.module.fc.out_features == 10
    assert m.weights_hash == resnet18.weights_hash
    assert m.classes[3] == "c3" and m.class_index("c3") == 3 and m.class_index("7") == 7
    with pytest.raises(ConceptLensError, match="class 'zebra' is not a class.*known classes: c0"):
        m.class_index("zebra")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/conceptlens-pwned",))


def test_weights_with_pickle_payload_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _Evil()}, path)
    if os.path.exists("/tmp/conceptlens-pwned"):
        os.remove("/tmp/conceptlens-pwned")
    with pytest.raises(ConceptLensError, match=r"evil\.pt holds Python objects beyond tensors and is refused"):
        load_state_dict(path)
    with pytest.raises(ConceptLensError, match="refused"):
        load_model(f"torchvision:resnet18:{path}", device="cpu")
    assert not os.path.exists("/tmp/conceptlens-pwned")


def test_non_state_dict_and_mismatched_weights(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(ConceptLensError, match="is not a state dict"):
        load_state_dict(p)
    p2 = tmp_path / "small.pt"
    torch.save(nn.Linear(2, 2).state_dict(), p2)
    with pytest.raises(ConceptLensError, match="does not fit the model"):
        load_model(f"torchvision:resnet18:{p2}", num_classes=10, device="cpu")
    # a checkpoint that wraps the weights is unwrapped
    p3 = tmp_path / "ckpt.pt"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict(), "epoch": torch.tensor(3)}, p3)
    assert set(load_state_dict(p3)) == {"weight", "bias"}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_torchscript_is_refused_with_explanation(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(TinyNet()), path)
    with pytest.raises(ConceptLensError, match="TorchScript.*hooks"):
        load_model(f"export:{path}", device="cpu")
    with pytest.raises(ConceptLensError, match="TorchScript"):
        load_model(f"torchvision:resnet18:{path}", device="cpu")


def test_export_program_layers_are_hookable(tmp_path):
    from conceptlens.core.extract import iter_activations

    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "net.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}}), path)
    m = load_model(f"export:{path}", device="cpu")
    assert "features.2" in list_layers(m, input_size=8)["name"].tolist()
    (_, pooled, _), = list(iter_activations(m, [(torch.arange(2), x)], ["features.2"], pool="none"))
    torch.testing.assert_close(pooled["features.2"], net.features(x))


def test_python_spec_from_file_with_weights(tmp_path):
    code = tmp_path / "mymodel.py"
    code.write_text(textwrap.dedent(
        """
        from torch import nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
        def not_a_model():
            return 3
        """
    ))
    m = load_model(f"python:{code}:build", device="cpu")
    assert not m.module.training
    weights = tmp_path / "w.pt"
    state = {k: torch.full_like(v, 0.5) for k, v in m.module.state_dict().items()}
    torch.save(state, weights)
    m2 = load_model(f"python:{code}:build:{weights}", device="cpu")
    assert torch.equal(m2.module[3].weight, torch.full((2, 2), 0.5))
    assert m2.weights_hash != m.weights_hash
    with pytest.raises(ConceptLensError, match="returned int, not a torch nn.Module"):
        load_model(f"python:{code}:not_a_model", device="cpu")
    with pytest.raises(ConceptLensError, match="has no callable 'nope'"):
        load_model(f"python:{code}:nope", device="cpu")
    with pytest.raises(ConceptLensError, match="cannot import model module"):
        load_model("python:no_such_module_xyz:build", device="cpu")


def test_bad_specs_and_devices():
    with pytest.raises(ConceptLensError, match="model spec 'resnet18' is not understood"):
        load_model("resnet18")
    with pytest.raises(ConceptLensError, match="torchvision has no architecture 'resnet19'; did you mean .*resnet18"):
        load_model("torchvision:resnet19")
    with pytest.raises(ConceptLensError, match="device must be auto, cpu or cuda"):
        load_model("torchvision:resnet18", device="tpu")


def test_unknown_layer_suggests_closest(resnet18):
    with pytest.raises(ConceptLensError, match=r"layer 'layer4.0.cnv1' is not a module.*did you mean 'layer4.0.conv1'"):
        validate_layers(resnet18.module, ["layer4.0.cnv1"])
    with pytest.raises(ConceptLensError, match="conceptlens layers MODEL"):
        validate_layers(resnet18.module, ["nothing_like_it"])
    assert validate_layers(resnet18.module, "layer3,layer4") == ["layer3", "layer4"]


def test_list_layers_shapes_and_calls(resnet18):
    frame = list_layers(resnet18, input_size=64).set_index("name")
    assert frame.loc["layer4", "output_shape"] == "512x2x2"
    assert frame.loc["fc", "output_shape"] == "10"
    assert frame.loc["layer1.0.relu", "calls"] == 2  # shared ReLU in BasicBlock
    assert frame.loc["layer3", "calls"] == 1
