"""Placement on toy models whose every tap can be checked by hand, plus threads and RobustBench layers."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_core import attach, calibrate, find_taps, sparsify
from meansparse_core.robustbench_compat import import_robustbench
from meansparse_core.statistics import embedded_statistics


class FunctionalNet(nn.Module):
    """Activations called as functions, in three spellings, one of them inside a child module."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(F.relu(a))
        c = torch.relu(b) + b.relu()
        return self.head(F.silu(c.mean(dim=(2, 3))))

    def by_hand(self, x, stats, alpha):
        def s(name, t):
            tap = stats[name]
            return sparsify(t, tap.mean.float(), tap.std.float(), alpha, tap.tap.channel_dim)

        a = self.conv1(x)
        b = self.conv2(F.relu(s("relu", a)))
        c = torch.relu(s("relu#2", b)) + s("relu#3", b).relu()
        return self.head(F.silu(s("silu", c.mean(dim=(2, 3)))))


class _Swish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class Swish(nn.Module):
    """Like DeepMind's: an activation module that calls no torch activation function."""

    def forward(self, x):
        return _Swish.apply(x)


class SwishBlock(nn.Module):
    """An activation-looking name around an activation: must not become a second tap."""

    def __init__(self):
        super().__init__()
        self.swish = Swish()

    def forward(self, x):
        return self.swish(x)


class ModuleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.relu = nn.ReLU(inplace=True)  # called twice, on features with different statistics
        self.block = SwishBlock()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        h = self.relu(h * 2 - 1)
        return self.fc(self.block(h).mean(dim=(2, 3)))


class TokenNet(nn.Module):
    """Channel-last features: (N, L, C) tokens and (N, H, W, C) maps through Linear + GELU."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mlp1 = nn.Linear(8, 12)
        self.act = nn.GELU()
        self.mlp2 = nn.Linear(12, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        maps = self.embed(x).permute(0, 2, 3, 1)  # N, H, W, C
        maps = self.mlp2(self.act(self.mlp1(maps)))  # the tap sees (N, H, W, 12)
        tokens = F.gelu(maps.flatten(1, 2))  # the tap sees (N, L, 7)
        return self.head(tokens.mean(dim=1))


def calibrated(model, n=16, shape=(3, 8, 8), device="cpu"):
    torch.manual_seed(0)
    model.to(device).eval()
    images = torch.rand(n, *shape).to(device)
    return images, calibrate(model, [images[:10], images[10:]])


def test_functional_taps_are_found_and_equal_a_hand_placed_operator(device):
    model = FunctionalNet()
    images, stats = calibrated(model, device=device)
    assert [(t.name, t.kind, t.channels) for t in stats.tap_list] == [
        ("relu", "function", 6), ("relu#2", "function", 6), ("relu#3", "function", 6), ("silu", "function", 6)
    ]
    sparse = attach(model, stats)
    with torch.no_grad():
        assert torch.equal(sparse(images, alpha=0.4), model.by_hand(images, stats, 0.4))


def test_module_taps_repeated_calls_and_custom_activations():
    model = ModuleNet()
    images, stats = calibrated(model)
    assert [(t.name, t.kind) for t in stats.tap_list] == [
        ("relu", "function"), ("relu#2", "function"), ("block.swish", "module")
    ]
    first, second = stats["relu"], stats["relu#2"]
    assert not torch.allclose(first.mean, second.mean), "each call of a shared module has its own statistics"


class MixedNet(nn.Module):
    """PyTorch activation modules (caught by pre-hooks) next to a functional call (function mode)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.gelu = nn.GELU()

    def forward(self, x):
        h = self.act(self.conv(x))
        return F.relu(self.gelu(h) - 0.1) + self.act(h)


def test_pytorch_activation_modules_are_routed_once_by_their_pre_hooks(device, monkeypatch):
    from meansparse_core.routing import route_taps

    model = MixedNet()
    images, stats = calibrated(model, device=device)
    assert [t.name for t in stats.tap_list] == ["act", "gelu", "relu", "act#2"]
    seen = []
    route_taps(model, stats.tap_list, lambda tap, x: seen.append(tap.name) or x, images)
    assert seen == ["act", "gelu", "relu", "act#2"], "every tap exactly once, in forward order"

    def s(name, t):
        return sparsify(t, stats[name].mean.float(), stats[name].std.float(), 0.4, 1)

    with torch.no_grad():
        h = F.relu(s("act", model.conv(images)))
        expected = F.relu(s("relu", F.gelu(s("gelu", h)) - 0.1)) + F.relu(s("act#2", h))
        sparse = attach(model, stats)
        assert torch.allclose(sparse(images, alpha=0.4), expected, atol=1e-6)
        assert function_mode_passes(monkeypatch, lambda: sparse(images, alpha=0.4)) == 1, \
            "the functional F.relu still needs the function mode"
    sparse.detach()


