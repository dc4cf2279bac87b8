"""Command line: ``python -m meansparse_core {models,calibrate,evaluate,sweep,reproduce,export} ...``.

Long work shows tqdm progress bars on stderr; ``--json`` prints machine-readable results on stdout.
Bad arguments, unknown models and missing data end with a one-line error and exit status 2.
Started by ``torchrun --nproc-per-node K -m meansparse_core -- evaluate ...``, calibrate, evaluate,
sweep and reproduce share their work among the K ranks (distributed.py); only rank 0 prints and
writes. The ``--`` keeps torchrun from reading ``--n`` as an abbreviation of its own options.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import attach, calibrate
from . import distributed
from .cli_arguments import PUBLISHED, build_parser
from .batchnorm_statistics import ESTIMATOR as BATCHNORM, batchnorm_statistics, builtin_source, describe_sources
from .data import (DATASETS, DataUnavailable, FolderDataset, ItemBatches, LazyImages, folder_photos, item_labels,
                   load_dataset, sample_indices)
from .evaluation import EvalResult, EvalSettings, ResultCache, sweep
from .files import file_digest
from .models import ModelSpec, ModelUnavailable, all_models, find_model, is_local, load_checkpoint, load_model
from .outcomes import write_items
from .paths import cache_folder
from .photos import PhotosUnavailable, builtin_photos
from .protocol import Protocol, evaluate_test, report, run_names, select_alpha, table, test_settings
from .statistics import Statistics
from .statistics_lookup import find_statistics, statistics_path

GROUP = distributed.SOLO  # the torchrun ranks sharing this command's work; set by main()


@contextmanager
def progress_bar(description: str, unit: str = "img"):
    """A tqdm bar driven by the library's ``progress(done, total)`` callbacks.

    The bar appears at the first callback, so steps that turn out to have nothing to do (weights
    or data already on disk) print nothing.
    """
    bar: tqdm | None = None

    def update(done: float, total: int) -> None:
        nonlocal bar
        if not GROUP.is_main:
            return
        if bar is None:
            bar = tqdm(desc=description, total=total, unit=unit, file=sys.stderr, leave=False)
        bar.total = total
        bar.n = round(done, 2)
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _weights_digest(args) -> str | None:
    return file_digest(args.checkpoint) if args.checkpoint else None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    return torch.device(name)


def _model(args) -> tuple[ModelSpec, torch.nn.Module]:
    spec = find_model(args.model)
    with progress_bar(f"weights of {spec.name}", "B") as update:
        model = load_checkpoint(spec, args.checkpoint) if args.checkpoint else load_model(spec, args.model_dir, update)
    return spec, model.to(_device(args.device))


def _dataset(args, spec: ModelSpec, split: str):
    data = args.data or spec.dataset
    source = DATASETS[data]
    if (source.image_size, source.num_classes) != (spec.input_size, spec.num_classes):
        raise ValueError(f"{spec.name} takes {spec.dataset} images, not {data}; pick --data {spec.dataset}.")
    with progress_bar(f"{data} download", "B") as update:
        return load_dataset(data, split, args.data_dir, update)


def _class_names(args, spec: ModelSpec) -> tuple[str, ...]:
    return DATASETS[args.data or spec.dataset].class_names


def _load(args, dataset, indices: list[int]) -> tuple[LazyImages, torch.Tensor]:
    """The items' images, read only as the evaluation reaches them (a torchrun rank reads its share),
    and their labels."""
    device = _device(args.device)
    return LazyImages(dataset, indices, device), item_labels(dataset, indices).to(device)


def _indices(args, dataset, n: int | None, in_order: bool = False) -> list[int]:
    """The indices of ``n`` items sampled by --seed (all without ``n``), or, ``in_order``, of the first
    ``n`` in the split's stored order."""
    count = min(n, len(dataset)) if n else len(dataset)
    return list(range(count)) if in_order else sample_indices(len(dataset), count, args.seed)


