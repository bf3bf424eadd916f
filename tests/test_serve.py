"""The query service (``rapidin-index serve``): endpoints, 4xx cases, capacity, batching."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("httpx", reason="httpx (FastAPI's TestClient) is not installed")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rapidin_index.build import BuildSettings, build_index  # noqa: E402
from rapidin_index.query import Attributor, QueryInput  # noqa: E402
from rapidin_index.serve import (  # noqa: E402
    QueryService,
    ScanBatcher,
    ServeSettings,
    create_app,
    is_loopback,
)
from rapidin_index.sketch import SketchSettings  # noqa: E402
from tests.tiny import make_records, write_jsonl  # noqa: E402

UNSAFE = "<script>window.pwned = 1</script> Tom &amp; Jerry &lt;b&gt; the cat"
PROMPT = "the cat"
GENERATION = "the cat sat on the mat"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("serve")
    records = make_records(12, seed=9)
    records[2]["output"] = UNSAFE
    data = write_jsonl(root / "train.jsonl", records)
    index = root / "ix"
    build_index(
        BuildSettings(
            data=str(data), index=str(index), model=tiny_model, sketch=SketchSettings(k=256)
        ),
        progress=False,
    )
    return str(index), records


@pytest.fixture(scope="module")
def attributor(built):
    return Attributor(built[0])


@pytest.fixture
def make_service(attributor):
    services = []

    def make(**settings) -> QueryService:
        service = QueryService(attributor, ServeSettings(**settings))
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


@pytest.fixture
def client(make_service):
    with TestClient(create_app(make_service(max_text_chars=200, max_topk=20))) as c:
        yield c


def _ranked(rows):
    return [(r["id"], r["score"]) for r in rows]


def _assert_same_ranking(got, want) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    scale = max(abs(r["score"]) for r in want)
    np.testing.assert_allclose(
        [r["score"] for r in got], [r["score"] for r in want], rtol=0, atol=1e-6 * scale
    )


def _visible_text(page: str) -> str:
    """The page's text as a browser shows it: entities decoded once, tags dropped."""
    from html.parser import HTMLParser

    chunks: list[str] = []
    parser = HTMLParser(convert_charrefs=True)
    parser.handle_data = chunks.append
    parser.feed(page)
    return "".join(chunks)


def _hold(monkeypatch, attributor, parties: int | None = None):
    """Make ``attributor.rapidgrads_and_norms`` wait: for ``release`` (an Event), or until
    ``parties`` calls have arrived (a Barrier). Returns (entered, release)."""
    original = attributor.rapidgrads_and_norms
    entered = threading.Event()
    release = threading.Event()
    barrier = threading.Barrier(parties) if parties else None

    def held(queries):
        entered.set()
        if barrier is not None:
            barrier.wait(timeout=30)
        else:
            release.wait(timeout=30)
        return original(queries)

    monkeypatch.setattr(attributor, "rapidgrads_and_norms", held)
    return entered, release


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def _async_client(service: QueryService) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(service))
    return httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60)


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


def test_health_and_info_describe_the_index_and_limits(client, built):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "in_flight": 0, "capacity": 34}
    info = client.get("/api/info").json()
    assert info["index"] == built[0]
    assert (info["rows"], info["records"], info["k"]) == (12, 12, 256)
    assert info["limits"]["max_text_chars"] == 200 and info["limits"]["max_topk"] == 20
    assert info["data"]["template"] == "alpaca"


def test_openapi_schema_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/api/info", "/api/attribute", "/api/generate", "/api/tokenwise"} <= set(
        schema["paths"]
    )
    attribute = schema["paths"]["/api/attribute"]["post"]
    assert {"200", "413", "422", "503"} <= set(attribute["responses"])
    assert "/" not in schema["paths"]  # the web page is not part of the API


