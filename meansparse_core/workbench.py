"""What the app and the command line share: statistics found for a model, one image attacked and
compared, and the live accuracy figures that follow the threshold.

Everything here takes the shared model read-only and gets alpha per call, so one loaded model
serves many users at once. Example::

    found = find_statistics(spec, model, "digits")
    sparse = attach(model, found.stats)
    adversarial = attack_image(sparse, image, label, AttackChoice(attack="pgd", eps=8), alpha=0.2)
    comparison = compare(sparse, image, adversarial, label, alpha=0.2, class_names=spec.class_names)
    print(comparison.verdict)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from .attacks import make_attack
from .evaluation import EvalSettings, ResultCache, evaluate, predict
from .files import discard_damaged
from .models import ModelSpec, bundled_statistics_path
from .operator import GradMode
from .placement import SparseModel, find_taps, own_layers, placement_of
from .paths import cache_folder
from .placement_rules import ACTIVATIONS, Placement
from .statistics import Statistics, embedded_statistics



@dataclass(frozen=True)
class Limits:
    """What one request from the app may ask for.

    A teaching server is shared by a room: no single click may queue hours of work or hold
    gigabytes. Raise them here for a private machine.
    """

    items: int = 1000  # test images per accuracy sweep
    alphas: int = 12  # alphas per sweep, besides alpha 0
    steps: int = 200  # iterations of one attack
    square_queries: int = 5000
    image_pixels: int = 40_000_000  # of an uploaded image, checked before it is decoded
    live_set: int = 50  # test images behind the live figures: 2 x 50 forward passes per slider move

    def steps_for(self, attack: str) -> int:
        return self.square_queries if attack == "square" else self.steps


LIMITS = Limits()


def parse_alphas(text: str, limits: Limits = LIMITS) -> tuple[float, ...]:
    """Alphas typed as "0.1, 0.2; 0.3": sorted, distinct, each in [0, 10], at most ``limits.alphas``."""
    try:
        values = tuple(sorted({float(a) for a in text.replace(";", ",").split(",") if a.strip()}))
    except ValueError:
        raise ValueError(f"Alphas must be numbers separated by commas, e.g. 0.1, 0.2; got {text!r}.") from None
    if not values or not all(0 <= a <= 10 for a in values):
        raise ValueError("Give at least one alpha, each between 0 and 10.")
    if len(values) > limits.alphas:
        raise ValueError(f"Give at most {limits.alphas} alphas per sweep; you gave {len(values)}.")
    return values


# --- statistics ------------------------------------------------------------------------------


def _placement_tag(placement: str | Placement) -> str:
    """A file-name part for a placement: none for "activations" (the files it always had)."""
    name = placement.name if isinstance(placement, Placement) else placement
    if name == "activations":
        return ""
    if name == "released":
        return "__released"
    return "__rule-" + hashlib.sha256(name.encode()).hexdigest()[:10]


def statistics_path(spec: ModelSpec, data: str, weights_digest: str | None = None,
                    cache: Path | None = None, placement: str | Placement = "activations") -> Path:
    """Where calibrated statistics are cached: per model (and user checkpoint), dataset and placement."""
    weights = f"__{weights_digest}" if weights_digest else ""
    name = f"{spec.key}{weights}__{data}{_placement_tag(placement)}"
    return (cache or cache_folder("stats")) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.pt"


@dataclass(frozen=True)
class FoundStatistics:
    """Statistics for a model, where they came from, and what was discarded on the way (or None)."""

    stats: Statistics
    origin: str
    discarded: str | None = None


def find_statistics(spec: ModelSpec, model: nn.Module, data: str, weights_digest: str | None = None,
                    cache: Path | None = None, placement: str | Placement = "activations") -> FoundStatistics | None:
    """Statistics for ``model`` with this ``placement``, without calibrating; None if there are none.

    Looked up in order: a calibration cached for this model, data and placement, the statistics
    shipped with a bundled model (placement "activations"), and the buffers of MeanSparse layers
    already inside the model (RobustBench's sparsified models: those layers are their taps, whatever
    the placement). A cached file that is damaged or whose taps are not the model's is discarded
    with a ``CacheWarning`` and the search goes on.
    """
    example = torch.zeros(1, *spec.input_size, device=next(model.parameters()).device)
    resolved = placement_of(model, placement)  # an unknown placement is the caller's error, not the file's
    cached = statistics_path(spec, data, weights_digest, cache, placement)
    discarded = None
    try:
        stats = Statistics.load(cached)
        if stats.tap_list != find_taps(model, example, resolved):
            raise ValueError("its layers are not this model's")
        return FoundStatistics(stats, f"calibrated on {stats.meta.get('n_images', '?')} {data} training images (cached)")
    except FileNotFoundError:
        pass
    except ValueError as exc:
        discarded = discard_damaged(cached, str(exc))
    bundled = (bundled_statistics_path(spec) if spec.source == "bundled" and not weights_digest
               and resolved == ACTIVATIONS else None)
    if bundled is not None and bundled.exists():
        stats = Statistics.load(bundled)
        return FoundStatistics(stats, f"shipped with the model ({stats.meta.get('n_images', '?')} {spec.dataset} training images)",
                               discarded)
    if own_layers(model):
        return FoundStatistics(embedded_statistics(model, example), "the model's own MeanSparse layers", discarded)
    return None


# --- one image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackChoice:
    """An attack on one image as the user sets it up; ``target`` is the model the attacker sees."""

    attack: str = "pgd"
    eps: float = 8.0  # /255 for Linf attacks, the L2 norm for pgd-l2
    steps: int = 10
    target: Literal["base", "sparse"] = "sparse"
    grad: GradMode = "exact"
    targeted: bool = False
    seed: int = 0

    @property
    def heavy(self) -> bool:
        """Whether crafting it on a shared server waits in the job queue (``jobs.JobQueue``): AutoAttack,
        and Square with more than ``HEAVY_SQUARE_QUERIES`` queries; the other attacks on one image take a
        second or two."""
        return self.attack == "autoattack" or (self.attack == "square" and self.steps > HEAVY_SQUARE_QUERIES)

    @property
    def effort(self) -> str:
        """How long the attack searches, in its own units: FGSM takes one step, Square counts queries,
        AutoAttack runs its fixed standard schedule (``steps`` is unused by both of these)."""
        if self.attack == "fgsm":
            return "one step"
        if self.attack == "autoattack":
            return "its standard schedule"
        if self.attack == "square":
            return f"{self.steps:,} {'query' if self.steps == 1 else 'queries'}"
        return f"{self.steps:,} {'step' if self.steps == 1 else 'steps'}"

    @property
    def description(self) -> str:
        """The attack in words, e.g. ``pgd eps 8/255, 10 steps``."""
        eps = f"{self.eps:g}" if self.attack == "pgd-l2" else f"{self.eps:g}/255"
        return f"{self.attack} eps {eps}, {self.effort}{', targeted' if self.targeted else ''}"

    def not_found(self) -> str:
        """What to say when the attack found no adversarial example (see ``found_adversarial``)."""
        return (f"No adversarial example found within {self.effort}: the attacked model still classifies the "
                "image correctly. Try more " + ("queries" if self.attack == "square" else "steps") + " or a larger eps.")


#: Square runs longer than this are heavy jobs (see ``AttackChoice.heavy``).
HEAVY_SQUARE_QUERIES = 300


def classifier(sparse: SparseModel, alpha: float, grad: GradMode = "exact",
               layer_alphas: Mapping[str, float] | None = None) -> nn.Module:
    """The model at ``alpha`` (the base model when alpha is 0 and no layer overrides it)."""
    if alpha == 0 and not any(layer_alphas.values() if layer_alphas else ()):
        return sparse.base
    return sparse.at(alpha, grad, layer_alphas)


def attack_image(sparse: SparseModel, image: torch.Tensor, label: int | None, choice: AttackChoice,
                 alpha: float = 0.0, layer_alphas: Mapping[str, float] | None = None) -> torch.Tensor:
    """The adversarial version of one (C, H, W) image, crafted against the base or the sparsified model.

    With no ``label`` (a photo whose class nobody named) the attack leads away from the base model's
    prediction on the clean image.
    """
    target = (sparse.base if choice.target == "base"
              else classifier(sparse, alpha, choice.grad, layer_alphas))
    attack = make_attack(choice.attack, target, choice.eps, choice.steps, choice.targeted, choice.seed)
    device = next(sparse.model.parameters()).device
    if label is None:
        label = int(predict(sparse.base, image[None].to(device))[0])
    return attack(image[None].to(device), torch.tensor([label], device=device))[0].cpu()


def found_adversarial(sparse: SparseModel, image: torch.Tensor, adversarial: torch.Tensor, label: int | None,
                      choice: AttackChoice, alpha: float = 0.0,
                      layer_alphas: Mapping[str, float] | None = None) -> bool:
    """Whether ``adversarial`` (made by ``attack_image`` with these arguments) fools the model it attacked.

    Judged against ``label``, or, without one, against the base model's prediction on the clean image.
    An attack that fails returns the clean image (or one the model still gets right), which otherwise
    looks like a bug.
    """
    attacked = sparse.model if choice.target == "base" else classifier(sparse, alpha, layer_alphas=layer_alphas)
    device = next(sparse.model.parameters()).device
    if label is None:
        label = int(predict(sparse.model, image[None].to(device))[0])
    return int(predict(attacked, adversarial[None].to(device))[0]) != label


#: Square's queries by default on one image (its old default was 10, the other attacks' steps).
#: ``python benchmarks/lecture_measurements.py --cifar-n 10 --digits-n 50``, on images the base model
#: gets right: CIFAR-10 demo (eps 8/255, 10 images) Square fools 0 with 100 queries, 2 with 300 and
#: 2 with 1,000, as many as PGD-10; digits demo (eps 32/255, 50 images) 3, 5 and 6, PGD-10 6. The
#: CIFAR card's 2,000-image run has Square-1,000 fooling 36% of the correctly classified images.
SQUARE_DEFAULT_QUERIES = 1000


def default_steps(attack: str) -> int:
    """Steps (queries for Square) an attack on one image starts with."""
    return SQUARE_DEFAULT_QUERIES if attack == "square" else 10


def amplified(perturbation: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The perturbation scaled to fill [0, 1] around mid-grey, and the factor used (1 if it is zero)."""
    peak = float(perturbation.abs().max())
    scale = 0.5 / peak if peak > 0 else 1.0
    return (0.5 + perturbation * scale).clamp(0, 1), scale


