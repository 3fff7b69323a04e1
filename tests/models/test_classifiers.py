import math

import pytest
import torch

from diffkd.data.schema import ClinicalEncoding
from diffkd.models.classifiers import create_classifier


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "efficientnet_b0", "resnet18"])
def test_a_classifier_from_scratch_starts_near_the_constant_prediction(arch):
    torch.manual_seed(0)
    model = create_classifier(arch, in_chans=1, num_classes=2).train()
    head = model.get_classifier()
    assert head.weight.abs().max() <= 1 / math.sqrt(head.weight.shape[1])  # PyTorch's default, not ±1/sqrt(2)
    logits = model(torch.randn(16, 1, 64, 64))
    ce = torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (16,)))
    assert abs(float(ce) - math.log(2)) < 0.25 and logits.std() > 0  # near ln 2, yet not a constant


def test_a_fusion_classifier_rescales_its_image_head():
    torch.manual_seed(0)
    model = create_classifier("resnet18", in_chans=1, clinical_dim=ClinicalEncoding().width)
    head = model.backbone.get_classifier()
    assert head.weight.abs().max() <= 1 / math.sqrt(head.weight.shape[1])
