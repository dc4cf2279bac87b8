"""Placement rules: named ones, a user's own (input, output, additions), what they store, and bad input."""

import pytest
import torch
from torch import nn

from meansparse_core import Statistics, attach, calibrate, find_taps, sparsify
from meansparse_core.placement_rules import PLACEMENTS, parse_rule, released_for


class Block(nn.Module):
    """A pre-activation residual block whose sum no module returns on its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        y = x + self.conv(self.act(self.norm(x)))
        return y * 0.5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(Block(4), Block(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def net_and_images():
    torch.manual_seed(0)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.running_mean, 0, 0.2)
    return net, torch.randn(6, 3, 8, 8)


def test_user_rules_tap_inputs_outputs_and_additions_in_forward_order():
    net, images = net_and_images()
    names = lambda placement: [t.name for t in find_taps(net, images[:1], placement)]  # noqa: E731
    assert names("activations") == ["block.0.act", "block.1.act"]
    assert names("block.*:additions") == ["block.0:add", "block.1:add"]
    assert names("activations, block.*:output") == ["block.0.act", "block.0:output", "block.1.act", "block.1:output"]
    assert names("**.conv:input") == ["block.0.conv:input", "block.1.conv:input"]
    assert [t.kind for t in find_taps(net, images[:1], "block.*:additions, head:input")] == ["sum", "sum", "input"]


@torch.no_grad()
def test_an_addition_tap_replaces_the_sum_the_block_goes_on_with():
    net, images = net_and_images()
    stats = calibrate(net, [images], placement="block.*:additions")
    sparse = attach(net, stats)

    def by_hand(x, alpha):
        x = net.stem(x)
        for i, block in enumerate(net.block):
            tap = stats.taps[i]
            y = sparsify(x + block.conv(block.act(block.norm(x))), tap.mean.float(), tap.std.float(), alpha)
            x = y * 0.5
        return net.head(x.mean(dim=(2, 3)))

    assert torch.equal(sparse(images, alpha=0.0), net(images))
    assert torch.equal(sparse(images, alpha=0.7), by_hand(images, 0.7))
    assert not torch.equal(sparse(images, alpha=0.7), net(images))


def test_statistics_keep_their_placement_and_input_size(tmp_path):
    net, images = net_and_images()
    stats = calibrate(net, [images], placement="activations, block.*:output")
    stats.save(tmp_path / "s.pt")
    loaded = Statistics.load(tmp_path / "s.pt")
    assert loaded.placement == stats.placement and loaded.input_size == (3, 8, 8)
    assert loaded.tap_list == stats.tap_list
    with torch.no_grad():
        assert torch.equal(attach(net, loaded)(images, alpha=0.5), attach(net, stats)(images, alpha=0.5))


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("placement, message", [
    ("everywhere", "Unknown placement 'everywhere'"),
    ("block.*:middle", "Unknown placement 'block.*:middle'"),
    ("nothing.*:output", "The rule 'nothing.*:output' matches no module of Net"),
    ("released", "No released placement is known for Net"),
])
def test_bad_placements_get_one_sentence_and_attach_nothing(placement, message):
    net, images = net_and_images()
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        calibrate(net, [images], placement=placement)
    assert hooks_left(net) == 0


def test_statistics_attached_with_another_placement_are_refused_whole():
    net, images = net_and_images()
    stats = calibrate(net, [images], placement="activations")
    with pytest.raises(ValueError, match="computed with the activations placement, not block"):
        attach(net, stats, placement="block.*:output")
    other = calibrate(net, [images], placement="block.*:output")
    other.placement = stats.placement  # a file that claims a placement its taps do not follow
    with pytest.raises(ValueError, match="other places than the activations placement"):
        attach(net, other)
    assert hooks_left(net) == 0


def test_every_named_placement_is_explained_and_released_families_resolve():
    assert set(PLACEMENTS) == {"activations", "released"} and all(PLACEMENTS.values())
    from torchvision.models import resnet18

    assert released_for(resnet18()).family == "ResNet"
    assert parse_rule("activations, a.*:output").activations


def test_authors_estimator_averages_batch_figures_in_order():
    net, images = net_and_images()
    first, second = images[:4], images[4:]
    stats = calibrate(net, [first, second], placement="block.*:output", estimator="authors")
    exact = calibrate(net, [first, second], placement="block.*:output")
    with torch.no_grad():
        features = [net.block[0](net.stem(batch)) for batch in (first, second)]
    mean = sum(torch.mean(f, dim=(0, 2, 3)) / 2 for f in features)
    var = sum(torch.var(f, dim=(0, 2, 3)) / 2 for f in features)
    assert torch.equal(stats.taps[0].mean, mean.double()) and torch.equal(stats.taps[0].std, torch.sqrt(var).double())
    assert stats.meta["estimator"] == "authors" and exact.meta["estimator"] == "exact"
    assert not torch.allclose(stats.taps[0].std, exact.taps[0].std)  # unbiased, per batch: not the exact figure
