"""COCO scale: ingest and `prepare` time per image, the largest process's memory and the
prepared bytes per image, against the number of images.

    python -m benchmarks.bench_scale [--sizes 2000,16000,118000] [--preset ssd300_vgg16] [--quick]
                                     [--work DIR] [--markdown FILE]

Each size N gets a COCO-shaped set: COCO's 80 categories with their ids and gaps, ~7.3 boxes
per image with polygons, ~1 % crowd boxes with RLE masks, large non-contiguous image ids, and
images hard-linked from a pool of real 640x480 photos (so N costs no disk): crops of the
photographs matplotlib and scikit-learn (an MLflow dependency) ship, saved at JPEG quality
75-95. Three bad inputs sit inside every set: a truncated JPEG, an annotated image that is
missing and a pixel bomb (a 20000x20000 PNG); each must be reported by name and the rest of
the set prepared.

Each N is measured in a child process with its own Ray: parse (`open_source`), check
(`read_dataset` over the whole set: every image's header and a 1/8-scale decode), then
`prepare` of the train and val splits as `rayssd prepare` runs it. A thread samples every
process of that tree (the driver, Ray's own and its workers) and keeps the largest resident
set (VmHWM) and the largest private memory (RssAnon: what is not a shared mapping such as Ray's
object store). Goals: prepare time per image at the largest N within 1.25x of the smallest
N's; no process above 3 GiB; prepared bytes per image at most the source JPEG's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.report import machine, publish

SIZES = (2_000, 16_000, 118_000)
QUICK_SIZES = (500, 2_000)
PHOTO = (640, 480)  # width, height
POOL = 64  # distinct photos hard-linked into every set
BOXES_PER_IMAGE = 7.3
CROWD_SHARE = 0.01
BOMB_SIDE = 20_000  # a PNG of 400 M pixels: over the decoders' pixel limit
TIME_GOAL = 1.25  # largest N's prepare seconds per image over the smallest N's
MEMORY_GOAL_GIB = 3.0
BYTES_GOAL = 1.0  # prepared bytes per image over source JPEG bytes per image
SAMPLE_S = 0.25

# COCO 2017's categories: (id, name); the ids skip 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83.
_COCO_NAMES = (  # in id order from 1; "-" marks an unused id
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant - "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe - "
    "backpack umbrella - - handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle - wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair "
    "couch potted_plant bed - dining_table - - toilet - tv laptop mouse remote keyboard cell_phone "
    "microwave oven toaster sink refrigerator - book clock vase scissors teddy_bear hair_drier "
    "toothbrush"
)
COCO_CATEGORIES = tuple(
    (i, name.replace("_", " ")) for i, name in enumerate(_COCO_NAMES.split(" "), start=1) if name != "-"
)


def real_photographs() -> list[Image.Image]:
    """The real photographs installed packages ship: matplotlib's Grace Hopper portrait and,
    where scikit-learn is installed (MLflow depends on it), its China and flower pictures."""
    from matplotlib import cbook

    paths = [Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    try:
        import sklearn

        images = Path(sklearn.__file__).parent / "datasets" / "images"
        paths += [images / "china.jpg", images / "flower.jpg"]
    except ImportError:
        pass
    photos = []
    for path in paths:
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    return photos


def photo_pool(folder: Path, count: int = POOL, seed: int = 0) -> list[Path]:
    """`count` distinct 640x480 JPEGs: random crops (at least 60 % of each side) of the real
    photographs, mirrored at random, at JPEG quality 75-95."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = real_photographs()
    paths = []
    for k in range(count):
        photo = photos[k % len(photos)]
        width, height = photo.size
        w, h = (int(side * rng.uniform(0.6, 1.0)) for side in (width, height))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = photo.crop((x, y, x + w, y + h)).resize(PHOTO, Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"pool_{k:03d}.jpg"
        crop.save(path, "JPEG", quality=int(rng.integers(75, 96)))
        paths.append(path)
    return paths


def pixel_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid grayscale PNG of side x side pixels that compresses to a few hundred KiB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + a black row
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def coco_set(root: Path, count: int, pool: list[Path], bomb: Path, seed: int = 0) -> tuple[Path, dict]:
    """A COCO-shaped set of `count` images under `root` (see the module docstring): returns
    the annotation file and the file names of the three bad inputs by kind."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    ids = np.sort(rng.choice(600_000, size=count, replace=False) + 1)  # COCO's ids reach 581929
    bad_rows = rng.choice(count, size=3, replace=False)
    bad = {}
    images, annotations = [], []
    category_ids = np.array([i for i, _ in COCO_CATEGORIES])
    width, height = PHOTO
    for row, image_id in enumerate(ids.tolist()):
        name = f"{image_id:012d}.jpg"
        target = images_dir / name
        entry = {"id": image_id, "file_name": name, "width": width, "height": height}
        if row == bad_rows[0]:  # cut short
            target.write_bytes(pool[row % len(pool)].read_bytes()[:30_000])
            bad["truncated"] = name
        elif row == bad_rows[1]:  # annotated, never copied
            bad["missing_file"] = name
        elif row == bad_rows[2]:  # a bomb, annotated at its size
            name = entry["file_name"] = f"{image_id:012d}.png"
            entry["width"] = entry["height"] = BOMB_SIDE
            os.link(bomb, images_dir / name)
            bad["too_large"] = name
        else:
            os.link(pool[row % len(pool)], target)
        images.append(entry)
        for _ in range(max(1, int(rng.poisson(BOXES_PER_IMAGE)))):
            w, h = np.exp(rng.uniform(np.log(8), np.log(400), size=2))
            x, y = rng.uniform(0, width - min(w, width - 1)), rng.uniform(0, height - min(h, height - 1))
            w, h = min(w, width - x), min(h, height - y)
            crowd = int(rng.random() < CROWD_SHARE)
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            segmentation = (
                {"size": [height, width], "counts": [int(y * width + x), int(w * h)]} if crowd else [polygon]
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)),
                    "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                    "area": round(float(w * h), 2),
                    "iscrowd": crowd,
                    "segmentation": segmentation,
                }
            )
    categories = [{"id": i, "name": name, "supercategory": "-"} for i, name in COCO_CATEGORIES]
    annotation_file = root / "annotations" / "instances.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    annotation_file.write_text(json.dumps(coco))
    return annotation_file, bad


class TreeMemory:
    """Samples every process in this process's tree; keeps the largest VmHWM and RssAnon."""

    def __init__(self) -> None:
        self.peak_rss = self.peak_private = 0
        self.peak_rss_name = self.peak_private_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        for pid in _tree(os.getpid()):
            status = _status(pid)
            rss, private = status.get("VmHWM", 0), status.get("RssAnon", 0)
            if rss > self.peak_rss:
                self.peak_rss, self.peak_rss_name = rss, status.get("Name", "?")
            if private > self.peak_private:
                self.peak_private, self.peak_private_name = private, _command(pid)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _status(pid: int) -> dict[str, Any]:
    """/proc/PID/status: Name, and sizes in bytes."""
    out: dict[str, Any] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            out[key] = int(value.split()[0]) * 1024 if value.endswith("kB") else value
    except OSError:
        pass
    return out


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60].strip()
    except OSError:
        return "?"


