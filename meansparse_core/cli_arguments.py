"""The command line's arguments: every subcommand, its options and how each value is checked."""

from __future__ import annotations

import argparse
from typing import Callable, Mapping

import torch

from .attacks import ATTACKS
from .batchnorm_statistics import ESTIMATOR as BATCHNORM
from .data import DATASETS
from .operator import GRAD_MODES
from .protocol import Protocol
from .statistics import ESTIMATORS

DESCRIPTION = "Command line: ``python -m meansparse_core {models,calibrate,evaluate,sweep,reproduce,export} ...``."
#: ``--alpha published``: the threshold a released model's own MeanSparse layers store.
PUBLISHED = "published"


def _alphas(text: str) -> list[float]:
    try:
        values = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas must be comma-separated numbers, got {text!r}") from None
    if not values or any(a < 0 for a in values):
        raise argparse.ArgumentTypeError("give at least one alpha, all >= 0")
    return values


def _alpha_arg(text: str) -> float | str:
    """A number >= 0, or ``published``: the threshold the model's own MeanSparse layers store."""
    return PUBLISHED if text == PUBLISHED else _non_negative(text)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class _Version(argparse.Action):
    """``--version``: the library's and PyTorch's versions and which implementation runs the operator."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print versions and the operator's implementation, then exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        from . import native

        try:
            ours = version("meansparse-explorer")
        except PackageNotFoundError:
            ours = "not installed"
        print(f"meansparse-explorer {ours}, torch {torch.__version__}\noperator on CPUs: {native.describe()}")
        parser.exit()


def build_parser(run: Mapping[str, Callable[[argparse.Namespace], None]]) -> argparse.ArgumentParser:
    """The parser of every subcommand; ``run[name]`` carries the subcommand ``name`` out."""
    parser = argparse.ArgumentParser(prog="python -m meansparse_core", description=DESCRIPTION)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--model-dir", default=None, help="RobustBench model folder, <dir>/<dataset>/<threat>/<name>.pt (default: $MEANSPARSE_MODELS, else models/ in the user's cache folder)")

    models = commands.add_parser("models", parents=[common], help="list bundled and RobustBench models")
    models.add_argument("--dataset", choices=sorted(DATASETS))
    models.add_argument("--threat", choices=["Linf", "L2", "corruptions"])
    models.add_argument("--search", default="", help="case-insensitive part of the name")
    models.set_defaults(run=run["models"])

    with_model = argparse.ArgumentParser(add_help=False, parents=[common])
    with_model.add_argument("--model", required=True, help="a key from `models`, e.g. robustbench/cifar10/Linf/Standard")
    with_model.add_argument("--checkpoint", help="your own weights for the model's architecture (state dict)")
    with_model.add_argument("--data", choices=sorted(DATASETS), help="dataset (default: the model's)")
    with_model.add_argument("--data-dir", help="folder with the dataset, python batches or ImageFolder tree (default: $MEANSPARSE_DATA, else data/ in the user's cache folder)")
    with_model.add_argument("--n", "--n-items", dest="n", type=int, default=None,
                            help="number of items sampled by --seed (default: all)")
    with_model.add_argument("--seed", type=int, default=0)
    with_model.add_argument("--batch-size", type=int, default=None,
                            help="default 100; 512 for calibrate --estimator authors")
    with_model.add_argument("--placement", default=None, help=(
        "where MeanSparse goes: 'activations' (in front of every activation, the paper's text; the default), "
        "'released' (where the authors' released models put it), or rules such as 'activations, "
        "layer.*.block.*:output' (input, output or additions of the modules a pattern names); "
        "evaluate, sweep and export check it against the statistics' own"))
    with_model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    cal = commands.add_parser("calibrate", parents=[with_model],
                              help="statistics over the training split, or without it (--estimator batchnorm)")
    cal.add_argument("--out", help="statistics file (default: stats/<model>__<data>.pt in the user's cache folder)")
    cal.add_argument("--estimator", choices=(*ESTIMATORS, BATCHNORM), default="exact", help=(
        "exact: mean and std over the whole set; authors: per-batch mean and unbiased variance averaged "
        "over batches, the training set in its stored order, batches of 512 unless --batch-size says otherwise; "
        "batchnorm: no data set, read from the BatchNorm feeding each tap; taps no BatchNorm feeds need "
        "--data-dir (a folder of any photos, no labels) or --builtin-photos"))
    cal.add_argument("--builtin-photos", action="store_true",
                     help="with --estimator batchnorm: scikit-image's sample photos for the taps no BatchNorm feeds")
    cal.set_defaults(run=run["calibrate"])

    with_stats = argparse.ArgumentParser(add_help=False, parents=[with_model])
    with_stats.add_argument("--stats", help="statistics file (default: calibrated, bundled or embedded ones)")

    attacked = argparse.ArgumentParser(add_help=False, parents=[with_stats])
    attacked.add_argument("--attack", choices=sorted(ATTACKS), default="pgd")
    attacked.add_argument("--eps", type=_non_negative, default=8.0, help="budget: /255 for Linf attacks, norm for L2")
    attacked.add_argument("--steps", type=int, default=10, help="iterations (queries for square)")
    attacked.add_argument("--step", type=_non_negative, default=None, help="PGD step size in eps units (default 2.5*eps/steps)")
    attacked.add_argument("--grad", choices=GRAD_MODES, default="exact", help="gradients through MeanSparse")
    attacked.add_argument("--targeted", action="store_true")
    attacked.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    attacked.add_argument("--items", help="also write per-item outcomes to this CSV file (format: outcomes.py)")

    ev = commands.add_parser("evaluate", parents=[attacked], help="clean and robust accuracy at one alpha")
    ev.add_argument("--alpha", type=_alpha_arg, default=0.0, help="a number, or 'published' (the threshold a "
                    "released model stores); 0 is the base model, its own MeanSparse layers switched off")
    ev.set_defaults(run=run["evaluate"])

    sw = commands.add_parser("sweep", parents=[attacked], help="clean and robust accuracy for several alphas")
    sw.add_argument("--alphas", type=_alphas, required=True, help="comma-separated, e.g. 0,0.1,0.2")
    sw.set_defaults(run=run["sweep"])

    rep = commands.add_parser("reproduce", parents=[with_model],
                              help="the paper's protocol: calibrate, select alpha on training images, test table")
    rep.add_argument("--eps", type=_non_negative, default=8.0, help="Linf budget in /255")
    rep.add_argument("--alphas", type=_alphas, default=list(Protocol.alphas), help="candidate alphas, comma-separated")
    rep.add_argument("--max-clean-drop", type=_non_negative, default=Protocol.max_clean_drop,
                     help="clean accuracy (fraction) an alpha may cost on the held-out slice")
    rep.add_argument("--select-n", type=int, default=1000, help="held-out training images for alpha selection")
    rep.add_argument("--calibration-n", type=int, default=None, help="training images for statistics (default: the rest)")
    rep.add_argument("--estimator", choices=ESTIMATORS, default="exact", help=(
        "exact: mean and std over the whole set, held-out slice and calibration images sampled by --seed; "
        "authors: per-batch mean and unbiased variance averaged over batches, the held-out slice the training "
        "split's last --select-n images and calibration over the others in stored order"))
    rep.add_argument("--calibration-batch-size", type=int, default=None,
                     help="calibration batches (default: 512 with --estimator authors, else --batch-size)")
    rep.add_argument("--steps", type=int, default=Protocol.apgd_steps, help="APGD-CE steps (selection and BPDA)")
    rep.add_argument("--square-queries", type=int, default=Protocol.square_queries)
    rep.add_argument("--no-cache", action="store_true", help="recompute even if cached results exist")
    rep.add_argument("--out", help="Markdown report (default: results/reproduce-<model>.md in the user's cache folder)")
    rep.add_argument("--items", help="also write per-item outcomes of the test runs to this CSV file")
    rep.set_defaults(run=run["reproduce"])

    ex = commands.add_parser("export", parents=[with_stats], help="write the sparsified model to one file")
    ex.add_argument("--alpha", type=_alpha_arg, required=True, help="a number, or 'published'")
    ex.add_argument("--out", required=True, help="the file meansparse_core.export.load_sparsified reads")
    ex.add_argument("--program", help="also write a torch.export program (.pt2) that needs only PyTorch")
    ex.set_defaults(run=run["export"])

    # Listed here for --help; cli.main hands the app's options to Streamlit untouched.
    commands.add_parser("app", help="start the web app (meansparse app [streamlit options], e.g. --server.port 8502)")
    return parser
