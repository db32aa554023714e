"""The `fmnist` command. Thin: parse flags, call the library, print. Exit 0 ok, 1 failure, 2 bad input."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fmnist.errors import FmnistError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows `(default: N)` in every --help and keeps description line breaks."""


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="folder with the dataset (IDX or Kaggle CSV); default: $FMNIST_DATA, the cache, "
                             "Debian's folder, then a download")
    parser.add_argument("--no-verify", action="store_true", help="skip the MD5 check (for custom IDX data)")


# ----------------------------------------------------------------------------------------------- data
def _cmd_data_info(args: argparse.Namespace) -> int:
    import numpy as np

    from fmnist import data

    source = data.locate_data(args.data_dir)
    print(f"dataset:   Fashion-MNIST ({source.format.upper()}) in {source.path} (found via {source.origin})")
    splits = {split: data.load_split(source, split, verify=not args.no_verify) for split in ("train", "test")}
    if source.format == "idx":
        print("checksums: " + ("skipped (--no-verify)" if args.no_verify else "all 4 files match the published MD5"))
    header = f"{'class':<14}" + "".join(f"{s:>8}" for s in splits)
    print(header)
    counts = {s: np.bincount(y, minlength=data.NUM_CLASSES) for s, (_, y) in splits.items()}
    for index, name in enumerate(data.CLASS_NAMES):
        print(f"{index} {name:<12}" + "".join(f"{counts[s][index]:>8}" for s in splits))
    print(f"{'total':<14}" + "".join(f"{len(y):>8}" for _, y in splits.values()))
    for split, (x, _) in splits.items():
        pixels = x.astype(np.float32) / 255.0
        print(f"{split} pixels: mean {pixels.mean():.4f}, std {pixels.std():.4f} (on 0..1), "
              f"shape {x.shape}, dtype {x.dtype}")
    return 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from fmnist import data, plots

    source = data.locate_data(args.data_dir)
    images, labels = data.load_split(source, args.split, verify=not args.no_verify)
    path = plots.save_figure(plots.sample_grid(images, labels, per_class=args.per_class, seed=args.seed), args.out)
    print(f"wrote {path} ({args.per_class} {args.split} images per class)")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from fmnist import data

    mirrors = tuple(args.mirror) if args.mirror else None
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not sys.stderr.isatty(), transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done)

        directory = data.fetch(args.dest, mirrors=mirrors, retries=args.retries, progress=report)
    print(f"Fashion-MNIST verified in {directory}")
    return 0


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface; sub-commands register their handler as `func`."""
    parser = argparse.ArgumentParser(prog="fmnist", formatter_class=_Formatter,
                                     description="Fashion-MNIST with PyTorch: data, training, evaluation, plots.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data_parser = commands.add_parser("data", help="find, inspect, show and fetch the dataset",
                                      formatter_class=_Formatter)
    data_commands = data_parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = data_commands.add_parser("info", help="where the data is, counts per class, pixel statistics, checksums",
                                    formatter_class=_Formatter)
    _add_data_dir(info)
    info.set_defaults(func=_cmd_data_info)
    show = data_commands.add_parser("show", help="save a grid of sample images, one row per class",
                                    formatter_class=_Formatter)
    _add_data_dir(show)
    show.add_argument("--out", default="runs/samples.png", help="PNG file to write")
    show.add_argument("--per-class", type=int, default=10, help="images per class (row)")
    show.add_argument("--split", choices=("train", "test"), default="train", help="which split to sample")
    show.add_argument("--seed", type=int, default=0, help="which random examples")
    show.set_defaults(func=_cmd_data_show)
    fetch = data_commands.add_parser("fetch", help="download the upstream files, verified, into the cache",
                                     formatter_class=_Formatter)
    fetch.add_argument("--dest", default=None, help="folder to download into (default: ~/.cache/fmnist)")
    fetch.add_argument("--mirror", action="append", help="base URL to download from (repeatable); "
                                                         "default: $FMNIST_MIRROR, then upstream")
    fetch.add_argument("--retries", type=int, default=3, help="attempts per file and mirror")
    fetch.set_defaults(func=_cmd_data_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fmnist` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except FmnistError as error:
        print(f"fmnist: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

