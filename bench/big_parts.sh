#!/usr/bin/env bash
# Splits the optional attention kernels' wheels (flash-attn 4 and its CUTLASS DSL, about 110 MB)
# into folders .big/p0, .big/p1 that fit one device call's 64 MiB carry each, next to .whl. Carry
# them in back-to-back calls (`bash bench/device.sh fa4` in each); the last one installs into /tmp/site.
#   bash bench/big_parts.sh DIR   (DIR: the wheels from `pip download --no-deps --python-version 3.12
#   --only-binary=:all: --platform manylinux_2_28_x86_64 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1
#   nvidia-cutlass-dsl-libs-{base,core,cu13}==4.8.1 einops apache-tvm-ffi torch-c-dlpack-ext quack-kernels
#   cuda-bindings protobuf`)
# flashinfer travels in one call: .big/fi holds flashinfer-python 0.6.6 (7.8 MB; 0.7.x is 101 MB) and
# the wheels it imports (click ninja tabulate tqdm einops apache-tvm-ffi nvidia-ml-py), for device.sh's
# flashinfer stage.
set -euo pipefail
src=$(cd "$1" && pwd); cd "$(dirname "$0")/.."
rm -rf .big && mkdir -p .big/p0 .big/p1
big=$(ls "$src"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -n 2 "$big" ".big/p0/$(basename "$big").part-"
mv .big/p0/*.part-ab .big/p1/
for w in "$src"/*.whl; do
  case "$(basename "$w")" in
    nvidia_cutlass_dsl_libs_cu13-*) ;;
    flash_attn_4-*|nvidia_cutlass_dsl-*|nvidia_cutlass_dsl_libs_*|cuda_bindings-*|protobuf-*|quack_kernels-*|torch_c_dlpack_ext-*) cp "$w" .big/p1/ ;;
    *) cp "$w" .big/p0/ ;;
  esac
done
(cd "$src" && sha256sum *.whl) > .big/p1/SHA256SUMS
du -sh .big/p*