def _items(args, spec: ModelSpec, split: str, n: int | None) -> tuple[LazyImages, torch.Tensor, list[int]]:
    """``n`` items of ``split`` sampled by --seed (all without ``n``), and their indices in the split."""
    dataset = _dataset(args, spec, split)
    indices = _indices(args, dataset, n)
    return *_load(args, dataset, indices), indices


def _statistics(args, spec: ModelSpec, model: torch.nn.Module) -> Statistics:
    if args.stats:
        return Statistics.load(args.stats)
    data = args.data or spec.dataset
    placement = args.placement or "activations"
    found = find_statistics(spec, model, data, _weights_digest(args), placement=placement)
    if found is None:
        raise ValueError(
            f"No statistics for {spec.key} on {data} with the {placement} placement: run `python -m meansparse_core "
            f"calibrate --model {spec.key} --placement {placement}` first, or pass --stats FILE."
        )
    return found.stats


def _sparse(args, model: torch.nn.Module, stats: Statistics):
    """The model with ``stats`` attached; ``--placement``, when given, must be the statistics' own."""
    return attach(model, stats, args.placement)


def _alpha(value: float | str, stats: Statistics) -> float:
    """A number, or the threshold stored in the model's own MeanSparse layers for ``published``."""
    if value != PUBLISHED:
        return float(value)
    if "published_alpha" not in stats.meta:
        raise ValueError("--alpha published needs a model that stores its threshold in its own MeanSparse layers "
                         "(RobustBench's Amini2024MeanSparse_* entries); give a number instead.")
    return float(stats.meta["published_alpha"])


def _batch_size(args) -> int:
    return args.batch_size or 100


def _settings(args) -> EvalSettings:
    return EvalSettings(attack=args.attack, eps=args.eps, steps=args.steps, step=args.step, grad=args.grad,
                        targeted=args.targeted, seed=args.seed, batch_size=_batch_size(args))


def _emit(records: list[dict] | dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(records, indent=2))
        return
    for r in records if isinstance(records, list) else [records]:
        print(f"alpha={r['alpha']:<6g} clean={r['clean_acc']:.2%}  robust={r['robust_acc']:.2%}  "
              f"({r['attack']}, eps={r['eps']:g}, steps={r['steps']}, grad={r['grad']}, n={r['n']}, {r['seconds']:.1f}s)")


# --- subcommands ---------------------------------------------------------------------------------


