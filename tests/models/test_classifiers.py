import pytest
import torch

from diffkd.models.classifiers import create_classifier
from diffkd.data.schema import ClinicalEncoding


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "resnet18"])
def test_a_classifier_from_scratch_starts_at_the_constant_prediction(arch):
    torch.manual_seed(0)
    model = create_classifier(arch, in_chans=1, num_classes=2).train()
    logits = model(torch.randn(4, 1, 64, 64))
    assert torch.equal(logits, torch.zeros_like(logits))  # p = 0.5, cross-entropy ln 2
    labels = torch.tensor([0, 1, 1, 0])
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert model.get_classifier().weight.grad.abs().sum() > 0  # the zero layer still learns


def test_a_fusion_classifier_zeroes_its_image_head_only():
    torch.manual_seed(0)
    model = create_classifier("resnet18", in_chans=1, clinical_dim=ClinicalEncoding().width)
    assert model.backbone.get_classifier().weight.abs().sum() == 0
    assert any(p.abs().sum() > 0 for p in model.head.parameters())
