"""MeanSparse Explorer's library: the operator, exact statistics and placement on any model."""

from .operator import GRAD_MODES, MeanSparse, sparsify
from .discovery import find_taps
from .routing import route_taps
from .sparse_model import FixedAlpha, SparseModel, attach
from .statistics import Statistics, TapStatistics, calibrate
from .taps import Tap

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
