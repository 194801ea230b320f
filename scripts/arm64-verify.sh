#!/usr/bin/env bash
# Verify bundles on emulated ARM64 CPUs: an aarch64 Debian userland run by qemu-user, with the device profile
# (export-adapter + onnxruntime/tokenizers/numpy aarch64 wheels) installed offline in it, then
# `export-adapter verify BUNDLE --json` once per CPU model. Each report records the CPU features it ran on.
#
#   scripts/arm64-verify.sh OUT_DIR BUNDLE [BUNDLE ...]
#
# ARM64_CPUS: qemu CPU models (default "cortex-a53 max": NEON only, then SVE2/i8mm/bf16/dotprod).
# ARM64_ROOT: where the userland is built once and reused (default ~/.cache/export-adapter/arm64-bookworm).
# Needs root (chroot, binfmt); apt installs mmdebstrap and qemu-user-static when missing.
# Measured: the userland takes ~9 min to build once; MiniLM's 3-variant verify ~4-10 min per CPU model.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR BUNDLE [BUNDLE ...]" >&2; exit 2; }
out=$(realpath -m "$1"); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${ARM64_ROOT:-$HOME/.cache/export-adapter/arm64-bookworm}
cpus=${ARM64_CPUS:-cortex-a53 max}
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
mkdir -p "$out"

need() { command -v "$1" >/dev/null || apt-get install -y -qq "$2" >/dev/null; }
need mmdebstrap mmdebstrap
need qemu-aarch64-static qemu-user-static
need update-binfmts binfmt-support
[ -e /proc/sys/fs/binfmt_misc/register ] || mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -x "$root/usr/bin/python3" ]; then
  echo "== building the arm64 $suite userland in $root (once)" >&2
  rm -rf "$root.part"
  # minbase + python: mmdebstrap runs the maintainer scripts emulated, ~5x less of them than debootstrap's.
  mmdebstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root.part" \
    >&2
  mv "$root.part" "$root"
fi

py=$("$root/usr/bin/python3" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null \
     || chroot "$root" python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
wheels="$root/opt/wheels"
if [ ! -f "$wheels/.done-$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo x)" ]; then
  echo "== aarch64 wheels for Python $py (device profile)" >&2
  rm -rf "$wheels" && mkdir -p "$wheels"
  python3 -m pip wheel -q --no-deps -w "$wheels" "$repo" >&2
  python3 -m pip download -q -d "$wheels" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --python-version "$py" --only-binary=:all: onnxruntime tokenizers numpy click >&2
  chroot "$root" sh -c "rm -rf /opt/venv && python3 -m venv /opt/venv && /opt/venv/bin/pip install -q --no-index \
    --find-links /opt/wheels export-adapter" >&2
  touch "$wheels/.done-$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo x)"
fi

# /proc and /dev only: with /sys mounted too, `import onnxruntime` segfaults under qemu on every CPU model.
mount --bind /proc "$root/proc"
mount --bind /dev "$root/dev"
trap 'umount "$root/proc" "$root/dev" 2>/dev/null || true; rm -rf "$root/bundles"' EXIT
rc=0
for bundle in "$@"; do
  name=$(basename "$bundle")
  rm -rf "$root/bundles/$name" && mkdir -p "$root/bundles" && cp -a "$bundle" "$root/bundles/$name"
  for cpu in $cpus; do
    echo "== verify $name on qemu -cpu $cpu" >&2
    start=$(date +%s)
    set +e
    QEMU_CPU=$cpu chroot "$root" /opt/venv/bin/export-adapter verify "/bundles/$name" --json \
      > "$out/$name.$cpu.json"
    code=$?
    set -e
    echo "   exit $code in $(( $(date +%s) - start )) s" >&2
    [ $code -eq 0 ] || rc=$code
  done
done
exit $rc
