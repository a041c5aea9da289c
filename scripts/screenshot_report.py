"""Full-page screenshot of a run's report.html, to check how the page reads (a dev tool, not a dependency).

    python scripts/screenshot_report.py runs/demo/report.html /tmp/report.png --width 1280

Needs Python Playwright driving the system's Chromium (Playwright's own browser download is not
used, so the machine needs no access to its CDN):

    apt-get install -y chromium          # Debian: /usr/bin/chromium
    pip install playwright               # the Python package only; no `playwright install`

The browser runs offline (no background networking, no component updates): a report that asked
for anything over the network would show it missing in the screenshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def screenshot(report: Path, output: Path, *, width: int = 1280, executable: str = CHROMIUM) -> Path:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report.resolve().as_uri(), wait_until="load")
            output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(output), full_page=True)
        finally:
            browser.close()
    remote = [url for url in requests if not url.startswith(("file:", "data:"))]
    if remote:
        print(f"warning: the page requested {len(remote)} remote resource(s), e.g. {remote[0]}", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    parser.add_argument("--chromium", default=CHROMIUM, help="Chromium executable")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"error: {args.report} does not exist; build it with `tailoredgen-train report RUN_DIR`", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium}; install it with `apt-get install -y chromium` "
              "or pass --chromium PATH", file=sys.stderr)
        return 2
    print(screenshot(args.report, args.output, width=args.width, executable=args.chromium))
    return 0


if __name__ == "__main__":
    sys.exit(main())
