"""The JSON API and the HTML pages through FastAPI's test client, on a study the tuner stored
(fake engine) and on the committed FLUX study (bench/results/tune_flux_dev.db, copied)."""

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dittune import db as D
from dittune.cli import app as cli

from conftest import TOKEN, GiB, dump, make_client
from dbrows import add_study, add_trial

ROOT = Path(__file__).resolve().parents[2]
FLUX_DB = ROOT / "bench" / "results" / "tune_flux_dev.db"


def cli_text(*args):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


def cli_json(*args):
    return json.loads(cli_text(*args))


@pytest.fixture(scope="module")
def client(fake_study):
    url, _ = fake_study
    with make_client(url) as c:
        yield c


@pytest.mark.parametrize("query, cli_args", [
    ("", []),
    ("&vram_budget=20GiB", ["--vram-budget", "20GiB"]),
    ("&num_gpus=2", ["--num-gpus", "2"]),
    ("&gpu=h100&num_gpus=1&vram_budget=0.5", ["--gpu", "h100", "--num-gpus", "1", "--vram-budget", "0.5"]),
])
def test_recommend_is_the_cli_answer(client, fake_study, query, cli_args):
    url, _ = fake_study
    r = client.get(f"/v1/recommend?model=flux-dev{query}")
    assert r.status_code == 200, r.text
    assert r.json() == cli_json("recommend", "flux-dev", "--db", url, "--format", "json", *cli_args)
    for row in r.json():
        assert row["rule"] and D.BEST_RULE in row["rule"]
        assert row["command"].startswith("dittune generate --model flux-dev")


def test_gpu_counts_answer_separately(client):
    rows = client.get("/v1/recommend?model=flux-dev").json()
    assert sorted(r["num_gpus"] for r in rows) == [1, 2]  # default: one answer per GPU count measured
    (two,) = client.get("/v1/recommend?model=flux-dev&num_gpus=2&vram_budget=16GiB").json()
    assert two["latency_s"] == 5.0 and two["flags"]["text-encoder-cpu-offload"] is True
    assert two["stale"] and any(s.startswith("torch 2.11.0 -> ") for s in two["stale_reasons"])
    assert client.get("/v1/recommend?model=flux-dev&num_gpus=4").status_code == 404


def test_one_best_everywhere(client, fake_study):
    """tune's winner, recommend, the study's page and JSON, studies and export pick the same trial."""
    url, res = fake_study
    (rec,) = client.get("/v1/recommend?model=flux-dev&num_gpus=1&vram_budget=40GiB").json()
    detail = client.get(f"/v1/studies/{res.study}").json()
    assert [b["trial_id"] for b in detail["best"]] == [rec["trial_id"]]
    assert res.winner.trial_id == rec["trial_id"]
    summary = next(s for s in client.get("/v1/studies").json() if s["name"] == res.study)
    assert summary["best_latency_s"] == rec["latency_s"] and summary["best_trial_id"] == rec["trial_id"]
    exported = client.get("/v1/export?format=json&model=flux-dev&num_gpus=1&vram_budget=40GiB").json()
    assert [x["trial_id"] for x in exported if x["best"]] == [rec["trial_id"]]
    assert f"trial {rec['trial_id']}" in client.get("/v1/export?format=sh&num_gpus=1&vram_budget=40GiB").text


