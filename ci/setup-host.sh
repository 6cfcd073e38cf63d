#!/usr/bin/env bash
# Install the Debian/Ubuntu packages nestvirt needs, only those missing. Idempotent.
#   ci/setup-host.sh                          host packages
#   ci/setup-host.sh --fetch-qemu NESTVIRT    QEMU 10 from bookworm-backports into the cache,
#                                             beside the system's 7.2 (`NESTVIRT qemu fetch`)
set -euo pipefail
if [ "${1:-}" = "--fetch-qemu" ]; then
  # Never fatal: without network or apt nestvirt runs on the QEMU it has, and the tests that
  # need 10.0 skip with the reason. The fetch says why in one line.
  if "$2" qemu fetch; then
    exit 0
  fi
  echo "setup: no QEMU 10 fetched (see the line above): runs use the QEMU on this host" >&2
  exit 0
fi
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
# The initramfs needs the static busybox (the dynamic one would need its libraries copied).
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
have cpio || need+=(cpio)
have gcc || need+=(gcc)
have make || need+=(make)
[ -x /usr/sbin/dropbear ] || need+=(dropbear-bin)
have zstd || need+=(zstd)
have dpkg-deb || need+=(dpkg)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# The KVM host VM's root image is packed by mkfs.ext4 -d (no root needed).
[ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
# TLS migration makes its certificates at run time with certtool.
have certtool || need+=(gnutls-bin)
# The two-host tests: network namespaces, veth, tc tbf (iproute2); unshare, setpriv (util-linux).
{ have ip && have tc; } || need+=(iproute2)
{ have unshare && have setpriv; } || need+=(util-linux)
# The HTML report's test opens the page in a real headless browser (tests/test_reports.py).
browser=""
have chromium-headless-shell || have chromium || browser=wanted
if [ ${#need[@]} -eq 0 ] && [ -z "$browser" ]; then
  echo "host packages: all present"
  exit 0
fi
echo "host packages: installing ${need[*]} ${browser:+a headless chromium}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -n "$browser" ]; then
  # Debian 12+ ships the small headless-only build; elsewhere take the full browser.
  for pkg in chromium-headless-shell chromium; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then
      $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null && break
    fi
  done
  have chromium-headless-shell || have chromium ||
    echo "host packages: no chromium package here: the HTML report's browser test will skip"
fi
