# Shared by scripts/serve and scripts/check-real-checkpoint (source it; it runs nothing itself).
#   gpu_name          prints the first NVIDIA GPU's name, or fails when `nvidia-smi -L` lists none
#   build_cuda_here   builds target/release/gazelle with --features cuda for this machine: with
#                     the system nvcc (CUDA_COMPUTE_CAP from nvidia-smi) or, without one, with
#                     scripts/build-cuda's CUDA 13.0 toolchain from PyPI, and then exports what
#                     the binary needs to run. A caller may define `run` (e.g. to print commands
#                     in a dry run; then nothing is exported).

gpu_name() {
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  local line
  line="$(nvidia-smi -L 2>/dev/null | grep -m1 '^GPU ')" || return 1
  line="${line#*: }"
  echo "${line%% (*}"
}

build_cuda_here() {
  local runner=()
  declare -F run >/dev/null && runner=(run)
  if command -v nvcc >/dev/null 2>&1; then
    local cap
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)"
    "${runner[@]}" env CUDA_COMPUTE_CAP="${cap:-90}" cargo build --quiet --release --features cuda
  else
    echo "$(basename "$0"): no nvcc on PATH: building with scripts/build-cuda's CUDA 13.0 toolchain from PyPI" >&2
    "${runner[@]}" env SKIP_TESTS=1 scripts/build-cuda
    if [ "${DRY:-0}" = 0 ]; then
      eval "$(scripts/build-cuda --env)"
      export LD_LIBRARY_PATH="$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
}
