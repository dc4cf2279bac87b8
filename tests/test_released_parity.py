"""The authors' released MeanSparse models rebuilt from their base models, bit for bit.

For each ``Amini2024MeanSparse_*`` entry of RobustBench 1.1.1 and its base entry, built with random
weights (shared between the two): the released model's statistics, attached to the base model,
give exactly the released model's logits with every stored threshold set to t, on the CPU in
float32. The default suite checks the smallest pair and small instances of the other released
architectures (the same classes with fewer blocks); MEANSPARSE_FULL_ZOO=1 checks all six pairs (a
few minutes and up to 4 GB of memory per pair on two CPU cores).
"""

import os
import warnings

import pytest
import torch
from torch import nn

from meansparse_core import attach
from meansparse_core.taps import own_layers
from meansparse_core.robustbench_compat import import_robustbench
from meansparse_core.statistics import embedded_statistics, published_alpha

import_robustbench()
from robustbench.model_zoo import model_dicts  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402

FULL_ZOO = os.environ.get("MEANSPARSE_FULL_ZOO") == "1"
THRESHOLDS = (0.0, 0.1, 0.25, 0.5)

# (dataset, threat, base entry, released entry, input side); the first is the smallest pair.
PAIRS = [
    ("imagenet", "Linf", "Liu2023Comprehensive_Swin-L", "Amini2024MeanSparse_Swin-L", 224),
    ("imagenet", "Linf", "Liu2023Comprehensive_ConvNeXt-L", "Amini2024MeanSparse_ConvNeXt-L", 224),
    ("cifar10", "Linf", "Peng2023Robust", "Amini2024MeanSparse_Ra_WRN_70_16", 32),
    ("cifar10", "L2", "Wang2023Better_WRN-70-16", "Amini2024MeanSparse_S-WRN-70-16", 32),
    ("cifar100", "Linf", "Wang2023Better_WRN-70-16", "Amini2024MeanSparse_S-WRN-70-16", 32),
    ("cifar10", "Linf", "Bartoldson2024Adversarial_WRN-94-16", "Amini2024MeanSparse_S-WRN-94-16", 32),
]


def zoo_builder(dataset: str, threat: str, name: str):
    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]["model"]


def released_pair(make_base, make_released, side: int):
    """(base, released, images): random weights shared, the released layers' statistics measured on
    the images with the authors' own update (one batch), their thresholds still 0."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        released = make_released().eval()
        base = make_base().eval()
    for module in released.modules():
        # Random affine batch norms, so that every block passes signal on (some zero-initialise them).
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
    weights = {k: v for k, v in released.state_dict().items()
               if not any(k.startswith(f"{n}.") for n in own_layers(released))}
    missing, unexpected = base.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if "relative_position_index" not in k], (missing, unexpected)
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    layers = own_layers(released).values()
    for layer in layers:
        layer.flag_update_statistics.fill_(1)
        layer.batch_num.fill_(1.0)
    with torch.no_grad():
        released(images)
    for layer in layers:
        layer.flag_update_statistics.fill_(0)
    return base, released, images


def pair_params():
    for i, pair in enumerate(PAIRS):
        skip = i > 0 and not FULL_ZOO
        yield pytest.param(*pair, id=f"{pair[0]}-{pair[1]}-{pair[3]}",
                           marks=[pytest.mark.skip(reason="set MEANSPARSE_FULL_ZOO=1 to include")] if skip else [])


def small_pairs():
    """(base, released, side) builders: the released architectures' own classes with few blocks."""
    from robustbench.model_zoo.architectures import Meansparse_ra_wrn_70_16 as released_ra
    from robustbench.model_zoo.architectures import Meansparse_wrn_70_16 as released_wrn
    from robustbench.model_zoo.architectures import Meansparse_wrn_94_16 as released_wrn94
    from robustbench.model_zoo.architectures import dm_wide_resnet, robustarch_wide_resnet
    from robustbench.model_zoo.architectures.sparsified_model import MeanSparse_imagenet, add_custom_layer_imagenet
    import timm

    wrn = dict(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU)
    ra = dict(mean=(0.5,) * 3, std=(0.25,) * 3, stem_width=16, depth=[2, 1, 1], stage_width=[16, 32, 64],
              groups=[1, 1, 1], activation_fn=nn.SiLU, se_ratio=0.25, se_activation=nn.ReLU, se_order=2)

    def convnext():
        return timm.create_model("convnext_large", pretrained=False, depths=(1, 1, 1, 1))

    def released_convnext():
        model = convnext()
        add_custom_layer_imagenet(model, MeanSparse_imagenet)
        return model

    return {
        "WRN": (lambda: dm_wide_resnet.DMWideResNet(**wrn), lambda: released_wrn.DMWideResNet(**wrn), 32),
        "WRN-94-16 class": (lambda: dm_wide_resnet.DMWideResNet(**wrn),
                            lambda: released_wrn94.MeanSparse_DMWideResNet(**wrn), 32),
        "RaWRN": (lambda: robustarch_wide_resnet.NormalizedWideResNet(**ra),
                  lambda: released_ra.NormalizedWideResNet(**ra), 32),
        "ConvNeXt": (convnext, released_convnext, 64),
    }


def check_pair(base, released, images):
    stats = embedded_statistics(released)
    sparse = attach(base, stats)
    assert len(sparse.taps) == len(own_layers(released))
    base_logits = base(images)
    assert torch.equal(sparse.base(images), base_logits)
    for t in THRESHOLDS:
        for layer in own_layers(released).values():
            layer.threshold.fill_(t)
        logits = sparse(images, alpha=t)
        assert torch.equal(logits, released(images)), f"logits differ at threshold {t}"
    assert published_alpha(released) == THRESHOLDS[-1]
    assert not torch.equal(logits, base_logits), "the thresholds must change the logits"


@pytest.mark.parametrize("dataset,threat,base_name,released_name,side", list(pair_params()))
@torch.no_grad()
def test_base_with_released_statistics_is_the_released_model(dataset, threat, base_name, released_name, side):
    check_pair(*released_pair(zoo_builder(dataset, threat, base_name), zoo_builder(dataset, threat, released_name), side))


@pytest.mark.parametrize("family", ["WRN", "WRN-94-16 class", "RaWRN", "ConvNeXt"])
@torch.no_grad()
def test_small_instances_of_every_released_architecture(family):
    check_pair(*released_pair(*small_pairs()[family]))


@torch.no_grad()
def test_a_released_model_at_alpha_0_is_its_base_and_its_threshold_is_published():
    from meansparse_core.one_image import classifier, compare

    base, released, images = released_pair(*small_pairs()["WRN"])
    for layer in own_layers(released).values():
        layer.threshold.fill_(0.25)
    stats = embedded_statistics(released)
    assert stats.meta["published_alpha"] == 0.25 and published_alpha(released) == 0.25
    sparse = attach(released, stats)
    base_logits = base(images)
    assert not torch.equal(released(images), base_logits), "called directly, the layers run at 0.25"
    assert torch.equal(classifier(sparse, 0.0)(images), base_logits)
    assert torch.equal(sparse(images, alpha=0.0), base_logits)
    assert torch.equal(sparse(images, alpha=0.25), released(images))
    names = [str(i) for i in range(10)]
    comparison = compare(sparse, images[0], None, 0, 0.25, names)
    assert comparison.base_clean == compare(attach(base, stats), images[0], None, 0, 0.25, names).base_clean
