"""Every attack runs on the channels-last CIFAR-10 demo model, against the base and the sparsified model,
on images laid out as the data loaders make them (HWC arrays permuted to CHW)."""

import pytest
import torch

from meansparse_core.attacks import ATTACKS, make_attack
from meansparse_core.models import bundled_models, load_model
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.one_image import attack_image
from meansparse_core.statistics_lookup import find_statistics
from meansparse_core import attach


@pytest.fixture(scope="module")
def cifar_demo():
    spec = next(s for s in bundled_models() if s.name == "cifar-resnet9")
    model = load_model(spec).eval()
    return attach(model, find_statistics(spec, model, "cifar10").stats)


@pytest.mark.parametrize("name, target", [(n, t) for n in sorted(ATTACKS) for t in ("base", "sparse")
                                          if not (n == "autoattack" and t == "base")])  # the slowest; same path
def test_every_attack_runs_on_the_channels_last_demo_model(cifar_demo, name, target):
    torch.manual_seed(0)
    # permute(2, 0, 1) of an HWC array, as meansparse_core.data does: channels-last strides.
    image = torch.rand(32, 32, 3).permute(2, 0, 1)
    assert not image.is_contiguous()
    with torch.no_grad():
        label = int(cifar_demo.base(image[None]).argmax())  # a correct prediction, so the attack has work to do
    # AutoAttack's four attacks at full length take minutes on one robust image; at eps 64 the first one
    # fools the model and the others are skipped. The layout test below covers its later attacks.
    eps = 0.5 if name == "pgd-l2" else 64 if name == "autoattack" else 8
    adversarial = attack_image(cifar_demo, image, label, AttackChoice(name, eps, 2, target), alpha=0.2)
    bound = (adversarial - image).norm() if name == "pgd-l2" else (adversarial - image).abs().max() * 255
    assert adversarial.shape == image.shape and bound <= eps * (1 + 1e-4)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_gets_images_with_standard_strides(cifar_demo, name, monkeypatch):
    # pyautoattack .view()s gradients laid out like its input; channels-last input strides make that fail.
    seen = []
    monkeypatch.setattr(ATTACKS[name], "_perturb", lambda self, images, labels, targets: seen.append(images) or images)
    image = torch.rand(1, 32, 32, 3).permute(0, 3, 1, 2)
    make_attack(name, cifar_demo.base, eps=8)(image, torch.tensor([0]))
    assert len(seen) == 1 and seen[0].is_contiguous() and torch.equal(seen[0], image)
