#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine (as root, no venv needed):
#   bash tools/run.sh demo   set everything up, then run the demo
#   bash tools/run.sh test   set everything up, then lint, type-check and test
# Set-up: the Debian packages the oracle tests use (installed when missing),
# a .venv made from Debian's python3 (with system site-packages, so the
# python3-libnbd bindings are importable), this project with its test
# and dev extras (refreshed when pyproject.toml changes), and Azurite (npm,
# pinned) in .venv/azurite, the peer tools/bench_blob.py measures against.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="python3-venv python3-dev qemu-utils libvhdi-utils libnbd-bin nbdkit fio python3-libnbd e2fsprogs"
APT_LEAN="qemu-system-x86 restic"  # installed without recommends (no GUI)
command -v npm >/dev/null || APT_LEAN="$APT_LEAN nodejs npm"  # for Azurite
AZURITE_VERSION=3.37.0
missing=()
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
lean=()
for p in $APT_LEAN; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || lean+=("$p")
done
if ((${#missing[@]} + ${#lean[@]})); then
  echo "setup: installing Debian packages: ${missing[*]} ${lean[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ((${#lean[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.diskstamp-installed 2>/dev/null)" != "$want" ]; then
  echo "setup: installing diskstamp and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import vhd, pyvhdi, pytest, hypothesis, aiohttp, azure.storage.blob.aio"
  echo "$want" > .venv/.diskstamp-installed
fi

# Azurite, locally in the (git-ignored) venv: .venv/azurite/node_modules/.bin/azurite-blob. Only the
# benchmark uses it, so a failed install (no registry) is a warning, not a stop.
if [ "$(cat .venv/azurite/.version 2>/dev/null)" != "$AZURITE_VERSION" ]; then
  echo "setup: installing Azurite $AZURITE_VERSION into .venv/azurite"
  mkdir -p .venv/azurite
  if npm install --prefix .venv/azurite --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null; then
    echo "$AZURITE_VERSION" > .venv/azurite/.version
  else
    echo "setup: WARNING: Azurite did not install; tools/bench_blob.py will measure the stamp only" >&2
  fi
fi

what="${1:-}"; shift || true
case "$what" in
  demo)
    exec .venv/bin/python tools/demo.py "$@" ;;
  test)
    echo "== ruff"; .venv/bin/ruff check vhd stamp hostcache tests tools
    echo "== mypy"; .venv/bin/mypy
    tmp="${TMPDIR:-/tmp}"
    free_gib=$(( $(df -Pk "$tmp" | awk 'NR==2 {print $4}') / 1048576 ))
    if [ "$free_gib" -lt 10 ]; then
      echo "WARNING: $tmp has $free_gib GiB free; the tests write images and stamps there and need about 10 GiB" >&2
    fi
    echo "== pytest"; exec .venv/bin/python -m pytest "$@" ;;
  *)
    echo "usage: bash tools/run.sh demo|test [args for the demo or pytest]" >&2; exit 2 ;;
esac