def measure(annotation_file: Path, out: Path, preset: str) -> dict[str, Any]:
    """Parse, check and prepare one set in this process (see the module docstring)."""
    from pipelines.common import start_ray
    from pipelines.data.datasets import read_dataset
    from pipelines.data.prepare import prepare
    from pipelines.data.sources import open_source
    from pipelines.data.validation import IMAGE_KINDS
    from ssd import config as C

    result: dict[str, Any] = {}
    with TreeMemory() as memory:
        start = time.perf_counter()
        probe = open_source(str(annotation_file))
        result["parse_s"] = time.perf_counter() - start
        start_ray("local", num_cpus=os.cpu_count())
        start = time.perf_counter()
        _, _, report = read_dataset(probe)
        result["check_s"] = time.perf_counter() - start
        prepared = prepare(probe, out, C.preset(preset))
        result["prepare_s"] = prepared.seconds
    result["images"] = report.images_in_source
    result["problems"] = sorted([e.kind, Path(e.file).name] for e in report.entries if e.kind in IMAGE_KINDS)
    result["prepared_rows"] = sum(s["rows"] for s in prepared.splits.values())
    result["prepared_bytes"] = sum(f.stat().st_size for f in out.rglob("*.parquet"))
    result["peak_rss"], result["peak_rss_process"] = memory.peak_rss, memory.peak_rss_name
    result["peak_private"], result["peak_private_process"] = memory.peak_private, memory.peak_private_name
    return result


def stored_input_difference(pool: list[Path], size: int) -> tuple[float, float]:
    """Mean and largest |difference| (levels of 255) between the network inputs of the pool's
    photos and the JPEGs prepared samples store of them, decoded as training decodes them."""
    from pipelines.data.samples import decode_input, encode_jpeg, read_image
    from ssd.image import network_input

    means, largest = [], 0
    for path in pool:
        direct = network_input(read_image(str(path), reduce_to=size), size)  # [3, S, S]
        stored = decode_input(encode_jpeg(direct.transpose(1, 2, 0)))
        difference = np.abs(stored.astype(np.int16) - direct)
        means.append(difference.mean())
        largest = max(largest, int(difference.max()))
    return float(np.mean(means)), float(largest)


