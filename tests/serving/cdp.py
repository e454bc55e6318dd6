"""A minimal Chrome DevTools Protocol client over websockets: headless Chromium for the page test."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Start Chromium, attach to one page target, send commands, stop."""

    def __init__(self):
        self.proc = None
        self.ws = None
        self.session = None
        self._id = 0
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")

    async def start(self, timeout: float = 60.0) -> None:
        import websockets

        # Its own process group: Chromium forks zygote, GPU and renderer processes, and close() ends
        # them all by the group, so none outlives the test (the wrapper script's, too).
        self.proc = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        loop = asyncio.get_running_loop()
        url = await asyncio.wait_for(loop.run_in_executor(None, self._devtools_url), timeout)
        self.ws = await websockets.connect(url, max_size=None)
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        self.session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]

    def _devtools_url(self) -> str:
        for line in self.proc.stderr:  # Chromium prints "DevTools listening on ws://..." on start
            m = re.search(r"(ws://\S+)", line)
            if m:
                # Keep reading what it logs after that: a full pipe would stall the browser.
                threading.Thread(target=self._drain, daemon=True).start()
                return m.group(1)
        raise RuntimeError("chromium exited before its DevTools endpoint came up")

    def _drain(self) -> None:
        for _ in self.proc.stderr:
            pass

    async def send(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        while True:  # skip events until our answer
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def page(self, method: str, params: dict | None = None) -> dict:
        return await self.send(method, params, session=True)

    async def eval(self, expression: str):
        r = await self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait(self, expression: str, timeout: float = 30.0):
        end = asyncio.get_running_loop().time() + timeout
        value = None
        while asyncio.get_running_loop().time() < end:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        return value

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.proc is not None:
            group = self.proc.pid  # start_new_session: the group id is the browser's pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
                os.killpg(group, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)
