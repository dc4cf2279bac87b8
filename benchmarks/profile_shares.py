"""Where a slider move's time goes, from a py-spy profile of the app's server.

Reads py-spy's raw output (one folded stack per line, then its sample count), keeps the samples
inside the Explore page's slider fragment (``stage_ui`` in ``explore.py``: what a slider move reruns)
and prints the share of them in each part of the page:

    py-spy record --pid <server> --rate 50 --format raw --duration 60 -o profile.txt
    python benchmarks/profile_shares.py profile.txt
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

#: Parts of a slider move, by a function on the stack (the first that matches counts).
PARTS = {
    "live accuracy figures": ("accuracy_panel_ui",),
    "top-5 forward passes": ("top_k (",),
    "building the top-5 figure": ("top_k_chart",),
    "st.plotly_chart": ("plotly_chart",),
    "images": ("images_ui",),
}


def shares(lines: list[str]) -> tuple[int, Counter]:
    """Samples inside Explore's ``stage_ui`` and how many of them fall in each part."""
    total, parts = 0, Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if "stage_ui (explore.py" not in stack or not count.isdigit():
            continue
        total += int(count)
        part = next((name for name, marks in PARTS.items() if any(m in stack for m in marks)), "other")
        parts[part] += int(count)
    return total, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    total, parts = shares(parser.parse_args().profile.read_text().splitlines())
    print(f"{total} samples in Explore's stage_ui")
    for name in [*PARTS, "other"]:
        print(f"| {name} | {parts[name] / max(total, 1):.0%} |")


if __name__ == "__main__":
    main()
