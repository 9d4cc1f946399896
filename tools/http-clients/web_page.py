"""Loads the gateway's web page in headless Chromium, submits a prompt, waits for the result and saves a
screenshot (run by crates/cli/tests/http_clients.rs). Drives Chromium over the Chrome DevTools protocol
(--remote-debugging-port) with the `websockets` package; nothing is fetched from the network.

Usage: web_page.py CHROMIUM PAGE_URL API_KEY PROMPT SEED OUT_DIR

Writes OUT_DIR/screenshot.png, OUT_DIR/result.png (the result image the page shows) and OUT_DIR/page.json
(the page's status line, parameters and number of previews). Exits non-zero when the page shows an error or
no result comes within the deadline.
"""

import base64
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from websockets.sync.client import connect

DEADLINE_S = 240
# Headless, no GPU, nothing from the network, a fresh profile (the flags).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
VIEWPORT = {"width": 1100, "height": 720, "deviceScaleFactor": 1, "mobile": False}

# Fills the form, submits it and resolves with what the page shows once the first result image is decoded;
# rejects with the page's error text.
SUBMIT_JS = r"""
(async (prompt, seed, key) => {
  const $ = (id) => document.getElementById(id);
  $("prompt").value = prompt;
  $("seed").value = String(seed);
  $("api-key").value = key;
  const outcome = new Promise((resolve, reject) => {
    const observer = new MutationObserver(() => {
      const err = $("error").textContent;
      const img = document.querySelector("#results img");
      if (!err && !img) return;
      observer.disconnect();
      if (err) { reject(new Error("the page shows an error: " + err)); return; }
      img.decode().then(() => resolve({
        src: img.src,
        status: $("status").textContent,
        params: $("params").textContent,
        previews: document.querySelectorAll("#previews img").length,
      }), reject);
    });
    observer.observe(document.body, { subtree: true, childList: true, characterData: true });
  });
  $("form").requestSubmit();
  return await outcome;
})
"""


class Cdp:
    """A Chrome DevTools protocol session on one page (flat sessions over the browser's websocket)."""

    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list = []
        self.session = None

    def call(self, method: str, params=None, timeout=60.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        end = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout=60.0):
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic()))))


def devtools_url(proc: subprocess.Popen) -> str:
    """The `DevTools listening on ws://...` line of Chromium's stderr; a thread keeps draining it after."""
    found = threading.Event()
    url = []

    def drain():
        for line in proc.stderr:
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m and not url:
                url.append(m.group(1))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(60) or not url:
        raise RuntimeError("Chromium printed no DevTools address (is it installed and runnable?)")
    return url[0]


def main() -> None:
    chromium, page_url, key, prompt, seed, out = sys.argv[1:7]
    out = pathlib.Path(out)
    # Chromium's helper processes can still be writing the profile when the browser itself has exited: they
    # run in the browser's own process group, killed as a whole below, and a file they add after that must
    # not fail the run (the profile directory is then left to the system's /tmp cleaning).
    with tempfile.TemporaryDirectory(prefix="qwen-image-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            cdp = Cdp(devtools_url(proc))
            target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            cdp.session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            cdp.call("Page.enable")
            cdp.call("Emulation.setDeviceMetricsOverride", VIEWPORT)
            cdp.call("Page.navigate", {"url": page_url})
            cdp.wait_event("Page.loadEventFired")
            shown = evaluate_submit(cdp, prompt, int(seed), key)
            shot = cdp.call("Page.captureScreenshot", {"format": "png"})
            (out / "screenshot.png").write_bytes(base64.b64decode(shot["data"]))
            src = shown.pop("src")
            prefix = "data:image/png;base64,"
            if not src.startswith(prefix):
                raise RuntimeError(f"the result image is not a PNG data URL: {src[:40]}")
            (out / "result.png").write_bytes(base64.b64decode(src[len(prefix):]))
            (out / "page.json").write_text(json.dumps(shown, indent=1))
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)


def evaluate_submit(cdp: Cdp, prompt: str, seed: int, key: str) -> dict:
    expr = f"({SUBMIT_JS})({json.dumps(prompt)}, {seed}, {json.dumps(key)})"
    r = cdp.call(
        "Runtime.evaluate",
        {"expression": expr, "awaitPromise": True, "returnByValue": True},
        timeout=DEADLINE_S,
    )
    if "exceptionDetails" in r:
        d = r["exceptionDetails"]
        raise RuntimeError(d.get("exception", {}).get("description") or d.get("text"))
    return r["result"]["value"]


if __name__ == "__main__":
    main()
