#!/usr/bin/env python
"""Screenshot of the query service's web page after one query, in headless Chromium.

Start the service first (``rapidin-index serve --index IX``), then::

    python tools/screenshot_page.py --url http://127.0.0.1:8000/ \
        --prompt "What is the melting point of aluminum in Celsius?" \
        --generation "Aluminum melts at about 660.3 degrees Celsius." --out docs/serve/page.png

Needs selenium, Chromium and chromedriver (Debian: ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import argparse
import shutil

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--generation", default="")
    parser.add_argument("--target-text", default="")
    parser.add_argument("--out", required=True, help="PNG file to write.")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={args.width},{args.height}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(args.timeout)
    try:
        driver.get(args.url)
        for name, value in (
            ("prompt", args.prompt),
            ("generation", args.generation),
            ("target_text", args.target_text),
        ):
            if value:
                driver.find_element(By.NAME, name).send_keys(value)
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, args.timeout).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "ol.results"))
        )
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