@dataclass(frozen=True)
class TopK:
    """The k most probable classes of one prediction, most probable first."""

    classes: tuple[str, ...]
    probabilities: tuple[float, ...]

    @property
    def best(self) -> str:
        return self.classes[0]


@torch.no_grad()
def top_k(model: nn.Module, image: torch.Tensor, class_names: Sequence[str], k: int = 5) -> TopK:
    """Top-k softmax probabilities of ``model`` for one (C, H, W) image."""
    device = next(model.parameters()).device
    logits = model(image[None].to(device)).float()
    if not torch.isfinite(logits).all():
        raise ValueError("The model's output for this image is NaN or infinite; check the image and the weights for "
                         "non-finite values.")
    probabilities = logits.softmax(dim=1)[0].cpu()
    values, indices = probabilities.topk(min(k, len(probabilities)))
    return TopK(tuple(class_names[i] for i in indices.tolist()), tuple(values.tolist()))


@dataclass(frozen=True)
class Comparison:
    """Base and sparsified predictions on the clean image and, when there is one, the adversarial one.

    ``label`` is the class the predictions are judged against: the true class, or, when nobody
    named it (``label_known`` False), the base model's prediction on the clean image.
    """

    label: str
    alpha: float
    base_clean: TopK
    sparse_clean: TopK
    base_adv: TopK | None
    sparse_adv: TopK | None
    label_known: bool = True

    @property
    def reference(self) -> str:
        """What ``label`` is, in words."""
        return "the true class" if self.label_known else "the base model's prediction"

    @property
    def verdict(self) -> str:
        """One sentence on what the attack did to each model."""
        if self.base_adv is None or self.sparse_adv is None:
            image = f"Clean image, true class {self.label}" if self.label_known else "Clean image, true class unknown"
            return (f"{image}: the base model says {self.base_clean.best}, "
                    f"MeanSparse at alpha {self.alpha:g} says {self.sparse_clean.best}. Run an attack to compare.")
        base_ok, sparse_ok = self.base_adv.best == self.label, self.sparse_adv.best == self.label
        outcome = {
            (True, True): f"both models still see {self.reference}",
            (False, True): f"the attack fools the base model ({self.base_adv.best}) but not MeanSparse",
            (True, False): f"the attack fools MeanSparse ({self.sparse_adv.best}) but not the base model",
            (False, False): (f"the attack fools both models (base: {self.base_adv.best}, "
                             f"MeanSparse: {self.sparse_adv.best})"),
        }[(base_ok, sparse_ok)]
        if self.label_known:
            return f"True class {self.label}, alpha {self.alpha:g}: {outcome}."
        return (f"True class unknown, so each model is judged against the base model's prediction on the clean "
                f"image ({self.label}); alpha {self.alpha:g}: {outcome}.")


