#!/usr/bin/env bash
# Installs what diskferry's tests and demo need on Debian 12, and only what is missing.
# Idempotent and quiet on success; prints a clear message and exits non-zero on failure.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools/bin"
temporal_version=v1.5.1
apt_packages=(qemu-utils nbdkit libnbd-dev libnbd-bin mariadb-server openssh-server iproute2 chromium docker-compose)

fail() { echo "setup: $*" >&2; exit 1; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  echo "setup: installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq >/tmp/diskferry-apt.log 2>&1 || fail "apt-get update failed, see /tmp/diskferry-apt.log"
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/diskferry-apt.log 2>&1 \
    || fail "apt-get install ${missing[*]} failed, see /tmp/diskferry-apt.log"
fi

# go-installed binaries report 0.0.0-DEV; the module version is in the build info.
if [ ! -x "$tools/temporal" ] || ! go version -m "$tools/temporal" 2>/dev/null | grep -q "mod[[:space:]]*github.com/temporalio/cli[[:space:]]*$temporal_version"; then
  echo "setup: installing temporal CLI $temporal_version into $tools (about 6 minutes on a cold machine)"
  mkdir -p "$tools"
  GOBIN="$tools" go install "github.com/temporalio/cli/cmd/temporal@$temporal_version" >/tmp/diskferry-temporal.log 2>&1 \
    || fail "go install temporal CLI failed, see /tmp/diskferry-temporal.log"
fi
