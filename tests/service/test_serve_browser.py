"""End to end: a real `dittune serve` on a free loopback port queues a tiny tune on the CPU
through POST /v1/tune, the test polls the job to completion, and headless Chromium renders the
study's page: its DOM must hold one SVG point per measured trial and the screenshot the plot."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "e2e-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base, path, body=None, method=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def _chromium(*args, tmp):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`; .ci/run installs it)")
def test_serve_tune_and_render_in_chromium(tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"sqlite:///{tmp_path / 'dittune.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("DITTUNE_DB", "DITTUNE_TOKEN")}
    server = subprocess.Popen([sys.executable, "-m", "dittune", "serve", "--port", str(port), "--db", url, "--token", TOKEN],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                assert _call(base, "/healthz")[1]["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.time() < deadline, server.stdout.read()
                time.sleep(0.3)
        # The cheapest tune that measures: compile off (the CPU space is then one configuration,
        # so "2 trials" ends after it), 2 denoise steps, 1 timed, no confirmation.
        status, job = _call(base, "/v1/tune", {"model": "flux-dev-tiny", "trials": 2, "device": "cpu", "steps": 2,
                                               "measure_steps": 1, "confirm": 0, "fix": ["enable-torch-compile=false"]})
        assert status == 202 and job["state"] == "running"
        deadline = time.time() + 420
        while job["state"] in ("queued", "running"):
            assert time.time() < deadline, job
            time.sleep(1.0)
            job = _call(base, f"/v1/jobs/{job['id']}")[1]
        assert job["state"] == "finished", job
        assert job["trials_done"] >= 1 and job["best"][0]["command"].startswith("dittune generate --model flux-dev-tiny")
        study = _call(base, f"/v1/studies/{job['study']}")[1]
        measured = [t["id"] for t in study["trial_rows"] if t["status"] in ("complete", "confirmed")]
        assert measured

        page = f"{base}/studies/{job['study']}"
        dom = _chromium("--dump-dom", page, tmp=tmp_path)
        assert dom.returncode == 0, dom.stderr[-2000:]
        points = sorted(int(x) for x in __import__("re").findall(r'class="trial" data-trial="(\d+)"', dom.stdout))
        assert points == sorted(measured)
        assert "<svg" in dom.stdout and job["best"][0]["command"] in dom.stdout.replace("&#x27;", "'")
        shot = tmp_path / "study.png"
        r = _chromium(f"--screenshot={shot}", "--window-size=1100,1400", page, tmp=tmp_path)
        assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
        from PIL import Image

        colours = dict((c, n) for n, c in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 24))
        assert colours.get((31, 119, 180), 0) > 20  # the markers' colour (#1f77b4) was painted
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
