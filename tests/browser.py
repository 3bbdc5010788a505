"""Headless Chromium, driven by Selenium, for the tests and the README's screenshot."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# As root in a container, Chromium needs --no-sandbox; without the background-networking
# flags it keeps trying to reach Google's hosts, which this machine's network refuses.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1200,800",
)


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """Start a fresh headless Chromium with an empty profile; quit it afterwards."""
    profile = tempfile.mkdtemp(prefix="ssecast-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
