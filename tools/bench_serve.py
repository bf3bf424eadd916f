#!/usr/bin/env python
"""Throughput, memory and a load test of the query service (``rapidin-index serve``).

Starts ``rapidin-index serve`` on an index as its own process, on a free loopback port, with
the model the index records (the embedded SmolLM2 for the demo's index; ``--model`` to
override), and measures:

1. the same 16 queries sent one by one (each waits for its answer) and all together (16
   concurrent requests, so the service scores them in shared scans): queries per second,
   the scans the service ran for them, and whether both ways return the same examples;
2. the service's resident memory (VmRSS) after start-up and after the queries, and its
   peak (VmHWM);
3. a load test on loopback: at most ``--load-requests`` requests from ``--load-clients``
   clients at once, stopped after ``--load-seconds``, counting status codes. Only 200 and
   the documented 503 (with ``Retry-After``) are allowed; anything else makes the exit
   status 1. More clients than the service admits (``--max-concurrent`` + ``--max-queue``)
   are used by default, so the 503 path is exercised.

Usage, on the demo's index of the embedded model (``bash tools/demo.sh`` builds it)::

    .venv/bin/python tools/bench_serve.py --index demo-index --out docs/bench-serve.json

A quick check of the tool on any index (a short load test)::

    python tools/bench_serve.py --index IX --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

# Longest wait for one admitted request (queue of max_queue requests at seconds each).
REQUEST_TIMEOUT_S = 900.0
logger = logging.getLogger("bench_serve")

# (prompt, generation): everyday instruction-following pairs, none taken from the index.
QUERIES = [
    ("At what temperature does aluminum melt?", "Aluminum melts at about 660 degrees Celsius."),
    ("Convert 45 kilometers to meters.", "45 kilometers is 45,000 meters."),
    ("What is the capital of Brazil?", "The capital of Brazil is Brasília."),
    ("Name a primary color.", "Red is a primary color."),
    ("What is the derivative of x squared?", "The derivative of x^2 is 2x."),
    ("Give a synonym for happy.", "A synonym for happy is joyful."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet."),
    ("Rewrite in passive voice: The cat chased the mouse.", "The mouse was chased by the cat."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide from the air."),
    ("Classify: apple, carrot, banana.", "Fruits: apple, banana. Vegetable: carrot."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Suggest a name for a pet goldfish.", "You could call the goldfish Bubbles."),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class Service:
    """``rapidin-index serve`` in a child process, stopped with SIGINT (then SIGKILL)."""

    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "rapidin_index",
            "--no-progress",
            "serve",
            "--index",
            args.index,
            "--port",
            str(self.port),
            "--max-concurrent",
            str(args.max_concurrent),
            "--max-queue",
            str(args.max_queue),
            "--batch-window-ms",
            str(args.batch_window_ms),
        ]
        if args.model:
            command += ["--model", args.model]
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        logger.info("started %s (log %s)", " ".join(command), log_path)

    def wait_ready(self, client: httpx.Client, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"the service exited ({self.proc.returncode}):\n"
                    + self.log_path.read_text()[-3000:]
                )
            try:
                if client.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the service did not answer within {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def attribute(client: httpx.Client, url: str, query: tuple[str, str], topk: int):
    response = client.post(
        url + "/api/attribute",
        timeout=600,
        json={"prompt": query[0], "generation": query[1], "topk": topk},
    )
    response.raise_for_status()
    return [r["id"] for r in response.json()["results"]]


def stats(client: httpx.Client, url: str) -> dict:
    return client.get(url + "/api/info", timeout=60).json()["stats"]


def delta(after: dict, before: dict) -> dict:
    return {
        key: round(after[key] - before[key], 4)
        for key in ("scans", "scanned_queries", "scan_seconds", "gradient_seconds")
    }


def throughput(client: httpx.Client, url: str, queries: list, topk: int) -> dict:
    """The queries one by one, then all at once; returns both figures."""
    out: dict = {}
    before = stats(client, url)
    began = time.perf_counter()
    latencies, sequential_ids = [], []
    for query in queries:
        t0 = time.perf_counter()
        sequential_ids.append(attribute(client, url, query, topk))
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - began
    out["one_by_one"] = {
        "seconds": round(seconds, 3),
        "qps": round(len(queries) / seconds, 3),
        "median_latency_s": round(statistics.median(latencies), 3),
        **delta(stats(client, url), before),
    }

    before = stats(client, url)
    start = threading.Barrier(len(queries))

    def one(query):
        start.wait()
        return attribute(client, url, query, topk)

    with ThreadPoolExecutor(len(queries)) as pool:
        began = time.perf_counter()
        together_ids = list(pool.map(one, queries))
        seconds = time.perf_counter() - began
    after = delta(stats(client, url), before)
    out["together"] = {
        "seconds": round(seconds, 3),
        "qps": round(len(queries) / seconds, 3),
        "mean_queries_per_scan": round(after["scanned_queries"] / max(after["scans"], 1), 2),
        **after,
    }
    out["speedup"] = round(out["together"]["qps"] / out["one_by_one"]["qps"], 2)
    out["same_results"] = together_ids == sequential_ids
    return out


def load_test(
    client: httpx.Client,
    url: str,
    queries: list,
    requests: int,
    clients: int,
    seconds: float,
    topk: int,
) -> dict:
    """At most ``requests`` requests from ``clients`` threads, for at most ``seconds``."""
    lock = threading.Lock()
    left = [requests]
    codes: Counter = Counter()
    missing_retry_after = [0]
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        n = index
        while True:
            with lock:
                if left[0] == 0 or time.monotonic() > deadline:
                    return
                left[0] -= 1
            prompt, generation = queries[n % len(queries)]
            n += clients
            try:
                response = client.post(
                    url + "/api/attribute",
                    json={"prompt": prompt, "generation": generation, "topk": topk},
                    # The time limit stops new requests, not admitted ones: the service
                    # bounds its queue, so an admitted request finishes in bounded time.
                    timeout=REQUEST_TIMEOUT_S,
                )
            except httpx.HTTPError as err:
                with lock:
                    codes[f"error: {type(err).__name__}"] += 1
                continue
            with lock:
                codes[str(response.status_code)] += 1
                if (
                    response.status_code == 503
                    and not response.headers.get("Retry-After", "").isdigit()
                ):
                    missing_retry_after[0] += 1
            if response.status_code == 503:
                time.sleep(0.05)  # a real client waits Retry-After; this one only backs off

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - began
    unexpected = sum(n for code, n in codes.items() if code not in ("200", "503"))
    return {
        "requests": sum(codes.values()),
        "clients": clients,
        "seconds": round(elapsed, 2),
        "status": dict(sorted(codes.items())),
        "unexpected": unexpected,
        "503_without_retry_after": missing_retry_after[0],
        "stopped_by_time_limit": left[0] > 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="Index directory.")
    parser.add_argument("--model", help="Override the model the index records.")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--max-concurrent", type=int, default=2, help="Passed to serve.")
    parser.add_argument("--max-queue", type=int, default=32, help="Passed to serve.")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="Passed to serve.")
    parser.add_argument("--load-requests", type=int, default=200)
    parser.add_argument(
        "--load-clients",
        type=int,
        default=None,
        help="[default: --max-concurrent + --max-queue + 8]",
    )
    parser.add_argument("--load-seconds", type=float, default=180.0)
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=900.0,
        help="Seconds to wait for the model to load (first use converts it).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A short run: a load test of 60 requests, 60 s at most.",
    )
    parser.add_argument("--out", help="Also write the JSON report here.")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.quick:
        args.load_requests, args.load_seconds = 60, 60.0
    if args.max_concurrent + args.max_queue < len(QUERIES):
        parser.error(
            f"--max-concurrent + --max-queue must admit the {len(QUERIES)} queries sent together"
        )
    clients = args.load_clients or args.max_concurrent + args.max_queue + 8

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        service = Service(args, Path(tmp) / "serve.log")
        try:
            with httpx.Client(limits=httpx.Limits(max_connections=clients + 8)) as client:
                service.wait_ready(client, args.start_timeout)
                info = client.get(service.url + "/api/info", timeout=60).json()
                memory_start = memory_mib(service.proc.pid)
                logger.info(
                    "service up: %d rows, K = %d; timing %d queries",
                    info["rows"],
                    info["k"],
                    len(QUERIES),
                )
                report = {
                    "index": info["index"],
                    "model": info["model"].get("path"),
                    "rows": info["rows"],
                    "k": info["k"],
                    "cpus": os.cpu_count(),
                    "settings": {
                        "max_concurrent": args.max_concurrent,
                        "max_queue": args.max_queue,
                        "batch_window_ms": args.batch_window_ms,
                        "topk": args.topk,
                    },
                    "queries": len(QUERIES),
                }
                report.update(throughput(client, service.url, QUERIES, args.topk))
                report["memory_mib"] = {
                    "after_start": memory_start["VmRSS"],
                    "after_queries": memory_mib(service.proc.pid)["VmRSS"],
                }
                logger.info(
                    "load test: %d requests, %d clients, %.0f s at most",
                    args.load_requests,
                    clients,
                    args.load_seconds,
                )
                report["load"] = load_test(
                    client,
                    service.url,
                    QUERIES,
                    args.load_requests,
                    clients,
                    args.load_seconds,
                    args.topk,
                )
                mem = memory_mib(service.proc.pid)
                report["memory_mib"].update(after_load=mem["VmRSS"], peak=mem["VmHWM"])
                report["service_stats"] = stats(client, service.url)
        finally:
            service.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        logger.info("wrote %s", args.out)
    load = report["load"]
    if load["unexpected"] or load["503_without_retry_after"]:
        logger.error("the load test saw responses other than 200 and 503 with Retry-After")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
