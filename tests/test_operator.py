"""The MeanSparse operator against a NumPy reference, its properties, gradients and RobustBench's layer."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from meansparse_core import MeanSparse, sparsify
from meansparse_core.robustbench_compat import import_robustbench

LAYOUTS = {  # shape, channel axis
    "NCHW": ((3, 5, 4, 6), 1),
    "NC": ((7, 5), 1),
    "NLC": ((2, 9, 5), -1),
    "NHWC": ((2, 4, 3, 5), -1),
}


def numpy_sparsify(x, mean, std, alpha, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    mean, std = mean.reshape(shape), std.reshape(shape)
    return np.where(np.abs(x - mean) < alpha * std, np.broadcast_to(mean, x.shape), x)


def random_case(shape, axis, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    channels = shape[axis]
    mean = torch.randn(channels, generator=gen) * 0.3
    std = torch.rand(channels, generator=gen) + 0.1
    return x.to(device), mean.to(device), std.to(device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 3.0])
def test_matches_numpy(layout, alpha, device):
    shape, axis = LAYOUTS[layout]
    x, mean, std = random_case(shape, axis, device=device)
    expected = numpy_sparsify(x.cpu().numpy(), mean.cpu().numpy(), std.cpu().numpy(), np.float32(alpha), axis)
    got = sparsify(x, mean, std, alpha, channel_dim=axis)
    assert got.device == x.device
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    assert (got != x).any(), "a test case that replaces nothing proves nothing"


def test_alpha_zero_returns_input_itself(device):
    x, mean, std = random_case((2, 5, 3, 3), 1, device=device)
    assert sparsify(x, mean, std, 0.0) is x
    assert MeanSparse(mean, std)(x, alpha=0.0) is x


def test_zero_std_channels_are_never_replaced_and_no_nan_appears(device):
    x, mean, std = random_case((4, 5, 3, 3), 1, device=device)
    std[2] = 0.0
    x[:, 2] = mean[2]  # even values exactly at the mean stay as they are
    for alpha in [0.5, 1e30, float("inf")]:
        y = sparsify(x, mean, std, alpha)
        assert not torch.isnan(y).any()
        assert torch.equal(y[:, 2], x[:, 2])
    y = sparsify(x, mean, std, float("inf"))
    others = [c for c in range(5) if c != 2]
    assert torch.equal(y[:, others], mean[others].view(1, -1, 1, 1).expand_as(y[:, others]))


def test_nan_input_passes_through_without_spreading(device):
    x, mean, std = random_case((2, 5, 3, 3), 1, device=device)
    x[0, 1, 0, 0] = float("nan")
    y = sparsify(x, mean, std, 1.0)
    assert torch.isnan(y).sum() == 1 and torch.isnan(y[0, 1, 0, 0])


def test_bad_arguments_are_refused():
    x, mean, std = random_case((2, 5, 3, 3), 1)
    with pytest.raises(ValueError, match="alpha"):
        sparsify(x, mean, std, -0.1)
    with pytest.raises(ValueError, match="channels"):
        sparsify(x, mean[:4], std[:4], 0.5)
    with pytest.raises(ValueError, match="grad"):
        sparsify(x, mean, std, 0.5, grad="bogus")


def test_exact_gradient_is_zero_inside_the_band_and_straight_through_is_identity(device):
    x, mean, std = random_case((3, 5, 4, 4), 1, device=device)
    inside = (x - mean.view(1, -1, 1, 1)).abs() < 0.7 * std.view(1, -1, 1, 1)
    assert inside.any() and (~inside).any()
    grads = {}
    for mode in ["exact", "straight-through"]:
        xg = x.clone().requires_grad_(True)
        sparsify(xg, mean, std, 0.7, grad=mode).sum().backward()
        grads[mode] = xg.grad
    assert torch.equal(grads["exact"], (~inside).float())
    assert torch.equal(grads["straight-through"], torch.ones_like(x))


def test_straight_through_forward_equals_exact_forward(device):
    x, mean, std = random_case((2, 9, 5), -1, device=device)
    exact = sparsify(x, mean, std, 0.6, channel_dim=-1)
    bpda = sparsify(x, mean, std, 0.6, channel_dim=-1, grad="straight-through")
    assert torch.equal(exact, bpda)


def _robustbench_layer(module_path, channels, mean, var, threshold):
    import_robustbench()
    import importlib

    layer = importlib.import_module(module_path).MeanSparse(channels)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)
    layer.threshold.fill_(threshold)
    return layer.eval()


@pytest.mark.parametrize(
    "module_path, shape, axis",
    [
        ("robustbench.model_zoo.architectures.Meansparse_wrn_70_16", (4, 6, 5, 5), 1),
        ("robustbench.model_zoo.architectures.Meansparse_swin_L", (2, 11, 6), -1),
    ],
)
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.25, 0.8, 2.0])
def test_same_outputs_as_robustbench_meansparse(module_path, shape, axis, threshold, device):
    x, mean, _ = random_case(shape, axis, seed=3, device=device)
    var = (torch.rand(shape[axis]) * 2).to(device)
    theirs = _robustbench_layer(module_path, shape[axis], mean, var, threshold).to(device)(x)
    ours = sparsify(x, mean, var.sqrt(), threshold, channel_dim=axis)
    assert torch.equal(ours, theirs)


# Property tests: any features, any statistics, any alpha.
channels = st.integers(1, 6)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def cases(draw):
    c = draw(channels)
    x = draw(arrays(np.float32, (draw(st.integers(1, 3)), c, draw(st.integers(1, 4))), elements=finite))
    mean = draw(arrays(np.float32, (c,), elements=finite))
    std = draw(arrays(np.float32, (c,), elements=st.floats(0, 1e3, width=32)))
    alpha = draw(st.floats(0, 10, allow_nan=False))
    return torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(std), alpha


@settings(max_examples=200, deadline=None)
@given(cases())
def test_every_output_is_the_input_or_the_channel_mean(case):
    x, mean, std, alpha = case
    y = sparsify(x, mean, std, alpha)
    m = mean.view(1, -1, 1).expand_as(x)
    assert torch.all((y == x) | (y == m))
    replaced = y != x
    assert torch.all(((x - m).abs() < alpha * std.view(1, -1, 1))[replaced])


@settings(max_examples=200, deadline=None)
@given(cases(), st.floats(0, 10, allow_nan=False))
def test_a_wider_band_replaces_a_superset(case, other_alpha):
    x, mean, std, alpha = case
    low, high = sorted([alpha, other_alpha])
    m = mean.view(1, -1, 1).expand_as(x)
    replaced_low = (sparsify(x, mean, std, low) == m) & (x != m)
    replaced_high = (sparsify(x, mean, std, high) == m) & (x != m)
    assert torch.all(replaced_high | ~replaced_low)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_sparsify_is_idempotent(case):
    x, mean, std, alpha = case
    once = sparsify(x, mean, std, alpha)
    assert torch.equal(sparsify(once, mean, std, alpha), once)


# --- the fused (compiled) path -------------------------------------------------------------------

FUSED_CASES = {"nchw": ((8, 24, 32, 32), 1, False), "channels_last": ((8, 24, 32, 32), 1, True),
               "tokens": ((8, 1024, 12), -1, False), "wide_channels_last": ((4, 1100, 4, 4), 1, True)}


@pytest.mark.parametrize("shape, axis", [((0, 5, 4, 6), 1), ((3, 5, 0, 6), 1), ((0, 5), 1), ((2, 0, 5), -1)])
@pytest.mark.parametrize("relu", [False, True])
def test_empty_features_pass_through(shape, axis, relu):
    """An empty batch (e.g. no item left to attack) gives an empty result, with and without gradients."""
    from meansparse_core.operator import sparsify_relu

    apply = sparsify_relu if relu else sparsify
    x = torch.randn(shape, requires_grad=True)
    y = apply(x, torch.zeros(5), torch.ones(5), 0.3, axis)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    with torch.no_grad():
        assert apply(x, torch.zeros(5), torch.ones(5), 0.3, axis).shape == x.shape


def edge_case(case, dtype, device):
    """Features with NaN, infinities, signed zeros, a dead channel and a channel on the band's edge."""
    shape, axis, channels_last = FUSED_CASES[case]
    x, mean, std = random_case(shape, axis, seed=5, device=device)
    x, mean, std = x.to(dtype), mean.to(dtype), std.to(dtype)
    std[0] = 0.0  # a dead channel
    x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype, device=device)
    x.select(axis, 1).fill_(mean[1] + std[1] * 0.5)  # a whole channel exactly on the band's edge (alpha 0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, mean, std, axis % x.dim()


