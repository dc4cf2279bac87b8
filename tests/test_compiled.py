"""The whole sparsified model compiled for forward-only work: alpha is an input, so moving it never recompiles."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from meansparse_core import attach
from meansparse_core.compiled import CompiledModel
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.statistics import Statistics


@pytest.fixture(scope="module")
def demo():
    spec = find_model("bundled/cifar-resnet9")
    sparse = attach(load_model(spec), Statistics.load(bundled_statistics_path(spec)))
    yield sparse
    sparse.detach()


def test_moving_alpha_or_a_layer_alpha_does_not_recompile(demo):
    torch._dynamo.reset()
    counter = CompileCounter()  # counts the frames TorchDynamo compiles, runs their graphs eagerly
    compiled = CompiledModel(demo, backend=counter)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first_layer = demo.taps[0].name
    settings = [(0.25, {}), (0.3, {}), (0.0, {}), (1.5, {first_layer: 0.0}), (0.1, {first_layer: 0.7})]
    for i, (alpha, layer_alphas) in enumerate(settings):
        logits = compiled(images, alpha, layer_alphas)
        if i == 0:
            frames, graph_ops = counter.frame_count, counter.op_count
            assert frames >= 1 and graph_ops > 0, "the model was captured"
        assert (counter.frame_count, counter.op_count) == (frames, graph_ops), f"alpha {alpha} recompiled"
        with torch.no_grad():
            assert torch.equal(logits, demo(images, alpha, layer_alphas=layer_alphas)), "the same logits as eagerly"


def test_bad_alphas_are_refused_before_the_compiled_graph_runs(demo):
    compiled = CompiledModel(demo, backend=CompileCounter())
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        compiled(torch.rand(1, 3, 32, 32), float("nan"))
    with pytest.raises(KeyError, match="No tap named 'nowhere'"):
        compiled(torch.rand(1, 3, 32, 32), 0.2, {"nowhere": 0.1})


def test_the_exported_model_holds_one_registered_operator_per_tap(demo):
    """torch.export traces the placement into one graph: a meansparse::sparsify node per tap, alphas an input."""
    from meansparse_core.compiled import export_with_thresholds

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    program = export_with_thresholds(demo, images)
    nodes = [n for n in program.graph.nodes if n.target == torch.ops.meansparse.sparsify.default]
    assert len(nodes) == len(demo.taps)
    with torch.no_grad():
        for alpha in (0.0, 0.4):
            alphas = torch.full((len(demo.taps),), alpha)
            assert torch.equal(program.module()(images, alphas), demo(images, alpha))


def test_the_whole_model_compiles_in_one_graph_with_the_eager_predictions_and_no_recompile_per_alpha(demo):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledModel(demo)  # Inductor, fullgraph=True: a graph break would raise
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for alpha in (0.25, 0.6):
        logits = compiled(images, alpha)
        with torch.no_grad():
            eager = demo(images, alpha)
        assert torch.equal(logits.argmax(1), eager.argmax(1))
        torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)  # Inductor's convolutions round on their own
        assert counters["stats"]["unique_graphs"] == 1, f"alpha {alpha} compiled a second graph"