def compare(sparse: SparseModel, clean: torch.Tensor, adversarial: torch.Tensor | None, label: int | None,
            alpha: float, class_names: Sequence[str], layer_alphas: Mapping[str, float] | None = None,
            k: int = 5) -> Comparison:
    """Top-k of the base and the sparsified model on a clean image and its adversarial version.

    ``label`` None (true class unknown) judges both against the base model's clean prediction.
    """
    sparsified = classifier(sparse, alpha, layer_alphas=layer_alphas)
    adv = (lambda m: top_k(m, adversarial, class_names, k)) if adversarial is not None else (lambda m: None)
    base_clean = top_k(sparse.base, clean, class_names, k)
    reference = base_clean.best if label is None else class_names[label]
    return Comparison(reference, alpha, base_clean, top_k(sparsified, clean, class_names, k), adv(sparse.base),
                      adv(sparsified), label_known=label is not None)


# --- accuracy that follows the slider --------------------------------------------------------


@dataclass(frozen=True)
class Turns:
    """Items of the live set on which MeanSparse changes the verdict on the adversarial example, as
    positions in the live set; on each, the base model gets the clean image right."""

    rescued: tuple[int, ...]  # the attack fools the base model but not MeanSparse
    broken: tuple[int, ...]  # the attack fools MeanSparse but not the base model


