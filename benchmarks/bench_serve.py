"""The served endpoint under closed-loop load against the same model called directly.

    python -m benchmarks.bench_serve [--quick] [--model URI] [--clients 1,8,32] [--markdown FILE]

Every figure runs the same work per image: decode a 640x480 JPEG, resize to the model's
input (`pipelines.serve.requests.prepare`), detect (`ssd.detector.Detector` with weights in
the layout `ssd.layout` measures faster here and 1 torch thread, as one detector replica with
1 CPU has), at the serving default threshold.

1. Direct, in this process: one image at a time (batch 1), and the serve batch size
   (decode B images, one `Detector` call on B): images/s and per-call p50/p99 latency.
2. `rayssd serve` on a local Ray (1 ingress replica, 1 detector replica of 1 CPU, default
   batching) under a closed-loop load generator: C keep-alive connections on one asyncio loop,
   each sending the next request when its answer arrives, C = 1, 8, 32: images/s, request
   p50/p99 latency, and the CPU the load generator's loop took (cores).
   goals: at 32 clients >= 80 % of the direct batched rate;
          at 1 client p50 overhead over the direct batch-1 call <= 15 ms.
3. Engines: `rayssd serve` of the torch checkpoint and of its `rayssd export` ONNX file (ONNX
   Runtime in the detector replica), `tiny` and a seeded random `ssdlite320`, at 32 clients
   (or the most given), each deployed in turn on the same port.
   goal: ONNX Runtime >= 1.3x torch images/s.
The clients share the machine with the server (on 2 cores they take part of a core).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import tempfile
import time
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from benchmarks.report import machine, publish
from pipelines.common import start_ray
from pipelines.serve import deployments as serving
from pipelines.serve import requests as serve_requests
from pipelines.track.models import load_model
from ssd import checkpoint
from ssd import config as C
from ssd.detector import Detector
from ssd.model import build_ssd
from ssd.synthetic import CLASS_NAMES, make_scene

GOAL_THROUGHPUT = 0.80  # serve at 32 clients / direct at the serve batch size
GOAL_OVERHEAD_MS = 15.0  # serve p50 at 1 client - direct p50 at batch 1
GOAL_ENGINE = 1.3  # serve images/s on ONNX Runtime / on torch, same model
ENGINE_PRESETS = ("tiny", "ssdlite320")
REQUEST_TIMEOUT_S = 120.0  # one answer; a server that hangs fails the run instead of stalling it


def _tiny_model(directory: str, preset: str = "tiny") -> str:
    """The `preset` (default `tiny`) with seeded random weights, for the built-in classes."""
    cfg = C.override(C.preset(preset), [f"model.num_classes={len(CLASS_NAMES) + 1}"])
    torch.manual_seed(0)
    dataset = {"class_names": list(CLASS_NAMES), "category_ids": list(range(1, len(CLASS_NAMES) + 1))}
    ckpt = checkpoint.make_checkpoint(build_ssd(cfg).eval(), cfg, dataset, epoch=0, step=0)
    return str(checkpoint.save(checkpoint.for_inference(ckpt), os.path.join(directory, preset)))


def _exported(model_uri: str, directory: str) -> str:
    """`model_uri` as `rayssd export` writes it (ONNX; the model's own thresholds)."""
    from ssd import export

    loaded = load_model(model_uri)
    out = os.path.join(directory, f"{loaded.cfg.name}-{os.getpid()}.onnx")
    export.export(loaded.model, loaded.cfg, loaded.dataset, out)
    return out


def _image() -> bytes:
    pixels, _, _ = make_scene(np.random.default_rng(0), height=480, width=640)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _stats(latencies: list[float], images: int, seconds: float) -> dict[str, float]:
    ms = np.array(latencies) * 1000.0
    return {
        "images_per_s": images / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def bench_direct(model_uri: str, data: bytes, batch: int, calls: int) -> dict[str, float]:
    """`calls` calls of: decode `batch` copies of the image, one Detector call on them."""
    loaded = load_model(model_uri)
    size, limit = loaded.cfg.model.image_size, C.ServeConfig().max_image_pixels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # = one detector replica of 1 CPU
    try:
        detector = Detector(loaded.model, loaded.cfg, channels_last=None)  # layout as the replica's
        latencies = []
        for i in range(calls + 2):
            start = time.perf_counter()
            prepared = [serve_requests.prepare(data, limit, size) for _ in range(batch)]
            images = torch.from_numpy(np.stack([image for image, _ in prepared]))  # [B, 3, S, S]
            threshold = serve_requests.DEFAULT_SCORE_THRESHOLD
            detector(images, [hw for _, hw in prepared], score_threshold=threshold)
            if i >= 2:  # two warm-up calls
                latencies.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return _stats(latencies, calls * batch, sum(latencies))


def closed_loop(url: str, data: bytes, clients: int, seconds: float, warmup_s: float) -> dict[str, float]:
    """`clients` HTTP/1.1 keep-alive connections, each sending the next request as soon as its
    answer arrives, all on one asyncio loop, so the load generator takes little of the cores
    the server shares with it. Adds ``client_cpu``: the cores that loop's thread used."""
    parsed = urlparse(url)
    head = (
        f"POST /detect HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
    latencies: list[float] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        try:
            while (now := time.perf_counter()) < stop_at:
                writer.write(head + data)
                await writer.drain()
                status = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
                done = time.perf_counter()
                if status != 200:
                    raise RuntimeError(f"a request failed with status {status} at {clients} clients")
                if now >= measure_from and done <= stop_at:
                    latencies.append(done - now)
        finally:
            writer.close()
            await writer.wait_closed()

    async def all_clients() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    cpu = time.thread_time()  # asyncio.run runs the loop in this thread
    asyncio.run(all_clients())
    stats = _stats(latencies, len(latencies), seconds)
    stats["client_cpu"] = (time.thread_time() - cpu) / (time.perf_counter() - start)
    return stats


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; its status code. ConnectionError
    if the server closes the connection first or answers in a form this client does not read."""
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"no HTTP status line from the server (got {status_line[:80]!r})")
    status = int(parts[1])
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        if not line:
            raise ConnectionError(f"the server closed the connection in the headers (status {status})")
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" not in headers:
        raise ConnectionError(f"status {status} without Content-Length (headers {sorted(headers)})")
    await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"connection", b"").lower() == b"close":
        raise ConnectionError(f"the server closed the connection after status {status}")
    return status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(model_uri: str | None, clients: list[int], quick: bool) -> dict[str, dict[str, float]]:
    import ray

    data = _image()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="rayssd-bench-serve-") as tmp:
        uri = model_uri or _tiny_model(tmp)
        batch = load_model(uri).cfg.serve.max_batch_size  # what serve batches up to
        calls = 20 if quick else 200
        results["direct, batch 1"] = bench_direct(uri, data, 1, calls)
        results[f"direct, batch {batch}"] = bench_direct(uri, data, batch, max(2, calls // batch))
        start_ray(None)
        try:
            url = serving.deploy(uri, port=_free_port(), detector_cpus=1.0)
            for c in clients:
                seconds = 4.0 if quick else 20.0
                results[f"serve, {c} client{'s' if c > 1 else ''}"] = closed_loop(url, data, c, seconds, 1.0)
            results["serve stats"] = serving.stats()
            serving.shutdown()
            models = {load_model(uri).cfg.name: uri}
            for preset in ENGINE_PRESETS:
                models.setdefault(preset, _tiny_model(tmp, preset))
            most = max(clients)
            for name, model in models.items():
                for engine, served in (("torch", model), ("ONNX Runtime", _exported(model, tmp))):
                    url = serving.deploy(served, port=_free_port(), detector_cpus=1.0)
                    seconds = 4.0 if quick else 12.0
                    key = f"engine {name}, {engine}, {most} clients"
                    results[key] = closed_loop(url, data, most, seconds, 2.0)
                    serving.shutdown()
        finally:
            serving.shutdown()
            ray.shutdown()
    return results


def format_table(results: dict[str, dict], clients: list[int]) -> str:
    lines = ["| run | images/s | p50 ms | p99 ms | load generator CPU (cores) |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
        + (f"{r['client_cpu']:.2f} |" if "client_cpu" in r else "- |")
        for name, r in results.items()
        if name != "serve stats"
    ]
    direct = [r for name, r in results.items() if name.startswith("direct")]
    served = {c: results[f"serve, {c} client{'s' if c > 1 else ''}"] for c in clients}
    if max(clients) >= 32 and 1 in clients:
        ratio = served[max(clients)]["images_per_s"] / direct[1]["images_per_s"]
        overhead = served[1]["p50_ms"] - direct[0]["p50_ms"]
        lines.append("")
        lines.append(
            f"throughput at {max(clients)} clients / direct batched: {ratio:.2f} "
            f"(goal >= {GOAL_THROUGHPUT:.2f}: {'met' if ratio >= GOAL_THROUGHPUT else 'NOT met'})"
        )
        lines.append(
            f"p50 overhead at 1 client over direct batch 1: {overhead:.1f} ms "
            f"(goal <= {GOAL_OVERHEAD_MS:g} ms: {'met' if overhead <= GOAL_OVERHEAD_MS else 'NOT met'})"
        )
    for name in dict.fromkeys(n.split(",")[0] for n in results if n.startswith("engine ")):
        torch_rate, onnx_rate = (
            results[f"{name}, {engine}, {max(clients)} clients"]["images_per_s"]
            for engine in ("torch", "ONNX Runtime")
        )
        ratio = onnx_rate / torch_rate
        lines.append(
            f"{name.removeprefix('engine ')} served on ONNX Runtime / on torch at {max(clients)} clients: "
            f"{ratio:.2f} (goal >= {GOAL_ENGINE:.2f}: {'met' if ratio >= GOAL_ENGINE else 'NOT met'})"
        )
    stats = results["serve stats"]
    lines.append(f"detector batch sizes seen (size: batches): {stats['batch_sizes']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 s per load level, few direct calls (noisy)")
    parser.add_argument("--model", help="model URI to serve (default: tiny preset, random weights)")
    parser.add_argument("--clients", default="1,8,32", help="closed-loop client counts (default: 1,8,32)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()[0]
    table = format_table(run(args.model, clients, args.quick), clients)
    header = (
        f"machine: {machine()}, load average {load:.1f} at the start, "
        f"torch {torch.__version__}; serve: 1 ingress, 1 detector replica (1 CPU), model's serve config"
    )
    publish(header, table, args.markdown)


if __name__ == "__main__":
    main()