def test_a_tie_within_noise_goes_to_the_smaller_peak(tmp_path):
    url = f"sqlite:///{tmp_path / 'tie.db'}"
    db = D.open_db(url, create=True)
    s = add_study(db, "tie")
    add_trial(db, s, "--enable-torch-compile", 10.0, 40, status="confirmed", flags={"enable-torch-compile": True},
              cold_start_s=30.0)
    add_trial(db, s, "--text-encoder-cpu-offload", 10.05, 30, status="confirmed", flags={"text-encoder-cpu-offload": True})
    db.dispose()
    with make_client(url) as c:
        (row,) = c.get("/v1/recommend?model=flux-dev").json()  # step_spread 1%: 10.05 s is within the band
        assert row["flags"] == {"text-encoder-cpu-offload": True}
        assert row["rule"].startswith("within the noise band ±1.0% (confirmation repeats) of the fastest (10.000 s")
        (study,) = c.get("/v1/studies").json()
        assert study["best_trial_id"] == row["trial_id"] and study["best_latency_s"] == 10.05
        assert "10.050" in CliRunner().invoke(cli, ["studies", "--db", url]).stdout
        (row,) = c.get("/v1/recommend?model=flux-dev&vram_budget=35GiB").json()
        assert row["flags"] == {"text-encoder-cpu-offload": True} and row["rule"].startswith("fastest measured")
        exported = c.get("/v1/export?format=json").json()
        assert [x["best"] for x in exported] == [False, True]  # the pick is marked, the frontier kept


def test_studies_and_study_detail(client, fake_study):
    _, res = fake_study
    names = [s["name"] for s in client.get("/v1/studies").json()]
    assert names == [res.study, "flux-2gpu"]
    d = client.get(f"/v1/studies/{res.study}").json()
    assert d["workload"] == {"width": 1024, "height": 1024, "steps": 28, "guidance": 3.5}
    assert d["gpu"]["name"] == "NVIDIA H100 80GB HBM3" and d["budget_bytes"] == 40 * GiB and not d["stale"]
    assert {"torch", "dittune", "registry_hash"} <= set(d["versions"]) | {"registry_hash"}
    statuses = {t["status"] for t in d["trial_rows"]}
    assert "complete" in statuses and "confirmed" in statuses
    assert all(t["reason"] for t in d["trial_rows"] if t["status"] in ("pruned", "oom"))
    peaks = [f["peak_vram_bytes"] for f in d["frontier"]]
    assert peaks == sorted(peaks, reverse=True) and len(d["frontier"]) >= 1
    assert client.get("/v1/studies/flux-2gpu").json()["stale"] is True


@pytest.mark.parametrize("fmt, ctype, marker", [
    ("sh", "text/plain", "#!/bin/sh"), ("md", "text/markdown", "| model |"), ("sglang", "text/plain", "sglang generate"),
])
def test_export_text_formats(client, fake_study, fmt, ctype, marker):
    url, _ = fake_study
    r = client.get(f"/v1/export?format={fmt}&model=flux-dev")
    assert r.status_code == 200 and r.headers["content-type"].startswith(ctype) and marker in r.text
    out = CliRunner().invoke(cli, ["export", "--db", url, "--format", fmt, "--model", "flux-dev"])
    assert out.stdout == r.text  # the CLI's export, byte for byte


def test_models_gpus_health(client):
    names = [m["name"] for m in client.get("/v1/models").json()]
    assert "flux-dev" in names and "flux-dev-tiny" in names
    g = client.get("/v1/gpus").json()
    assert isinstance(g["gpus"], list) and (g["gpus"] or g["reason"])
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["db"].startswith("sqlite:///")


BAD = [
    ("/v1/recommend?model=flux-ultra", 400, "unknown model 'flux-ultra'"),
    ("/v1/recommend?model=flux-dev&vram_budget=lots", 400, "malformed VRAM budget 'lots'"),
    ("/v1/recommend?model=flux-dev&num_gpus=two", 422, "num_gpus"),
    ("/v1/recommend?model=flux-dev&num_gpus=0", 422, "num_gpus"),
    ("/v1/recommend", 422, "model: Field required"),
    ("/v1/recommend?model=flux-dev&vram_budget=1GiB", 404, "no measured configuration of flux-dev within 1GiB"),
    ("/v1/recommend?model=qwen-image", 404, "no measured configuration of qwen-image"),
    ("/v1/studies/nope", 404, "no study named 'nope'"),
    ("/studies/nope", 404, "no study named 'nope'"),
    ("/v1/export?format=pdf", 400, "--format 'pdf'"),
    ("/v1/export?format=sh&model=sd9", 400, "unknown model 'sd9'"),
    ("/v1/export?vram_budget=-3GiB", 400, "malformed VRAM budget"),
    ("/v1/jobs/nope", 404, "no job 'nope'"),
    ("/v1/nothing", 404, "Not Found"),
]


