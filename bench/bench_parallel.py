"""One denoise step on two (or four) GPUs: dittune's best single-GPU configuration, each layout
of that many GPUs that applies (2: Ulysses-2, ring-2, CFG parallel, TP-2; 4: TP-2 x Ulysses-2,
TP-4, Ulysses-4, CFG x TP-2), and diffusers' own context parallel and tensor parallel
(`enable_parallelism` with ContextParallelConfig / TensorParallelConfig, regional compile, cuDNN
attention), in the same call on the same synthetic weights and inputs. Step times (rank 0,
medians of warmed-up steps), speed-up over one GPU, each GPU's peak, and the output's difference
against dittune on one GPU.

    python bench/bench_parallel.py --models flux-dev --json out.json        # 2 GPUs, NCCL
    python bench/bench_parallel.py --models flux-dev --gpus 4               # the 4-GPU layouts (TP x Ulysses)
    python bench/bench_parallel.py --models flux-dev --profile              # + kernel time split of one Ulysses-2 step
    python bench/bench_parallel.py --models flux-dev --only tp --profile    # ... of one TP-2 step
    python bench/bench_parallel.py --models flux-dev --only tp \
        --inductor reorder_for_compute_comm_overlap=true bucket_all_reduces_fx=all   # + each layout again under each setting
    python bench/bench_parallel.py --tiny --device cpu                      # smoke test on gloo

The ranks are started by dittune's own launcher (engine/parallel/launch.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

BEST = "--attention-backend torch_cudnn_sdpa --fused-kernels --enable-torch-compile"
PASSES = {"qwen_image": 2}


def _layouts(model: str, tiny: bool, gpus: int = 2) -> list[dict]:
    """The layouts of `gpus` GPUs that the model allows (heads and widths divisible; true CFG)."""
    from dittune.engine.models import get_spec, tensor_plan

    spec = get_spec(model)
    cfg = spec.true_cfg and spec.uses_cfg(spec.guidance if spec.guidance > 0 else 1.5)
    if gpus == 2:
        out = [{"ulysses": 2}, {"ring": 2}] + ([{"cfg": 2}] if cfg else []) + [{"tp": 2}]
    else:
        out = [{"ulysses": 2, "tp": 2}, {"tp": 4}, {"ulysses": 4}, {"ulysses": 2, "ring": 2}]
        out += [{"cfg": 2, "tp": 2}] if cfg else []
    plan = tensor_plan(spec)
    return [lay for lay in out
            if plan.refusal(lay.get("tp", 1), model) is None
            and spec.attention_heads % (lay.get("tp", 1) * lay.get("ulysses", 1)) == 0]


def native_tp(family, sd: dict, device, dtype, groups):
    """This rank's tensor-parallel share of the native DiT holding diffusers' state dict `sd`:
    built on the meta device and sharded before any weight lands on the GPU."""
    import torch

    from dittune.engine.components import default_dtype
    from dittune.engine.models import tensor_plan
    from dittune.engine.parallel.tensor import slice_state_dict, tensor_parallel

    with torch.device("meta"), default_dtype(dtype):
        ours = family.transformer_cls(family.spec.dit_config)
    shards = tensor_parallel(ours, tensor_plan(family.spec), groups.tp, groups.layout.tp, groups.coords["tp"])
    mine = slice_state_dict(family.convert_diffusers_state_dict(sd), shards)
    ours.load_state_dict({k: v.to(device, dtype) for k, v in mine.items()}, strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def bench_rank(rank: int, world: int, payload: dict):
    """Runs in every rank; returns the rows (rank 0)."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_dit import DIFFUSERS_BACKEND, build_reference, case, free, native_from, prepare_native, timeit  # noqa: F401

    from dittune.engine import flags as F
    from dittune.engine.cudagraph import capture
    from dittune.engine.models import get_family
    from dittune.engine.parallel import Layout, context
    from dittune.engine.parallel.sequence import all_gather

    model, size, tokens, warmup, iters = (payload[k] for k in ("model", "size", "tokens", "warmup", "iters"))
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family = get_family(model)
    passes = PASSES.get(family.spec.family, 1)
    ref_cls, ref_cfg, ref_fwd, our_fwd = case(model, size, size, tokens, device, dtype)
    cfg = F.config_from_argv(shlex.split(payload["flags"]))
    graphs = device.type == "cuda" and not payload.get("no_graphs")
    rows: list[dict] = []

    def peak_reset():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def peaks() -> list:
        mine = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return context.current().all_ranks(mine) if context.current() else [mine]

    torch.manual_seed(0)
    ref = build_reference(ref_cls, ref_cfg, torch.device("cpu"), dtype)  # same random init on every rank
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    del ref

    # --- dittune on one GPU (rank 0; the others wait) -------------------------------------------------
    single_out = None
    if rank == 0:
        peak_reset()
        ours = native_from(family, sd, device, dtype)
        with torch.inference_mode():
            t = time.perf_counter()
            prepare_native(ours, cfg, device)
            single_out = our_fwd(ours).float()
            compile_s = time.perf_counter() - t

            def step():
                cache: dict = {}
                for _ in range(passes):
                    our_fwd(ours, cache)

            ms = timeit(step, device, warmup, iters) * 1e3
            rows.append({"config": "dittune 1 GPU " + payload["flags"], "gpus": 1, "step_ms": ms, "compile_s": compile_s,
                         "peak_bytes": [torch.cuda.max_memory_allocated(device)] if device.type == "cuda" else [None]})
            if graphs:
                graph, _ = capture(step, device)
                rows.append({"config": "dittune 1 GPU " + payload["flags"] + " --enable-cuda-graph", "gpus": 1,
                             "step_ms": timeit(graph.replay, device, warmup, iters) * 1e3,
                             "peak_bytes": [torch.cuda.max_memory_allocated(device)]})
                del graph
        del ours
        free(device)
    dist.barrier()
    box = [single_out.cpu() if single_out is not None else None]
    dist.broadcast_object_list(box, src=0)
    single_out = box[0].to(device)

    # --- dittune layouts on every rank --------------------------------------------------------------
    only = payload.get("only") or ()
    runs = [(lay, {}) for lay in _layouts(model, payload["tiny"], world) if not only or any(lay.get(d, 1) > 1 for d in only)]
    runs += [(lay, setting) for setting in payload.get("inductor") or [] for lay, _ in list(runs)]
    for lay, setting in runs:
        torch._dynamo.reset()  # each row compiles afresh: no row inherits (or exhausts) another's cache
        layout = Layout(**lay)
        name = f"dittune {layout.describe()} {payload['flags']}" + "".join(f" [inductor {k}={v}]" for k, v in setting.items())
        try:
            patch = torch._inductor.config.patch(setting)
            patch.__enter__()
            par = context.enter(layout, rank, world, device)
            peak_reset()
            ours = native_tp(family, sd, device, dtype, par.groups) if layout.tp > 1 else native_from(family, sd, device, dtype)
            with torch.inference_mode():
                t = time.perf_counter()
                prepare_native(ours, cfg, device, groups=par.groups)

                if layout.cfg > 1:  # each rank one branch, one gather of the prediction per step
                    def step():
                        v = our_fwd(ours, {})
                        return all_gather(v.contiguous(), 0, par.groups.cfg)
                    out = step()[:1].float()
                else:
                    def step():
                        cache: dict = {}
                        for _ in range(passes):
                            v = our_fwd(ours, cache)
                        return v
                    out = step().float()
                compile_s = time.perf_counter() - t
                ms = timeit(step, device, warmup, iters) * 1e3
                diff = ((out - single_out).norm() / single_out.norm()).item()
                rows.append({"config": name, "gpus": world, "step_ms": ms, "compile_s": compile_s, "peak_bytes": peaks(),
                             "rel_diff_vs_1gpu": diff})
                if graphs:
                    try:
                        graph, _ = capture(step, device)
                        rows.append({"config": name + " --enable-cuda-graph", "gpus": world,
                                     "step_ms": timeit(graph.replay, device, warmup, iters) * 1e3, "peak_bytes": peaks(),
                                     "rel_diff_vs_1gpu": diff})
                        del graph
                    except Exception as e:  # noqa: BLE001 - recorded in the table
                        rows.append({"config": name + " --enable-cuda-graph", "gpus": world, "error": f"{type(e).__name__}: {e}"[:300]})
            del ours
        except Exception as e:  # noqa: BLE001
            rows.append({"config": name, "gpus": world, "error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            patch.__exit__(None, None, None)
        free(device)
        dist.barrier()

    # --- diffusers' own parallelism ------------------------------------------------------------------
    if not payload.get("no_diffusers"):
        from diffusers import ContextParallelConfig, TensorParallelConfig

        # Every GPU of the call in one degree: diffusers' TP beside dittune's TP rows.
        configs = [(f"diffusers ulysses {world}", lambda: ContextParallelConfig(ulysses_degree=world)),
                   (f"diffusers ring {world}", lambda: ContextParallelConfig(ring_degree=world)),
                   (f"diffusers TP {world}", lambda: TensorParallelConfig(tp_degree=world))]
        if only:
            configs = [c for c in configs if any(d in c[0].lower() for d in only)]
        for name, make in configs:
            name += ", regional compile, cuDNN"
            torch._dynamo.reset()
            try:
                peak_reset()
                with torch.device("meta"):
                    ref = ref_cls.from_config({k: v for k, v in ref_cfg.items() if not k.startswith("_")})
                ref.load_state_dict({k: v.to(device) for k, v in sd.items()}, assign=True)
                ref = ref.to(device, dtype).eval().requires_grad_(False)
                if DIFFUSERS_BACKEND.get("torch_cudnn_sdpa") and device.type == "cuda":
                    ref.set_attention_backend(DIFFUSERS_BACKEND["torch_cudnn_sdpa"])
                ref.enable_parallelism(config=make())
                with torch.inference_mode():
                    t = time.perf_counter()
                    if device.type == "cuda":
                        ref.compile_repeated_blocks(fullgraph=True)
                    out = ref_fwd(ref).float()
                    compile_s = time.perf_counter() - t
                    ms = timeit(lambda: [ref_fwd(ref) for _ in range(passes)], device, warmup, iters) * 1e3
                    diff = ((out - single_out).norm() / single_out.norm()).item()
                rows.append({"config": name, "gpus": world, "step_ms": ms, "compile_s": compile_s, "peak_bytes": peaks(),
                             "rel_diff_vs_1gpu": diff})
                del ref
            except Exception as e:  # noqa: BLE001
                rows.append({"config": name, "gpus": world, "error": f"{type(e).__name__}: {e}"[:300]})
            free(device)
            dist.barrier()

    if payload.get("profile") and world == 2 and device.type == "cuda":
        lay = next((lay for lay, _ in runs), {"ulysses": 2}) if only else {"ulysses": 2}
        rows.append(_profile(model, family, sd, cfg, device, dtype, our_fwd, passes, rank, world, lay))
    return rows if rank == 0 else None


def _profile(model, family, sd, cfg, device, dtype, our_fwd, passes, rank, world, lay: dict) -> dict:
    """Kernel time of one step of layout `lay` (2 GPUs) on rank 0: NCCL kernels vs the rest, the
    kernels by name, and the step's wall time; the GPU's busy time (kernel intervals merged) says
    how much of the step is idle or waits in no kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_dit import native_from, prepare_native

    from dittune.engine.parallel import Layout, context

    torch._dynamo.reset()
    layout = Layout(**lay)
    par = context.enter(layout, rank, world, device)
    ours = native_tp(family, sd, device, dtype, par.groups) if layout.tp > 1 else native_from(family, sd, device, dtype)
    with torch.inference_mode():
        prepare_native(ours, cfg, device, groups=par.groups)

        def step():
            cache: dict = {}
            for _ in range(passes):
                our_fwd(ours, cache)

        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            wall = time.perf_counter() - t
    nccl = other = 0.0
    top: dict[str, float] = {}
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type is not None and not str(e.device_type).endswith("CPU"))
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of kernel intervals
        if a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    # "nccl:all_reduce" and the like are torch's annotations around the NCCL kernels, carrying the
    # same device time: skipped, or every collective counts twice (the first TP profile did).
    kernels = [e for e in prof.key_averages() if e.device_type is not None and not str(e.device_type).endswith("CPU")
               and not e.key.startswith("nccl:")]
    nccl_calls = sum(e.count for e in kernels if "nccl" in e.key.lower())
    for e in kernels:
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if "nccl" in e.key.lower():
            nccl += us
        else:
            other += us
        top[e.key[:80]] = us
    return {"config": f"profile: dittune {layout.describe()}, one step, rank 0", "wall_ms": wall * 1e3,
            "nccl_kernel_ms": nccl / 1e3, "nccl_kernels": nccl_calls, "other_kernel_ms": other / 1e3,
            "gpu_busy_ms": busy / 1e3,
            "top_kernels_ms": {k: v / 1e3 for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:16]}}


def _settings(items: list[str] | None) -> list[dict]:
    """["reorder_for_compute_comm_overlap=true", "a=1,b=all"] -> one {key: bool | int | str} per
    item (one variant each; keys checked here)."""
    import torch._inductor.config as ic

    out = []
    for item in items or []:
        variant = {}
        for it in item.split(","):
            k, sep, v = it.partition("=")
            if not sep or k not in ic._config:
                raise SystemExit(f"--inductor {item}: not KEY=VALUE[,KEY=VALUE] with KEY a torch._inductor.config setting")
            variant[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
        out.append(variant)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--flags", default=BEST, help=f"dittune's engine flags for every row (default: {BEST})")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--gpus", type=int, choices=(2, 4), default=2, help="GPUs of the parallel rows (4: TP x Ulysses)")
    ap.add_argument("--diffusers-tp", action="store_true", help="accepted for old command lines: diffusers' TP row is always in")
    ap.add_argument("--only", nargs="+", choices=("ulysses", "ring", "cfg", "tp"), default=None,
                    help="only the layouts (and diffusers rows) of these dimensions, beside the 1-GPU rows")
    ap.add_argument("--profile", action="store_true", help="kernel time of one step of the first --only layout (default Ulysses-2)")
    ap.add_argument("--inductor", nargs="+", default=None, metavar="KEY=VALUE",
                    help="run each layout again under each KEY=VALUE[,KEY=VALUE] group of torch._inductor.config settings (an experiment's rows)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from dittune.engine.parallel import launch

    models = a.models or (["flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny"] if a.tiny else ["flux-dev", "qwen-image", "z-image-turbo"])
    flags = "" if a.device == "cpu" and a.flags == BEST else a.flags
    table = []
    for m in models:
        tokens = 16 if a.tiny else (512 if m.startswith("flux") else 128)
        payload = {"model": m, "size": 64 if a.tiny else a.size, "tokens": tokens, "warmup": a.warmup, "iters": a.iters,
                   "flags": flags, "tiny": a.tiny, "no_graphs": a.no_graphs, "no_diffusers": a.no_diffusers,
                   "profile": a.profile, "only": a.only, "inductor": _settings(a.inductor)}
        sys.path.insert(0, str(Path(__file__).parent))
        rows = launch.run(a.gpus, "bench_parallel:bench_rank", payload, "nccl" if a.device == "cuda" else "gloo")
        one = next((r["step_ms"] for r in rows if r.get("gpus") == 1 and "step_ms" in r and "cuda-graph" in r["config"]),
                   next((r["step_ms"] for r in rows if r.get("gpus") == 1 and "step_ms" in r), None))
        for r in rows:
            r["model"] = m
            if "step_ms" in r and one:
                r["speedup_vs_1gpu"] = one / r["step_ms"]
            print(json.dumps(r), flush=True)
        table += rows
    if a.json:
        import torch

        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
                                            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "rows": table}, indent=2))
    print(f"\n{'model':16} {'config':92} {'step ms':>8} {'x 1GPU':>7} {'peak GiB/GPU':>14} {'rel diff':>9}")
    for r in table:
        if "step_ms" not in r:
            print(f"{r['model']:16} {r['config'][-92:]:92} {r.get('error', json.dumps(r)[:60])}")
            continue
        pk = "/".join(f"{p / 2**30:.1f}" for p in r.get("peak_bytes") or [] if p) or "-"
        sp = f"{r['speedup_vs_1gpu']:.3f}" if r.get("speedup_vs_1gpu") else "-"
        rd = f"{r['rel_diff_vs_1gpu']:.1e}" if r.get("rel_diff_vs_1gpu") is not None else "-"
        print(f"{r['model']:16} {r['config'][-92:]:92} {r['step_ms']:8.2f} {sp:>7} {pk:>14} {rd:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
