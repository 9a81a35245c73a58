"""The HTML routing report in a real headless browser (Debian's ``chromium``): no console errors, every plot decoded.

A copy of the report gets a small checker script at the top of ``<head>`` (the report itself has no script): it
records ``error`` events (failed resources included) and ``console.error`` calls, and on ``load`` (which waits for
every image) writes each ``<img>``'s ``naturalWidth`` and the errors into a ``<pre id="__check">`` that
``chromium --dump-dom`` prints; a full ``img.decode()`` of each is added when it finishes before the dump. Chromium's own
log (``--enable-logging=stderr``) is also searched for console messages. A control page with a broken image and a
console error proves the harness catches both.

Skipped, with the reason, when no chromium binary is installed (``make test`` installs it where it can).
"""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .analysis_helpers import tiny_run

CHECKER = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push("error: " + (e.message ||
  (e.target && (e.target.currentSrc || e.target.src || "")).slice(0, 60) || "resource")), true);
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push("console.error: " + a.join(" ")); __consoleError.apply(console, a); };
function __write(id, value) {
  const pre = document.createElement("pre");
  pre.id = id;
  pre.textContent = JSON.stringify(value);
  document.body.appendChild(pre);
}
window.addEventListener("load", () => {  // "load" waits for every image, so naturalWidth is known here
  const imgs = [...document.images];
  __write("__check", {images: imgs.length, widths: imgs.map(i => i.naturalWidth),
                      undecoded: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
                      errors: window.__errors});
  Promise.all(imgs.map(i => i.decode().then(() => null, () => i.alt)))  // full decode: reported if done in time
    .then(bad => __write("__decode", bad.filter(x => x)));
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom"]


def find_chromium() -> str | None:
    for cand in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (/usr/bin/chromium or on PATH): install Debian's `chromium` "
                             "package (`make test` does it when run as root with apt-get) to check the HTML report "
                             "in a headless browser")


def open_in_browser(html_text: str, folder: Path) -> tuple[dict, list[str]]:
    """Load the page with the checker; returns (checker results, chromium's console log lines)."""
    page = folder / "page.html"
    page.write_text(re.sub(r"<head>", "<head>" + CHECKER, html_text, count=1), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={folder / 'profile'}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="__check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium produced no check result (exit {proc.returncode}); stderr:\n{proc.stderr[-2000:]}"
    result = json.loads(html.unescape(m.group(1)))
    decoded = re.search(r'<pre id="__decode">(.*?)</pre>', proc.stdout, re.S)  # absent if the dump came first
    if decoded:
        result["undecoded"] = sorted(set(result["undecoded"]) | set(json.loads(html.unescape(decoded.group(1)))))
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return result, console


def test_harness_catches_broken_images_and_console_errors(tmp_path):
    good = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    page = (f"<!DOCTYPE html><html><head><title>control</title></head><body><img alt='ok' "
            f"src='data:image/png;base64,{good}'><img alt='broken' src='data:image/png;base64,AAAA'>"
            "<script>console.error('boom')</script></body></html>")
    result, console = open_in_browser(page, tmp_path)
    assert result["images"] == 2 and result["widths"] == [1, 0] and result["undecoded"] == ["broken"]
    assert "console.error: boom" in result["errors"] and any("boom" in ln for ln in console)


def test_report_opens_offline_without_errors(tmp_path_factory, tmp_path):
    report = tiny_run(tmp_path_factory)["report"]
    html_text = report["html"].read_text(encoding="utf-8")
    result, console = open_in_browser(html_text, tmp_path)
    assert result["errors"] == [] and console == []
    assert result["images"] == len(report["pngs"]) >= 7
    assert result["undecoded"] == [] and all(w > 0 for w in result["widths"])