def function_mode_passes(monkeypatch, run) -> int:
    """How many times ``run()`` enters the function mode that catches functional activations."""
    from meansparse_core import routing

    entered = []

    class Counted(routing._FunctionCalls):
        def __enter__(self):
            entered.append(self)
            return super().__enter__()

    monkeypatch.setattr(routing, "_FunctionCalls", Counted)
    run()
    monkeypatch.setattr(routing, "_FunctionCalls", Counted.__base__)
    return len(entered)


@pytest.mark.parametrize("kernel", [True, False])
def test_relu_modules_are_routed_by_their_own_forward_without_the_function_mode(kernel, monkeypatch):
    """A tapped nn.ReLU is the operator and the ReLU in one C kernel call; other callers see PyTorch's ReLU."""
    from meansparse_core import native

    monkeypatch.setattr(native, "enabled", kernel)
    relu = nn.ReLU()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 4, 1), relu)  # one module, two taps
    images, plain_stats = calibrated(plain)
    assert [t.name for t in plain_stats.tap_list] == ["1", "1#2"]
    with torch.no_grad():
        h = F.relu(sparsify(plain[0](images), plain_stats["1"].mean.float(), plain_stats["1"].std.float(), 0.4))
        s = plain_stats["1#2"]
        expected = F.relu(sparsify(plain[2](h), s.mean.float(), s.std.float(), 0.4))
    fused_calls = []
    run = native.run
    monkeypatch.setattr(native, "run", lambda x, *args: fused_calls.append(args[3]) or run(x, *args))
    sparse = attach(plain, plain_stats)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in plain.modules()), \
        "a pass that needs no hook puts none on the model (each hook slows every call of its module)"
    with torch.no_grad():
        assert function_mode_passes(monkeypatch, lambda: sparse(images, alpha=0.4)) == 0
        assert torch.equal(sparse(images, alpha=0.4), expected)
        assert fused_calls == [True] * 4 if kernel else not fused_calls, "operator and ReLU in one call, twice a pass"
        assert torch.equal(plain(images), F.relu(plain[2](F.relu(plain[0](images))))), "no pass: PyTorch's ReLU"
    sparse.detach()
    assert "forward" not in vars(relu), "detached, the module has its class's forward again"


def test_channel_last_features_use_the_last_axis(device):
    model = TokenNet()
    images, stats = calibrated(model, shape=(3, 16, 16), device=device)
    assert [(t.name, t.channel_dim, t.channels) for t in stats.tap_list] == [("act", 3, 12), ("gelu", 2, 7)]


