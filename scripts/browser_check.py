#!/usr/bin/env python3
"""Open every chapter page of the built book in headless Chromium and check it.

For each page ``book/chapters/*.html`` under the HTML folder (and the front page), served
from a local web server on 127.0.0.1, Chromium takes a screenshot (into the screenshots
folder) and dumps the DOM after scripts ran. A page passes when:

- it was served and loaded (HTTP 200, a DOM with the page's article in it, a screenshot);
- every ``<img>`` has a non-empty ``src``: an inline ``data:`` image with a payload, or a
  file under the HTML folder that exists and is not empty;
- no notebook cell output shows an error: no stderr or traceback output area (myst-nb's
  ``output stderr`` / ``output traceback`` classes) and no "Traceback"/"...Error:" text
  in a cell output.

Exit status 0 when every page passes, 1 with the list of problems otherwise, 2 on usage
errors. Without Chromium it prints "skipped" and a reason, and exits 0.

    python scripts/browser_check.py --html _build/html --screenshots _build/screenshots
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1800",
                  "--virtual-time-budget=5000")
ERROR_CLASSES = {"stderr", "traceback"}  # myst-nb: <div class="output stderr ...">, "output traceback"
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\s*\w*(Error|Exception):", re.MULTILINE)
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
             "track", "wbr", "param"}
PAGE_TIMEOUT_S = 120


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None (the check is then skipped)."""
    env = os.environ.get("BIASGYM_CHROMIUM")
    for candidate in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@dataclass
class PageFacts:
    """What the DOM of one page holds that the checks look at."""

    images: list[str] = field(default_factory=list)  # src of every <img> ('' when missing)
    error_areas: list[str] = field(default_factory=list)  # classes of stderr/traceback outputs
    output_texts: list[str] = field(default_factory=list)  # text of every cell output
    has_article: bool = False


