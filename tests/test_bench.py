"""`rayssd bench`: the suites' tables become one table of goals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.__main__ import goals

TRAIN = """machine: x86_64

| benchmark | rayssd | baseline | ratio | goal | met |
|---|---|---|---|---|---|
| train images/s, 1 worker (vs plain loop) | 130.5 | 143.1 | 0.91x | >= 0.9x | yes |
|   whole `rayssd train` run, 1 worker, 2 epochs (s) | 60.4 | - | - | - | - |
| train images/s, 2 workers (vs plain loop) | 133.2 | 143.1 | 0.93x | report | - |
"""
SERVE = """| run | images/s | p50 ms | p99 ms |
|---|---|---|---|
| direct, batch 1 | 97.8 | 10.2 | 11.0 |

throughput at 32 clients / direct batched: 0.52 (goal >= 0.80: NOT met)
p50 overhead at 1 client over direct batch 1: 13.5 ms (goal <= 15 ms: met)
"""


def test_only_figures_with_a_goal_are_collected_with_their_baseline_and_verdict():
    rows = goals("train", TRAIN) + goals("serve", SERVE)
    assert [(r.suite, r.rayssd, r.baseline, r.ratio, r.goal, r.met) for r in rows] == [
        ("train", "130.5", "143.1", "0.91x", ">= 0.9x", "yes"),
        ("serve", "0.52", "(in the figure)", "-", ">= 0.80", "NO"),
        ("serve", "13.5 ms", "(in the figure)", "-", "<= 15 ms", "yes"),
    ]


@pytest.mark.slow
def test_rayssd_bench_runs_a_suite_and_writes_the_report_and_plot(tmp_path):
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = [sys.executable, "-m", "jobs.cli", "bench", "--quick", "--only", "core", "--markdown", str(md)]
    done = subprocess.run([*argv, "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = md.read_text()
    assert "## core" in report and "## goals" in report and "matching + encoding" in report
    table = report.split("## goals")[1]
    assert "| core | matching + encoding, SSD300 (img/s) |" in table and "for reference" not in table
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):  # an unknown suite is refused in one line, exit 2
        from jobs.cli import main

        main(["bench", "--only", "nope"])


def _answer_with(response: bytes) -> int | Exception:
    """`_read_response` against a real local asyncio server that sends `response` and closes."""
    import asyncio

    from benchmarks.bench_serve import _read_response

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(response)
        await writer.drain()
        writer.close()

    async def ask() -> int | Exception:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /detect HTTP/1.1\r\n\r\n")
            try:
                return await asyncio.wait_for(_read_response(reader), 10)
            except ConnectionError as exc:
                return exc
            finally:
                writer.close()

    return asyncio.run(ask())


def test_the_load_generator_reads_a_status_and_refuses_what_it_cannot_read():
    body = b'{"boxes": []}'
    ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    assert _answer_with(ok) == 200
    assert _answer_with(ok.replace(b"200 OK", b"503 Service Unavailable")) == 503
    closed = _answer_with(b"")
    assert isinstance(closed, ConnectionError) and "no HTTP status line" in str(closed)
    chunked = _answer_with(
        b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert isinstance(chunked, ConnectionError) and "status 500 without Content-Length" in str(chunked)
    cut = _answer_with(b"HTTP/1.1 200 OK\r\ncontent-le")
    assert isinstance(cut, ConnectionError) and "closed the connection in the headers" in str(cut)
    last = _answer_with(ok.replace(b"content-length", b"connection: close\r\ncontent-length"))
    assert isinstance(last, ConnectionError) and "after status 200" in str(last)