@pytest.mark.parametrize("net", [FunctionalNet, ModuleNet, TokenNet])
def test_attach_alpha_zero_is_bit_identical_and_detach_restores(net, device):
    model = net()
    images, stats = calibrated(model, shape=(3, 16, 16), device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(images)
        sparse = attach(model, stats)
        assert torch.equal(model(images), base), "attached but not called through MeanSparse: unchanged"
        assert torch.equal(sparse(images, alpha=0.0), base)
        assert not torch.allclose(sparse(images, alpha=0.5), base)
        assert sparse.detach() is model
        assert torch.equal(model(images), base)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_alphas_override_the_global_alpha(device):
    model = FunctionalNet()
    images, stats = calibrated(model, device=device)
    sparse = attach(model, stats)
    with torch.no_grad():
        only_silu = sparse(images, alpha=0.0, layer_alphas={"silu": 0.8})
        by_hand = model.head(F.silu(sparsify(
            (torch.relu(model.conv2(F.relu(model.conv1(images))))
             + model.conv2(F.relu(model.conv1(images))).relu()).mean(dim=(2, 3)),
            stats["silu"].mean.float(), stats["silu"].std.float(), 0.8)))
        assert torch.equal(only_silu, by_hand)
    with pytest.raises(KeyError, match="No tap named"):
        sparse(images, alpha=0.1, layer_alphas={"nope": 0.3})


def test_straight_through_gradients_flow_where_exact_ones_vanish(device):
    model = TokenNet()  # GELU's derivative is non-zero at the replaced values, unlike ReLU's
    images, stats = calibrated(model, shape=(3, 16, 16), device=device)
    sparse = attach(model, stats)
    grads = {}
    for mode in ["exact", "straight-through"]:
        x = images.clone().requires_grad_(True)
        sparse(x, alpha=50.0, grad=mode).sum().backward()  # every feature replaced
        grads[mode] = x.grad
    assert torch.count_nonzero(grads["exact"]) == 0
    assert torch.count_nonzero(grads["straight-through"]) > 0


def test_fixed_alpha_view_is_a_plain_module(device):
    model = FunctionalNet()
    images, stats = calibrated(model, device=device)
    sparse = attach(model, stats)
    view = sparse.at(alpha=0.3, grad="straight-through")
    with torch.no_grad():
        assert torch.equal(view(images), sparse(images, alpha=0.3))
    assert len(list(view.parameters())) == len(list(model.parameters()))


def test_two_threads_with_different_alphas_each_get_their_own_result():
    model = FunctionalNet()
    images, stats = calibrated(model)
    sparse = attach(model, stats)
    alphas = {"a": 0.2, "b": 0.9, "base": None}
    with torch.no_grad():
        expected = {k: model(images) if a is None else sparse(images, alpha=a) for k, a in alphas.items()}
    assert not torch.equal(expected["a"], expected["b"])
    start = threading.Barrier(len(alphas))
    mismatches = []

    def worker(key):
        start.wait()
        with torch.no_grad():
            for _ in range(60):
                a = alphas[key]
                got = model(images) if a is None else sparse(images, alpha=a)
                if not torch.equal(got, expected[key]):
                    mismatches.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in alphas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []


def test_model_without_activations_is_refused():
    with pytest.raises(ValueError, match="No activation found"):
        find_taps(nn.Sequential(nn.Linear(3, 2)), torch.rand(1, 3))


def small_meansparse_wrn():
    """RobustBench's MeanSparse WRN (the Amini2024MeanSparse_S-WRN-70-16 code) at depth 10."""
    import_robustbench()
    from robustbench.model_zoo.architectures.Meansparse_wrn_70_16 import DMWideResNet

    torch.manual_seed(0)
    model = DMWideResNet(num_classes=10, depth=10, width=1).eval()
    for name, buf in model.named_buffers():
        if name.endswith("running_mean") and "meansparse" in name:
            buf.copy_(torch.randn_like(buf) * 0.1)
        elif name.endswith("running_var") and "meansparse" in name:
            buf.copy_(torch.rand_like(buf) + 0.05)
    return model


def set_thresholds(model, value):
    for name, buf in model.named_buffers():
        if name.endswith("threshold"):
            buf.fill_(value)


def test_robustbench_meansparse_layers_become_the_taps_and_follow_our_alpha():
    model = small_meansparse_wrn()
    images = torch.rand(4, 3, 32, 32)
    stats = embedded_statistics(model, images[:1])
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "MeanSparse"]
    assert [t.name for t in stats.tap_list] == layers
    assert {t.kind for t in stats.tap_list} == {"robustbench"}
    sparse = attach(model, stats)
    set_thresholds(model, 0.7)  # a stored threshold must not leak into our alpha
    with torch.no_grad():
        for alpha in [0.0, 0.1, 0.35]:
            ours = sparse(images, alpha=alpha)
            set_thresholds(model, alpha)
            assert torch.equal(ours, model(images)), f"alpha={alpha}"
            set_thresholds(model, 0.7)


def test_embedded_statistics_are_refused_for_models_without_meansparse_layers():
    with pytest.raises(ValueError, match="calibrate it instead"):
        embedded_statistics(FunctionalNet().eval(), torch.rand(1, 3, 8, 8))


def test_a_sparse_model_collected_while_a_router_is_being_built_does_not_hang_the_process():
    """The cyclic collector can free a SparseModel (and run its routing's exit) while this thread holds
    the routers' lock; that hung a long pytest run. In a subprocess, so that a hang fails the test."""
    code = """if True:
        import gc
        from meansparse_core import attach, routing
        from meansparse_core.models import bundled_statistics_path, find_model, load_model
        from meansparse_core.statistics import Statistics
        spec = find_model("bundled/digits-cnn")
        sparse = attach(load_model(spec), Statistics.load(bundled_statistics_path(spec)))
        sparse.cycle = [sparse]  # freed by the cyclic collector only
        del sparse
        with routing._installs_lock:  # as while another pass is being set up
            gc.collect()
        print("collected")
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "collected", done.stderr[-2000:]