class _DomScanner(HTMLParser):
    """Collect images, error output areas and cell-output text from a dumped DOM."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.facts = PageFacts()
        self._stack: list[tuple[str, bool]] = []  # (tag, opens a cell output)
        self._depth_in_output = 0
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "img":
            self.facts.images.append((attrs.get("src") or "").strip())
        if tag == "article" or "bd-article" in classes:
            self.facts.has_article = True
        if "output" in classes and classes & ERROR_CLASSES:
            self.facts.error_areas.append(" ".join(sorted(classes)))
        if tag in VOID_TAGS:
            return
        opens = "cell_output" in classes
        if opens:
            if self._depth_in_output == 0:
                self._text = []
            self._depth_in_output += 1
        self._stack.append((tag, opens))

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        while self._stack:  # pop to the matching tag (tolerates unclosed inner tags)
            open_tag, opens = self._stack.pop()
            if opens:
                self._depth_in_output -= 1
                if self._depth_in_output == 0:
                    self.facts.output_texts.append("".join(self._text))
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._depth_in_output:
            self._text.append(data)


def scan_dom(html: str) -> PageFacts:
    scanner = _DomScanner()
    scanner.feed(html)
    scanner.close()
    return scanner.facts


def image_problems(src: str, page_rel: str, html_root: Path) -> list[str]:
    """Problems with one <img src>: empty, unreadable data: URI, or a missing/empty file."""
    if not src:
        return ["<img> with an empty or missing src"]
    if src.startswith("data:"):
        head, _, payload = src.partition(",")
        if not payload.strip():
            return [f"inline image with no data ({head[:40]})"]
        if head.endswith(";base64"):
            try:
                if not base64.b64decode(payload, validate=False):
                    return [f"inline image decodes to nothing ({head[:40]})"]
            except (binascii.Error, ValueError):
                return [f"inline image is not valid base64 ({head[:40]})"]
        return []
    parsed = urllib.parse.urlparse(src)
    if parsed.scheme in ("http", "https") and parsed.hostname not in ("127.0.0.1", "localhost"):
        return [f"image from another site (not in the book): {src}"]
    page_url = "/" + page_rel
    target = urllib.parse.urljoin(page_url, urllib.parse.unquote(parsed.path))
    path = (html_root / target.lstrip("/")).resolve()
    if html_root.resolve() not in path.parents:
        return [f"image outside the book folder: {src}"]
    if not path.is_file():
        return [f"image file missing: {src} (looked for {path})"]
    if path.stat().st_size == 0:
        return [f"image file is empty: {src}"]
    return []


def page_problems(facts: PageFacts, page_rel: str, html_root: Path) -> list[str]:
    """Everything wrong with one page, as readable lines (empty when the page passes)."""
    problems = []
    if not facts.has_article:
        problems.append("page did not load: no article in the DOM")
    for src in facts.images:
        problems += image_problems(src, page_rel, html_root)
    for classes in facts.error_areas:
        problems.append(f"error output area in a cell output (class '{classes}')")
    for text in facts.output_texts:
        match = ERROR_TEXT.search(text)
        if match:
            problems.append(f"cell output shows an error: {match.group(0).strip()!r}")
    return problems


def pages_to_check(html_root: Path) -> list[str]:
    """The front page and every chapter page, relative to the HTML folder."""
    chapters = sorted(p.relative_to(html_root).as_posix() for p in (html_root / "book" / "chapters").glob("*.html"))
    return ["index.html"] + chapters


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A headless Chromium that closes a connection early (a broken pipe) is not an error
        of the page; anything else still prints."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def serve(html_root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve the HTML folder on 127.0.0.1 at a free port, in a background thread."""
    handler = functools.partial(_QuietHandler, directory=str(html_root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def render(chromium: str, url: str, screenshot: Path, profile_dir: Path) -> tuple[str, str]:
    """Screenshot ``url`` and return (dumped DOM, Chromium's stderr)."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={screenshot}",
           "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    return proc.stdout, proc.stderr


def check_page(chromium: str, base_url: str, page_rel: str, html_root: Path, shots: Path) -> list[str]:
    url = urllib.parse.urljoin(base_url, page_rel)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            if response.status != 200:
                return [f"HTTP {response.status} for {url}"]
    except OSError as exc:
        return [f"could not fetch {url}: {exc}"]
    screenshot = shots / (page_rel.replace("/", "__").removesuffix(".html") + ".png")
    with tempfile.TemporaryDirectory(prefix="biasgym-chromium-") as profile_dir:
        try:
            dom, stderr = render(chromium, url, screenshot, Path(profile_dir))
        except subprocess.TimeoutExpired:
            return [f"Chromium did not finish within {PAGE_TIMEOUT_S} s"]
    problems = []
    if not dom.strip():
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        problems.append(f"Chromium returned no DOM; its last messages:\n{tail}")
    else:
        problems += page_problems(scan_dom(dom), page_rel, html_root)
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        problems.append(f"no screenshot written to {screenshot}")
    return problems


def run_check(html_root: Path, shots: Path, chromium: str) -> dict[str, list[str]]:
    """Check every page; returns {page: problems}."""
    if not (html_root / "index.html").is_file():
        return {"index.html": [f"no built book at {html_root} (index.html missing); build it first"]}
    shots.mkdir(parents=True, exist_ok=True)
    server, base_url = serve(html_root)
    results = {}
    try:
        for page in pages_to_check(html_root):
            t0 = time.perf_counter()
            results[page] = check_page(chromium, base_url, page, html_root, shots)
            status = "ok" if not results[page] else f"{len(results[page])} problem(s)"
            print(f"  {page}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        server.shutdown()
        server.server_close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=Path("_build/html"), help="the built book (default _build/html)")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="where to put screenshots (default: <html>/../screenshots)")
    args = parser.parse_args(argv)
    html_root = args.html.resolve()
    shots = (args.screenshots or html_root.parent / "screenshots").resolve()
    chromium = find_chromium()
    if chromium is None:
        print("browser check skipped: chromium is not installed (on Debian: apt-get install chromium, "
              "or run scripts/install_browser.sh as root).")
        return 0
    print(f"browser check: {html_root} with {chromium}")
    results = run_check(html_root, shots, chromium)
    failed = {page: p for page, p in results.items() if p}
    if failed:
        print(f"\nbrowser check FAILED on {len(failed)} of {len(results)} page(s):")
        for page, problems in failed.items():
            for problem in problems:
                print(f"  {page}: {problem}")
        return 1
    print(f"browser check passed: {len(results)} page(s); screenshots in {shots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