def test_attribute_returns_what_the_attributor_returns(client, attributor):
    response = client.post(
        "/api/attribute",
        json={"prompt": PROMPT, "generation": GENERATION, "topk": 5, "bottom": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated"] is False and body["generation"] == GENERATION
    want = attributor.attribute([QueryInput(PROMPT, GENERATION)], topk=5, bottom=True)[0]
    assert _ranked(body["results"]) == _ranked(want.results)
    assert _ranked(body["bottom"]) == _ranked(want.bottom)
    assert set(body["results"][0]) == {"rank", "id", "score", "instruction", "input", "output"}


def test_attribute_with_target_text_retrieves_with_the_restricted_gradient(client, attributor):
    response = client.post(
        "/api/attribute",
        json={"prompt": PROMPT, "generation": GENERATION, "target_text": "mat", "topk": 12},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["target"] == {"text": "mat", "spans": [[19, 22]]}
    want = attributor.attribute([QueryInput(PROMPT, GENERATION, "mat")], topk=12)[0]
    assert _ranked(body["results"]) == _ranked(want.results)


def test_generate_writes_the_generation_then_ranks_it(client, attributor):
    response = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "topk": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    written = attributor.generate(PROMPT, 6)
    assert body["generated"] is True and body["generation"] == written
    want = attributor.attribute([QueryInput(PROMPT, written)], topk=3)[0]
    assert _ranked(body["results"]) == _ranked(want.results)


def test_tokenwise_gives_token_scores_whose_mean_is_the_exact_score(client, attributor):
    response = client.post(
        "/api/tokenwise",
        json={"prompt": PROMPT, "generation": GENERATION, "id": 2, "pairwise": True, "html": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == 2 and body["output"] == UNSAFE
    scored = [t["score"] for t in body["tokens"] if t["score"] is not None]
    assert np.mean(scored) == pytest.approx(body["exact_score"], rel=1e-5)
    sketch = attributor.score_all([QueryInput(PROMPT, GENERATION)])[0][2]
    assert body["score"] == pytest.approx(float(sketch), rel=1e-5, abs=1e-6)
    assert len(body["generation_scores"]) == len(body["generation_tokens"])
    matrix = np.asarray(body["pairwise"]["matrix"])
    assert matrix.shape == (
        len(body["pairwise"]["generation_tokens"]),
        len(body["pairwise"]["train_tokens"]),
    )
    # The heat-map page escapes the training text: no script element, entities shown as typed.
    assert "<script" not in body["html"]
    assert UNSAFE in _visible_text(body["html"])


# --------------------------------------------------------------------------------------------
# Bad requests: a 4xx with a message, never a 500
# --------------------------------------------------------------------------------------------

LONG = "x" * 201

BAD_REQUESTS = [
    ("/api/attribute", {"prompt": PROMPT}, 422, "generation"),
    ("/api/attribute", {"generation": GENERATION}, 422, "prompt"),
    ("/api/attribute", {"prompt": "", "generation": GENERATION}, 422, "prompt"),
    ("/api/attribute", {"prompt": PROMPT, "generation": GENERATION, "topk": 0}, 422, "topk"),
    ("/api/attribute", {"prompt": PROMPT, "generation": GENERATION, "topk": 21}, 422, "--max-topk"),
    ("/api/attribute", {"prompt": PROMPT, "generation": GENERATION, "topk": "many"}, 422, "topk"),
    ("/api/attribute", {"prompt": LONG, "generation": GENERATION}, 413, "--max-text-chars"),
    ("/api/attribute", {"prompt": PROMPT, "generation": LONG}, 413, "generation has 201"),
    (
        "/api/attribute",
        {"prompt": PROMPT, "generation": GENERATION, "target_text": "Canada"},
        422,
        "does not occur",
    ),
    ("/api/generate", {"prompt": PROMPT, "max_new_tokens": 10_000}, 422, "--max-new-tokens"),
    ("/api/generate", {"prompt": LONG}, 413, "--max-text-chars"),
    (
        "/api/tokenwise",
        {"prompt": PROMPT, "generation": GENERATION, "id": 12},
        404,
        "no training example 12",
    ),
    ("/api/tokenwise", {"prompt": PROMPT, "generation": GENERATION, "id": -1}, 422, "id"),
    ("/api/tokenwise", {"prompt": PROMPT, "generation": GENERATION}, 422, "id"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(client, path, body, status, message):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json()["detail"])


def test_malformed_and_oversized_bodies_are_refused(client):
    response = client.post(
        "/api/attribute", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    response = client.post(
        "/api/attribute", content=b"[]", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    limit = client.get("/api/info").json()["limits"]["max_body_bytes"]
    response = client.post(
        "/api/attribute", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "bytes" in response.json()["detail"]
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/api/attribute").status_code == 405


def test_web_form_errors_are_shown_on_the_page_with_a_4xx(client):
    response = client.post("/", data={"prompt": PROMPT, "generation": GENERATION, "topk": "zero"})
    assert response.status_code == 422
    assert 'class="error"' in response.text and "results must be a whole number" in response.text
    response = client.post("/", data={"prompt": LONG})
    assert response.status_code == 413 and "--max-text-chars" in response.text
    response = client.post(
        "/example", data={"prompt": PROMPT, "generation": GENERATION, "id": "99"}
    )
    assert response.status_code == 404 and "no training example 99" in response.text


# --------------------------------------------------------------------------------------------
# Concurrency: capacity, health during slow queries, batched scans
# --------------------------------------------------------------------------------------------


def test_requests_over_capacity_get_503_with_retry_after(make_service, attributor, monkeypatch):
    service = make_service(max_concurrent=1, max_queue=0)
    entered, release = _hold(monkeypatch, attributor)
    body = {"prompt": PROMPT, "generation": GENERATION, "topk": 3}

    async def scenario():
        async with _async_client(service) as http:
            first = asyncio.ensure_future(http.post("/api/attribute", json=body))
            await _until(entered.is_set)
            over = await http.post("/api/attribute", json=body)
            page = await http.post("/", data={"prompt": PROMPT, "generation": GENERATION})
            health = await http.get("/health")
            release.set()
            return await first, over, page, health

    first, over, page, health = asyncio.run(scenario())
    assert over.status_code == 503
    assert int(over.headers["Retry-After"]) >= 1
    assert "at capacity" in over.json()["detail"]
    assert page.status_code == 503 and "Retry-After" in page.headers
    assert health.status_code == 200 and health.json()["in_flight"] == 1
    assert first.status_code == 200
    assert service.stats()["rejected"] == 2 and service.admission.in_flight == 0


def test_health_answers_at_once_during_a_slow_query(make_service, attributor, monkeypatch):
    service = make_service(max_concurrent=1)
    entered, release = _hold(monkeypatch, attributor)

    async def scenario():
        async with _async_client(service) as http:
            slow = asyncio.ensure_future(
                http.post("/api/attribute", json={"prompt": PROMPT, "generation": GENERATION})
            )
            await _until(entered.is_set)
            began = time.perf_counter()
            health = await asyncio.wait_for(http.get("/health"), timeout=5)
            info = await asyncio.wait_for(http.get("/api/info"), timeout=5)
            seconds = time.perf_counter() - began
            still_running = not slow.done()
            release.set()
            return health, info, seconds, still_running, await slow

    health, info, seconds, still_running, slow = asyncio.run(scenario())
    assert health.status_code == 200 and health.json()["in_flight"] == 1
    assert info.status_code == 200
    assert still_running and seconds < 2.0
    assert slow.status_code == 200


def test_queries_arriving_together_share_one_scan_with_equal_results(
    make_service, attributor, monkeypatch
):
    # A long window and both gradients finishing together (a barrier) make the batch
    # deterministic; in service the window is a few milliseconds.
    service = make_service(max_concurrent=2, batch_window_ms=2000)
    _hold(monkeypatch, attributor, parties=2)
    calls = []
    original_scan = attributor._scan

    def spy(q, topk, bottom, engine, cosine=False):
        calls.append((q.shape[0], topk, bottom))
        return original_scan(q, topk, bottom, engine, cosine)

    monkeypatch.setattr(attributor, "_scan", spy)
    first = {"prompt": PROMPT, "generation": GENERATION, "topk": 4}
    second = {"prompt": "why water", "generation": "fire earth air", "topk": 6, "bottom": True}

    async def scenario():
        async with _async_client(service) as http:
            return await asyncio.gather(
                http.post("/api/attribute", json=first), http.post("/api/attribute", json=second)
            )

    one, two = asyncio.run(scenario())
    assert one.status_code == 200 and two.status_code == 200
    assert calls == [(2, 6, True)]
    monkeypatch.undo()
    want_one = attributor.attribute([QueryInput(PROMPT, GENERATION)], topk=4)[0]
    want_two = attributor.attribute(
        [QueryInput("why water", "fire earth air")], topk=6, bottom=True
    )[0]
    # Same ids; scores to the scan's float32 accumulation error (its kernels for m queries
    # sum in another order than for one; rapidin_index.scan's docstring bounds it by ~1e-6
    # of the largest score).
    _assert_same_ranking(one.json()["results"], want_one.results)
    assert one.json()["bottom"] is None
    _assert_same_ranking(two.json()["results"], want_two.results)
    _assert_same_ranking(two.json()["bottom"], want_two.bottom)
    assert service.stats()["scans"] == 1 and service.stats()["scanned_queries"] == 2


def test_out_of_memory_in_a_query_is_a_503_and_the_service_lives_on(
    make_service, attributor, monkeypatch
):
    def no_memory(queries):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(attributor, "rapidgrads_and_norms", no_memory)
    body = {"prompt": PROMPT, "generation": GENERATION}
    with TestClient(create_app(make_service())) as http:
        failed = http.post("/api/attribute", json=body)
        monkeypatch.undo()
        after = http.post("/api/attribute", json=body)
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "10"
    assert "out of memory" in failed.json()["detail"]
    assert after.status_code == 200


def test_scan_batcher_cuts_each_query_to_its_own_k_and_passes_errors_on():
    def scan(q, k, bottom):
        ids = np.arange(k)
        tops = [(ids, np.full(k, float(i), np.float32)) for i in range(len(q))]
        return tops, ([(ids[::-1], ids[::-1].astype(np.float32))] * len(q) if bottom else None)

    batcher = ScanBatcher(scan, window_s=1.0, max_batch=2)
    try:
        a = batcher.submit(np.zeros(4, np.float32), 2, False)
        b = batcher.submit(np.ones(4, np.float32), 5, True)
        (top_a, low_a), (top_b, low_b) = a.result(10), b.result(10)
        assert top_a[0].tolist() == [0, 1] and low_a is None
        assert top_b[0].tolist() == [0, 1, 2, 3, 4] and top_b[1][0] == 1.0
        assert low_b[0].tolist() == [4, 3, 2, 1, 0]
        assert (batcher.scans, batcher.queries) == (1, 2)
    finally:
        batcher.close()

    def broken(q, k, bottom):
        raise RuntimeError("disk gone")

    batcher = ScanBatcher(broken, window_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="disk gone"):
            batcher.submit(np.zeros(4, np.float32), 1, False).result(10)
    finally:
        batcher.close()


# --------------------------------------------------------------------------------------------
# The web page (without a browser; tests/test_serve_browser.py drives Chromium)
# --------------------------------------------------------------------------------------------


def test_web_page_lists_results_with_heat_maps_and_escapes_training_text(make_service):
    service = make_service(max_heatmaps=12)
    with TestClient(create_app(service)) as http:
        empty = http.get("/")
        assert empty.status_code == 200 and '<form class="query"' in empty.text
        assert "script-src" not in empty.headers["Content-Security-Policy"]
        assert "default-src 'none'" in empty.headers["Content-Security-Policy"]
        page = http.post(
            "/",
            data={
                "prompt": PROMPT,
                "generation": GENERATION,
                "target_text": "mat",
                "topk": "12",
                "heatmaps": "12",
            },
        )
    assert page.status_code == 200, page.text
    text = page.text
    assert text.count('<li data-id="') == 12
    assert text.count('class="example"') == 12  # a heat map per result
    assert '<mark class="target">mat</mark>' in text
    assert "<script" not in text
    # Shown as typed twice: in the results list and in its heat map.
    assert _visible_text(text).count(UNSAFE) == 2


# --------------------------------------------------------------------------------------------
# The command and the listening address
# --------------------------------------------------------------------------------------------


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")


def test_non_loopback_address_is_warned_about(make_service, monkeypatch, caplog):
    import uvicorn

    from rapidin_index.serve import run_server

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    with caplog.at_level("INFO", logger="rapidin_index.serve"):
        run_server(make_service(), "127.0.0.1", 8123)
        run_server(make_service(), "0.0.0.0", 8124)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert (
        "INFO",
        "listening on http://127.0.0.1:8123, a loopback address: reachable from this machine only",
    ) in messages
    assert any(
        level == "WARNING" and "0.0.0.0:8124, NOT a loopback address" in text
        for level, text in messages
    )
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8124


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_answers_on_loopback_and_stops_on_sigint(built, tmp_path):
    import signal

    port = _free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, RAPIDIN_INDEX_NO_PROGRESS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rapidin_index",
                "serve",
                "--index",
                built[0],
                "--port",
                str(port),
                "--max-concurrent",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/attribute",
            timeout=60,
            json={"prompt": PROMPT, "generation": GENERATION, "topk": 2},
        )
        assert response.status_code == 200 and len(response.json()["results"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"listening on http://127.0.0.1:{port}, a loopback address" in text
    assert proc.returncode == 0, text
