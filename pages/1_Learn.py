"""Learn: what MeanSparse does, and how to read what this app shows."""

import streamlit as st

st.set_page_config(page_title="Learn · MeanSparse Explorer", layout="wide")
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

**Where it goes.** In front of every activation (ReLU, SiLU, GELU, ...) of an adversarially
trained network, including the last one before the classifier. Nothing is retrained: only the
statistics are measured and one global $\alpha$ is chosen.

**Why it can help.** An adversarial perturbation is a small change spread over many features.
Much of it moves features that sit near their channel mean; those moves are clamped away, so less
of the perturbation reaches the next layer.

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
