"""Open a page in headless Chromium (Debian's `chromium`) over the DevTools protocol, with aiohttp.

`inspect_page(url)` returns the page's figures (id, load state, natural and on-screen size),
a full-page PNG screenshot, console errors and exceptions, and every URL the page requested.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FIGURES_JS = """[...document.querySelectorAll('figure')].map(f => { const i = f.querySelector('img');
  const r = i ? i.getBoundingClientRect() : f.getBoundingClientRect();
  return {id: f.id, img: !!i, complete: i ? i.complete : false, natural: i ? [i.naturalWidth, i.naturalHeight] : [0, 0],
          rect: [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]}; })"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Session:
    def __init__(self, ws, session_id=None):
        self.ws, self.session_id, self.ids, self.events = ws, session_id, itertools.count(1), []
        self.pending: dict[int, asyncio.Future] = {}

    async def pump(self):
        async for msg in self.ws:
            data = msg.json()
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, session: str | None = None, **params):
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params,
                                 **({"sessionId": session} if session else {})})
        reply = await asyncio.wait_for(fut, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]


async def _inspect(ws_url: str, url: str, width: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        s = _Session(ws)
        pump = asyncio.create_task(s.pump())
        target = (await s.send("Target.createTarget", url="about:blank"))["targetId"]
        sid = (await s.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await s.send(f"{domain}.enable", sid)
        await s.send("Emulation.setDeviceMetricsOverride", sid, width=width, height=900, deviceScaleFactor=1,
                     mobile=False)
        await s.send("Page.navigate", sid, url=url)
        for _ in range(600):
            if any(e.get("method") == "Page.loadEventFired" for e in s.events):
                break
            await asyncio.sleep(0.05)
        else:
            raise TimeoutError(f"{url}: no load event in 30 s")
        figures = (await s.send("Runtime.evaluate", sid, expression=FIGURES_JS, returnByValue=True))["result"]["value"]
        size = (await s.send("Page.getLayoutMetrics", sid))["cssContentSize"]
        shot = await s.send("Page.captureScreenshot", sid, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        await asyncio.sleep(0.2)  # late console messages
        pump.cancel()
    errors = []
    for e in s.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(p["entry"]["text"])
        elif m == "Network.loadingFailed":
            errors.append(f"failed to load: {p.get('errorText')}")
    requests = [e["params"]["request"]["url"] for e in s.events if e.get("method") == "Network.requestWillBeSent"]
    return {"figures": figures, "png": base64.b64decode(shot["data"]), "errors": errors, "requests": requests}


def inspect_page(path: Path, width: int = 1400, timeout: float = 30.0) -> dict:
    """Load `path` in headless Chromium: {figures, png, errors, requests}."""
    exe = chromium()
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    log = profile / "stderr.log"
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--disable-default-apps", "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
            "--remote-allow-origins=*", "about:blank"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        ws_url = None
        while ws_url is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{log.read_text(errors='replace')[-2000:]}")
            line = next((x for x in log.read_text(errors="replace").splitlines() if "DevTools listening on" in x), None)
            ws_url = line.split("listening on ", 1)[1].strip() if line else None
            time.sleep(0.05)
        return asyncio.run(asyncio.wait_for(_inspect(ws_url, path.resolve().as_uri(), width), timeout * 2))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
