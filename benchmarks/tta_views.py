"""Which test-time views pay: accuracy on a run's own validation split for several view sets.

The views compared: the image alone, image + mirror image (the flip TTA fmnist used before), and the mirror image
plus 1-pixel shifts of both, diagonal (2 shifts) or along the axes (4 shifts, what `fmnist.data.tta_views` now
uses), weighted as written below. Only the validation split is read: the choice is not tuned on the test set.

    .venv/bin/python benchmarks/tta_views.py runs/a runs/b      # run folders trained with --validation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist import checkpoint, training
from fmnist.data import shift


def probabilities(model: torch.nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Softmax outputs in batches of 500, in the layout the model trained in."""
    with torch.inference_mode():
        return torch.cat([F.softmax(model(batch.contiguous(memory_format=torch.channels_last) if channels_last
                                          else batch).float(), 1) for batch in x.split(500)])


def view_sets(model: torch.nn.Module, x: torch.Tensor, channels_last: bool) -> dict[str, torch.Tensor]:
    """Averaged probabilities per view set."""
    def both(view: torch.Tensor) -> torch.Tensor:  # a view and its mirror image
        return probabilities(model, view, channels_last) + probabilities(model, view.flip(-1), channels_last)

    plain, flips = probabilities(model, x, channels_last), both(x)
    diagonal = [both(shift(x, dy, dx)) for dy, dx in ((-1, -1), (1, 1))]
    axes = [both(shift(x, dy, dx)) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    return {"image only": plain, "image + mirror": flips / 2,
            "+ 2 diagonal shifts, half weight": (flips + 0.5 * sum(diagonal)) / 4,
            "+ 2 diagonal shifts, equal weight": (flips + sum(diagonal)) / 6,
            "+ 4 axis shifts, half weight (fmnist)": (2 * flips + 0.5 * sum(axes)) / 8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| run | " + " | ".join(["image only", "+ mirror", "+2 diag (half)", "+2 diag (equal)", "+4 axis (half)"])
          + " |\n|---|---|---|---|---|---|")
    for run in args.runs:
        model, meta = checkpoint.load_model(run)
        tensors = training.prepare_tensors(checkpoint.read_config(run), None, None, torch.device("cpu"))
        if tensors.x_val is None:
            parser.error(f"{run} has no validation split")
        sets = view_sets(model, tensors.x_val, meta.channels_last)
        cells = [f"{(p.argmax(1) == tensors.y_val).float().mean().item() * 100:.2f}" for p in sets.values()]
        print(f"| {run} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
