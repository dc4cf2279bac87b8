"""Accuracy against alpha: clean and robust accuracy at each alpha, with second opinions, the alpha
they select, and the table as CSV with 95% Wilson intervals."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch

from .evaluation import EvalSettings, ResultCache, evaluate
from .sparse_model import SparseModel


def nearest(rows: Sequence[dict], alpha: float) -> dict | None:
    """The row of an accuracy table (see ``accuracy_table``) whose alpha is closest to ``alpha``."""
    return min(rows, key=lambda r: abs(r["alpha"] - alpha), default=None)


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
    """The alpha with the best worst-case robust accuracy (see ``accuracy_table``; ``robust`` where a row
    has no ``worst``) whose clean accuracy is within ``max_clean_drop`` of the base model's (alpha 0);
    the smallest such alpha on a tie. The app's sweep and the command line's ``reproduce`` both pick so."""
    base = next(r for r in rows if r["alpha"] == 0)
    floor = base["clean"] - max_clean_drop - 1e-12  # 0.1 - 0.01 is above 0.09 in floating point
    allowed = [r for r in rows if r["clean"] >= floor]
    return max(allowed, key=lambda r: (r.get("worst", r["robust"]), -r["alpha"]))["alpha"]


#: The two-sided 95% quantile of the normal distribution.
Z_95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for an accuracy of ``correct`` out of ``n`` (95% by default).

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
