"""The HTTP service: the CLI's answers as a versioned JSON API (/v1), HTML pages with server-side
SVG plots, and tune jobs. Every answer comes from the same library functions as the CLI
(dittune.answers, db.best); errors are JSON bodies naming the problem, never tracebacks."""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dittune import __version__, answers
from dittune import db as D
from dittune.errors import DittuneError

from . import pages
from .jobs import JobRunner, UnknownJob, jobs_dir_for


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status, self.message, self.headers = status, message, headers


class TuneBody(BaseModel):
    """The options of `dittune tune`, by the same names (durations as `dittune tune` takes them)."""

    model: str
    vram_budget: Optional[str] = None
    trials: int = Field(30, ge=1)
    timeout: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    fix: list[str] = []
    allow_lossy: bool = False
    study: Optional[str] = None
    gpu: int = Field(0, ge=0)
    seed: int = 0
    objective: str = "frontier"
    confirm: int = Field(3, ge=0)
    device: Optional[str] = None
    trial_timeout: Optional[str] = None
    measure_steps: Optional[int] = Field(None, ge=1)

    def check(self) -> None:
        """What can be checked without a GPU; the rest (space, workload, budget vs card) is the
        job's own start-up check, which fails the job with tune's one-line error."""
        from dittune.engine import flags as F
        from dittune.engine.budget import parse_budget
        from dittune.engine.models import get_spec
        from dittune.tuner import parse_duration
        from dittune.tuner.study import OBJECTIVES

        get_spec(self.model)
        if self.vram_budget is not None:
            parse_budget(self.vram_budget)
        for d in (self.timeout, self.trial_timeout):
            if d is not None:
                parse_duration(d)
        F.parse_fix(self.fix)
        if self.objective not in OBJECTIVES:
            raise DittuneError(f"objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}")
        if self.device not in (None, "cpu"):
            raise DittuneError(f"device {self.device!r}: only 'cpu' (or none: the GPU) is accepted")

    def argv(self) -> list[str]:
        """`dittune tune` arguments; the database reaches the job as DITTUNE_DB (a URL may hold a password)."""
        out = ["tune", self.model, "--trials", str(self.trials), "--gpu", str(self.gpu), "--seed", str(self.seed),
               "--objective", self.objective, "--confirm", str(self.confirm)]
        for name in ("vram_budget", "timeout", "width", "height", "steps", "guidance", "study", "device",
                     "trial_timeout", "measure_steps"):
            v = getattr(self, name)
            if v is not None:
                out += [f"--{name.replace('_', '-')}", str(v)]
        for f in self.fix:
            out += ["--fix", f]
        if self.allow_lossy:
            out.append("--allow-lossy")
        return out


