"""`rayssd prepare`: validate a dataset and write its matched samples to Parquet (cached).

Also runs as ``ray job submit --working-dir . -- python -m jobs.prepare --data ... --out ...``.
"""

from __future__ import annotations

import argparse
import os

from jobs.options import add_config_arguments, config_from_args, run_job

DESCRIPTION = """Validate a detection dataset (COCO annotation file, YOLO dataset YAML, Pascal
VOC root or image folder, local path or URI), match every image to the preset's default boxes on Ray workers,
and write non-augmented samples to OUT/<split>/*.parquet (compact: the network input as a
JPEG, each default box's match; fewer bytes than a 640x480 source JPEG at SSD300) with
OUT/manifest.json and a validation report per split (bad images are named and counted,
the rest prepared). A second run with the same source and sample-relevant config
reuses the files."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="COCO annotation .json, YOLO dataset .yaml, Pascal VOC root, or image folder (path or URI)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for Parquet shards")
    add_config_arguments(parser)
    parser.add_argument(
        "--splits",
        default="train,val",
        help="comma-separated splits to prepare; 'all' for the whole source (default: train,val)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first data problem, naming the file"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
    )


def run(args: argparse.Namespace) -> dict:

    from pipelines.common import start_ray
    from pipelines.data.prepare import prepare
    from pipelines.data.sources import checked_location, open_source

    cfg = config_from_args(args)
    splits = tuple(None if s.strip() == "all" else s.strip() for s in args.splits.split(",") if s.strip())
    if not splits:
        raise ValueError("--splits needs at least one split name")
    probe = open_source(args.data)  # a bad source fails here, before Ray starts; parsed once
    checked_location(args.out, "--out")  # so does a bucket the samples cannot be written to
    start_ray(args.address)
    print(f"preparing {args.data} -> {args.out} (preset {cfg.name}, splits {args.splits})", flush=True)
    result = prepare(probe, args.out, cfg, splits=splits, strict=args.strict, force=args.force)
    state = "up to date, reused" if result.reused else f"written in {result.seconds:.1f}s"
    for name, split in result.splits.items():
        print(
            f"  {name:6s} {split['rows']:7d} samples in {split['files']} Parquet files, "
            f"{split['problems']} data problems (report: {split['report']})"
        )
    print(f"{result.out_dir}: {state}")
    return {"reused": result.reused, "splits": result.splits}


def main(argv: list[str] | None = None) -> None:
    run_job("prepare", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    main()
