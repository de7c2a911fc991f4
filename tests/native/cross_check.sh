#!/usr/bin/env bash
# The CPU kernels built for aarch64 (NEON) with Debian's cross compiler and checked against dequantize-then-matmul
# under user-mode emulation: tests/native/kernels_check.cpp. Needs g++-aarch64-linux-gnu and qemu-user (Debian's
# packages); prints "skipped" without them. Exit status: the check's.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  echo "skipped: aarch64-linux-gnu-g++ or qemu-aarch64 missing (apt-get install g++-aarch64-linux-gnu qemu-user)"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
aarch64-linux-gnu-g++ -O2 -std=c++17 -pthread -Icsrc tests/native/kernels_check.cpp csrc/quant.cpp csrc/qmatmul.cpp \
  csrc/qmatmul_x86.cpp csrc/qmatmul_k.cpp csrc/qtiled.cpp -o "$out/kernels_check"
# twice: a CPU with the dot-product instructions (qemu's max: the sdot kernel) and one without (Cortex-A57, ARMv8.0:
# the float NEON kernel), so both NEON paths are checked
qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu "$out/kernels_check" | tee "$out/max.txt"
grep -q "NEON dot product: yes" "$out/max.txt"
qemu-aarch64 -cpu cortex-a57 -L /usr/aarch64-linux-gnu "$out/kernels_check" | tee "$out/a57.txt"
grep -q "NEON dot product: no" "$out/a57.txt"
