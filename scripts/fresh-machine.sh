#!/usr/bin/env bash
# Proves the README's "Run it" on a machine that has only what a new machine ships: a minimal
# Debian bookworm root made with debootstrap, a clean clone of this repository copied into it,
# the host's Rust toolchain bind-mounted read-only (it cannot be fetched). Inside, as a new user
# would: `./scripts/install-deps.sh`, `cargo build --release --locked`, then `./scripts/run-local.sh`
# until the README's curl example answers exactly what the README prints, and the rows it sent
# are read back from the MergeTree with the README's own SELECT.
#
# A step that fails names itself and the check exits non-zero: a build or run dependency missing
# from install-deps.sh turns CI red here even when the CI machine itself still has it.
#
# The debootstrapped root is cached outside the clone (FRESH_ROOT_CACHE, default
# /var/cache/buffergate/fresh-root) and never written to after it is made: every run works on a
# throwaway overlay above it, so what one run installs is gone for the next. The Debian mirror,
# the apt sources and the trusted CA certificates are the host's own, read at run time.
#   usage: sudo scripts/fresh-machine.sh [--tests]
#   --tests   also run the README's test command (./scripts/test.sh) inside the fresh root
set -Eeuo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
run_tests=0
[ "${1:-}" = "--tests" ] && run_tests=1

cache=${FRESH_ROOT_CACHE:-/var/cache/buffergate/fresh-root}
# What a new machine of this project's kind ships besides a minimal Debian, and no more: the
# compilers, git, curl, Python with pip. Everything else must come from install-deps.sh.
packages=ca-certificates,curl,git,gcc,g++,make,libc6-dev,python3,python3-pip,procps
base=$cache/base-$(printf '%s' "$packages" | sha256sum | cut -c1-12)

step=""
fail() { echo "fresh-machine.sh: FAILED at step: $step" >&2; }
trap fail ERR
begin() { step=$1; echo "==> fresh-machine [${SECONDS} s]: $step"; }

[ "$(id -u)" -eq 0 ] || { echo "fresh-machine.sh needs root (debootstrap, mount, chroot)" >&2; exit 1; }

# The host's Debian mirror: the first URI of a bookworm suite in its apt sources (deb822 or
# one-line form).
mirror() {
  local uri
  uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' \
          /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' \
          /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  [ -n "$uri" ] || { echo "no bookworm mirror in the host's apt sources" >&2; return 1; }
  echo "$uri"
}

begin "the cached bookworm root ($base)"
if [ ! -e "$base/.complete" ]; then
  command -v debootstrap >/dev/null 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
  }
  rm -rf "$base"
  mkdir -p "$cache"
  debootstrap --variant=minbase --include="$packages" bookworm "$base" "$(mirror)" >/dev/null
  # The apt lists debootstrap leaves behind would let apt install without `apt-get update`,
  # which a new machine cannot.
  rm -rf "$base/var/lib/apt/lists/"*
  touch "$base/.complete"
fi

