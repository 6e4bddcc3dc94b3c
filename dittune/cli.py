"""The `dittune` command. Each command parses, calls one library function, prints. Expected
failures (DittuneError) end with one line on stderr and exit code 1; tracebacks are for bugs."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dittune.errors import DittuneError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    # Plain click help: flag names stay whole in any terminal width (rich panels cut them at 80 columns).
    rich_markup_mode=None,
    help="Measure the fastest flags for a diffusion model on your GPU, within your VRAM budget.",
)


class _Out:
    """Rich console bound to the current stdout; wide when piped so tables stay whole."""

    def print(self, *args, **kwargs):
        width = None if sys.stdout.isatty() else 240
        Console(file=sys.stdout, highlight=False, width=width).print(*args, **kwargs)


out = _Out()
DB_HELP = "Database URL (default: $DITTUNE_DB or sqlite:///<XDG data dir>/dittune/dittune.db)."


def expected_failures(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DittuneError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@expected_failures
def models() -> None:
    """List the models the engine knows (exact names)."""
    from dittune.engine.models import get_spec, model_names

    t = Table("model", "family", "Hugging Face repo", "default workload", "notes")
    for name in model_names():
        s = get_spec(name)
        t.add_row(name, s.family, s.hf_repo or "-", f"{s.width}x{s.height}, {s.steps} steps, guidance {s.guidance:g}",
                  "tiny CPU variant" if s.tiny else s.notes)
    out.print(t)


@app.command()
@expected_failures
def gpus() -> None:
    """Show the NVIDIA GPUs NVML sees (name, memory, driver, compute capability)."""
    from dittune.engine.gpu import detect
    from dittune.engine.budget import format_bytes

    d = detect()
    if not d:
        out.print(d.reason)
        return
    t = Table("index", "name", "total", "free", "driver", "compute capability")
    for g in d.gpus:
        t.add_row(str(g.index), g.name, format_bytes(g.total_bytes), format_bytes(g.free_bytes), g.driver,
                  f"{g.compute_capability[0]}.{g.compute_capability[1]}")
    out.print(t)


@app.command()
@expected_failures
def studies(db: Optional[str] = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """List stored studies."""
    from dittune import db as D
    from dittune.engine.budget import format_bytes
    from dittune.tuner.versions import staleness_keys

    rows = D.studies(D.open_db(db), staleness_keys())
    from dittune.tuner.emit import band_text

    t = Table("study", "model", "workload", "GPU", "budget", "objective", "trials", "measured", "best (s)", "noise band",
              "best trial", "created")
    for r in rows:
        b = r.best
        t.add_row(r.name + (f" (STALE: {'; '.join(r.stale_reasons)})" if r.stale else ""), r.model,
                  f"{r.width}x{r.height}, {r.steps} steps", r.gpu, format_bytes(r.budget_bytes) if r.budget_bytes else "-",
                  r.objective, str(r.trials), str(r.measured), f"{r.best_latency_s:.3f}" if b is not None else "-",
                  band_text(b) if b is not None else "-", str(b.trial_id) if b is not None else "-",
                  f"{r.created_at:%Y-%m-%d %H:%M}")
    out.print(t)
    out.print(f"best (s): {D.BEST_RULE}")


NUM_GPUS_HELP = "Only configurations measured on this many GPUs (default: every GPU count measured, one answer each)."


@app.command()
@expected_failures
def recommend(
    model: str = typer.Argument(..., help="Model name (see `dittune models`)."),
    gpu: Optional[str] = typer.Option(None, help="GPU name or part of it, e.g. H100."),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help=NUM_GPUS_HELP),
    vram_budget: Optional[str] = typer.Option(None, help="24GiB, 24G, 24000MiB, 0.5 (of the card) or 80%."),
    format: str = typer.Option("text", "--format", help="text or json."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """The best stored configuration for MODEL whose measured peak VRAM fits the budget (the rule: README)."""
    from dittune import answers
    from dittune import db as D

    if format not in ("text", "json"):
        raise DittuneError(f"--format {format!r}: choose text or json")
    q = answers.Question(model, gpu, num_gpus, vram_budget)
    q.check()
    database = D.open_db(db)
    results = answers.recommend(database, q)
    peers = answers.single_gpu_peers(database, q, results)
    if format == "json":
        print(json.dumps([answers.answer_dict(r, peers.get(r.trial_id)) for r in results], indent=2))
    else:
        for r in results:
            print(answers.answer_text(r, peers.get(r.trial_id)))


@app.command()
@expected_failures
def export(
    model: Optional[str] = typer.Option(None, help="Only this model."),
    gpu: Optional[str] = typer.Option(None, help="Only GPUs whose name contains this."),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help=NUM_GPUS_HELP),
    vram_budget: Optional[str] = typer.Option(None, help="Only configurations that fit this budget."),
    format: str = typer.Option("sh", "--format", help="sh, json, md or sglang."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here instead of stdout."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Export the measured latency/VRAM frontier as command lines (fastest first), the best one marked."""
    from dittune import answers
    from dittune import db as D

    q = answers.Question(model, gpu, num_gpus, vram_budget)
    q.check()
    text, n = answers.export(D.open_db(db), q, format)
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text)
        except OSError as e:
            raise DittuneError(f"cannot write {output}: {e.strerror}") from None
        out.print(f"wrote {n} configurations to {output}")


