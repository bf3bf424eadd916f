"""The service's web page in a real browser: headless Chromium driven through chromedriver.

The service runs on a tiny random model in a thread, on a free loopback port. Skipped, with
the reason, where selenium, Chromium or chromedriver is missing (``tools/setup.sh`` installs
Debian's ``chromium-driver`` when apt is usable).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from rapidin_index.build import BuildSettings, build_index  # noqa: E402
from rapidin_index.query import Attributor  # noqa: E402
from rapidin_index.serve import QueryService, ServeSettings, create_app  # noqa: E402
from rapidin_index.sketch import SketchSettings  # noqa: E402
from tests.tiny import make_records, write_jsonl  # noqa: E402

UNSAFE = "<script>window.pwned = 1</script> Tom &amp; Jerry &lt;b&gt; <img src=x onerror=alert(1)>"
ROWS = 12


def _chrome():
    """A headless Chromium session, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    browser = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if browser is None:
        pytest.skip("no Chromium or Chrome on PATH (Debian: apt-get install chromium)")
    driver = shutil.which("chromedriver")
    if driver is None:
        pytest.skip("no chromedriver on PATH (Debian: apt-get install chromium-driver)")
    options = Options()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
    ):
        options.add_argument(arg)
    try:
        # An explicit driver path: selenium then never tries to download one.
        return webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as err:
        pytest.skip(f"headless Chromium did not start: {str(err).splitlines()[0]}")


@pytest.fixture(scope="module")
def browser():
    driver = _chrome()
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def service_url(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("serve-browser")
    records = make_records(ROWS, seed=9)
    records[2]["output"] = UNSAFE
    data = write_jsonl(root / "train.jsonl", records)
    build_index(
        BuildSettings(
            data=str(data), index=str(root / "ix"), model=tiny_model, sketch=SketchSettings(k=256)
        ),
        progress=False,
    )
    service = QueryService(Attributor(str(root / "ix")), ServeSettings(max_heatmaps=ROWS))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free loopback port, held until uvicorn takes it over
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


def _wait_for(driver, css: str, timeout: float = 120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )
    return driver.find_elements(By.CSS_SELECTOR, css)


def _fill(driver, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(value)


def test_form_query_shows_results_and_heat_maps_with_training_text_escaped(
    browser, service_url, tmp_path
):
    from selenium.webdriver.common.by import By

    browser.get(service_url + "/")
    assert browser.find_elements(By.CSS_SELECTOR, "form.query textarea[name=prompt]")
    _fill(browser, "prompt", "the cat")
    _fill(browser, "generation", "the cat sat on the mat")
    _fill(browser, "target_text", "mat")
    _fill(browser, "topk", str(ROWS))
    _fill(browser, "heatmaps", str(ROWS))
    browser.find_element(By.ID, "submit").click()

    items = _wait_for(browser, "ol.results li")
    browser.save_screenshot(str(tmp_path / "results.png"))
    assert len(items) == ROWS
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    # Every result has its heat map, with shaded tokens.
    examples = browser.find_elements(By.CSS_SELECTOR, "#heatmaps .example")
    assert len(examples) == ROWS
    assert browser.find_elements(By.CSS_SELECTOR, "#heatmaps .example span.tok")
    # The target text is marked in the generation.
    marks = browser.find_elements(By.CSS_SELECTOR, "#shown-generation mark.target")
    assert [m.text for m in marks] == ["mat"]
    # Training text with markup and entities is shown as typed and never run.
    unsafe_item = browser.find_element(By.CSS_SELECTOR, 'ol.results li[data-id="2"]')
    assert UNSAFE in unsafe_item.text
    assert any(UNSAFE in e.text for e in examples)
    assert browser.execute_script("return document.querySelectorAll('script, img').length") == 0
    assert browser.execute_script("return window.pwned === undefined")


def test_heat_map_button_opens_one_examples_token_view(browser, service_url):
    from selenium.webdriver.common.by import By

    browser.get(service_url + "/")
    _fill(browser, "prompt", "the cat")
    _fill(browser, "generation", "the cat sat on the mat")
    _fill(browser, "heatmaps", "0")
    browser.find_element(By.ID, "submit").click()
    first = _wait_for(browser, "ol.results li")[0]
    example_id = first.get_attribute("data-id")
    assert not browser.find_elements(By.CSS_SELECTOR, "#heatmaps")
    first.find_element(By.CSS_SELECTOR, "button.heatmap").click()
    examples = _wait_for(browser, "#heatmaps .example")
    assert len(examples) == 1
    assert f"training example {example_id}" in examples[0].text
    assert examples[0].find_elements(By.CSS_SELECTOR, "span.tok")
    assert "Token-wise influence of one training example" in browser.title


def test_empty_generation_lets_the_model_write_it(browser, service_url):
    from selenium.webdriver.common.by import By

    browser.get(service_url + "/")
    _fill(browser, "prompt", "why water")
    _fill(browser, "topk", "3")
    browser.find_element(By.ID, "submit").click()
    assert len(_wait_for(browser, "ol.results li")) == 3
    assert "written by the model" in browser.find_element(By.TAG_NAME, "body").text