def cmd_models(args) -> None:
    specs = [s for s in all_models()
             if (not args.dataset or s.dataset == args.dataset)
             and (not args.threat or s.threat_model == args.threat)
             and args.search.lower() in s.key.lower()]
    rows = [{"key": s.key, "label": s.label, "dataset": s.dataset, "threat_model": s.threat_model,
             "local": is_local(s, args.model_dir)} for s in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{'*' if r['local'] else ' '} {r['key']}")
        print(f"{len(rows)} models; * = weights on this machine", file=sys.stderr)


def cmd_calibrate(args) -> None:
    spec, model = _model(args)
    if args.estimator == BATCHNORM:
        return _calibrate_without_data(args, spec, model)
    if args.builtin_photos:
        raise ValueError("--builtin-photos goes with --estimator batchnorm (for the taps no BatchNorm feeds).")
    authors = args.estimator == "authors"
    dataset = _dataset(args, spec, "train")
    # The authors' estimator averages per-batch figures, so batch size and order are part of it.
    indices = _indices(args, dataset, args.n, in_order=authors)
    if authors:
        _warn_if_sorted_by_class(dataset)
    placement = args.placement or "activations"
    with progress_bar("calibration") as update:
        stats = calibrate(model, ItemBatches(dataset, indices, args.batch_size or (512 if authors else 100)),
                          progress=update, total=len(indices),
                          meta={"model": spec.key, "data": args.data or spec.dataset, "seed": args.seed},
                          group=GROUP, placement=placement, estimator=args.estimator)
    out = Path(args.out) if args.out else statistics_path(spec, args.data or spec.dataset, _weights_digest(args),
                                                          placement=placement)
    if GROUP.is_main:
        stats.save(out)
    summary = {"model": spec.key, "data": args.data or spec.dataset, "n": len(indices), "taps": len(stats.taps),
               "statistics": str(out)}
    print(json.dumps(summary, indent=2) if args.json else f"{len(stats.taps)} taps over {len(indices)} images -> {out}")


def _photos(args, spec: ModelSpec) -> tuple[torch.Tensor | None, str]:
    """The photos for taps no BatchNorm feeds: --data-dir's, or the built-in ones, or none; and their name."""
    if args.data_dir and args.builtin_photos:
        raise ValueError("Give either --data-dir (a folder of photos) or --builtin-photos, not both.")
    if args.data_dir:
        photos = folder_photos(args.data_dir, spec.input_size, spec.preparation)
        return photos, f"{len(photos)} photos from {args.data_dir}"
    if args.builtin_photos:
        photos = builtin_photos(spec.input_size, spec.preparation)
        return photos, builtin_source(len(photos))
    return None, ""


def _calibrate_without_data(args, spec: ModelSpec, model: torch.nn.Module) -> None:
    """``calibrate --estimator batchnorm``: no training set; photos only for taps no BatchNorm feeds."""
    if GROUP.world_size > 1:
        raise ValueError("--estimator batchnorm reads no data set: run it in one process, not under torchrun.")
    photos, source = _photos(args, spec)
    placement = args.placement or "activations"
    data = args.data or spec.dataset
    stats = batchnorm_statistics(model, spec.input_size, placement, photos.to(_device(args.device))
                                 if photos is not None else None, source, meta={"model": spec.key, "data": data})
    out = Path(args.out) if args.out else statistics_path(spec, data, _weights_digest(args), placement=placement)
    stats.save(out)
    summary = {"model": spec.key, "estimator": BATCHNORM, "taps": len(stats.taps), "statistics": str(out),
               "sources": {t.tap.name: t.source for t in stats.taps}}
    print(json.dumps(summary, indent=2) if args.json else f"{len(stats.taps)} taps ({describe_sources(stats)}) -> {out}")


def _run_name(result: EvalResult) -> str:
    s = result.settings
    return f"alpha={s.alpha:g} {s.attack}{' targeted' if s.targeted else ''} eps={s.eps:g} {s.grad}"


def _report_resumed(results: list[EvalResult]) -> None:
    resumed = sum(r.resumed_batches for r in results)
    if resumed and GROUP.is_main:
        print(f"resumed {resumed} attacked batches from the journal", file=sys.stderr)


def _evaluation_run(args, alphas: list[float | str]) -> list[dict]:
    spec, model = _model(args)
    stats = _statistics(args, spec, model)
    sparse = _sparse(args, model, stats)
    alphas = [_alpha(a, stats) for a in alphas]
    images, labels, indices = _items(args, spec, "test", args.n)
    context = {"model": spec.key, "data": args.data or spec.dataset}
    cache_key = {**context, "weights": _weights_digest(args) or spec.key,
                 "stats": stats.fingerprint(), "data_dir": args.data_dir, "n": len(labels)}
    with progress_bar("alphas", "alpha") as update:
        results = sweep(sparse, images, labels, _settings(args), alphas, progress=update,
                        cache=None if args.no_cache else ResultCache(cache_folder("results")), cache_key=cache_key,
                        group=GROUP)
    _report_resumed(results)
    if args.items and GROUP.is_main:
        write_items(args.items, [(_run_name(r), r.outcomes) for r in results], indices, _class_names(args, spec))
    return [r.as_record(**context) for r in results]


def cmd_evaluate(args) -> None:
    _emit(_evaluation_run(args, [args.alpha])[0], args.json)


def cmd_sweep(args) -> None:
    _emit(_evaluation_run(args, args.alphas), args.json)


def _warn_if_sorted_by_class(dataset) -> str:
    """The authors' estimator follows the training split's stored order, which an ImageFolder tree has lost
    (it lists its images class by class): say so on stderr. Returns the warning, or "" where the order is
    the dataset's own."""
    if not isinstance(dataset, FolderDataset):
        return ""
    warning = ("these training images come from an ImageFolder tree, sorted by class rather than in the dataset's "
               "original order; for the authors' order, point --data-dir at the official python batches")
    if GROUP.is_main:
        print(f"warning: {warning}", file=sys.stderr)
    return warning


def _training_split(args, dataset) -> tuple[list[int], list[int], str]:
    """The held-out training indices for alpha selection, the calibration indices (disjoint), and a
    sentence saying where the held-out slice lies.

    The exact estimator takes both from one shuffle by --seed. The authors' estimator depends on the
    order of the data and wants it as stored, so the held-out slice is the split's last --select-n
    images and calibration runs over the others from the first one on.
    """
    size = len(dataset)
    if args.estimator == "authors":
        cut = max(size - args.select_n, 0)
        held_out, pool = list(range(cut, size)), list(range(cut))
        warning = _warn_if_sorted_by_class(dataset)
        where = f"the last {len(held_out)} training images in stored order" + (f" ({warning})" if warning else "")
    else:
        order = sample_indices(size, size, args.seed)
        held_out, pool = order[:args.select_n], order[args.select_n:]
        where = f"{len(held_out)} held-out training images sampled by seed {args.seed}"
    if not pool:
        raise ValueError(f"--select-n {args.select_n} leaves no training image for calibration; lower it.")
    return held_out, pool[:args.calibration_n] if args.calibration_n else pool, where


def _calibrated(args, spec: ModelSpec, model: torch.nn.Module, dataset, indices: list[int]) -> tuple[Statistics, str]:
    """Statistics over the chosen training items, calibrated once and kept (a rerun reads them back),
    and a sentence naming the images and the estimator."""
    data = args.data or spec.dataset
    placement = args.placement or "activations"
    authors = args.estimator == "authors"
    batch_size = args.calibration_batch_size or (512 if authors else _batch_size(args))
    how = (f"the first {len(indices)} training images in stored order, the authors' estimator (per-batch mean "
           f"and unbiased variance averaged over batches of {batch_size})" if authors else
           f"{len(indices)} training images sampled by seed {args.seed}, the exact estimator (mean and std over "
           "the whole set)")
    key = (f"{spec.key}__{_weights_digest(args) or 'weights'}__{data}__n{len(indices)}__seed{args.seed}__{placement}"
           + (f"__authors-b{batch_size}" if authors else ""))
    path = cache_folder("stats") / "reproduce" / f"{''.join(c if c.isalnum() or c in '._-' else '_' for c in key)}.pt"
    if path.exists():
        return Statistics.load(path), f"{how}; read back from {path}"
    with progress_bar("calibration") as update:
        stats = calibrate(model, ItemBatches(dataset, indices, batch_size), progress=update, total=len(indices),
                          meta={"model": spec.key, "data": data, "seed": args.seed}, group=GROUP, placement=placement,
                          estimator=args.estimator)
    if GROUP.is_main:
        stats.save(path)
    return stats, f"{how}; saved to {path}"


def cmd_reproduce(args) -> None:
    spec, model = _model(args)
    data = args.data or spec.dataset
    protocol = Protocol(eps=args.eps, alphas=tuple(a for a in args.alphas if a > 0), max_clean_drop=args.max_clean_drop,
                        apgd_steps=args.steps, square_queries=args.square_queries, seed=args.seed,
                        batch_size=_batch_size(args))
    train = _dataset(args, spec, "train")
    held_out, pool, held_out_where = _training_split(args, train)
    stats, calibration = _calibrated(args, spec, model, train, pool)
    sparse = attach(model, stats)
    cache = None if args.no_cache else ResultCache(cache_folder("results"))
    cache_key = {"model": spec.key, "data": data, "weights": _weights_digest(args) or spec.key,
                 "stats": stats.fingerprint(), "data_dir": args.data_dir, "seed": args.seed}
    images, labels = _load(args, train, held_out)
    with progress_bar("alpha selection", "alpha") as update:
        selection = select_alpha(sparse, images, labels, protocol, cache, {**cache_key, "n": len(held_out)}, GROUP, update)
    images, labels, indices = _items(args, spec, "test", args.n)
    names = list(test_settings(protocol, selection.alpha))
    with progress_bar("test evaluations", "run") as update:
        results = evaluate_test(sparse, images, labels, protocol, selection.alpha, cache,
                                {**cache_key, "n": len(labels)}, GROUP,
                                lambda name: lambda done, total: update(names.index(name) + done / max(total, 1), len(names)))
    _report_resumed([*selection.sweep, *results.values()])
    markdown = report(spec.key, results, selection, protocol, held_out_where, calibration, GROUP.world_size)
    out = Path(args.out) if args.out else cache_folder("results") / f"reproduce-{spec.name}.md"
    if GROUP.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        if args.items:
            write_items(args.items, run_names(results), indices, _class_names(args, spec))
    if args.json:
        print(json.dumps({"model": spec.key, "alpha": selection.alpha, "n": len(labels), "world_size": GROUP.world_size,
                          "estimator": args.estimator, "statistics": calibration, "held_out": held_out_where,
                          "selection": [r.as_record() for r in selection.sweep],
                          "test": {name: r.as_record() for name, r in results.items()}, "report": str(out)}, indent=2))
    else:
        print(table(results, selection.alpha, protocol) + f"\n\nalpha {selection.alpha:g} selected on held-out "
              f"training images; {len(labels)} test images; report: {out}")


def cmd_export(args) -> None:
    from .export import export_program, save_sparsified

    spec, model = _model(args)
    model = model.cpu()
    stats = _statistics(args, spec, model)
    sparse, alpha = _sparse(args, model, stats), _alpha(args.alpha, stats)
    save_sparsified(args.out, model, sparse.stats, alpha, architecture={"key": spec.key})
    written = {"model": spec.key, "alpha": alpha, "file": args.out}
    if args.program:
        example = torch.rand(2, *spec.input_size, generator=torch.Generator().manual_seed(0))
        export_program(sparse.at(alpha), example, args.program)
        written["program"] = args.program
    print(json.dumps(written) if args.json else "wrote " + ", ".join(str(v) for k, v in written.items() if k in ("file", "program")))


COMMANDS = {"models": cmd_models, "calibrate": cmd_calibrate, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "reproduce": cmd_reproduce, "export": cmd_export}


def _start_app(options: list[str]) -> int:
    """The app is its own package, installed beside the library; the library never imports Streamlit itself."""
    try:
        from meansparse_app.launch import main as serve
    except ImportError:
        _error("the app is not installed: install MeanSparse Explorer itself (pip install meansparse-explorer), "
               "not only its library")
        return 2
    return serve(options)


def _error(message: str) -> None:
    """One line on stderr. Under torchrun the ranks share stderr, where rank 0's progress bar may stand
    unfinished: the line then starts with a line break, or it would read as the end of the bar."""
    start = "\n" if GROUP.world_size > 1 else ""
    print(f"{start}error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    global GROUP
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["app"]:
        return _start_app(argv[1:])
    args = build_parser(COMMANDS).parse_args(argv)
    if getattr(args, "n", None) is not None and args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    where, stdout = "", sys.stdout
    try:
        GROUP = distributed.join(_device(getattr(args, "device", "cpu")))
        where = f"rank {GROUP.rank}: " if GROUP.world_size > 1 else ""
        with open(os.devnull, "w") as silent:
            if not GROUP.is_main:
                sys.stdout = silent  # only rank 0 prints results
            args.run(args)
    except (KeyError, ValueError, FileNotFoundError, DataUnavailable, ModelUnavailable, PhotosUnavailable) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        _error(f"{where}{message}")
        return 2
    except torch.distributed.DistError as exc:  # another rank died: torchrun ends the job or restarts it
        _error(f"{where}lost another rank of the job ({' '.join(str(exc).split())[:200]})")
        return 1
    finally:
        sys.stdout = stdout
        distributed.leave()
        GROUP = distributed.SOLO
    return 0