@app.command()
@expected_failures
def tune(
    model: Optional[str] = typer.Argument(None, help="Model name (see `dittune models`); optional with --model-path."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="Diffusers-format checkpoint dir: trials load its weights."),
    vram_budget: Optional[str] = typer.Option(None, help="24GiB, 24G, 24000MiB, 0.5 (of the card) or 80% (default: the whole card)."),
    trials: int = typer.Option(30, help="Measured trials the study should hold; a rerun continues towards it."),
    timeout: Optional[str] = typer.Option(None, help="Stop this run after this long: 600, 10m, 1h."),
    width: Optional[int] = typer.Option(None), height: Optional[int] = typer.Option(None),
    steps: Optional[int] = typer.Option(None), guidance: Optional[float] = typer.Option(None),
    fix: list[str] = typer.Option([], "--fix", help="flag=value held fixed (repeatable)."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Also search lossy flags (sage_attn, bf16 VAE)."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: derived from model, workload, GPU, budget)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="The study's GPUs by NVML index, e.g. 0,1 (default: all visible); trials run side by side on them."),
    max_gpus_per_trial: Optional[int] = typer.Option(None, help="Most GPUs one trial's layout may use (default: all of --gpus)."),
    gpu: Optional[int] = typer.Option(None, "--gpu", help="One GPU index (the same as --gpus N)."),
    seed: int = typer.Option(0, "--seed", help="Sampler seed."),
    objective: str = typer.Option("frontier", help="frontier (latency and peak VRAM) or latency."),
    confirm: int = typer.Option(3, help="Finalists re-measured at the end."),
    device: Optional[str] = typer.Option(None, help="cpu to tune on the CPU (tiny models) even where a GPU exists."),
    trial_timeout: Optional[str] = typer.Option(None, help="Cap one trial (load + compile + requests): 300, 5m (default: the preset's)."),
    measure_steps: Optional[int] = typer.Option(None, help="Denoise steps timed per trial (default: the preset's)."),
    cold_workers: bool = typer.Option(False, "--cold-workers", help="Start each trial's process when the trial starts "
                                      "(default on GPUs: started ahead, imports done; the measurement is the same)."),
) -> None:
    """Measure configurations of MODEL on this GPU under the VRAM budget; print the frontier and the fastest command."""
    from dittune.engine.budget import format_bytes
    from dittune.tuner import TuneOptions, emit, parse_duration
    from dittune.tuner import tune as run_tune
    from dittune.tuner.pool import parse_gpus

    opts = TuneOptions(
        model=model, vram_budget=vram_budget, trials=trials, timeout_s=parse_duration(timeout) if timeout else None,
        width=width, height=height, steps=steps, guidance=guidance, fix=tuple(fix), allow_lossy=allow_lossy,
        db_url=db, study_name=study, gpu_index=gpu, gpus=parse_gpus(gpus), max_gpus_per_trial=max_gpus_per_trial, seed=seed, objective=objective, confirm=confirm, device=device,
        trial_timeout_s=parse_duration(trial_timeout) if trial_timeout else None, measure_steps=measure_steps,
        model_path=model_path, warm_workers=False if cold_workers else None,
    )
    import shlex
    import signal

    from dittune.tuner import progress as P

    resume = shlex.join(["dittune", *sys.argv[1:]])
    previous = signal.signal(signal.SIGTERM, P.sigterm_as_interrupt)  # outside the loop too (confirmation)
    try:
        res = run_tune(opts, progress=sys.stdout.isatty(), log=None if sys.stdout.isatty() else print)
    except BaseException as e:  # between trials' loop and the end (confirmation): what was recorded stays
        if not P.interrupted_by_signal(e):
            raise
        _interrupted(resume)
    finally:
        signal.signal(signal.SIGTERM, previous)
    interrupted = res.stopped.startswith("interrupted")
    out.print(f"study {res.study}: {res.measured} measured trials; stopped: {res.stopped}")
    if res.frontier:
        t = Table("latency (s)", "step median (ms)", "peak VRAM", "cold start (s)", "flags", title="latency / VRAM frontier")
        for r in res.frontier:
            t.add_row(f"{r.latency_s:.3f}", f"{r.step_median_s * 1e3:.1f}" if r.step_median_s else "-",
                      format_bytes(r.peak_vram_bytes), f"{r.cold_start_s:.1f}" if r.cold_start_s else "-", r.argv or "(defaults)")
        out.print(t)
    if res.predicted_vs_measured:
        errs = sorted(abs(p - m) / m for p, m in res.predicted_vs_measured)
        out.print(f"memory model: median error {errs[len(errs) // 2]:.1%}, max {errs[-1]:.1%} over {len(errs)} trials")
    if res.winner is None:
        if interrupted:
            _interrupted(resume)
        if res.budget_bytes is None:
            raise DittuneError(f"no configuration was measured: every trial failed (see `dittune studies --db {res.db_url}`)")
        raise DittuneError(f"no configuration was measured within the budget {format_bytes(res.budget_bytes)}")
    out.print(f"best: {emit.evidence_text(res.winner)}")
    out.print(f"picked by: {res.winner.rule}")
    print(emit.generate_command(res.winner))
    if interrupted:
        _interrupted(resume)


def _interrupted(resume: str) -> None:
    """Ctrl-C or SIGTERM stopped tune after saving: say how to resume, exit 130 / 143."""
    from dittune.tuner.progress import interrupt_exit_code

    print(f"interrupted; everything measured is kept. Resume with: {resume}", file=sys.stderr)
    raise typer.Exit(interrupt_exit_code())


@app.command()
@expected_failures
def compare(
    before: Path = typer.Argument(..., help="Perf dump (--perf-dump-path) of the baseline."),
    after: Path = typer.Argument(..., help="Perf dump to compare with it."),
) -> None:
    """Stage-by-stage diff of two perf dumps: times, step median, peak VRAM, cold start, flags."""
    from dittune.engine.perfdiff import compare_dumps, load_dump

    rows, flag_changes = compare_dumps(load_dump(before), load_dump(after))
    t = Table("figure", "before", "after", "after / before", title=f"{before.name} -> {after.name}")
    for name, a, b, unit in rows:
        ratio = f"{b / a:.3f}" if a and b is not None else "-"
        fmt = (lambda v: "-" if v is None else f"{v:.2f} {unit}".strip())
        t.add_row(name, fmt(a), fmt(b), ratio)
    out.print(t)
    for name, a, b in flag_changes:
        out.print(f"flag {name}: {a} -> {b}")


@app.command()
@expected_failures
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (non-loopback needs a token)."),
    port: int = typer.Option(8765, help="Port."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    token: Optional[str] = typer.Option(None, "--token", help="Bearer token for writes (default: $DITTUNE_TOKEN; none: writes refused)."),
) -> None:
    """Serve recommendations, studies and exports over HTTP (JSON API under /v1, HTML pages, tune jobs)."""
    from dittune.service import serve as run_serve

    run_serve(host, port, db, token)


@app.command()
@expected_failures
def report(
    study: str = typer.Argument(..., help="Study name (see `dittune studies`)."),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="HTML file to write."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Write STUDY's page (frontier and per-flag plots, trials, recommended command) as one self-contained HTML file."""
    from dittune.service import write_report

    size = write_report(study, output, db)
    out.print(f"wrote {output} ({size / 1024:.0f} KiB)")


def _with_engine_flags(fn):
    """Append one typer option per registry flag to `fn`'s signature; `fn` receives them in
    **flags and turns them into an EngineConfig with engine.flags.config_from_dict."""
    from dittune.engine.flags import FLAGS

    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    for f in FLAGS:
        help_ = f.help + (f" [{' | '.join(map(str, f.choices))}]" if f.choices else "")
        if f.requires:
            help_ += f" (needs --{f.requires})"
        decl = f"--{f.name}/--no-{f.name}" if f.type is bool else f.option
        params.append(inspect.Parameter(
            f.attr, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
            default=typer.Option(f.default, decl, help=help_, rich_help_panel="Engine flags"),
        ))
    fn.__signature__ = inspect.Signature(params)
    return fn


@app.command()
@expected_failures
@_with_engine_flags
def generate(
    model: Optional[str] = typer.Option(None, "--model", help="Model name (see `dittune models`); with --model-path, must match the checkpoint."),
    prompt: str = typer.Option("A photo of a cat sitting on a windowsill", "--prompt"),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="For true-CFG runs (Qwen-Image; Z-Image with --guidance > 0)."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="Diffusers-format checkpoint dir (its model_index.json names the model); without it, synthetic weights at real shapes."),
    max_sequence_length: Optional[int] = typer.Option(None, "--max-sequence-length", help="Prompt tokens of the long text encoder, as diffusers' max_sequence_length (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width"),
    height: Optional[int] = typer.Option(None, "--height"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    guidance: Optional[float] = typer.Option(None, "--guidance"),
    seed: int = typer.Option(0, "--seed", help="Noise seed: the same noise as diffusers with generator=torch.Generator(\"cpu\").manual_seed(SEED)."),
    output: Optional[Path] = typer.Option(Path("out.png"), "--output", help="PNG to write."),
    perf_dump_path: Optional[Path] = typer.Option(None, "--perf-dump-path", help="Write stage/step times, peak VRAM and the manifest as JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)."),
    warmup: int = typer.Option(0, "--warmup", help="Requests to run before the measured one."),
    max_warmup: Optional[int] = typer.Option(None, "--max-warmup", help="Up to this many warm-up requests in all, more than --warmup while two consecutive requests differ by over 5% (the tuner: --warmup 1 --max-warmup 4)."),
    measure_s: float = typer.Option(0.0, "--measure-s", help="After warm-up, measure requests until this many seconds of them (at most 200) and report their median latency (the tuner: 0.5 on a GPU, 3 on the CPU); 0: one measured request."),
    vram_budget: Optional[str] = typer.Option(None, "--vram-budget", help="This process's whole VRAM footprint may not exceed this: torch's allocator is capped at it less the CUDA context and headroom (fails with OOM beyond it)."),
    **flags,
) -> None:
    """Run the engine: encode -> denoise -> decode -> PNG, with the given engine flags."""
    from dittune.engine import flags as F
    from dittune.engine.run import GenerateRequest, generate as run_generate

    cfg = F.config_from_dict({name: value for name, value in flags.items()})
    req = GenerateRequest(
        model=model, prompt=prompt, negative_prompt=negative_prompt, model_path=model_path, width=width,
        height=height, steps=steps, guidance=guidance, seed=seed, max_sequence_length=max_sequence_length, output=output, perf_dump_path=perf_dump_path,
        device=device, dtype=dtype, warmup=warmup, max_warmup=max_warmup, measure_s=measure_s, vram_budget=vram_budget, flags=cfg,
    )
    result = run_generate(req, progress=True)
    out.print(result.summary())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
