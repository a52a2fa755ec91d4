#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml (newest versions that fit its ranges):
#   bash requirements/lock.sh
# then run the tests on them (README, "Pinned environments") and commit both files.
# Extra arguments go to `uv pip compile` (e.g. --upgrade-package tensorflow).
set -euo pipefail
cd "$(dirname "$0")/.."
common=(
    --python-version 3.11
    --python-platform x86_64-manylinux_2_28
    --custom-compile-command "bash requirements/lock.sh"
    --quiet
    "$@"
)
# Linux x86-64, CPU only (CI, laptops, CPU runners).
uv pip compile pyproject.toml --extra dev -o requirements/linux-cpu.txt "${common[@]}"
# Linux x86-64 with NVIDIA GPUs: TensorFlow's CUDA and cuDNN wheels on top.
uv pip compile pyproject.toml --extra dev --extra gpu -o requirements/linux-gpu.txt "${common[@]}"