def reference(x, mean, std, axis, grad, relu, grad_output):
    """The operator written with plain PyTorch operations (then ReLU), and the input gradient autograd derives."""
    shape = [1] * x.dim()
    shape[axis] = -1
    mean, band = mean.view(shape), (std * 0.5).view(shape)
    leaf = x.detach().clone().requires_grad_(True)
    if grad == "exact":
        y = torch.where((leaf - mean).abs() < band, mean, leaf)
        inner = leaf
    else:  # straight-through: the gradient passes the operator unchanged, only ReLU's own backward applies
        inner = torch.where((x - mean).abs() < band, mean, x).requires_grad_(True)
        y = inner
    out = torch.relu(y) if relu else y
    out.backward(grad_output)
    return out.detach(), inner.grad


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True], ids=["operator", "operator+relu"])
@pytest.mark.parametrize("kernel", ["native", "pytorch"])
def test_the_fused_operator_equals_plain_pytorch_bit_for_bit(case, dtype, relu, kernel, device, monkeypatch):
    """The C kernel (CPU) and the library's PyTorch path, forward and both gradients, against plain autograd."""
    from meansparse_core import native
    from meansparse_core.operator import sparsify_relu

    monkeypatch.setattr(native, "enabled", kernel == "native")
    x, mean, std, axis = edge_case(case, dtype, device)
    assert native.usable(x, axis) == (kernel == "native" and device.type == "cpu")
    apply = sparsify_relu if relu else sparsify
    for grad in ("exact", "straight-through"):
        grad_output = torch.linspace(-1, 1, x.numel(), dtype=dtype, device=device).view(x.shape)
        expected, expected_grad = reference(x, mean, std, axis, grad, relu, grad_output)
        with torch.no_grad():
            forward_only = apply(x, mean, std, 0.5, axis, grad)
        leaf = x.detach().clone().requires_grad_(True)
        y = apply(leaf, mean, std, 0.5, axis, grad)
        y.backward(grad_output)
        for got in (forward_only, y.detach()):
            assert got.stride() == x.stride(), "the output keeps the input's memory layout"
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(got.signbit(), expected.signbit()), "signed zeros as PyTorch gives them"
        torch.testing.assert_close(leaf.grad, expected_grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_the_compiled_operator_equals_the_eager_one_bit_for_bit(case, device, monkeypatch):
    """Where the C kernel does not run (GPUs, no C compiler), forward-only work may use torch.compile."""
    from meansparse_core import native
    from meansparse_core.fusion import MIN_ELEMENTS
    from meansparse_core.operator import _COMPILED, _operator, _operator_eager, channel_view

    monkeypatch.setattr(native, "enabled", False)
    x, mean, std, axis = edge_case(case, torch.float32, device)
    band = std * 0.5
    for mask, fused in _COMPILED.items():
        assert x.numel() >= MIN_ELEMENTS and fused.enabled
        compiled = _operator(x, mean, band, axis, False, mask)
        eager = _operator_eager(x, channel_view(mean, x, axis), channel_view(band, x, axis), False, mask)
        assert fused.kernel is not None and fused.enabled, "the compiled kernel ran"
        assert compiled[0].stride() == eager[0].stride(), "the output keeps the input's memory layout"
        for got, expected in zip(compiled, eager):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("grad", ["exact", "straight-through"])
def test_the_demo_model_gives_the_same_logits_gradients_and_attack_with_and_without_fusion(grad, monkeypatch):
    """The whole sparsified model: ReLUs fused with the operator (C kernel) against PyTorch's operations."""
    from meansparse_core import attach, native
    from meansparse_core.attacks import make_attack
    from meansparse_core.fusion import Fused
    from meansparse_core.models import bundled_statistics_path, find_model, load_model
    from meansparse_core.statistics import Statistics

    spec = find_model("bundled/cifar-resnet9")
    model, stats = load_model(spec), Statistics.load(bundled_statistics_path(spec))
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(native, "enabled", fused)
        monkeypatch.setattr(Fused, "worth_it", lambda self, x, on=fused: on and x.numel() >= 1 << 16)
        sparse = attach(model, stats)
        with torch.no_grad():
            logits = sparse(images, alpha=0.3)
        leaf = images.clone().requires_grad_(True)
        sparse(leaf, alpha=0.3, grad=grad).logsumexp(1).sum().backward()
        adversarial = make_attack("pgd", sparse.at(0.3, grad), eps=8, steps=3, seed=0)(images, labels)
        runs.append((logits, leaf.grad, adversarial))
        sparse.detach()
    for fused, eager in zip(*runs):
        assert torch.equal(fused, eager)


def test_the_operator_stays_eager_and_says_so_once_where_compiling_fails(monkeypatch):
    from meansparse_core.fusion import Fused
    from meansparse_core.operator import _operator_eager

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    fused = Fused(_operator_eager)
    x, mean, std = random_case((4, 16, 32, 32), 1)
    arguments = (x, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1) * 0.5)
    assert fused.worth_it(x)
    with pytest.warns(RuntimeWarning, match="_operator_eager unfused: torch.compile failed .*no C\\+\\+ compiler"):
        assert torch.equal(fused(*arguments)[0], _operator_eager(*arguments)[0])
    assert not fused.enabled and not fused.worth_it(x), "no second try, and so no second warning"


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The C kernel module with an empty cache folder and nothing loaded: the next call builds it."""
    from meansparse_core import native

    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "enabled", True)
    return native


def test_without_a_c_compiler_the_operator_says_so_once_and_uses_pytorch(fresh_kernel, monkeypatch, tmp_path):
    native = fresh_kernel
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.library_path().parent == tmp_path / "cache" / "kernels", "the cache folder is read at call time"
    x, mean, std = random_case((4, 16, 32, 32), 1)
    with pytest.warns(RuntimeWarning, match="uses PyTorch's operations: its C kernel could not be built"):
        assert not native.usable(x, 1)
    assert not list((tmp_path / "cache").rglob("*.so")), "nothing was built"
    assert torch.equal(sparsify(x, mean, std, 0.5), torch.from_numpy(numpy_sparsify(x.numpy(), mean.numpy(), std.numpy(), 0.5, 1)))
    assert not native.available(), "no second try, and so no second warning"
    assert native.describe().startswith("PyTorch's operations (the C kernel could not be built")


def test_a_corrupt_cached_kernel_is_rebuilt(fresh_kernel):
    native = fresh_kernel
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF but cut short")
    x, mean, std = random_case((4, 16, 8, 8), 1)
    assert native.available()
    assert path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 1000
    assert torch.equal(sparsify(x, mean, std, 0.5), torch.from_numpy(numpy_sparsify(x.numpy(), mean.numpy(), std.numpy(), 0.5, 1)))


def test_a_compiler_without_openmp_builds_a_serial_kernel(fresh_kernel, monkeypatch, tmp_path):
    """Apple clang refuses -fopenmp: the next recipe (serial) is built, gives the same results and says so."""
    import shutil

    native = fresh_kernel
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && echo "unsupported option -fopenmp" >&2 '
                        f'&& exit 1; done\nexec {shutil.which("cc")} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    x, mean, std = random_case((4, 16, 32, 32), 1)
    assert native.available()
    assert native.describe().startswith("C kernel, serial")
    assert torch.equal(sparsify(x, mean, std, 0.5), torch.from_numpy(numpy_sparsify(x.numpy(), mean.numpy(), std.numpy(), 0.5, 1)))


def test_build_recipes_suit_each_platform(tmp_path):
    from meansparse_core.native import recipes

    runtime = tmp_path / "libomp.dylib"
    mac = recipes("Darwin", "arm64", runtime)
    assert [r.name for r in mac] == ["OpenMP (PyTorch's runtime)", "serial"]
    assert mac[0].flags == ("-Xpreprocessor", "-fopenmp"), "Apple clang takes OpenMP only through the preprocessor"
    assert str(runtime) in mac[0].link, "linked to PyTorch's own libomp: a second copy aborts the process"
    assert [r.name for r in recipes("Darwin", "arm64", None)] == ["serial"]
    arm = recipes("Linux", "aarch64", None)
    assert all("-mprefer-vector-width=256" not in r.flags for r in arm) and "-mcpu=native" in arm[0].flags
    x86 = recipes("Linux", "x86_64", tmp_path / "libgomp.so.1")
    assert "-mprefer-vector-width=256" in x86[0].flags and x86[-1].flags == (), "a portable build comes last"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's loaded libraries (Linux)")
def test_the_kernel_runs_on_pytorchs_openmp_runtime_not_a_second_one():
    """In a fresh process (other libraries, such as scikit-learn, bring their own runtime), torch plus the kernel
    load one OpenMP runtime."""
    from meansparse_core import native

    if not native.available():
        pytest.skip("no C kernel here")
    script = (
        "import re, torch\n"
        "from meansparse_core import native, sparsify\n"
        "assert native.available()\n"
        "sparsify(torch.randn(2, 4, 8, 8), torch.zeros(4), torch.ones(4), 0.5)\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(sorted({l.split()[-1] for l in maps if re.search(r'/lib(g|i)?omp[^/]*\\.so', l)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])
    assert len(loaded) <= 1, f"two OpenMP runtimes in one process: {loaded}"


def test_the_kernel_reads_statistics_that_are_not_contiguous():
    """Strided statistics are copied for the call and kept alive until C has read them."""
    from meansparse_core import native

    if not native.available():
        pytest.skip("no C kernel here")
    x, mean, std = random_case((4, 16, 8, 8), 1)
    band = std * 0.5
    spaced_mean, spaced_band = torch.stack([mean, -mean]).T.flatten()[::2], torch.stack([band, -band]).T.flatten()[::2]
    assert not spaced_mean.is_contiguous() and not spaced_band.is_contiguous()
    for _ in range(3):
        out, _ = native.run(x, spaced_mean, spaced_band, 1, False, None)
        assert torch.equal(out, torch.from_numpy(numpy_sparsify(x.numpy(), mean.numpy(), std.numpy(), 0.5, 1)))


def test_the_kernel_refuses_statistics_it_would_read_wrongly():
    from meansparse_core import native

    if not native.available():
        pytest.skip("no C kernel here")
    x, mean, std = random_case((4, 16, 8, 8), 1)
    for bad_mean in (mean.double(), mean[:8], mean.to("meta")):
        with pytest.raises(ValueError, match="mean must be a CPU vector of 16 torch.float32 values"):
            native.run(x, bad_mean, std, 1, False, None)
    with pytest.raises(ValueError, match="float32 or float64 CPU features"):
        native.run(x.half(), mean.half(), std.half(), 1, False, None)


def test_a_layer_reuses_its_band_only_while_alpha_and_its_statistics_stay_the_same():
    """MeanSparse keeps its last alpha * std: changed statistics (in place or replaced) or alpha must not reuse it."""
    x, mean, std = random_case((4, 8, 5, 5), 1)
    layer = MeanSparse(mean, std)
    for alpha in (0.5, 0.7, 0.5):
        assert torch.equal(layer(x, alpha), sparsify(x, mean, std, alpha))
    layer.std.mul_(2)  # in place, as load_state_dict writes
    assert torch.equal(layer(x, 0.5), sparsify(x, mean, std * 2, 0.5))
    layer.load_state_dict({"mean": mean + 0.1, "std": std})
    assert torch.equal(layer.relu(x, 0.5), torch.relu(sparsify(x, mean + 0.1, std, 0.5)))
    layer.double()  # new buffers, another dtype
    assert torch.equal(layer(x.double(), 0.5), sparsify(x.double(), (mean + 0.1).double(), std.double(), 0.5))


# --- the operator registered with PyTorch (meansparse::sparsify) ------------------------------------

OP_CASES = {"nchw": ((4, 6, 5, 5), 1, False), "channels_last": ((4, 6, 5, 5), 1, True), "tokens": ((3, 7, 6), -1, False)}


def op_case(case, alpha):
    """Random features with a zero-variance channel; mean and band as the operator takes them."""
    shape, axis, channels_last = OP_CASES[case]
    x, mean, std = random_case(shape, axis, seed=7)
    std[2] = 0.0
    x.select(axis, 2).fill_(mean[2])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, mean, std * alpha, axis % x.dim()


@pytest.mark.parametrize("case", OP_CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel", ["native", "pytorch"])
def test_the_registered_operator_equals_numpy(case, alpha, relu, kernel, monkeypatch):
    from meansparse_core import native
    from meansparse_core.operator import _apply, _operator

    monkeypatch.setattr(native, "enabled", kernel == "native")
    x, mean, band, axis = op_case(case, alpha)
    expected = numpy_sparsify(x.numpy(), mean.numpy(), band.numpy(), np.float32(1), axis)
    expected = np.where(expected < 0, np.float32(0), expected) if relu else expected
    for save_mask in (False, True):
        y, keep = torch.ops.meansparse.sparsify(x, mean, band, axis, relu, "exact", save_mask)
        np.testing.assert_array_equal(y.numpy(), expected)
        assert y.stride() == x.stride() and keep.shape == (x.shape if save_mask else (0,))
        direct, direct_keep = _operator(x, mean, band, axis, relu, "exact" if save_mask else None)
        assert torch.equal(y, direct) and (not save_mask or torch.equal(keep, direct_keep))
    grad_output = torch.linspace(-1, 1, x.numel()).view(x.shape)
    for grad in ("exact", "straight-through"):  # the registered autograd formula and the eager one
        gradients = []
        for run in (lambda leaf: torch.ops.meansparse.sparsify(leaf, mean, band, axis, relu, grad, True)[0],
                    lambda leaf: _apply(leaf, mean, band, 1.0, axis, grad, relu)):
            leaf = x.clone().requires_grad_(True)
            run(leaf).backward(grad_output)
            gradients.append(leaf.grad)
        assert torch.equal(*gradients)


@pytest.mark.parametrize("case", OP_CASES)
def test_the_registered_operator_passes_pytorchs_checks(case):
    """Schema, fake (meta) implementation, autograd registration and tracing, as torch.library.opcheck tests them."""
    x, mean, band, axis = op_case(case, 0.5)
    for relu, grad in [(False, "exact"), (True, "exact"), (False, "straight-through"), (True, "straight-through")]:
        torch.library.opcheck(torch.ops.meansparse.sparsify.default,
                              (x.clone().requires_grad_(True), mean, band, axis, relu, grad, True))
        torch.library.opcheck(torch.ops.meansparse.sparsify.default, (x, mean, band, axis, relu, grad, False))
    keep = torch.rand(x.shape) < 0.5
    torch.library.opcheck(torch.ops.meansparse.masked.default, (x, keep))
    torch.library.opcheck(torch.ops.meansparse.masked.default, (x, keep.contiguous()))  # another layout than grad's


def test_the_fake_operator_gives_the_real_outputs_shapes_and_layouts():
    x, mean, band, axis = op_case("channels_last", 0.5)
    real = torch.ops.meansparse.sparsify(x, mean, band, axis, True, "exact", True)
    fake = torch.ops.meansparse.sparsify(x.to("meta"), mean.to("meta"), band.to("meta"), axis, True, "exact", True)
    for r, f in zip(real, fake):
        assert (f.device.type, f.shape, f.stride(), f.dtype) == ("meta", r.shape, r.stride(), r.dtype)


def test_a_gradient_without_its_mask_says_what_to_do():
    x, mean, band, axis = op_case("nchw", 0.5)
    y, _ = torch.ops.meansparse.sparsify(x.clone().requires_grad_(True), mean, band, axis, False, "exact", False)
    with pytest.raises(RuntimeError, match="call it with save_mask=True"):
        y.sum().backward()
