"""Make the README's screenshot of the ticker demo: ``python scripts/screenshot.py``.

Starts the demo on a free port, opens it in headless Chromium (Debian's ``chromium`` and
``chromium-driver``), waits until prices and an alert show, and writes
``docs/img/ticker.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser and server helpers live with the tests

from browser import chromium  # noqa: E402
from servers import PYTHON, free_port, running  # noqa: E402

OUTPUT = ROOT / "docs" / "img" / "ticker.png"


def main() -> None:
    port = free_port()
    argv = [PYTHON, str(ROOT / "examples" / "ticker"), "--port", str(port), "--rate", "40"]
    with running(argv, port=port), chromium() as browser:
        browser.get(f"http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if browser.execute_script("return document.querySelectorAll('li.alert').length"):
                break
            time.sleep(0.2)
        time.sleep(2)  # let the chart fill in
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(OUTPUT))
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
