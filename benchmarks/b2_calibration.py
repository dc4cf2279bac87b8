"""B2: the exact-statistics pass over N images against a plain inference pass over the same images.

Both passes run the demo CIFAR-10 model in eval mode without gradients over the same batches;
calibration also routes every tap's input through the float64 streaming moments. The ratio is
the median of per-round ratios.

    python benchmarks/b2_calibration.py [--n 5000] [--batch 250] [--rounds 3] [--device cpu]
"""

from __future__ import annotations


import torch

from common import MODELS, arguments, images, interleaved, medians, ratio, save
from meansparse_core import calibrate


def main() -> None:
    parser = arguments(__doc__, rounds=3, pick_model=True)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()
    model, _ = MODELS[args.model](args.device)
    batches = images(args.n, args.device).split(args.batch)

    def inference():
        with torch.no_grad():
            for batch in batches:
                model(batch)

    times = interleaved({"inference": inference, "calibration": lambda: calibrate(model, batches)}, args.rounds)
    median, slower = medians(times), ratio(times, "calibration", "inference")
    print(f"{args.model}, {args.n} images: inference {median['inference']:.2f} s, "
          f"calibration {median['calibration']:.2f} s, ratio {slower:.3f} (goal <= 1.15)")
    save(f"b2_calibration_{args.device}", {"model": args.model, "n": args.n, "batch": args.batch, "rounds": args.rounds,
                                           "median_seconds": median, "ratio": slower})


if __name__ == "__main__":
    main()
