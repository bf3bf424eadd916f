#!/usr/bin/env python
"""Benchmark of the exact top-k scan (rapidin_index.scan) on a synthetic fp16 store.

Builds (or reuses) an N x K fp16 store as raw chunk files, then measures with a warm page
cache (median of --repeats runs after one warm-up run):

1. plain read: numpy sum over a uint64 view of every memmapped block (single thread),
2. our scan with 1 query, and its throughput ratio to (1)   (target >= 0.8),
3. our scan with --queries queries in one pass, time ratio to (2)   (target <= 2),
4. faiss IndexFlatIP on an fp32 copy of the rows (a subset when the copy would not fit
   comfortably in RAM), same k, and our speed-up on the same rows   (target >= 1.5),
5. torch fp16 matrix-vector / matrix-matrix products over the same memmapped blocks,
6. peak resident memory of the scans.

With --larger-than-ram, N is set so the store is 1.5x the physical RAM (unless --rows is
given), page-cache pages are dropped before and during each run, and the figures are
cold-cache streaming figures. Example:

    python tools/bench_scan.py --dir /work/bench_store --rows 52000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rapidin_index.scan import iter_raw_chunks, scan  # noqa: E402

logger = logging.getLogger("bench_scan")

MANIFEST = "manifest.json"


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return mem_total_bytes() // 2


def chunk_layout(n_rows: int, chunk_rows: int) -> list[tuple[str, int, int]]:
    """(file name, row_start, valid_rows) of every chunk; the last may be partly valid."""
    out = []
    for i, r0 in enumerate(range(0, n_rows, chunk_rows)):
        out.append((f"chunk_{i:06d}.f16", r0, min(chunk_rows, n_rows - r0)))
    return out


def build_store(
    directory: Path, n_rows: int, k_dim: int, chunk_rows: int, seed: int, scale: float
) -> list[tuple[str, int, int]]:
    """Write (or reuse) the synthetic store; returns iter_raw_chunks' file list."""
    directory.mkdir(parents=True, exist_ok=True)
    want = {
        "rows": n_rows,
        "K": k_dim,
        "chunk_rows": chunk_rows,
        "seed": seed,
        "scale": scale,
        "format": "raw fp16 little-endian C-order",
    }
    layout = chunk_layout(n_rows, chunk_rows)
    files = [(str(directory / name), r0, nv) for name, r0, nv in layout]
    manifest = directory / MANIFEST
    chunk_bytes = chunk_rows * k_dim * 2
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if have == want and all(
            os.path.exists(p) and os.path.getsize(p) == chunk_bytes for p, _, _ in files
        ):
            logger.info("reusing the store in %s", directory)
            return files
        logger.info("store in %s has other settings %s: rebuilding", directory, have)
        manifest.unlink()
    need = len(layout) * chunk_bytes
    free = shutil.disk_usage(directory).free
    if need > free * 0.95:
        raise SystemExit(
            f"the store needs {need / 1e9:.1f} GB, {directory} has "
            f"{free / 1e9:.1f} GB free: use --dir elsewhere or fewer --rows"
        )
    for stale in directory.glob("chunk_*.f16"):
        stale.unlink()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for path, _, valid in files:
        rows = np.empty((chunk_rows, k_dim), dtype=np.float16)
        # float32 normals scaled like small gradient sketches (some fp16 subnormals),
        # converted chunk by chunk so memory stays one chunk
        rows[:valid] = rng.standard_normal((valid, k_dim), dtype=np.float32) * np.float32(scale)
        if valid < chunk_rows:
            rows[valid:] = np.float16(np.nan)  # the invalid tail must never be read
        rows.tofile(path)
    dt = time.perf_counter() - t0
    manifest.write_text(json.dumps(want, indent=1))
    logger.info("wrote %d chunks (%.2f GB) in %.1f s", len(files), need / 1e9, dt)
    return files


