#!/usr/bin/env bash
# Checks the systemd units in this folder with systemd's own tools, without
# installing them and without systemd running (works in a container):
#
#   systemd-analyze verify     on one instance of each template, the
#                              oneshots and the timer, strict: any warning (unknown key, bad
#                              value, missing executable) fails the check
#   systemd-analyze security   the sandbox's exposure score must stay low
#   systemd-sysusers           wxhost.sysusers creates the wxhost user
#
# It builds a throw-away root (--root=): the units in etc/systemd/system, a
# copy of the system's own units (sysinit.target, ...), /bin/kill, and a stub
# executable at the units' ExecStart= path (/opt/wxhost/bin/wxhost), because
# verify checks that the programs exist. Installs systemd (apt-get) if
# systemd-analyze is missing.
set -euo pipefail
# shellcheck source=deploy/lib/cluster.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/cluster.sh"

here=$DEPLOY_DIR/systemd
ensure_command systemd-analyze systemd

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/bin" "$root/opt/wxhost/bin" \
    "$root/etc/wxhost" "$root/usr/sbin"
ln -s usr/bin "$root/bin"
units_dir=/usr/lib/systemd/system
[ -d "$units_dir" ] || units_dir=/lib/systemd/system
cp -r "$units_dir" "$root/usr/lib/systemd/"
cp "$(type -P kill)" "$root/usr/bin/kill"
printf '#!/bin/sh\nexit 0\n' > "$root/opt/wxhost/bin/wxhost"
chmod 755 "$root/opt/wxhost/bin/wxhost"
: > "$root/etc/wxhost/web.env"
: > "$root/etc/wxhost/app.env"
cp "$here"/*.service "$here"/*.timer "$root/etc/systemd/system/"

# The ExecStart= path the units use must be the stub's.
for unit in "$here"/*.service; do
    grep -q '^ExecStart=/opt/wxhost/bin/wxhost ' "$unit" ||
        die "$(basename "$unit"): ExecStart= is not /opt/wxhost/bin/wxhost; update verify.sh"
done

failed=
units=(wxhost-web@81.service wxhost-app@82.service wxhost-migrate.service wxhost-reconcile.service
    wxhost-reconcile.timer)
for unit in "${units[@]}"; do
    if out=$(systemd-analyze verify --man=no --generators=no --root="$root" "$unit" 2>&1) && [ -z "$out" ]; then
        echo "ok    systemd-analyze verify $unit"
    else
        printf '%s\n' "$out"
        echo "FAIL  systemd-analyze verify $unit"
        failed=1
    fi
done

# Exposure: 0 (locked down) .. 10 (unprotected); the threshold is in tenths.
for unit in wxhost-web@81.service wxhost-app@82.service wxhost-reconcile.service; do
    if out=$(systemd-analyze security --offline=yes --root="$root" --threshold=25 --no-pager "$unit" 2>&1); then
        echo "ok    systemd-analyze security $unit: $(grep -o 'exposure level.*' <<<"$out" | head -n 1)"
    else
        printf '%s\n' "$out" | tail -n 30
        echo "FAIL  systemd-analyze security $unit (exposure above 2.5)"
        failed=1
    fi
done

if command -v systemd-sysusers >/dev/null 2>&1; then
    : > "$root/etc/passwd"
    : > "$root/etc/group"
    if systemd-sysusers --root="$root" "$here/wxhost.sysusers" >/dev/null 2>&1 &&
        grep -q '^wxhost:' "$root/etc/passwd"; then
        echo "ok    systemd-sysusers wxhost.sysusers ($(grep '^wxhost:' "$root/etc/passwd"))"
    else
        echo "FAIL  systemd-sysusers wxhost.sysusers"
        failed=1
    fi
fi

[ -z "$failed" ] || exit 1
echo "the units pass"