@dataclass(frozen=True)
class LiveAccuracy:
    """A fixed evaluation set with adversarial examples crafted once against the base model.

    Re-scoring it at a new alpha costs two forward passes, so it can follow the slider. Its robust
    figure is *transfer* accuracy (the attacker never saw MeanSparse), which is not the adaptive
    robust accuracy of a sweep. ``indices`` are the items' indices in their dataset, ``choice`` the
    attack that made the adversarial examples.
    """

    images: torch.Tensor
    labels: torch.Tensor
    adversarial: torch.Tensor
    attack: str
    indices: tuple[int, ...] = ()
    choice: AttackChoice | None = None

    @classmethod
    def craft(cls, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, choice: AttackChoice,
              batch_size: int = 100, indices: Sequence[int] = ()) -> "LiveAccuracy":
        attack = make_attack(choice.attack, model, choice.eps, choice.steps, choice.targeted, choice.seed)
        adversarial = torch.cat([attack(images[i:i + batch_size], labels[i:i + batch_size])
                                 for i in range(0, len(labels), batch_size)])
        return cls(images, labels, adversarial, choice.description, tuple(indices), choice)

    def at(self, sparse: SparseModel, alpha: float,
           layer_alphas: Mapping[str, float] | None = None) -> tuple[float, float]:
        """(clean accuracy, transfer robust accuracy) of the model at ``alpha``."""
        model = classifier(sparse, alpha, layer_alphas=layer_alphas)
        both = predict(model, torch.cat([self.images, self.adversarial]))
        clean, adv = (both == torch.cat([self.labels, self.labels])).float().split(len(self.labels))
        return float(clean.mean()), float(adv.mean())

    def turns(self, sparse: SparseModel, alpha: float, layer_alphas: Mapping[str, float] | None = None) -> Turns:
        """The items MeanSparse at ``alpha`` rescues and those it breaks (see ``Turns``)."""
        base_clean, base_adv = (predict(sparse.model, torch.cat([self.images, self.adversarial])) ==
                                torch.cat([self.labels, self.labels])).split(len(self.labels))
        sparse_adv = predict(classifier(sparse, alpha, layer_alphas=layer_alphas), self.adversarial) == self.labels
        positions = lambda mask: tuple(torch.nonzero(mask).flatten().tolist())  # noqa: E731
        return Turns(rescued=positions(base_clean & ~base_adv & sparse_adv),
                     broken=positions(base_clean & base_adv & ~sparse_adv))


def nearest(rows: Sequence[dict], alpha: float) -> dict | None:
    """The row of an accuracy table (see ``accuracy_table``) whose alpha is closest to ``alpha``."""
    return min(rows, key=lambda r: abs(r["alpha"] - alpha), default=None)


# --- accuracy against alpha ------------------------------------------------------------------

#: Optional second opinions on each robust figure: the attack with straight-through gradients
#: (BPDA), and Square, which needs no gradient at all (``square_queries`` queries).
SECOND_OPINIONS = ("bpda", "square")


