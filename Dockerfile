# syntax=docker/dockerfile:1
#
# gazelle images, CPU and CUDA, from one file (BuildKit is needed: Docker 23+ uses it by default).
#
#   docker build --target cpu  -t gazelle:cpu  .
#   docker build --target cuda -t gazelle:cuda .            # CUDA 13.0, sm_90 (H100/H200)
#   docker build --target cuda --build-arg CUDA_COMPUTE_CAP=89 -t gazelle:cuda-sm89 .
#
#   docker run --rm -p 3000:3000 gazelle:cpu                                  # scripted model
#   docker run --rm -p 3000:3000 gazelle:cpu serve --host 0.0.0.0 \
#       --slm-url http://vllm:8000 --slm-model fixie-ai/ultravox-v0_5-llama-3_1-8b
#   docker run --rm --gpus all -p 3000:3000 -v gazelle-hf:/var/lib/gazelle gazelle:cuda \
#       serve --host 0.0.0.0 --model tincans-ai/gazelle-v0.2 --device cuda
#
# SIGTERM drains the server (see README "Stopping: the drain"): live calls go on for up to
# server.drain_timeout_ms (30 s) plus at most 15 s of goodbye. `docker stop` waits only 10 s by
# default, so stop with `docker stop -t 50`.
#
# The last stage is `cuda`, so a build without --target gives the CUDA image.

ARG RUST_IMAGE=rust:1-bookworm
# The 13.0 line on purpose: PTX from a newer nvcc does not load on a CUDA 13.0 driver (580),
# the one the project's GPU machines run (scripts/build-cuda pins nvcc 13.0.88 = 13.0.2 for the
# same reason). Raise both together when the drivers allow it.
ARG CUDA_VERSION=13.0.2
ARG CUDA_UBUNTU=ubuntu24.04

# ---- the Rust toolchain ------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS rust

# ---- runtime files cargo cannot provide (scripts/setup) ----------------------------------------
# ONNX Runtime (PyPI onnxruntime wheel), the Silero VAD model, the Smart Turn v3.2 end-of-turn
# model (SHA-256 checked, with its BSD-2 licence) and libespeak-ng with its data. scripts/setup
# needs only python3 with pip (it downloads wheels and unzips them; it installs nothing).
FROM python:3.11-slim-bookworm AS assets
WORKDIR /src
COPY scripts/setup scripts/setup
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN GAZELLE_CACHE=/opt/gazelle/assets scripts/setup \
 && for lib in /opt/gazelle/assets/onnxruntime/libonnxruntime.so.*; do \
      ln -s "${lib##*/}" /opt/gazelle/assets/onnxruntime/libonnxruntime.so; \
    done

# ---- CPU build ---------------------------------------------------------------------------------
FROM rust AS build-cpu
WORKDIR /src
COPY . .
# The binary embeds frontend/dist (committed), so Node is not needed here.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=gazelle-target-cpu \
    cargo build --release --locked --bin gazelle \
 && install -D -m 0755 target/release/gazelle /out/gazelle

# ---- CUDA build --------------------------------------------------------------------------------
# NVIDIA's devel image has nvcc, the CUDA libraries and the libcuda.so link stub, which
# scripts/build-cuda otherwise takes from PyPI wheels and Debian's libcuda1.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS build-cuda
ARG CUDA_COMPUTE_CAP=90
# Versions are left to the Ubuntu release the CUDA tag pins; its security updates replace
# exact versions, which would break a pinned build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc g++ libc6-dev make pkg-config \
 && rm -rf /var/lib/apt/lists/*
# rustup's toolchains run on any glibc >= 2.17, so the official image's copy works on Ubuntu.
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:$PATH \
    CUDA_ROOT=/usr/local/cuda \
    CUDA_HOME=/usr/local/cuda \
    CUDA_PATH=/usr/local/cuda \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib64/stubs
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=gazelle-target-cuda \
    nvcc --version \
 && cargo build --release --locked --features cuda --bin gazelle \
 && install -D -m 0755 target/release/gazelle /out/gazelle

# ---- CPU runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim AS cpu
# The binary, libonnxruntime and libespeak-ng need only glibc, libstdc++ and libgcc, which the
# base image has (apt depends on them). ca-certificates: reqwest verifies TLS against the system
# store (network TTS providers, a hosted model API, Hub downloads).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gazelle \
 && useradd --system --uid 10001 --gid gazelle --home-dir /var/lib/gazelle --create-home \
      --shell /usr/sbin/nologin gazelle
COPY --from=assets /opt/gazelle/assets /opt/gazelle/assets
COPY --from=build-cpu /out/gazelle /usr/local/bin/gazelle
# What src/assets.rs reads; GAZELLE_CACHE alone would do, the others make each file explicit.
ENV GAZELLE_CACHE=/opt/gazelle/assets \
    GAZELLE_ORT_LIB=/opt/gazelle/assets/onnxruntime/libonnxruntime.so \
    GAZELLE_VAD_MODEL=/opt/gazelle/assets/silero_vad.onnx \
    GAZELLE_TURN_MODEL=/opt/gazelle/assets/smart-turn-v3.2-cpu.onnx \
    GAZELLE_ESPEAK_DIR=/opt/gazelle/assets/espeak-ng \
    HF_HOME=/var/lib/gazelle/huggingface
USER 10001:10001
WORKDIR /var/lib/gazelle
EXPOSE 3000
# For plain Docker only (Kubernetes uses its own probes): /health is 200 once calls can start,
# 503 while the model loads, after a failed load and while draining. No curl in the image, so
# bash's /dev/tcp does the request. Assumes the default port 3000.
HEALTHCHECK --interval=15s --timeout=3s --start-period=15m --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/3000 && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# gazelle runs as PID 1 and handles SIGTERM/SIGINT itself (the drain). Arguments given to
# `docker run` (or Kubernetes `args`) replace the CMD, so they start with `serve`.
ENTRYPOINT ["gazelle"]
CMD ["serve", "--host", "0.0.0.0"]

# ---- CUDA runtime ------------------------------------------------------------------------------
# The runtime image carries libcudart, cuBLAS, cuRAND and NVRTC; libcuda comes from the host's
# driver through the NVIDIA container toolkit (`--gpus all`, or the device plugin in Kubernetes).
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gazelle \
 && useradd --system --uid 10001 --gid gazelle --home-dir /var/lib/gazelle --create-home \
      --shell /usr/sbin/nologin gazelle
COPY --from=assets /opt/gazelle/assets /opt/gazelle/assets
COPY --from=build-cuda /out/gazelle /usr/local/bin/gazelle
# HF_HOME: the Gazelle weights (14.7 GB) land here; mount a volume on /var/lib/gazelle to keep
# them across restarts, or pre-fill it and serve with --offline.
ENV GAZELLE_CACHE=/opt/gazelle/assets \
    GAZELLE_ORT_LIB=/opt/gazelle/assets/onnxruntime/libonnxruntime.so \
    GAZELLE_VAD_MODEL=/opt/gazelle/assets/silero_vad.onnx \
    GAZELLE_TURN_MODEL=/opt/gazelle/assets/smart-turn-v3.2-cpu.onnx \
    GAZELLE_ESPEAK_DIR=/opt/gazelle/assets/espeak-ng \
    HF_HOME=/var/lib/gazelle/huggingface
USER 10001:10001
WORKDIR /var/lib/gazelle
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=15m --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/3000 && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["gazelle"]
CMD ["serve", "--host", "0.0.0.0"]
