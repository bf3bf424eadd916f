"""The on-disk index: a Zarr v3 array of RapidGrads plus a JSON manifest.

Layout of an index directory::

    manifest.json            settings, model and data identity, committed row count
    rapidgrads/zarr.json     Zarr v3 metadata: shape (rows, K), float16, chunks (R, K)
    rapidgrads/c/<i>/0       chunk i: R x K float16, raw little-endian, row-major
    norms/zarr.json          Zarr v3 metadata: shape (rows,), float32, chunks (R,)
    norms/c/<i>              chunk i: R float32, the exact L2 norm of each row's gradient
    progress/chunk-<i>.json  rows written to chunk i and their CRC32s (see Store.commit)
    .lock, .lock-rank<r>     held by a running build

The array is uncompressed so a scan can memory-map chunk files directly; any Zarr v3 reader
(``zarr.open_array(index / "rapidgrads")``) reads it too. The last chunk file is always
written at full size, padded with zeros, as Zarr expects.

``norms/`` (indexes built since score options exist; ``manifest["store"]["norms"]``) holds,
for each row, the exact L2 norm of the example's flattened gradient after the index's
normalisation and before the RapidGrad transform, so that a query can divide the sketched
inner product by exact norms (``query --score cosine``) rather than by the sketch's. Its
chunks follow the row chunks one to one and are written before the row chunk's marker, with
their own CRC32 in the marker, so they share the rows' crash safety. Older indexes have no
``norms/``; everything else works on them.

Crash safety: a chunk file is written to a temporary name, fsynced and renamed, then its
progress marker, then the manifest is replaced the same way. The manifest's ``rows`` is
the only source of truth for how many rows exist, so a reader that reads the manifest first
sees a consistent prefix, and a build killed at any instant restarts from the markers. A
rename leaves a reader's open memory map on the old file, whose committed prefix is
unchanged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rapidin_index.errors import SettingsMismatchError, StoreError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ARRAY = "rapidgrads"
NORMS = "norms"
PROGRESS = "progress"
FORMAT_VERSION = 1
# Chunk target size: big enough for sequential reads, small enough to rewrite the partial
# last chunk at every flush of a running build without noticeable cost.
CHUNK_BYTES = 16 << 20


def default_rows_per_chunk(k: int) -> int:
    return max(1, CHUNK_BYTES // (2 * k))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _flatten(prefix: str, value: object, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value


def compare_settings(recorded: dict, requested: dict, hint: str = "") -> None:
    """Raise :class:`SettingsMismatchError` listing every key where the two differ.

    Only keys present in ``requested`` are compared.
    """
    flat_old: dict = {}
    flat_new: dict = {}
    _flatten("", recorded, flat_old)
    _flatten("", requested, flat_new)
    diffs = {
        key: (flat_old.get(key), value)
        for key, value in flat_new.items()
        if _normalise(flat_old.get(key)) != _normalise(value)
    }
    if diffs:
        raise SettingsMismatchError(diffs, hint)


def _normalise(value: object) -> object:
    # JSON turns tuples into lists; compare them as equal.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


class Store:
    """An append-only RapidGrad store. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        info = manifest["store"]
        self.k: int = info["k"]
        self.rows_per_chunk: int = info["rows_per_chunk"]
        self._tail: list[np.ndarray] | None = None
        self._tail_norms: list[float] | None = None
        # Rows appended but not yet committed to disk.
        self.pending = 0
        self._lock_handle = None

    # ----------------------------------------------------------------------------- opening

    @classmethod
    def create(
        cls,
        path: str | Path,
        manifest: dict,
        k: int,
        rows_per_chunk: int | None = None,
        with_norms: bool = False,
    ) -> Store:
        """Create an empty store; ``manifest`` holds the settings sections.

        With ``with_norms`` the store also keeps one float32 gradient norm per row
        (``norms/``), which every write must then supply.
        """
        import zarr

        path = Path(path)
        if (path / MANIFEST).exists():
            raise StoreError(f"{path} already holds an index; open it instead")
        rows_per_chunk = rows_per_chunk or default_rows_per_chunk(k)
        path.mkdir(parents=True, exist_ok=True)
        zarr.create_array(
            store=str(path / ARRAY),
            shape=(0, k),
            chunks=(rows_per_chunk, k),
            dtype="float16",
            compressors=None,
            filters=None,
            fill_value=0,
            zarr_format=3,
        )
        full = dict(manifest)
        full["format_version"] = FORMAT_VERSION
        full["store"] = {
            "format": "zarr-v3",
            "array": ARRAY,
            "dtype": "float16",
            "k": k,
            "rows_per_chunk": rows_per_chunk,
            "rows": 0,
            "chunk_crc32": [],
        }
        if with_norms:
            zarr.create_array(
                store=str(path / NORMS),
                shape=(0,),
                chunks=(rows_per_chunk,),
                dtype="float32",
                compressors=None,
                filters=None,
                fill_value=0,
                zarr_format=3,
            )
            full["store"]["norms"] = {
                "array": NORMS,
                "dtype": "float32",
                "of": "exact L2 norm of each example's flattened gradient after the "
                "index's normalisation, before the RapidGrad transform",
                "chunk_crc32": [],
            }
        _write_atomic(path / MANIFEST, json.dumps(full, indent=2).encode())
        logger.info("created index %s (K=%d, %d rows per chunk)", path, k, rows_per_chunk)
        return cls(path, full)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"no index at {path} (missing {MANIFEST}); check --index")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest_path} is corrupted ({err.msg})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: index format {manifest.get('format_version')} is not supported "
                f"by this version (expects {FORMAT_VERSION}); rebuild the index"
            )
        store = cls(path, manifest)
        store.check_files()
        return store

    def reload(self) -> None:
        """Re-read the manifest, to see rows committed by a concurrent build."""
        self.manifest = json.loads((self.path / MANIFEST).read_text())

    # ----------------------------------------------------------------------------- reading

    @property
    def rows(self) -> int:
        return int(self.manifest["store"]["rows"])

    @property
    def nbytes(self) -> int:
        return self.rows * self.k * 2

    @property
    def has_norms(self) -> bool:
        """Whether the store keeps each row's exact gradient norm (``norms/``)."""
        return "norms" in self.manifest["store"]

    def chunk_path(self, index: int) -> Path:
        return self.path / ARRAY / "c" / str(index) / "0"

    def norms_chunk_path(self, index: int) -> Path:
        return self.path / NORMS / "c" / str(index)

    def chunk_files(self, rows: int | None = None) -> list[tuple[str, int, int]]:
        """``(path, row_start, valid_rows)`` of every chunk holding committed rows."""
        rows = self.rows if rows is None else rows
        out = []
        for start in range(0, rows, self.rows_per_chunk):
            valid = min(self.rows_per_chunk, rows - start)
            out.append((str(self.chunk_path(start // self.rows_per_chunk)), start, valid))
        return out

    def check_files(self) -> None:
        """Cheap integrity check: every committed chunk exists at full size."""
        expected = self.rows_per_chunk * self.k * 2
        paths = [(path, expected) for path, _, _ in self.chunk_files()]
        if self.has_norms:
            paths += [
                (str(self.norms_chunk_path(i)), self.rows_per_chunk * 4) for i in range(len(paths))
            ]
        for path, want in paths:
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise StoreError(
                    f"chunk file {path} is missing; the index is damaged, "
                    "rebuild it (rapidin-index build)"
                ) from None
            if size != want:
                raise StoreError(
                    f"chunk file {path} is truncated ({size} bytes, expected "
                    f"{want}); the index is damaged, rebuild it"
                )

    def _read_chunk(self, index: int, valid: int) -> np.ndarray:
        data = np.fromfile(self.chunk_path(index), dtype="<f2")
        return data.reshape(self.rows_per_chunk, self.k)[:valid]

    def _read_norms_chunk(self, index: int, valid: int) -> np.ndarray:
        return np.fromfile(self.norms_chunk_path(index), dtype="<f4")[:valid]

    def verify(self) -> None:
        """Full integrity check: the CRC32 of every committed chunk's rows (and norms)."""
        self.check_files()
        crcs = self.manifest["store"]["chunk_crc32"]
        norm_crcs = self.manifest["store"]["norms"]["chunk_crc32"] if self.has_norms else None
        for i, (path, _, valid) in enumerate(self.chunk_files()):
            crc = zlib.crc32(self._read_chunk(i, valid).tobytes())
            if crc != crcs[i]:
                raise StoreError(
                    f"chunk file {path} is corrupted (checksum mismatch); "
                    "the index is damaged, rebuild it"
                )
            if norm_crcs is not None:
                crc = zlib.crc32(self._read_norms_chunk(i, valid).tobytes())
                if i >= len(norm_crcs) or crc != norm_crcs[i]:
                    raise StoreError(
                        f"chunk file {self.norms_chunk_path(i)} is corrupted (checksum "
                        "mismatch); the index is damaged, rebuild it"
                    )

    def read_norms(self, rows: int | None = None) -> np.ndarray:
        """(rows,) float32 exact gradient norms of the first ``rows`` committed rows.

        Raises:
            StoreError: the index keeps no norms (built before they were stored).
        """
        if not self.has_norms:
            raise StoreError(
                f"the index {self.path} stores no gradient norms (it was built by an older "
                "version of rapidin-index); rebuild it into a new --index"
            )
        rows = self.rows if rows is None else rows
        parts = [
            self._read_norms_chunk(start // self.rows_per_chunk, valid)
            for _, start, valid in self.chunk_files(rows)
        ]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)

    def iter_blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row_start, block)``, block an (n, K) uint16 memory map of fp16 bits."""
        for path, start, valid in self.chunk_files(rows):
            block = np.memmap(path, dtype="<u2", mode="r", shape=(self.rows_per_chunk, self.k))
            yield start, block[:valid]

    def read_rows(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """(len(ids), K) float16 rows by id."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise StoreError(f"row ids out of range [0, {self.rows})")
        out = np.empty((ids.size, self.k), dtype=np.float16)
        for j, row in enumerate(ids):
            chunk, offset = divmod(int(row), self.rows_per_chunk)
            block = np.memmap(
                self.chunk_path(chunk), dtype="<f2", mode="r", shape=(self.rows_per_chunk, self.k)
            )
            out[j] = block[offset]
        return out

    def read_all(self) -> np.ndarray:
        """(rows, K) float16; for small stores and tests."""
        return np.concatenate(
            [b.view(np.float16) for _, b in self.iter_blocks()]
            or [np.empty((0, self.k), np.float16)]
        )

    # ----------------------------------------------------------------------------- writing

    def lock(self, name: str = ".lock") -> None:
        """Take a build lock, so two builds never write the same chunks at once.

        A single-process build locks the whole index; each rank of a distributed build
        takes its own lock file (``.lock-rank<r>``), since ranks write disjoint chunks.
        """
        # Kept open for the whole build: closing the file releases the lock.
        handle = open(self.path / name, "w")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(
                f"another build is writing to {self.path}; wait for it or choose another --index"
            ) from None
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # A chunk's progress marker records how many of its rows are written and their CRC32.
    # Markers are what writers produce; :meth:`commit` folds them into the manifest, whose
    # ``rows`` is the longest prefix of rows that every marker before it completes.

    def marker_path(self, index: int) -> Path:
        return self.path / PROGRESS / f"chunk-{index}.json"

    def _markers(self) -> dict[int, dict]:
        """``{chunk index: marker}``; a marker holds ``rows``, ``crc32`` and, in a store
        with norms, ``norms_crc32``."""
        out = {}
        folder = self.path / PROGRESS
        if folder.is_dir():
            for marker in folder.glob("chunk-*.json"):
                out[int(marker.stem.split("-")[1])] = json.loads(marker.read_text())
        return out

    def chunk_progress(self) -> dict[int, tuple[int, int]]:
        """``{chunk index: (rows written, crc32 of those rows)}`` from the markers."""
        return {
            index: (int(info["rows"]), int(info["crc32"]))
            for index, info in self._markers().items()
        }

    def write_chunk(self, index: int, rows: np.ndarray, norms: np.ndarray | None = None) -> None:
        """Write chunk ``index`` holding ``rows`` ((n, K), n <= rows_per_chunk), then its
        marker. The file is always full size (zero padded); every write is atomic.

        Args:
            index: Chunk number.
            rows: (n, K) RapidGrads, cast to float16.
            norms: (n,) exact gradient norms, cast to float32; required when the store
                keeps norms, ignored otherwise (an index begun without them stays so).
        """
        rows = np.asarray(rows, dtype="<f2")
        if rows.ndim != 2 or rows.shape[1] != self.k or len(rows) > self.rows_per_chunk:
            raise ValueError(f"chunk rows must be (<= {self.rows_per_chunk}, {self.k})")
        record: dict = {"rows": len(rows)}
        if self.has_norms:
            if norms is None:
                raise ValueError("this store keeps gradient norms: pass norms with the rows")
            norms = np.asarray(norms, dtype="<f4").reshape(-1)
            if len(norms) != len(rows):
                raise ValueError(f"{len(norms)} norms for {len(rows)} rows")
            padded = np.zeros(self.rows_per_chunk, dtype="<f4")
            padded[: len(norms)] = norms
            norms_path = self.norms_chunk_path(index)
            norms_path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(norms_path, padded.tobytes())
            record["norms_crc32"] = zlib.crc32(padded[: len(norms)].tobytes())
        full = np.zeros((self.rows_per_chunk, self.k), dtype="<f2")
        full[: len(rows)] = rows
        path = self.chunk_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, full.tobytes())
        marker = self.marker_path(index)
        marker.parent.mkdir(parents=True, exist_ok=True)
        record["crc32"] = zlib.crc32(full[: len(rows)].tobytes())
        _write_atomic(marker, json.dumps(record).encode())

    def read_chunk_rows(self, index: int) -> np.ndarray:
        """The rows already written to chunk ``index`` per its marker, CRC-checked."""
        valid, crc = self.chunk_progress().get(index, (0, 0))
        if not valid:
            return np.empty((0, self.k), dtype=np.float16)
        data = self._read_chunk(index, valid)
        if zlib.crc32(data.tobytes()) != crc:
            raise StoreError(
                f"chunk file {self.chunk_path(index)} is corrupted (checksum mismatch); "
                "the index is damaged, rebuild it"
            )
        return data

    def read_chunk_norms(self, index: int) -> np.ndarray:
        """(n,) float32 norms already written to chunk ``index`` per its marker, CRC-checked;
        empty in a store without norms."""
        info = self._markers().get(index)
        if not self.has_norms or info is None or not info["rows"]:
            return np.empty(0, dtype=np.float32)
        data = self._read_norms_chunk(index, int(info["rows"]))
        if "norms_crc32" not in info or zlib.crc32(data.tobytes()) != info["norms_crc32"]:
            raise StoreError(
                f"chunk file {self.norms_chunk_path(index)} is corrupted (checksum mismatch); "
                "the index is damaged, rebuild it"
            )
        return data

    def commit(self) -> int:
        """Fold the chunk markers into the manifest; returns the committed row count.

        Only one process may commit at a time (rank 0 of a distributed build).
        """
        markers = self._markers()
        rows, crcs, norm_crcs, index = 0, [], [], 0
        while index in markers:
            valid, crc = int(markers[index]["rows"]), int(markers[index]["crc32"])
            rows += valid
            crcs.append(crc)
            norm_crcs.append(markers[index].get("norms_crc32"))
            if valid < self.rows_per_chunk:
                break
            index += 1
        info = self.manifest["store"]
        norms = info.get("norms")
        if (
            rows != info["rows"]
            or crcs != info["chunk_crc32"]
            or (norms is not None and norm_crcs != norms["chunk_crc32"])
        ):
            self._write_zarr_shape(rows)
            info["rows"] = rows
            info["chunk_crc32"] = crcs
            if norms is not None:
                norms["chunk_crc32"] = norm_crcs
            _write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=2).encode())
        return rows

    # Sequential appends, for a single writer that produces rows in id order.

    def append(self, rows: np.ndarray, norms: np.ndarray | None = None) -> None:
        """Append (n, K) rows (cast to float16), with their (n,) gradient norms in a store
        that keeps norms; written when a chunk fills or on flush."""
        rows = np.asarray(rows, dtype=np.float16)
        if rows.ndim != 2 or rows.shape[1] != self.k:
            raise ValueError(f"expected rows of shape (n, {self.k}), got {rows.shape}")
        if self.has_norms:
            if norms is None or len(np.asarray(norms).reshape(-1)) != len(rows):
                raise ValueError("this store keeps gradient norms: pass one norm per row")
            norms = np.asarray(norms, dtype=np.float32).reshape(-1)
        if self._tail is None:
            index = self.rows // self.rows_per_chunk
            self._tail = list(self.read_chunk_rows(index))
            self._tail_norms = list(self.read_chunk_norms(index))
        for i, row in enumerate(rows):
            self._tail.append(row)
            if norms is not None:
                self._tail_norms.append(float(norms[i]))
            self.pending += 1
            if len(self._tail) == self.rows_per_chunk:
                self.flush()

    def flush(self) -> None:
        """Write the current chunk and commit every appended row to the manifest."""
        if not self.pending:
            return
        index = (self.rows + self.pending - 1) // self.rows_per_chunk
        norms = np.array(self._tail_norms, dtype=np.float32) if self.has_norms else None
        self.write_chunk(index, np.stack(self._tail), norms)
        self.commit()
        self.pending = 0
        if len(self._tail) == self.rows_per_chunk:
            self._tail, self._tail_norms = [], []

    def _write_zarr_shape(self, rows: int) -> None:
        meta_path = self.path / ARRAY / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"] = [rows, self.k]
        _write_atomic(meta_path, json.dumps(meta, indent=2).encode())
        if self.has_norms:
            meta_path = self.path / NORMS / "zarr.json"
            meta = json.loads(meta_path.read_text())
            meta["shape"] = [rows]
            _write_atomic(meta_path, json.dumps(meta, indent=2).encode())

    def update_manifest(self, **sections: object) -> None:
        """Replace top-level manifest sections (e.g. build statistics) and write it."""
        self.manifest.update(sections)
        _write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=2).encode())
