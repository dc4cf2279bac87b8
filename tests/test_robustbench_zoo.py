"""Placement on RobustBench's CIFAR-10 Linf architectures (random weights) and its offline loading path.

By default one entry per distinct architecture (class, size and activation) up to SIZE_LIMIT
parameters runs, plus one MeanSparse model; MEANSPARSE_FULL_ZOO=1 runs every entry (about seven
minutes on two CPU cores).
"""

import os
import warnings

import pytest
import torch
from torch import nn

from meansparse_core import attach, calibrate
from meansparse_core.robustbench_compat import import_robustbench

rb = import_robustbench()
from robustbench.model_zoo import model_dicts  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402

ZOO = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
SIZE_LIMIT = 150e6
FULL_ZOO = os.environ.get("MEANSPARSE_FULL_ZOO") == "1"
# Always tested, whatever the size limit; each also stands for the entries that share its architecture.
ALWAYS = ["Standard", "Sehwag2021Proxy_R18", "Gowal2021Improving_R18_ddpm_100m",
          "Rebuffi2021Fixing_28_10_cutmix_ddpm", "Amini2024MeanSparse_S-WRN-94-16"]

# Entries whose zoo builder cannot run offline or on a CPU, and how the test handles them.
XCIT_ARCHITECTURES = {  # the zoo asks timm for pretrained weights under a name timm does not know
    "Debenedetti2022Light_XCiT-S12": "debenedetti2022light_xcit_s12_cifar10_linf",
    "Debenedetti2022Light_XCiT-M12": "debenedetti2022light_xcit_m12_cifar10_linf",
    "Debenedetti2022Light_XCiT-L12": "debenedetti2022light_xcit_l12_cifar10_linf",
}
NEEDS_CUDA = {"Bai2023Improving_edm"}  # its builder moves parts to CUDA


def builder(name):
    if name in XCIT_ARCHITECTURES:
        import timm
        from robustbench.model_zoo.architectures import xcit  # noqa: F401  (registers the models)

        return lambda: timm.create_model(XCIT_ARCHITECTURES[name], pretrained=False)
    return ZOO[name]["model"]


def signature(name):
    """(class, parameter count, activation classes) from a build on the meta device, or None."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = builder(name)()
    except Exception:
        return None  # e.g. builders that read tensor values; sized only by a real build
    activations = sorted({type(m).__name__ for m in model.modules() if "lu" in type(m).__name__.lower()})
    return type(model).__name__, sum(p.numel() for p in model.parameters()), tuple(activations)


def build_random(name) -> nn.Module:
    """The architecture with random weights, and batch norms that pass signal through."""
    torch.manual_seed(0)
    model = builder(name)()
    # Some architectures zero-initialise the last batch norm of each residual branch, so every
    # image gives the same logits and no threshold could change them; randomise the affine terms.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return model.eval()


def zoo_params():
    """Every entry; by default one per distinct architecture up to SIZE_LIMIT parameters."""
    tested = {}
    for name in [*ALWAYS, *(n for n in ZOO if n not in ALWAYS)]:
        sig = signature(name)
        reason = None
        if name in NEEDS_CUDA:
            reason = f"RobustBench builds {name} with CUDA tensors; no GPU here"
        elif FULL_ZOO or name in ALWAYS:
            tested.setdefault(sig, name)
        elif sig is None or sig[1] > SIZE_LIMIT:
            reason = "over 150M parameters (or not sizeable): set MEANSPARSE_FULL_ZOO=1 to include"
        elif sig in tested:
            reason = f"same architecture as {tested[sig]}: set MEANSPARSE_FULL_ZOO=1 to include"
        else:
            tested[sig] = name
        yield pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [])


def frozen_forward(model, state, x):
    """Forward pass from a fixed state: one architecture renormalises its own weights as it runs."""
    model.load_state_dict(state)
    return model(x)


@pytest.mark.parametrize("name", list(zoo_params()))
@torch.no_grad()
def test_placement_on_zoo_architecture(name):
    model = build_random(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = frozen_forward(model, state, images)
    stats = calibrate(model, [images])
    assert len(stats.taps) > 0
    if any(type(m).__name__.startswith("MeanSparse") for m in model.modules()):
        assert {t.tap.kind for t in stats.taps} == {"robustbench"}
    sparse = attach(model, stats)
    model.load_state_dict(state)
    assert torch.equal(sparse(images, alpha=0.0), base), "alpha 0 must give bit-identical logits"
    model.load_state_dict(state)
    assert not torch.equal(sparse(images, alpha=0.5), base), "alpha > 0 must change the logits"
    sparse.detach()
    assert torch.equal(frozen_forward(model, state, images), base)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_robustbench_imports_from_a_plain_registry_install():
    import robustbench.eval
    import robustbench.loaders

    assert callable(rb.load_model) and callable(robustbench.eval.benchmark)
    ids = robustbench.loaders.pkg_resources.resource_filename("robustbench.loaders", "helper_files")
    assert os.path.isdir(ids), "robustbench must find its own data files"
    assert any(name.startswith("Amini2024MeanSparse") for name in ZOO)


def test_load_model_reads_a_local_checkpoint_in_robustbench_layout(tmp_path):
    source = build_random("Sehwag2021Proxy_R18")
    path = tmp_path / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = rb.load_model("Sehwag2021Proxy_R18", model_dir=tmp_path, dataset="cifar10", threat_model="Linf")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))