def create_app(db: D.Database, token: str | None = None, jobs: JobRunner | None = None) -> FastAPI:
    """The service over `db`. Writes (tune jobs) need `token` as a bearer token; without one the
    service refuses every write."""
    _sqlite_concurrency(db)
    current = _current()
    runner = jobs if jobs is not None else JobRunner(jobs_dir_for(db.url), db.url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.close()

    app = FastAPI(title="dittune", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Measured flag recommendations for diffusion models. " + D.BEST_RULE)
    app.state.db, app.state.jobs = db, runner

    def write_access(request: Request) -> None:
        if not token:
            raise ApiError(403, "writes are disabled: start `dittune serve` with --token or DITTUNE_TOKEN")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(DittuneError)
    async def _dittune_error(request: Request, e: DittuneError):
        status = 404 if isinstance(e, (answers.NoAnswer, D.UnknownStudy, UnknownJob)) else 400
        return JSONResponse({"error": str(e)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        msgs = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"] if x not in ("query", "body", "path"))
            msgs.append(f"{where or 'request'}: {err['msg']}")
        return JSONResponse({"error": "; ".join(msgs)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(OperationalError)
    async def _busy(request: Request, e: OperationalError):
        return JSONResponse({"error": f"database unavailable, retry: {str(e.orig).strip()}"}, status_code=503,
                            headers={"Retry-After": "1"})

    # -- JSON API -----------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "db": db.engine.url.render_as_string(hide_password=True)}

    @app.get("/v1/recommend", summary="The best stored configuration (the same answer as `dittune recommend --format json`)")
    def recommend(model: str, gpu: Optional[str] = None, num_gpus: Optional[int] = Query(None, ge=1),
                  vram_budget: Optional[str] = None) -> JSONResponse:
        q = answers.Question(model, gpu, num_gpus, vram_budget)
        rows = answers.recommend(db, q, current)
        peers = answers.single_gpu_peers(db, q, rows, current)
        return JSONResponse([answers.answer_dict(r, peers.get(r.trial_id)) for r in rows])  # plain dicts: no response-model pass

    @app.get("/v1/studies", summary="Stored studies with their best configuration")
    def studies_() -> list[dict[str, Any]]:
        return [pages.summary_dict(s) for s in D.studies(db, current)]

    @app.get("/v1/studies/{name}", summary="One study: workload, GPU, budget, versions, trials, frontier, best")
    def study_(name: str) -> dict[str, Any]:
        return pages.study_dict(db, name, current)

    @app.get("/v1/export", summary="The frontier as command lines (`dittune export`)")
    def export(format: str = "sh", model: Optional[str] = None, gpu: Optional[str] = None,
               num_gpus: Optional[int] = Query(None, ge=1), vram_budget: Optional[str] = None):
        text, _ = answers.export(db, answers.Question(model, gpu, num_gpus, vram_budget), format, current)
        if format == "json":
            return JSONResponse(content=__import__("json").loads(text))
        return PlainTextResponse(text, media_type="text/markdown" if format == "md" else "text/plain")

    @app.get("/v1/models")
    def models() -> list[dict[str, Any]]:
        from dittune.engine.models import get_spec, model_names

        return [{"name": n, "family": (s := get_spec(n)).family, "hf_repo": s.hf_repo, "width": s.width,
                 "height": s.height, "steps": s.steps, "guidance": s.guidance, "tiny": s.tiny} for n in model_names()]

    @app.get("/v1/gpus")
    def gpus() -> dict[str, Any]:
        from dittune.engine.gpu import detect

        d = detect()
        return {"gpus": [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
                          "driver": g.driver, "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}"}
                         for g in (d.gpus if d else ())],
                "reason": None if d else d.reason}

    @app.post("/v1/tune", status_code=202, dependencies=[Depends(write_access)],
              summary="Queue `dittune tune` on this host (bearer token)")
    def tune(body: TuneBody) -> dict[str, Any]:
        body.check()
        lane = "cpu" if body.device == "cpu" else f"gpu{body.gpu}"
        return runner.submit(body.model_dump(), body.argv(), lane, body.trials)

    @app.get("/v1/jobs")
    def jobs_() -> list[dict[str, Any]]:
        return runner.list()

    @app.get("/v1/jobs/{job_id}", summary="Progress: trials done, best so far, ETA; the best once it ended")
    def job(job_id: str) -> dict[str, Any]:
        view = runner.view(job_id)
        if view["study"] and view["state"] in ("finished", "stopped", "interrupted"):
            view["best"] = [answers.answer_dict(r) for r in D.best(db, None, current=current, study=view["study"])]
        return view

    @app.delete("/v1/jobs/{job_id}", dependencies=[Depends(write_access)],
                summary="Stop a job cleanly (SIGTERM; measured trials are kept)")
    def stop(job_id: str) -> dict[str, Any]:
        return runner.stop(job_id)

    # -- HTML ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return pages.studies_page(D.studies(db, current))

    @app.get("/studies/{name}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(name: str, vram_budget: Optional[str] = None, num_gpus: Optional[str] = None) -> str:
        return pages.study_page(db, name, current, vram_budget or None, num_gpus or None, interactive=True)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> str:
        return pages.api_page(app.openapi())

    return app


def _current() -> dict[str, Any]:
    from dittune.tuner.versions import staleness_keys

    return staleness_keys()


def _sqlite_concurrency(db: D.Database) -> None:
    """Reads beside a running tune job: SQLite in WAL mode (readers never block the writer) and
    a busy timeout on every connection. PostgreSQL needs nothing (MVCC)."""
    if db.engine.url.get_backend_name() != "sqlite":
        return

    @event.listens_for(db.engine, "connect")
    def _on_connect(conn, record):
        cur = conn.cursor()
        cur.execute("PRAGMA busy_timeout = 10000")
        cur.close()

    db.engine.dispose()
    try:
        with db.engine.connect() as c:
            c.exec_driver_sql("PRAGMA journal_mode=WAL")
    except OperationalError:
        pass  # a read-only file or a writer holding the lock: the busy timeout still serialises

