"""The guided tour: a few steps through the real pages, each setting the view up and saying what to look at.

The app carries each step out (``ui.tour``); this module only says what each one does and why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TourStep:
    title: str
    text: str
    page: str  # one of meansparse_core.links.PAGES
    alpha: float | None = None  # set the slider (and switch MeanSparse on)
    first_image: bool = False  # pick the gallery's first test image
    attack: bool = False  # craft the page's default attack (PGD against the base model)
    last_layer: bool = False  # open the Layers page on the last tap before the classifier


TOUR = (
    TourStep("Pick an image", "A test image and what each model makes of it: the bars are the top-5 classes, green "
             "is the true class; the panels put the base model next to the same model with MeanSparse at alpha 0.2.",
             "explore", alpha=0.2, first_image=True),
    TourStep("Attack it", "PGD changes each pixel by at most eps, steering the base model away from the true class; "
             "the perturbation is scaled up so you can see it. Look at the two 'adversarial' panels.",
             "explore", attack=True),
    TourStep("Switch MeanSparse off", "At alpha 0 the operator replaces nothing: both models compute the same "
             "features, so they give the same answer on the adversarial image.", "explore", alpha=0.0),
    TourStep("Raise alpha", "At alpha 1, every feature within one standard deviation of its channel's mean is "
             "replaced by that mean. Does the true class come back on the adversarial image, and what happens "
             "on the clean one? The adversarial example stays the one crafted against the base model.",
             "explore", alpha=1.0),
    TourStep("Look inside", "The last layer before the classifier: the grey band is what the operator replaces. "
             "Compare the clean and the adversarial features before and after it, and the charts over depth below.",
             "layers", last_layer=True),
    TourStep("Measure on many images", "One image proves little. A sweep attacks MeanSparse itself at each alpha; "
             "BPDA (straight-through gradients) checks the gain: if only the plain attack's line rises, the gain "
             "is gradient masking, not robustness.", "accuracy"),
    TourStep("Why stay sceptical", "How the operator works, why its zero gradient can fool an attacker, and what "
             "RobustBench's own BPDA evaluation found for the published models.", "learn"),
)
