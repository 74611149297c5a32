"""The HTML report in a real headless browser: every image loads, no section is empty, no script error.

Skips cleanly where no Chromium (or Chrome) is installed, or without the ``websockets`` package
that speaks the DevTools protocol (``pip install gradkit[test]`` installs it).
"""
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from test_cli import gk

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
                if shutil.which(b)), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(BROWSER is None, reason="no Chromium/Chrome on PATH")]
websockets_sync = pytest.importorskip("websockets.sync.client", reason="the DevTools protocol needs websockets")

CHECK = """(async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });  // the report lazy-loads its plots: load them all now
  const ok = await Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth > 0, () => false)));
  const broken = imgs.filter((i, k) => !ok[k]).map(i => i.src);
  const empty = [...document.querySelectorAll('section')].filter(s => {
    const body = [...s.children].filter(c => !/^H[1-6]$/.test(c.tagName));
    return !body.some(c => c.textContent.trim() || c.querySelector('img') || c.tagName === 'IMG');
  }).map(s => s.id || s.textContent.slice(0, 40));
  return JSON.stringify({broken, empty, images: imgs.length,
                         sections: document.querySelectorAll('section').length,
                         title: document.title, h1: (document.querySelector('h1') || {}).textContent});
})()"""


class DevTools:
    """A headless browser and one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([BROWSER, "--headless=new", "--disable-gpu", "--no-sandbox",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the browser did not start its DevTools endpoint")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(p for p in pages if p.get("type") == "page")
        self.ws = websockets_sync.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30).__enter__()
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60.0):
        end = time.time() + timeout
        while time.time() < end:
            if any(e.get("method") == event for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, end - time.time()))))
        raise TimeoutError(event)

    def close(self):
        try:
            self.ws.__exit__(None, None, None)
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def test_html_report_renders_in_a_browser(tmp_path):
    db = tmp_path / "r.db"
    assert gk("run", "fake-pass", "--seeds", "2", db=db).returncode == 0
    assert gk("run", "fake-fail", "--seeds", "2", db=db).returncode == 1
    out = tmp_path / "rep"
    r = gk("report", "--out", str(out), db=db)
    assert r.returncode == 0, r.stderr
    html = out / "report.html"
    browser = DevTools(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Runtime.enable")
        browser.call("Log.enable")
        browser.call("Page.navigate", url=html.as_uri())
        browser.wait_for("Page.loadEventFired")
        result = browser.call("Runtime.evaluate", expression=CHECK, returnByValue=True, awaitPromise=True)
        state = json.loads(result["result"]["value"])
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
    finally:
        browser.close()
    assert state["title"] == "gradkit reproduction report" and "gradkit" in state["h1"]
    assert state["images"] >= 2 and not state["broken"], state   # the plot and the image grid
    assert state["sections"] >= 3 and not state["empty"], state
    assert not errors, errors


def test_a_broken_image_is_caught(tmp_path):
    """The check itself can fail: a report page with a missing image and an empty section."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><head><title>t</title></head><body><h1>x</h1>"
                    "<section id='a'><h2>A</h2><img src='missing.png'></section>"
                    "<section id='b'><h2>B</h2></section></body></html>")
    browser = DevTools(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=page.as_uri())
        browser.wait_for("Page.loadEventFired")
        state = json.loads(browser.call("Runtime.evaluate", expression=CHECK, returnByValue=True, awaitPromise=True)["result"]["value"])
    finally:
        browser.close()
    assert len(state["broken"]) == 1 and state["empty"] == ["b"]
