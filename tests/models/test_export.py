"""ONNX export of the student and its parity with torch; parameter and latency helpers."""
import timm
import torch
from torch import nn

import pytest

from diffkd.models.export import ExportError, check_onnx_parity, example_inputs, export_onnx, onnx_session
from diffkd.models.footprint import count_parameters, latency_ms, time_call


class _ImageAndClinical(nn.Module):
    """A timm backbone whose logits get a clinical term: the shape of a fusion classifier."""

    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("mobilenetv3_small_050", in_chans=1, num_classes=2)
        self.clinical = nn.Linear(5, 2)

    def forward(self, image, clinical):
        return self.backbone(image) + self.clinical(clinical)


def test_onnx_matches_torch_within_1e4_at_any_batch(tmp_path):
    torch.manual_seed(0)
    model = _ImageAndClinical()
    model.train()  # export must switch to eval itself and restore the mode
    path = export_onnx(model, tmp_path / "student" / "model.onnx", example_inputs(64, clinical_dim=5, batch=2))
    assert model.training and path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".onnx-")]
    for batch in (1, 7):
        diff = check_onnx_parity(model, path, example_inputs(64, clinical_dim=5, batch=batch, seed=batch))
        assert diff <= 1e-4
    session = onnx_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == ["image", "clinical"]
    feed = {k: v.numpy() for k, v in example_inputs(64, clinical_dim=5, batch=3).items()}
    assert session.run(None, feed)[0].shape == (3, 2)


def test_parity_check_catches_a_model_that_changed_after_export(tmp_path):
    model = timm.create_model("resnet18", in_chans=1, num_classes=2).eval()
    inputs = example_inputs(32)
    path = export_onnx(model, tmp_path / "model.onnx", inputs)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    with pytest.raises(ExportError, match="differs from torch"):
        check_onnx_parity(model, path, inputs)


def test_failed_export_leaves_the_previous_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, image):
            raise RuntimeError("boom")

    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ExportError, match="boom"):
        export_onnx(Broken(), target, example_inputs(8))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_parameters_and_latency_helpers():
    small = timm.create_model("mobilenetv3_small_050", in_chans=1, num_classes=2)
    big = timm.create_model("resnet18", in_chans=1, num_classes=2)
    assert count_parameters(big) == sum(p.numel() for p in big.parameters())
    assert count_parameters(big) > 5 * count_parameters(small)
    shared = nn.Sequential(small.conv_stem, small.conv_stem)
    assert count_parameters(shared) == count_parameters(small.conv_stem)
    assert latency_ms(small, 32, repeats=2) > 0
    assert time_call(lambda: None, repeats=1, warmup=0) >= 0
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=0)


def test_latency_table_times_both_runtimes_at_both_batches_with_the_threads_asked(tmp_path):
    from diffkd.models.footprint import latency_table

    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    threads = torch.get_num_threads()
    table = latency_table(model, 16, repeats=2)
    assert set(table) == {"torch", "onnx"} and all(set(t) == {"b1", "b32"} for t in table.values())
    assert all(ms > 0 for t in table.values() for ms in t.values())
    assert torch.get_num_threads() == threads  # one thread while timing, the caller's setting after
    exported = export_onnx(model, tmp_path / "model.onnx", example_inputs(16))
    assert set(latency_table(model, 16, batches=(4,), repeats=1, onnx_path=str(exported))["onnx"]) == {"b4"}
