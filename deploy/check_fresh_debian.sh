#!/usr/bin/env bash
# Release check (manual, not part of the test suite: it needs root, debootstrap and the network): the README's two
# set-up commands, exactly as written there, on a fresh Debian 12 machine.
#
#   deploy/check_fresh_debian.sh [WORKDIR]     # default /work/deb-root; the chroot is WORKDIR/fresh
#
# "Fresh Debian machine" here: a minbase bookworm (debootstrap --variant=minbase) with only python3 (what Debian's
# server/cloud images and `apt-get install python3` give: no python3-venv, no python3-pip), git (to clone) and
# ca-certificates, and the standard apt sources (bookworm, -updates, -security). No compiler, no sudo. The repository
# is a clone of this checkout's HEAD (committed work only), without shared/ beside it.
# Network: the root is made once (WORKDIR/base, kept pristine) and copied for each check. Certificates that the host
# added to its trust store (/usr/local/share/ca-certificates, e.g. a TLS-inspecting proxy's) are added to the chroot's
# too, as any machine on that network has them; nothing else is copied from the host.
#
# Command 1 runs as an ordinary user (newcomer), then its ndvi-sample.zarr is opened with xarray in the chroot.
# Command 2 runs as root (its --test-tools installs Debian packages; a user would go through sudo). CHECK_TESTS, if
# set, is passed to pytest (PYTEST_ADDOPTS) to run only some test files, e.g.
#   CHECK_TESTS="tests/test_readme.py tests/test_outputs.py" deploy/check_fresh_debian.sh
# CHECK_SKIP_TESTS=1 stops after command 1. Logs: WORKDIR/command1.log, WORKDIR/command2.log.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/work/deb-root}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=$W/base
R=$W/fresh
[[ $(id -u) == 0 ]] || { echo "error: run as root (debootstrap, chroot, mount)" >&2; exit 1; }

if [[ ! -x $BASE/usr/bin/python3 ]]; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  rm -rf "$BASE"
  mkdir -p "$W"
  echo "debootstrap: minbase bookworm + python3, ca-certificates, git -> $BASE"
  debootstrap --variant=minbase --include=python3,ca-certificates,git bookworm "$BASE" "$MIRROR" >"$W/debootstrap.log"
fi

cleanup() {
  for m in sys dev proc; do
    if mountpoint -q "$R/$m"; then umount -R "$R/$m" || umount -R -l "$R/$m"; fi
  done
}
cleanup
trap cleanup EXIT
if grep -q " $R/" /proc/mounts; then echo "error: something is still mounted under $R; not removing it" >&2; exit 1; fi
rm -rf "$R"
cp -a "$BASE" "$R"
cat >"$R/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
cp /etc/resolv.conf "$R/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
  chroot "$R" update-ca-certificates >/dev/null 2>&1
fi
chroot "$R" useradd -m -s /bin/bash newcomer
git clone -q --no-local "$REPO" "$R/home/newcomer/ndvi-scale"
chroot "$R" chown -R newcomer:newcomer /home/newcomer/ndvi-scale
git clone -q --no-local "$REPO" "$R/root/ndvi-scale"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev" && mount --make-rslave "$R/dev"
mount --rbind /sys "$R/sys" && mount --make-rslave "$R/sys"

# The two commands, from the README's Quick start (tests/test_readme.py: exactly two bash blocks there).
mapfile -t CMDS < <(python3 - "$REPO/README.md" <<'EOF'
import re, sys
quick = open(sys.argv[1], encoding="utf-8").read().split("## Quick start", 1)[1].split("\n## ", 1)[0]
for block in re.findall(r"```bash\n(.*?)```", quick, flags=re.S):
    print(block.strip())
EOF
)
(( ${#CMDS[@]} == 2 )) || { echo "error: expected 2 commands in the README's Quick start" >&2; exit 1; }
PATHS=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
in_chroot() {  # USER COMMAND...: a login-like clean environment, in the user's clone
  local user=$1 home; shift
  home=$([[ $user == root ]] && echo /root || echo "/home/$user")
  chroot --userspec="$user:$user" "$R" /usr/bin/env -i HOME="$home" USER="$user" PATH="$PATHS" LANG=C.UTF-8 \
    ${PYTEST_ADDOPTS:+PYTEST_ADDOPTS="$PYTEST_ADDOPTS"} /bin/bash -c "cd ~/ndvi-scale && $*"
}

echo "python3: $(chroot "$R" python3 --version); ensurepip: $(chroot "$R" python3 -c 'import ensurepip' 2>&1 \
  | tail -1 || true)"
echo "command 1 (as newcomer): ${CMDS[0]}"
start=$SECONDS
if ! in_chroot newcomer "${CMDS[0]}" >"$W/command1.log" 2>&1; then
  tail -20 "$W/command1.log"; echo "FAIL: command 1 (log: $W/command1.log)"; exit 1
fi
echo "command 1 passed in $((SECONDS - start)) s; $(grep -m1 '^made\|^kept' "$W/command1.log")"
in_chroot newcomer '.venv/bin/python -c "
import rioxarray, xarray as xr
ds = xr.open_zarr(\"ndvi-sample.zarr\", decode_coords=\"all\")
assert ds.sizes[\"time\"] == 12 and ds.rio.crs.to_epsg() == 32631 and 0.2 < float(ds.ndvi.mean()) < 0.9, ds
print(\"ndvi-sample.zarr:\", dict(ds.sizes), list(ds.data_vars), ds.rio.crs, \"mean NDVI %.3f\" % float(ds.ndvi.mean()))
"'
[[ ${CHECK_SKIP_TESTS:-} == 1 ]] && exit 0

echo "command 2 (as root): ${CMDS[1]}${CHECK_TESTS:+  [PYTEST_ADDOPTS=$CHECK_TESTS]}"
start=$SECONDS
PYTEST_ADDOPTS=${CHECK_TESTS:-}
if ! in_chroot root "${CMDS[1]}" >"$W/command2.log" 2>&1; then
  tail -30 "$W/command2.log"; echo "FAIL: command 2 (log: $W/command2.log)"; exit 1
fi
tail -3 "$W/command2.log"
echo "command 2 passed in $((SECONDS - start)) s"
