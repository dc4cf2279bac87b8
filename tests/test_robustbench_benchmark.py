"""RobustBench's own benchmark, run offline on the sparsified CIFAR-10 demo model from a local folder."""

import torch

from meansparse_core import Statistics, attach
from meansparse_core.evaluation import EvalSettings, evaluate
from meansparse_core.models import bundled_statistics_path, find_model, load_model
from meansparse_core.robustbench_compat import import_robustbench

import_robustbench()
import robustbench.eval  # noqa: E402
from robustbench.data import load_clean_dataset  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset  # noqa: E402
from robustbench.utils import clean_accuracy  # noqa: E402

N = 24
ALPHA = 0.25
EPS = 16  # /255: twice the usual budget, so that few items survive to AutoAttack's slower stages


def test_benchmark_and_clean_accuracy_agree_with_evaluate(shared_cifar10, tmp_path):
    spec = find_model("bundled/cifar-resnet9")
    sparse = attach(load_model(spec), Statistics.load(bundled_statistics_path(spec)))
    model = sparse.at(ALPHA)
    torch.manual_seed(0)
    clean, robust = robustbench.eval.benchmark(model, n_examples=N, dataset="cifar10", threat_model="Linf",
                                               data_dir=str(shared_cifar10), eps=EPS / 255, batch_size=N,
                                               log_path=str(tmp_path / "aa.log"))
    images, labels = load_clean_dataset(BenchmarkDataset.cifar_10, N, str(shared_cifar10), None)
    assert images.shape == (N, 3, 32, 32)
    ours = evaluate(sparse, images, labels, EvalSettings(alpha=ALPHA, attack="autoattack", eps=EPS, batch_size=N))
    assert clean == clean_accuracy(model, images, labels) == ours.clean_acc
    # AutoAttack draws its own random starts: the two runs may differ by a few items, not more.
    assert abs(robust - ours.robust_acc) <= 3 / N
    assert robust <= clean and (tmp_path / "aa.log").exists()