def run(sizes: tuple[int, ...], preset: str, work: Path) -> list[dict[str, Any]]:
    from ssd import config as C

    pool = photo_pool(work / "pool")
    source_bytes = float(np.mean([p.stat().st_size for p in pool]))
    difference = stored_input_difference(pool, C.preset(preset).model.image_size)
    bomb = pixel_bomb(work / "bomb.png")
    results = []
    for n in sizes:
        root = work / f"coco_{n}"
        start = time.perf_counter()
        annotation_file, bad = coco_set(root, n, pool, bomb)
        built = time.perf_counter() - start
        out, report = root / "prepared", root / "measure.json"
        command = [sys.executable, "-m", "benchmarks.bench_scale", "--measure", str(annotation_file)]
        command += ["--out", str(out), "--preset", preset, "--json", str(report)]
        subprocess.run(command, check=True)
        result = json.loads(report.read_text())
        result.update(n=n, built_s=built, bad=bad, source_bytes=source_bytes, stored_difference=difference)
        results.append(result)
        print(json.dumps(result), flush=True)
        shutil.rmtree(root)  # the next set has the disk
    return results


def format_table(results: list[dict[str, Any]], preset: str) -> str:
    lines = [
        "| images | parse (ms/img) | check (ms/img) | prepare (ms/img) | largest process RSS / private (GiB) "
        "| prepared / source JPEG (KiB/img) | bad inputs reported |",
        "|---|---|---|---|---|---|---|",
    ]
    gib, kib = 2**30, 1024
    for r in results:
        n = r["images"]
        found = {kind for kind, _ in r["problems"]}
        named = all([kind, name] in r["problems"] for kind, name in r["bad"].items())
        lines.append(
            f"| {n} | {1e3 * r['parse_s'] / n:.2f} | {1e3 * r['check_s'] / n:.2f} | "
            f"{1e3 * r['prepare_s'] / n:.2f} | {r['peak_rss'] / gib:.2f} / {r['peak_private'] / gib:.2f} | "
            f"{r['prepared_bytes'] / r['prepared_rows'] / kib:.1f} / {r['source_bytes'] / kib:.1f} | "
            f"{len(r['problems'])} ({', '.join(sorted(found))}){'' if named else ' NOT the planted ones'}; "
            f"{r['prepared_rows']} prepared |"
        )
    first, last = results[0], results[-1]
    per_image = [r["prepare_s"] / r["images"] for r in (first, last)]
    time_ratio = per_image[1] / per_image[0]
    memory = max(r["peak_rss"] for r in results) / gib
    size_ratio = last["prepared_bytes"] / last["prepared_rows"] / last["source_bytes"]
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines += [
        "",
        f"prepare time per image, {last['images']} images over {first['images']} (preset {preset}): "
        f"{time_ratio:.2f} (goal <= {TIME_GOAL}: {met(time_ratio <= TIME_GOAL)})",
        f"largest process at any size, GiB: {memory:.2f} (goal <= {MEMORY_GOAL_GIB:g}: "
        f"{met(memory <= MEMORY_GOAL_GIB)})",
        f"prepared bytes per image / source JPEG bytes per image: {size_ratio:.2f} (goal <= "
        f"{BYTES_GOAL:.2f}: {met(size_ratio <= BYTES_GOAL)})",
        f"largest process: {max(results, key=lambda r: r['peak_rss'])['peak_rss_process']} (RSS), "
        f"{max(results, key=lambda r: r['peak_private'])['peak_private_process']} (private)",
        "stored network inputs (JPEG) against the direct ones, |difference| in levels of 255: mean "
        f"{last['stored_difference'][0]:.2f}, largest {last['stored_difference'][1]:.0f}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="set sizes (default: %(default)s)")
    parser.add_argument(
        "--preset", default="ssd300_vgg16", help="preset to prepare for (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: sizes {QUICK_SIZES}")
    parser.add_argument(
        "--work", help="folder for the sets (default: a temporary one; needs a few GB per 100k)"
    )
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: one set
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(Path(args.measure), Path(args.out), args.preset)
        Path(args.json).write_text(json.dumps(result))
        return
    sizes = QUICK_SIZES if args.quick else tuple(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work) as work:
        results = run(sizes, args.preset, Path(work))
    header = (
        f"machine: {machine()}, load average {os.getloadavg()[0]:.1f} at "
        f"the end; preset {args.preset}; {POOL} pooled 640x480 photos, {BOXES_PER_IMAGE} boxes per image"
    )
    publish(header, format_table(results, args.preset), args.markdown)


if __name__ == "__main__":
    main()
