"""MeanSparse Explorer's library: the operator, exact statistics and placement on any model."""

from .operator import GRAD_MODES, MeanSparse, sparsify
from .placement import FixedAlpha, SparseModel, Tap, attach, find_taps, route_taps
from .statistics import Statistics, TapStatistics, calibrate

__all__ = [
    "GRAD_MODES",
    "FixedAlpha",
    "MeanSparse",
    "SparseModel",
    "Statistics",
    "Tap",
    "TapStatistics",
    "attach",
    "calibrate",
    "find_taps",
    "route_taps",
    "sparsify",
]
