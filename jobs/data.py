"""`rayssd data`: datasets that need no download.

    rayssd data builtin --out DIR [--seed 0] [--train-images N] [--val-images N] [--overwrite]
    python -m jobs.data builtin --out DIR ...

writes the built-in COCO-format dataset (`pipelines.data.builtin`) into DIR, or says that DIR
already holds it and skips.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipelines.data import builtin


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `data` command (with its `builtin` subcommand) to a `rayssd` subparsers object."""
    data = subparsers.add_parser(
        "data",
        help="write datasets that need no download (the built-in dataset)",
        description="Write datasets that need no download.",
    )
    add_arguments(data)
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    b = sub.add_parser(
        "builtin",
        help="write the seeded synthetic detection dataset (COCO JSON + JPEG)",
        description=(
            "Write the built-in dataset: seeded synthetic scenes of five shape classes at many "
            "scales and aspect ratios, on cluttered backgrounds, with occlusion and crowds; "
            "train and val splits in COCO format; CC0-1.0. The same seed gives byte-identical files."
        ),
    )
    b.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    b.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    b.add_argument(
        "--train-images",
        type=int,
        default=builtin.DEFAULT_TRAIN_IMAGES,
        help=f"training images (default: {builtin.DEFAULT_TRAIN_IMAGES})",
    )
    b.add_argument(
        "--val-images",
        type=int,
        default=builtin.DEFAULT_VAL_IMAGES,
        help=f"validation images (default: {builtin.DEFAULT_VAL_IMAGES})",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="write even into a non-empty directory that is not a built-in dataset "
        "(replaces its train/, val/, annotations/ and top-level dataset files)",
    )
    b.set_defaults(func=run_builtin)


def _progress(split: str, done: int, total: int) -> None:
    print(f"  {split}: {done}/{total} images", flush=True)


def run_builtin(args: argparse.Namespace) -> int:
    """Write the built-in dataset as `args` ask; print a summary. Returns the exit code."""
    print(f"built-in dataset -> {args.out} (seed {args.seed})", flush=True)
    try:
        summary = builtin.write_builtin(
            args.out,
            seed=args.seed,
            train_images=args.train_images,
            val_images=args.val_images,
            overwrite=args.overwrite,
            progress=_progress,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        print(f"rayssd data builtin: error: {exc}", file=sys.stderr)
        return 2
    if summary["skipped"]:
        print(f"{args.out} already holds this dataset (files match builtin.json); nothing written")
    else:
        print(f"wrote it in {summary['seconds']:.1f}s")
    for split, info in summary["splits"].items():
        images, boxes, path = info["images"], info["annotations"], info["annotation_file"]
        print(f"  {split:5s} {images:6d} images {boxes:7d} boxes  {path}")
    names = ", ".join(f"{cid}={name}" for cid, name in summary["categories"].items())
    print(f"  categories {names}; sha256 {summary['digest'][:16]}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.data", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