run=$(mktemp -d /var/tmp/buffergate-fresh.XXXXXX)
root=$run/root
mkdir -p "$run/upper" "$run/work" "$root"
cleanup() {
  local p
  # Every process whose root is the fresh root (the gateway, ClickHouse) ends with the check.
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && kill -9 "${p#/proc/}" 2>/dev/null
  done
  sleep 0.5
  umount -R "$root" 2>/dev/null || umount -lR "$root" 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT

begin "a throwaway overlay over the cached root"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$run/upper,workdir=$run/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
# The machine's own network settings: its resolver, apt sources and proxy settings, the CA
# certificates it trusts (the package registries may be reached through a TLS proxy only the
# host trusts) and its pip configuration. None of it is the project's.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
rm -f "$root/etc/apt/sources.list"
cp -a /etc/apt/sources.list.d/. "$root/etc/apt/sources.list.d/" 2>/dev/null || true
[ -e /etc/apt/sources.list ] && cp /etc/apt/sources.list "$root/etc/apt/sources.list"
cp -a /etc/apt/apt.conf.d/. "$root/etc/apt/apt.conf.d/" 2>/dev/null || true
cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
[ -e /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
chroot "$root" update-ca-certificates >/dev/null 2>&1

begin "the host's Rust toolchain, read-only"
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
mkdir -p "$root/opt/rustup" "$root/opt/cargo-bin" "$root/root/.cargo"
mount --bind "$rustup_home" "$root/opt/rustup" && mount -o remount,bind,ro "$root/opt/rustup"
mount --bind "$cargo_bin" "$root/opt/cargo-bin" && mount -o remount,bind,ro "$root/opt/cargo-bin"

begin "a clean clone of $(git -C "$repo" rev-parse --short HEAD)"
git clone --quiet --no-hardlinks "$repo" "$root/root/buffergate"

# A clean environment, as a login on the new machine would have: nothing of this shell's
# variables but the CA bundle's location (for cargo, pip, curl and Python's ssl).
bundle=/etc/ssl/certs/ca-certificates.crt
in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUSTUP_HOME=/opt/rustup RUSTUP_AUTO_INSTALL=0 CARGO_HOME=/root/.cargo \
    SSL_CERT_FILE=$bundle CURL_CA_BUNDLE=$bundle PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle \
    GIT_SSL_CAINFO=$bundle \
    /bin/bash -c "cd /root/buffergate && $1"
}

begin "./scripts/install-deps.sh"
in_root ./scripts/install-deps.sh

begin "cargo build --release --locked"
in_root 'cargo build --release --locked 2>&1 | tail -n 40; exit "${PIPESTATUS[0]}"'

# The README's example, taken from the README itself so the check cannot drift from it: the
# shell block under "Run it" that posts to localhost:8080, its first command, the answer
# printed after it, and the commands that follow (flush, then SELECT).
begin "the README's curl example, read from README.md"
python3 - "$repo/README.md" "$root" <<'PY'
import pathlib, re, sys
readme = pathlib.Path(sys.argv[1]).read_text()
blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
block = next(b for b in blocks if "localhost:8080/v1/events" in b)
lines = block.splitlines()
answer_at = next(i for i, l in enumerate(lines) if l.startswith("# {"))
out = pathlib.Path(sys.argv[2])
(out / "example-post.sh").write_text("\n".join(lines[:answer_at]) + "\n")
(out / "example-answer").write_text(lines[answer_at][2:].strip())
(out / "example-read.sh").write_text(
    "\n".join(l.split("#")[0] for l in lines[answer_at + 1:]) + "\n")
PY

# Run it in a network namespace of its own, loopback only: the ports the README uses (8080,
# 8123, 9000) cannot collide with anything on the host, and nothing reaches the network, so
# run-local.sh's own install-deps.sh must find everything in place.
begin "./scripts/run-local.sh, then the README's curl example"
unshare --net /bin/bash -s "$root" "$run" <<'NETNS'
set -Eeuo pipefail
root=$1; run=$2
ip link set lo up
chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  RUSTUP_HOME=/opt/rustup RUSTUP_AUTO_INSTALL=0 CARGO_HOME=/root/.cargo LANG=C.UTF-8 \
  /bin/bash -c 'cd /root/buffergate && exec ./scripts/run-local.sh' > "$run/run-local.log" 2>&1 &
ok=0
for _ in $(seq 1 300); do
  if chroot "$root" curl -fsS localhost:8080/readyz >/dev/null 2>&1; then ok=1; break; fi
  kill -0 $! 2>/dev/null || break
  sleep 0.5
done
if [ $ok -ne 1 ]; then
  echo "the gateway did not become ready; run-local.sh said:" >&2
  tail -n 40 "$run/run-local.log" >&2
  exit 1
fi
got=$(chroot "$root" /bin/bash /example-post.sh)
want=$(cat "$root/example-answer")
if [ "$got" != "$want" ]; then
  echo "the README's example answered: $got" >&2
  echo "the README prints:             $want" >&2
  exit 1
fi
echo "answered as the README prints: $got"
rows=$(chroot "$root" /bin/bash /example-read.sh)
echo "$rows"
for want in '42 click' '43 view'; do
  set -- $want
  grep -E "(^|[^0-9])$1([^0-9]|$)" <<<"$rows" | grep -q "$2" \
    || { echo "the README's SELECT shows no row of user $1 with $2" >&2; exit 1; }
done
NETNS

if [ $run_tests -eq 1 ]; then
  begin "./scripts/test.sh"
  in_root ./scripts/test.sh
fi
step=""
echo "==> fresh-machine [${SECONDS} s]: the README's commands work on a fresh bookworm root"
