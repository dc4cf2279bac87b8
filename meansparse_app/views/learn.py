"""Learn: what MeanSparse does, and how to read what this app shows."""

import streamlit as st

st.title("How MeanSparse works")

st.markdown(
    r"""
**The operator.** For a tapped layer, channel $c$ has mean $\mu_c$ and standard deviation
$\sigma_c$, measured once over a calibration set (the training set) with the model in eval mode.
Each feature $x$ of that channel becomes

$$
y = \begin{cases} \mu_c & \text{if } |x - \mu_c| < \alpha\,\sigma_c \\ x & \text{otherwise.} \end{cases}
$$

With $\alpha = 0$ nothing changes. As $\alpha$ grows, more and more small, common variations
around the mean are erased, while large, informative deviations pass untouched.

**Where it goes.** The paper's text puts it in front of every activation (ReLU, SiLU, GELU, ...)
of an adversarially trained network, including the last one before the classifier: the
*activations* placement. The authors' released models put it in more places, after every residual
addition too (per architecture: see the README): the *released* placement, which reproduces their
published models exactly. The sidebar picks one. Nothing is retrained: only the statistics are
measured and one global $\alpha$ is chosen.

**Why it can help.** An adversarial perturbation is a small change spread over many features.
Where a feature sits near its channel mean for both the clean and the adversarial image, the
operator replaces both with the mean and that part of the perturbation is gone. But where one of
the two lies inside the band and the other outside, the operator *creates* a change of at least
$\alpha\sigma_c$, however small the perturbation was. Whether less of the perturbation reaches the
next layer depends on which of the two wins: the Layers page measures it.

**Why to stay sceptical: gradient masking.** Inside the band the operator's gradient is exactly
zero. A gradient-based attacker therefore sees flat regions and can fail for the wrong reason:
not because the model is robust, but because the gradient no longer points anywhere. Two checks
keep the numbers honest:

- **BPDA (straight-through)**: attack with the identity as the operator's backward pass, so the
  gradient flows as if MeanSparse were absent while the forward pass still sparsifies.
- **Square**: a score-based attack that needs no gradient at all.

RobustBench's own evaluation of the published models shows why this matters: for CIFAR-10 Linf,
RaWRN-70-16 with MeanSparse scores 72.08% under AutoAttack but 68.94% under APGD with BPDA, below
the 71.07% of the same model without MeanSparse.
"""
)

st.subheader("Reading the pages")
st.markdown(
    r"""
**Sidebar.** The model, the data, where the statistics come from, and the threshold. Alpha is yours
alone: other people on the same server have their own.

**Explore.** The clean image, the perturbation (scaled up until visible; the caption gives the
factor and its $L_\infty$ size) and the adversarial image. The four bar charts are the top-5
classes of the base and the sparsified model on the clean and the adversarial image; green is the
true class. The adversarial example is crafted when you press *Attack* and then stays fixed, so
moving alpha shows what MeanSparse does to *that* perturbation. To see an adaptive attacker, attack
again after moving alpha (target: MeanSparse).

**Layers.** For the chosen layer, histograms of the features before and after the operator, for
the clean and the adversarial image. The grey band is $\mu \pm \alpha\sigma$: every value inside it
becomes $\mu$, which shows up as a spike at the mean in the *after* panel. The whole-layer view
standardises each channel, $(x-\mu_c)/\sigma_c$, so that one band $\pm\alpha$ fits all channels.
Below: the fraction of values replaced per layer, and the perturbation left at each layer,
$\lVert f(x+\delta)-f(x)\rVert$, without MeanSparse and after the operator with MeanSparse. In the
*relative* view both lines are divided by the same number, the norm of the **base** model's clean
features at that layer, so that they compare (dividing the MeanSparse line by its own sparsified
features would shrink its denominator as $\alpha$ grows and inflate the ratio). The bars below split
the perturbation at the operator: **removed** (clean and adversarial value both inside the band),
**passed** (both outside, unchanged) and **created** (one inside, one outside: the jump at the band's
edge).

**What the demo models show there, measured.** On both bundled models the perturbation left after
the operator is *larger* with MeanSparse than without, at every tap and at every alpha measured
(0.25, 0.5, 1.0), for PGD-10 crafted against the base model and for PGD-10 crafted against
MeanSparse itself. On the CIFAR-10 model at alpha 0.5 (10 test images): at the first tap `3`,
0.129 of the base model's clean features without MeanSparse, 0.169 with it; the operator removed
0.060 but created 0.134 at the band's edges. On the digits model at alpha 0.5 (50 test images): at
tap `3`, 0.277 without, 0.341 with (removed 0.118, created 0.272). The operator removes part of the
perturbation and creates more. So on these models MeanSparse does not work by shrinking the
perturbation layer by layer, and whatever robustness the exact-gradient attacks report has to be
checked against BPDA and Square (the Accuracy page, and the model cards, which give the figures and
the command that measured them: `python benchmarks/lecture_measurements.py`).

**Accuracy figures next to the views.** *Clean* accuracy on a fixed set of test images and *transfer*
robust accuracy on adversarial examples crafted once against the base model are recomputed live
as alpha moves. Transfer accuracy overstates robustness: the attacker never saw MeanSparse. The
third figure is the *adaptive* robust accuracy from your last sweep on the Accuracy page, at the
swept alpha nearest to yours.

**Accuracy.** Clean and robust accuracy for each alpha, the attack run against the sparsified
model at that alpha, each with its 95% Wilson interval (on 200 images a 40% accuracy is known to
about ±7 points). BPDA and Square are second opinions: if the plain attack's line rises with
alpha but theirs do not, the gain comes from gradient masking. The *worst case* column is the lowest
of the attacks run, and the suggested alpha is chosen on it.
"""
)