def drop_page_cache(files: list[tuple[str, int, int]]) -> None:
    """Evict the store from the page cache (for cold-cache figures)."""
    for path, _, _ in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM so later readings cover one phase (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes(resettable: bool) -> int:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timing(float):
    """Median seconds of a measurement, with its fastest run and CPU seconds attached."""

    fastest: float
    cpu: float  # process CPU seconds (all threads, user + sys), median over the runs


class Bench:
    """Times callables with a warm-up run and a median, or once per cold run."""

    def __init__(self, files, repeats: int, cold: bool, max_seconds: float) -> None:
        self.files = files
        self.repeats = repeats
        self.cold = cold
        self.max_seconds = max_seconds

    def time(self, fn: Callable[[], object]) -> tuple[Timing, object]:
        times = []
        cpus = []
        result = None
        runs = self.repeats if self.cold else self.repeats + 1
        for i in range(runs):
            if self.cold:
                drop_page_cache(self.files)
            c0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
            if self.cold or i > 0 or dt > self.max_seconds:
                # the first warm run only fills the page cache, unless it is too slow to repeat
                times.append(dt)
                cpus.append(cpu)
                if i == 0:
                    break
        timing = Timing(statistics.median(times))
        timing.fastest = min(times)
        timing.cpu = statistics.median(cpus)
        return timing, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "rapidin_bench_store",
        help="store directory, reused when its manifest matches",
    )
    ap.add_argument("--rows", type=int, default=None, help="N (default 52,000)")
    ap.add_argument("--K", type=int, default=65536, help="columns (default 65,536)")
    ap.add_argument("--chunk-rows", type=int, default=128, help="rows per chunk file")
    ap.add_argument("--k", type=int, default=100, help="top-k per query")
    ap.add_argument("--queries", type=int, default=16, help="m for the multi-query run")
    ap.add_argument("--bottom", action="store_true", help="also keep bottom-k")
    ap.add_argument("--engine", default="cpu", help="scan engine: cpu, gpu or auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    ap.add_argument(
        "--larger-than-ram", action="store_true", help="N = 1.5x physical RAM, cold-cache figures"
    )
    ap.add_argument(
        "--faiss-max-gb",
        type=float,
        default=None,
        help="largest fp32 copy for faiss (default: 40%% of available RAM)",
    )
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--torch-rows",
        type=int,
        default=4096,
        help="rows for the torch comparison (a prefix of the store)",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="a measurement whose warm-up run takes longer is reported once",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.01, help="std of the synthetic values")
    ap.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging (per block)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    k_dim = args.K
    row_bytes = 2 * k_dim
    if args.rows is not None:
        n_rows = args.rows
    elif args.larger_than_ram:
        n_rows = int(1.5 * mem_total_bytes() // row_bytes) + 1
    else:
        n_rows = 52_000
    cold = args.larger_than_ram
    files = build_store(args.dir, n_rows, k_dim, args.chunk_rows, args.seed, args.scale)
    store_bytes = n_rows * row_bytes
    logger.info(
        "store: N=%d K=%d (%.2f GB, %d chunk files), %s cache, engine %s",
        n_rows,
        k_dim,
        store_bytes / 1e9,
        len(files),
        "cold" if cold else "warm",
        args.engine,
    )

    load_start = os.getloadavg()[0]
    bench = Bench(files, args.repeats, cold, args.max_seconds)
    rss_resettable = reset_peak_rss()
    rng = np.random.default_rng(args.seed + 1)
    q_many = rng.standard_normal((args.queries, k_dim), dtype=np.float32)
    q_one = q_many[:1].copy()
    rows_out: list[tuple[str, str, str, str, str]] = []

    def chunks(subset=None):
        return iter_raw_chunks(
            files if subset is None else subset, k_dim, drop_cache=True if cold else None
        )

    def add(name, seconds: Timing, nbytes, rows, note=""):
        gbs = nbytes / seconds / 1e9
        fastest, cpu = seconds.fastest, seconds.cpu
        rows_out.append(
            (
                name,
                f"{seconds:.3f}",
                f"{fastest:.3f}",
                f"{cpu:.2f}",
                f"{gbs:.2f}",
                f"{rows / seconds:,.0f}",
                note,
            )
        )
        print(
            f"{name}: {seconds:.3f} s (fastest {fastest:.3f} s, {cpu:.2f} CPU-s), "
            f"{gbs:.2f} GB/s, {rows / seconds:,.0f} rows/s {note}",
            flush=True,
        )
        return gbs

    # (1) plain read of the same bytes
    def plain_read():
        total = 0
        for _, block in chunks():
            view = block.reshape(-1)
            view = view.view(np.uint64) if view.nbytes % 8 == 0 else view
            total ^= int(view.sum(dtype=np.uint64))  # keeps the sum alive, wraps silently
        return total

    t_read, _ = bench.time(plain_read)
    add("plain read (numpy uint64 sum, 1 thread)", t_read, store_bytes, n_rows)

    # (2) and (3): our scan, 1 query and m queries in one pass
    def our_scan(q, subset=None):
        return lambda: scan(q, chunks(subset), args.k, bottom=args.bottom, engine=args.engine)

    scan(q_one, chunks(files[:2]), args.k, engine=args.engine)  # compile / load the kernels
    scan(q_many, chunks(files[:2]), args.k, engine=args.engine)
    rss_base = current_rss_bytes()
    reset_peak_rss()
    t_one, res_one = bench.time(our_scan(q_one))
    rss_one = peak_rss_bytes(rss_resettable)
    add(
        f"scan, 1 query ({args.engine})",
        t_one,
        store_bytes,
        n_rows,
        f"throughput ratio to plain read {t_read / t_one:.2f}",
    )
    reset_peak_rss()
    t_many, res_many = bench.time(our_scan(q_many))
    rss_many = peak_rss_bytes(rss_resettable)
    add(
        f"scan, {args.queries} queries ({args.engine})",
        t_many,
        store_bytes,
        n_rows,
        f"time ratio to 1 query {t_many / t_one:.2f}",
    )
    assert res_one.rows_scanned == n_rows and res_many.rows_scanned == n_rows

    # (4) faiss IndexFlatIP on an fp32 copy
    faiss_note = ""
    if not args.no_faiss:
        try:
            import faiss
        except ImportError:
            faiss = None
            faiss_note = "faiss not installed"
        if faiss is not None:
            # the fp32 copy must leave the store's page cache alone (warm figures)
            room = mem_available_bytes() - (0 if cold else store_bytes)
            budget = args.faiss_max_gb * 1e9 if args.faiss_max_gb is not None else 0.5 * room
            n_sub = min(n_rows, max(0, int(budget // (4 * k_dim))))
            subset = [f for f in files if f[1] + f[2] <= n_sub] or files[:1]
            n_sub = sum(nv for _, _, nv in subset)
            sub_bytes = n_sub * row_bytes
            where = (
                "all rows"
                if n_sub == n_rows
                else f"first {n_sub:,} rows: an fp32 copy of all {n_rows:,} needs "
                f"{n_rows * 4 * k_dim / 1e9:.1f} GB"
            )
            faiss_note = f"faiss on {where}"
            print(faiss_note, flush=True)
            index = faiss.IndexFlatIP(k_dim)
            for _, block in chunks(subset):  # block by block: one fp32 copy, in faiss
                index.add(block.view(np.float16).astype(np.float32))
            for label, q in (("1 query", q_one), (f"{args.queries} queries", q_many)):
                t_f, (dist, ids_f) = bench.time(lambda q=q: index.search(q, args.k))
                t_o, res_o = bench.time(our_scan(q, subset))
                same = float(
                    np.mean(
                        [
                            len(set(a) & set(b)) / max(1, len(a))
                            for a, b in zip(ids_f, res_o.top_ids, strict=True)
                        ]
                    )
                )
                add(
                    f"faiss IndexFlatIP fp32, {label}",
                    t_f,
                    n_sub * 4 * k_dim,
                    n_sub,
                    f"({where}; fp32 bytes)",
                )
                add(
                    f"scan on the same rows, {label}" + (" (cold, from disk)" if cold else ""),
                    t_o,
                    sub_bytes,
                    n_sub,
                    f"speed-up vs faiss {t_f / t_o:.2f}x, top-{args.k} id agreement {same:.4f}",
                )
            del index

    # (5) torch fp16 products on the same memmapped blocks (a prefix of the store when
    # the whole would take too long: torch's CPU fp16 matmul is slow without AVX512-FP16)
    if not args.no_torch:
        import torch

        torch_files = [f for f in files if f[1] < args.torch_rows]
        torch_rows = sum(nv for _, _, nv in torch_files)
        torch_bytes = torch_rows * row_bytes
        where = "all rows" if torch_rows == n_rows else f"first {torch_rows:,} rows"
        with _torch_quiet():
            for label, q, t_ours in (
                ("1 query", q_one, t_one),
                (f"{args.queries} queries", q_many, t_many),
            ):
                kind, product = pick_torch_product(torch, q, files[0], k_dim)
                t_t, _ = bench.time(
                    lambda product=product: torch_run(torch, product, chunks(torch_files))
                )
                ours_per_byte = t_ours / store_bytes
                add(
                    f"torch {kind}, {label}",
                    t_t,
                    torch_bytes,
                    torch_rows,
                    f"({where}) our scan is {t_t / torch_bytes / ours_per_byte:.1f}x faster "
                    "per byte",
                )

    # (6) peak RSS
    chunk_mib = args.chunk_rows * row_bytes / 2**20
    print()
    how = "VmHWM per phase" if rss_resettable else "ru_maxrss"
    print(
        f"RSS before the scans: {rss_base / 2**20:.0f} MiB; "
        f"peak RSS during the 1-query scan: {rss_one / 2**20:.0f} MiB; during the "
        f"{args.queries}-query scan: {rss_many / 2**20:.0f} MiB (store "
        f"{store_bytes / 2**30:.2f} GiB, chunk {chunk_mib:.0f} MiB, {how})"
    )
    print(
        f"process peak RSS overall (ru_maxrss, includes the faiss copy): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"
    )
    print()
    print(
        f"N={n_rows:,} K={k_dim:,} k={args.k} chunk={args.chunk_rows} rows "
        f"({chunk_mib:.0f} MiB), store {store_bytes / 1e9:.2f} GB, "
        f"{'cold' if cold else 'warm'} page cache, {os.cpu_count()} CPUs, "
        f"{'median of' if args.repeats > 1 else 'runs:'} {args.repeats}; 1-min load "
        f"average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end (above ~0.5, "
        "other processes competed for the CPUs)"
    )
    print()
    print("| measurement | median (s) | fastest (s) | CPU-s | GB/s (median) | rows/s | notes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    print(
        f"| peak RSS, scans | | | | | | before {rss_base / 2**20:.0f} MiB; peak 1 query "
        f"{rss_one / 2**20:.0f} MiB, {args.queries} "
        f"queries {rss_many / 2**20:.0f} MiB |"
    )
    return 0


def pick_torch_product(torch, q: np.ndarray, first_file, k_dim: int):
    """The faster of fp16 @ fp16 and fp16 -> fp32 @ fp32 on this CPU, timed on one chunk."""
    qt = torch.from_numpy(np.ascontiguousarray(q.T))  # (K, m) float32
    candidates = []
    try:
        qh = qt.half()
        _ = torch.ones((2, 4), dtype=torch.float16) @ torch.ones((4, 1), dtype=torch.float16)
        candidates.append(("fp16 @ fp16", lambda x: x @ qh))
    except RuntimeError:
        pass
    candidates.append(("fp16 -> fp32 @ fp32", lambda x: x.float() @ qt))
    path, _, valid = first_file
    block = np.fromfile(path, dtype=np.int16, count=valid * k_dim).reshape(valid, k_dim)
    x = torch.from_numpy(block).view(torch.float16)
    best = None
    for kind, product in candidates:
        product(x)
        t0 = time.perf_counter()
        product(x)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, kind, product)
    return best[1], best[2]


def torch_run(torch, product, blocks):
    """Apply a torch product to every block (the scores' max keeps the work alive)."""
    best = None
    for _, block in blocks:
        x = torch.from_numpy(block.view(np.int16)).view(torch.float16)
        top = product(x).max()
        best = top if best is None else torch.maximum(best, top)
    return best


class _torch_quiet:
    """Silence torch's warning about read-only memmapped arrays."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", message=".*not writable.*")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


if __name__ == "__main__":
    raise SystemExit(main())