def test_bad_input_is_a_4xx_json_error_and_changes_nothing(client, fake_study):
    url, _ = fake_study
    before = dump(url)
    for path, status, frag in BAD:
        r = client.get(path)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert frag in r.json()["error"], (path, r.json())
        assert "Traceback" not in r.text
    assert dump(url) == before


def test_writes_need_the_token_and_bad_bodies_queue_nothing(fake_study, tmp_path):
    url, _ = fake_study
    before = dump(url)
    body = {"model": "flux-dev", "trials": 2}
    with make_client(url, token=None, jobs_dir=tmp_path / "j0") as c:
        r = c.post("/v1/tune", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403 and "writes are disabled" in r.json()["error"]
    with make_client(url, jobs_dir=tmp_path / "j1") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = c.post("/v1/tune", json=body, headers=headers)
            assert r.status_code == 401 and "bearer token" in r.json()["error"], headers
        assert c.delete("/v1/jobs/x", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for bad, status, frag in [
            ({"model": "flux-ultra"}, 400, "unknown model"),
            ({"model": "flux-dev", "vram_budget": "much"}, 400, "malformed VRAM budget"),
            ({"model": "flux-dev", "trials": 0}, 422, "trials"),
            ({"model": "flux-dev", "fix": ["warp"]}, 400, "expected flag=value"),
            ({"model": "flux-dev", "fix": ["warp=1"]}, 400, "unknown flag"),
            ({"model": "flux-dev", "timeout": "soon"}, 400, "malformed --timeout"),
            ({"model": "flux-dev", "objective": "speed"}, 400, "objective 'speed'"),
            ({"model": "flux-dev", "device": "tpu"}, 400, "device 'tpu'"),
            ({"trials": 3}, 422, "model: Field required"),
        ]:
            r = c.post("/v1/tune", json=bad, headers=auth)
            assert r.status_code == status and frag in r.json()["error"], (bad, r.text)
        r = c.post("/v1/tune", content=b"{not json", headers={**auth, "content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json()
        assert c.delete("/v1/jobs/nope", headers=auth).status_code == 404
        assert c.get("/v1/jobs").json() == []
    assert dump(url) == before


def test_html_pages(client, fake_study):
    url, res = fake_study
    index = client.get("/").text
    assert f'href="/studies/{res.study}"' in index and "stale" in index
    page = client.get(f"/studies/{res.study}")
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    n_measured = len(D.measured(D.open_db(url), study=res.study))
    assert len(re.findall(r'class="trial" data-trial="\d+"', html)) == n_measured
    assert 'class="frontier-line"' in html and 'class="budget"' in html and 'class="best"' in html
    assert 'class="effect-bar"' in html and "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert html.count('class="trial-row"') == len(D.trials(D.open_db(url), study_name=res.study))
    (rec,) = client.get("/v1/recommend?model=flux-dev&num_gpus=1&vram_budget=40GiB").json()
    assert rec["command"] in html.replace("&#x27;", "'")
    answer = client.get(f"/studies/{res.study}?vram_budget=30GiB&num_gpus=1").text
    (small,) = client.get("/v1/recommend?model=flux-dev&num_gpus=1&vram_budget=30GiB").json()
    assert answer.count('class="command"') == 2 and small["command"] in answer
    assert "malformed VRAM budget" in client.get(f"/studies/{res.study}?vram_budget=xx").text
    assert "whole number" in client.get(f"/studies/{res.study}?num_gpus=-1").text
    two = client.get("/studies/flux-2gpu").text
    assert two.count('class="trial"') == 2 and "2 GPUs" in two and "STALE" in two
    docs = client.get("/docs").text
    assert "/v1/recommend" in docs and "/v1/tune" in docs and "<script" not in docs
    assert "/v1/studies/{name}" in client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    copy = tmp_path_factory.mktemp("flux") / "tune_flux_dev.db"
    shutil.copy(FLUX_DB, copy)
    return f"sqlite:///{copy}"


def test_committed_flux_study(flux, tmp_path):
    before = FLUX_DB.read_bytes()
    with make_client(flux, jobs_dir=tmp_path / "jobs") as c:
        r = c.get("/v1/recommend?model=flux-dev&gpu=H100")
        assert r.status_code == 200
        assert r.json() == cli_json("recommend", "flux-dev", "--gpu", "H100", "--db", flux, "--format", "json")
        (row,) = r.json()
        assert row["stale"] and row["status"] == "confirmed" and "Rule:" in row["rule"]
        (study,) = c.get("/v1/studies").json()
        assert study["measured"] == 22 and study["best_latency_s"] == row["latency_s"]
        html = c.get(f"/studies/{study['name']}").text
        assert len(re.findall(r'class="trial" data-trial=', html)) == len(D.measured(D.open_db(flux)))
        assert c.get("/v1/export?format=md&model=flux-dev").text.count("\n| flux-dev |") >= 2
    out = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["report", study["name"], "--db", flux, "-o", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<link" not in page and "<script" not in page
    assert row["command"] in page.replace("&#x27;", "'")
    r = CliRunner().invoke(cli, ["report", "nope", "--db", flux, "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 1 and "no study named 'nope'" in r.stderr and not (tmp_path / "x.html").exists()
    assert FLUX_DB.read_bytes() == before


def test_serve_refuses_non_loopback_without_a_token(monkeypatch, tmp_path):
    monkeypatch.delenv("DITTUNE_TOKEN", raising=False)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert r.exit_code == 1 and "refusing to listen on 0.0.0.0" in r.stderr
    assert not (tmp_path / "x.db").exists()
    from dittune.service import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")


def test_export_num_gpus_is_the_cli_export(client, fake_study):
    url, _ = fake_study
    api = client.get("/v1/export?format=json&num_gpus=2").json()
    assert {r["num_gpus"] for r in api} == {2} and [r["latency_s"] for r in api] == [3.0, 5.0]
    assert api == cli_json("export", "--db", url, "--format", "json", "--num-gpus", "2")
    r = CliRunner().invoke(cli, ["export", "--db", url, "--num-gpus", "0"])
    assert r.exit_code == 1 and "--num-gpus 0: need at least one GPU" in r.stderr


def test_wide_answers_weigh_themselves_against_single_gpu_replicas(client, fake_study):
    """Images per second per GPU on every answer; a 2-GPU answer also says what two replicas of
    the best 1-GPU answer of the same workload and GPU kind would serve, in JSON and text alike."""
    url, _ = fake_study
    rows = client.get("/v1/recommend?model=flux-dev").json()
    one = next(r for r in rows if r["num_gpus"] == 1)
    two = next(r for r in rows if r["num_gpus"] == 2)
    assert one["images_per_s_per_gpu"] == pytest.approx(1 / one["latency_s"]) and "vs_single_gpu_replicas" not in one
    assert two["images_per_s_per_gpu"] == pytest.approx(1 / (2 * two["latency_s"]))
    x = two["vs_single_gpu_replicas"]
    assert x["single_gpu_trial_id"] == one["trial_id"] and x["replicas"] == 2
    assert x["replicas_images_per_s"] == pytest.approx(2 / one["latency_s"])
    assert x["layout_images_per_s"] == pytest.approx(1 / two["latency_s"])
    assert x["more_images_per_s"] == ("replicas" if 2 / one["latency_s"] > 1 / two["latency_s"] else "layout")
    text = cli_text("recommend", "flux-dev", "--num-gpus", "2", "--db", url)
    assert f"2 replicas of the one-GPU best (trial {one['trial_id']}, {one['latency_s']:.3f} s) would serve" in text
    assert f"{two['images_per_s_per_gpu']:.3g} images/s per GPU (2 GPU(s))" in text
