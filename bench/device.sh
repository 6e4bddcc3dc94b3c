#!/usr/bin/env bash
# Runs on the device machine (see ../shared/device/README.md): install the project, then one named
# stage that fits a 10-minute call. Logs and JSON go to $OUT (default ./out).
#   bash bench/device.sh STAGE...   (gpu-tests gpu-idle flags-a flags-b flags-c flags-e flags-i e2e profile cold tune winner
#   par-gen tp-bench tp-proto tune2 pool fa4 flashinfer budget-tune budget kernels ncu micro configs kernel-tests;
#   tune and winner need TUNE_DB=file, tune takes TUNE_ARGS such as --vram-budget 24GiB)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ! (cd /tmp && PYTHONPATH=/tmp/site python3 -c "import dittune.engine, dittune.db" 2>/dev/null); then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-/tmp/site} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
# flash-attn 4's CUTLASS DSL, where the fa4 stage installed it (its .pth is not read from a --target folder)
[ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] && export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# Several stages may share one call: each gets at most what is left of DEADLINE seconds.
DEADLINE=${DEADLINE:-585}; T0=$(date +%s)
left() { local l=$(( DEADLINE - ($(date +%s) - T0) )); (( l > $1 )) && l=$1; (( l < 5 )) && l=5; echo $l; }
# need DIR WHEEL:MODULE...: install DIR/WHEEL-*.whl into /tmp/site where MODULE does not import already
need() {
  local dir=$1 pair; shift
  for pair in "$@"; do
    python3 -c "import ${pair#*:}" 2>/dev/null || python3 -m pip install -q --no-deps --no-index --target /tmp/site "$dir/${pair%%:*}"-*.whl
  done
}
stage() {
  case "$1" in
  gpu-tests)
    timeout "$(left 400)" python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1
    echo "gpu-tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -15 ;;
  flags-a)  # attention backends, compile, fused, component offloads
    timeout "$(left 560)" python3 bench/bench_flags.py --no-diffusers --json "$OUT/flags_a.json" \
      --only default,cudnn,flash,efficient,sage,compile-regional,fused,te+vae-offload,dit-cpu-offload > "$OUT/flags_a.log" 2>&1
    echo "flags-a rc=$?"; tail -12 "$OUT/flags_a.log" ;;
  flags-b)  # layerwise ladder, full compile, diffusers group offload in the same run
    timeout "$(left 560)" python3 bench/bench_flags.py --json "$OUT/flags_b.json" \
      --only layerwise-p1,layerwise-p2,layerwise-p4,layerwise-r20,layerwise-r40,compile-full > "$OUT/flags_b.log" 2>&1
    echo "flags-b rc=$?"; tail -10 "$OUT/flags_b.log" ;;
  flags-c)  # CUDA graphs, the fast path, spread residency, the fast path under 24 and 16 GiB budgets
    timeout "$(left 560)" python3 bench/bench_flags.py --no-diffusers --json "$OUT/flags_c.json" \
      --only cuda-graph,best-no-graph,best,layerwise-p1,layerwise-r20,layerwise-r40,b24-r28,b24-r32,b16-r8,b16-r12 > "$OUT/flags_c.log" 2>&1
    echo "flags-c rc=$?"; tail -13 "$OUT/flags_c.log" ;;
  cold)  # cold start of the fast path: fresh process, empty compile cache, load + compile + first request
    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d)
    timeout "$(left 240)" dittune generate --model flux-dev --attention-backend torch_cudnn_sdpa \
      --fused-kernels --enable-torch-compile --enable-cuda-graph --perf-dump-path "$OUT/cold.json" --output "$OUT/cold.png" > "$OUT/cold.log" 2>&1
    echo "cold rc=$?"; tail -3 "$OUT/cold.log"
    python3 -c "import json; d=json.load(open('$OUT/cold.json')); print('cold_start', d['cold_start'], 'step', d['step_median_s'])" ;;
  flags-e)  # budgets with the text encoders streamed: resident counts the memory model now allows
    timeout "$(left 560)" python3 bench/bench_flags.py --no-diffusers --json "$OUT/flags_e.json" \
      --only best,b24-r40,b24-r44,b24-r46,b16-r20,b16-r24,b16-r26,layerwise-p1 > "$OUT/flags_e.log" 2>&1
    echo "flags-e rc=$?"; tail -11 "$OUT/flags_e.log" ;;
  flags-i)  # idle offload under 16 and 24 GiB budgets, beside the resident best and whole-DiT offload
    timeout "$(left 560)" python3 bench/bench_flags.py --no-diffusers --json "$OUT/flags_i.json" \
      --only best,b16-r26,b16-i32,b16-i34,b16-i36,b16-i38,b24-r46,b24-i52,b24-i54,b24-dit-offload > "$OUT/flags_i.log" 2>&1
    echo "flags-i rc=$?"; tail -12 "$OUT/flags_i.log" ;;
  gpu-idle)  # the GPU parity test of the idle-offload row only
    timeout "$(left 200)" python3 -m pytest -m gpu -q -p no:cacheprovider tests/engine/test_flags_apply.py -k "idle" > "$OUT/gpu_idle.log" 2>&1
    echo "gpu-idle rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_idle.log" | tail -8 ;;
  winner)  # the tuner's recommended command through `dittune generate` vs the single-flag rows, same call
    db=${TUNE_DB:?set TUNE_DB to the database file}
    cmd=$(dittune export --model flux-dev --format sh --db "sqlite:///$db" | grep '^dittune generate' | head -1)
    echo "recommended: $cmd"
    timeout "$(left 200)" $cmd --warmup 1 --perf-dump-path "$OUT/winner.json" --output "$OUT/winner.png" > "$OUT/winner.log" 2>&1
    echo "winner rc=$?"; tail -2 "$OUT/winner.log"
    timeout "$(left 400)" python3 bench/bench_flags.py --no-diffusers --steps 28 --json "$OUT/single_flags.json" \
      --only default,cudnn,flash,efficient,compile-regional,fused,cuda-graph,te+vae-offload,dit-cpu-offload > "$OUT/single_flags.log" 2>&1
    echo "single flags rc=$?"; tail -11 "$OUT/single_flags.log" ;;
  e2e)
    timeout "$(left 560)" python3 bench/bench_e2e.py --json "$OUT/e2e.json" ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1
    echo "e2e rc=$?"; tail -14 "$OUT/e2e.log" ;;
  kernels)  # the attention kernel by input layout (dittune's vs diffusers'), L2 warm and flushed, with SM clocks
    timeout "$(left 120)" python3 bench/bench_kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; tail -26 "$OUT/kernels.log" ;;
  profile)  # one forward per model, dittune's fast path vs diffusers eager, kernel by kernel
    for m in ${PROFILE_MODELS:-flux-dev qwen-image z-image-turbo}; do
      timeout "$(left 200)" python3 bench/profile_step.py --model "$m" --json "$OUT/profile_$m.json" \
        --flags="${PROFILE_FLAGS:---attention-backend torch_cudnn_sdpa --fused-kernels --enable-torch-compile}" > "$OUT/profile_$m.log" 2>&1
      echo "profile $m rc=$?"; grep -A7 "^== " "$OUT/profile_$m.log" | grep -v "^--"
    done ;;
  ncu)  # one compiled forward per model under Nsight Compute: each kernel's time, DRAM bytes, bandwidth
        # (NCU_ARGS="--launch-count N": its first N kernels only, for a forward too long to replay whole)
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$NCU" ] || { echo "ncu: not found"; return; }
    gbps=$(python3 -c "import torch, triton.testing as tt; x = torch.empty(2**29, dtype=torch.bfloat16, device='cuda'); y = torch.empty_like(x); ms = tt.do_bench(lambda: y.copy_(x), return_mode='median'); print(round(2 * x.numel() * 2 / ms / 1e6))")
    echo "copy bandwidth: $gbps GB/s"
    for m in ${NCU_MODELS:-z-image-turbo flux-dev qwen-image}; do
      timeout "$(left 300)" "$NCU" --profile-from-start off --clock-control none --target-processes application-only ${NCU_ARGS:-} \
        --print-units base --csv --page raw --log-file "$OUT/ncu_$m.csv" --metrics \
gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_elapsed.avg.per_second,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed \
        python3 bench/profile_step.py --model "$m" --ncu \
        --flags="${PROFILE_FLAGS:---attention-backend torch_cudnn_sdpa --fused-kernels --enable-torch-compile}" > "$OUT/ncu_$m.log" 2>&1
      echo "ncu $m rc=$?"; tail -3 "$OUT/ncu_$m.log"
      python3 bench/ncu_table.py "$OUT/ncu_$m.csv" --copy-gbps "$gbps" --json "$OUT/ncu_$m.json" --top 25 > "$OUT/ncu_$m.md" 2>&1
      head -40 "$OUT/ncu_$m.md"
    done ;;
  configs)  # launch configurations of the fused kernels at the models' shapes (bench_fused_configs.py)
    timeout "$(left 200)" python3 bench/bench_fused_configs.py --json "$OUT/fused_configs.json" > "$OUT/fused_configs.log" 2>&1
    echo "configs rc=$?"; sed -n '/^model /,$p' "$OUT/fused_configs.log" ;;
  kernel-tests)  # the kernels' GPU tests only
    timeout "$(left 200)" python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels > "$OUT/gpu_kernel_tests.log" 2>&1
    echo "kernel-tests rc=$?"; tail -3 "$OUT/gpu_kernel_tests.log" ;;
  micro)  # the fused kernels against their torch references at the models' shapes (GB/s of the bytes they need)
    for k in qk_norm_rope residual modulation rmsnorm; do
      timeout "$(left 120)" python3 -m dittune.kernels.$k >> "$OUT/micro.log" 2>&1; echo "micro $k rc=$?"
    done; cat "$OUT/micro.log" ;;
  tune)  # resumable: carry the SQLite file back and forth; each call stops itself before the limit
    db=${TUNE_DB:?set TUNE_DB to the database file}
    timeout "$(left 580)" dittune tune flux-dev --trials 30 --timeout $(( $(left 580) - 60 )) --trial-timeout 5m \
      --db "sqlite:///$db" ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
    echo "tune rc=$?"; tail -25 "$OUT/tune.log"; cp "$db" "$OUT/" ;;
  par-gen)  # FLUX.1-dev on 2 GPUs through `dittune generate`, fast flags: Ulysses-2, then TP-2. A run still
            # going after PAR_GEN_LIMIT s gets SIGUSR1 (every rank prints its Python stacks), then SIGKILL.
    for lay in "--ulysses-degree 2" "--tp-size 2"; do
      n=$(echo "$lay" | tr -d ' -'); lim=$(left ${PAR_GEN_LIMIT:-170}); t0=$(date +%s)
      setsid dittune generate --model flux-dev --num-gpus 2 $lay --attention-backend torch_cudnn_sdpa --fused-kernels \
        --enable-torch-compile --enable-cuda-graph --warmup 1 --perf-dump-path "$OUT/gen_$n.json" > "$OUT/gen_$n.log" 2>&1 &
      pid=$!
      while kill -0 $pid 2>/dev/null && (( $(date +%s) - t0 < lim )); do sleep 1; done
      if kill -0 $pid 2>/dev/null; then
        echo "gen $n: still running after $lim s: stacks, then killed"; kill -USR1 -- -$pid; sleep 5; kill -9 -- -$pid
      fi
      wait $pid; echo "gen $n rc=$? wall=$(( $(date +%s) - t0 )) s"; tail -4 "$OUT/gen_$n.log"
      [ -f "$OUT/gen_$n.json" ] && python3 -c "import json; d=json.load(open('$OUT/gen_$n.json')); print('latency', d['latency_s'], 'step', d['step_median_s'], 'cold', d['cold_start'].get('load_s'), d['cold_start'].get('first_request_s'), 'alloc', d.get('manifest', {}).get('allocator'))"
    done ;;
  tp-bench)  # FLUX TP-2 step: rows, the same under two inductor settings, and a kernel profile of one step
    PYTHONPATH=bench:$PYTHONPATH timeout "$(left 400)" python3 bench/bench_parallel.py --models flux-dev --only tp --no-diffusers \
      --profile --inductor reorder_for_compute_comm_overlap=true bucket_all_reduces_fx=all --json "$OUT/tp_bench.json" > "$OUT/tp_bench.log" 2>&1
    echo "tp-bench rc=$?"; tail -8 "$OUT/tp_bench.log"
    python3 -c "import json; r=[x for x in json.load(open('$OUT/tp_bench.json'))['rows'] if 'wall_ms' in x]; print(json.dumps(r, indent=1))" ;;
  tp-proto)  # the FLUX TP-2 rows under each NCCL protocol (the all-reduce ran ring LL at ~130 GB/s); a bench
             # builds its CPU reference first (over a minute for FLUX): give each run 300 s
    for proto in ${PROTOS:-Simple LL128}; do
      NCCL_PROTO=$proto PYTHONPATH=bench:$PYTHONPATH timeout "$(left 300)" python3 bench/bench_parallel.py --models flux-dev \
        --only tp --no-diffusers --json "$OUT/tp_$proto.json" > "$OUT/tp_$proto.log" 2>&1
      echo "tp-proto $proto rc=$?"; tail -3 "$OUT/tp_$proto.log"
    done ;;
  tune2)  # TUNE_MODEL on both GPUs with the fast flags fixed (the layouts searched), then recommend per GPU count
    m=${TUNE_MODEL:-flux-dev}; db="$OUT/tune_${m//-/_}_2xh200.db"
    timeout "$(left 580)" dittune tune "$m" --gpus 0,1 --trials ${TUNE_TRIALS:-3} --confirm ${TUNE_CONFIRM:-0} --trial-timeout 200 \
      --timeout $(( $(left 580) - 20 )) --db "sqlite:///$db" --fix attention-backend=torch_cudnn_sdpa --fix enable-torch-compile=true \
      --fix fused-kernels=true --fix enable-cuda-graph=true ${TUNE_ARGS:-} > "$OUT/tune2_$m.log" 2>&1
    echo "tune2 $m rc=$?"; tail -22 "$OUT/tune2_$m.log"
    for n in 1 2; do dittune recommend "$m" --num-gpus $n --db "sqlite:///$db" --format json > "$OUT/rec_${m}_$n.json" 2>&1; echo "recommend --num-gpus $n:"; head -c 900 "$OUT/rec_${m}_$n.json"; echo; done ;;
  pool)  # a single-GPU study alone on GPU 0, then side by side on GPUs 0 and 1 (bench/bench_tuner.py pool)
    timeout "$(left 590)" python3 bench/bench_tuner.py pool --model ${POOL_MODEL:-z-image-turbo} --trials ${POOL_TRIALS:-16} \
      --confirm ${POOL_CONFIRM:-1} --out "$OUT" -- ${POOL_ARGS:-} > "$OUT/pool.log" 2>&1
    echo "pool rc=$?"; tail -8 "$OUT/pool.log" ;;
  fa4)  # flash-attn 4 carried in parts (bench/big_parts.sh): gathered in /tmp/parts call by call, installed
    # into /tmp/site once every wheel checks out; what the machine already has is not shadowed
    mkdir -p /tmp/parts; for d in .big/p*; do [ -d "$d" ] && cp "$d"/* /tmp/parts/; done
    ( cd /tmp/parts
      for base in $(ls *.part-* 2>/dev/null | sed 's/\.part-.*//' | sort -u); do cat "$base".part-* > "$base"; done
      if [ -f SHA256SUMS ] && sha256sum -c --quiet SHA256SUMS; then
        for w in nvidia_cutlass_dsl*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
        need . einops:einops apache_tvm_ffi:tvm_ffi torch_c_dlpack_ext:torch_c_dlpack_ext quack_kernels:quack \
               cuda_bindings:cuda.bindings protobuf:google.protobuf flash_attn_4:flash_attn.cute
        echo "fa4: installed"
      else echo "fa4: parts gathered: $(ls /tmp/parts | tr '\n' ' ')"; fi )
    [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] && export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
    python3 -c "from dittune.engine.attention import available_backends as a; print('attention backends:', a('cuda'))" ;;
  flashinfer)  # flashinfer (its JIT builds kernels with the machine's nvcc on first use) from .big/fi, the
    # wheels of bench/big_parts.sh's note; installed into /tmp/site where the machine lacks them
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0}
    export PATH=$CUDA_HOME/bin:$PATH
    need .big/fi flashinfer_python:flashinfer click:click ninja:ninja tabulate:tabulate tqdm:tqdm einops:einops \
         apache_tvm_ffi:tvm_ffi nvidia_ml_py:pynvml
    python3 -c "from dittune.engine.attention import available_backends as a; print('attention backends:', a('cuda'))" ;;
  budget-tune)  # the budget study's tune alone (SIGTERM before the limit: saved, resumed by `budget` in the next call)
    timeout "$(left 590)" python3 -m dittune tune ${DITTUNE_GPU_BUDGET_MODEL:-flux-dev} --vram-budget ${DITTUNE_GPU_BUDGET:-24GiB} \
      --trials ${DITTUNE_GPU_BUDGET_TRIALS:-3} --gpus 0 --confirm 1 --db sqlite:////tmp/budget.db > "$OUT/budget_tune.log" 2>&1
    echo "budget-tune rc=$?"; cp /tmp/budget.db "$OUT/" 2>/dev/null; tail -5 "$OUT/budget_tune.log" ;;
  budget)  # FLUX under 24 GiB: tune (resuming /tmp/budget.db if budget-tune began it), recommend, the recommended
    # command watched through NVML (tests/tuner/test_budget_gpu.py)
    [ -f /tmp/budget.db ] && export DITTUNE_GPU_BUDGET_DB=/tmp/budget.db
    timeout "$(left 590)" python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/tuner/test_budget_gpu.py > "$OUT/budget.log" 2>&1
    echo "budget rc=$?"; cp /tmp/budget.db "$OUT/" 2>/dev/null; grep -E "under|passed|failed|Error|assert" "$OUT/budget.log" | tail -12 ;;
  *) echo "usage: bash bench/device.sh STAGE... (gpu-tests gpu-idle flags-a flags-b flags-c flags-e flags-i e2e profile cold tune winner par-gen tp-bench tp-proto tune2 pool fa4 flashinfer budget-tune budget kernels ncu micro configs kernel-tests)"; exit 2 ;;
  esac
}
for s in "$@"; do stage "$s"; done