def second_opinion(settings: EvalSettings, which: str, square_queries: int = 1000) -> EvalSettings:
    """The settings of a second opinion on ``settings``' robust accuracy."""
    if which == "bpda":
        return replace(settings, grad="straight-through")
    if which == "square":
        return replace(settings, attack="square", steps=square_queries, step=None, grad="exact")
    raise KeyError(f"Unknown second opinion {which!r}; choose from {', '.join(SECOND_OPINIONS)}.")


def accuracy_table(sparse: SparseModel, images: torch.Tensor, labels: torch.Tensor, settings: EvalSettings,
                   alphas: Sequence[float], opinions: Sequence[str] = (), square_queries: int = 1000,
                   progress: Callable[[float, int, str], None] | None = None,
                   cache: ResultCache | None = None, cache_key: dict | None = None) -> list[dict]:
    """Clean and robust accuracy at each alpha (alpha 0 is the base model), one row per alpha.

    Each row has ``alpha``, ``clean``, ``robust``, one ``robust_<opinion>`` column per second opinion
    and ``worst``, the lowest robust accuracy of the attacks run: an attack that fails does not make a
    model robust. BPDA is not run at alpha 0, where the operator is the identity and BPDA *is* the plain
    attack: its column there repeats ``robust``. ``progress(done, total, what)`` follows every batch:
    ``done`` counts evaluations, with a fraction for the one running.
    """
    jobs = [(a, "robust", replace(settings, alpha=float(a))) for a in sorted(set(alphas) | {0.0})]
    jobs += [(a, f"robust_{o}", second_opinion(one, o, square_queries))
             for a, _, one in list(jobs) for o in opinions if not (o == "bpda" and a == 0)]
    rows: dict[float, dict] = {}
    for done, (alpha, column, one) in enumerate(jobs):
        what, report = f"{column.replace('_', ' ')} at alpha {alpha:g}", None
        if progress is not None:
            progress(done, len(jobs), what)
            report = lambda items, total: progress(done + items / max(total, 1), len(jobs), what)  # noqa: E731
        run = lambda journal: evaluate(sparse, images, labels, one, report, journal)  # noqa: E731 - for the cache
        result = cache.get_or_run(cache_key or {}, one, run) if cache is not None else run(None)
        row = rows.setdefault(alpha, {"alpha": alpha, "clean": result.clean_acc})
        row[column] = result.robust_acc
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    if "bpda" in opinions:
        rows[0.0]["robust_bpda"] = rows[0.0]["robust"]
    for row in rows.values():
        row["worst"] = min(v for k, v in row.items() if k.startswith("robust"))
    return [rows[a] for a in sorted(rows)]


#: Headers of an accuracy table's columns, for people.
COLUMN_LABELS = {"alpha": "alpha", "clean": "clean", "robust": "robust (exact gradients)",
                 "robust_bpda": "robust (BPDA)", "robust_square": "robust (Square)", "worst": "worst case"}


def best_alpha(rows: Sequence[dict], max_clean_drop: float = 0.01) -> float:
    """The alpha with the best worst-case robust accuracy (see ``accuracy_table``) whose clean accuracy is
    within ``max_clean_drop`` of the base model's; the smallest such alpha on a tie."""
    base = next(r for r in rows if r["alpha"] == 0)
    allowed = [r for r in rows if r["clean"] >= base["clean"] - max_clean_drop]
    return max(allowed, key=lambda r: (r.get("worst", r["robust"]), -r["alpha"]))["alpha"]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for an accuracy of ``correct`` out of ``n`` (95% for z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%.
    """
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"An accuracy needs 0 <= correct <= n and n > 0 (got {correct} of {n}).")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def sweep_csv(rows: Sequence[dict], n: int) -> str:
    """An accuracy table as CSV: each accuracy with the bounds of its 95% Wilson interval on ``n`` images."""
    columns = [c for c in COLUMN_LABELS if c != "alpha" and any(c in r for r in rows)]
    lines = [",".join(["alpha", "n"] + [f"{c}{end}" for c in columns for end in ("", "_low", "_high")])]
    for row in rows:
        cells = [f"{row['alpha']:g}", str(n)]
        for c in columns:
            low, high = wilson_interval(round(row[c] * n), n)
            cells += [f"{row[c]:.4f}", f"{low:.4f}", f"{high:.4f}"]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def with_interval(accuracy: float, n: int) -> str:
    """An accuracy on ``n`` items with its 95% Wilson interval, e.g. ``71% (62-79%)``."""
    low, high = wilson_interval(round(accuracy * n), n)
    return f"{accuracy:.0%} ({low:.0%}–{high:.0%})"
