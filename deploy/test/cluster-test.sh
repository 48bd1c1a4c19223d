#!/usr/bin/env bash
# End-to-end test of the deployment files on one machine:
#
#   1. nginx -t on the production and cluster configurations, systemd units verified
#   2. deploy/local-cluster up (2 web + 2 app processes, nginx, simulator)
#   3. deploy/test/routing-check.sh through nginx (and its internal listener)
#   4. QR-code login and a payment through nginx: the simulator's push and
#      notify go nginx -> web role -> internal listener -> app role; a notify
#      sent 4 times credits once
#   5. an app process killed (SIGKILL): requests still answered (nginx retries
#      the other one), then deploy/rolling-restart brings it back
#   6. deploy/rolling-restart of every process under load: no failed request
#   7. deploy/rolling-plugin-update with a new verify.wasm under load, then
#      with a broken one (refused, rolled back)
#   8. deploy/local-cluster down, twice; no process and no port left
#
# Needs DATABASE_URL (mysql://..., a database of its own: the test writes
# users and orders) and a built wxhost (WXHOST_BIN, else target/debug/wxhost
# under CARGO_TARGET_DIR). The cluster's state goes to a temporary folder
# unless WXHOST_CLUSTER_STATE is set; it is stopped at the end in any case.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
deploy=$(cd "$here/.." && pwd)

[ -n "${DATABASE_URL:-}" ] || { echo "DATABASE_URL is required (mysql://...)" >&2; exit 2; }
tmp=$(mktemp -d)
export WXHOST_CLUSTER_STATE=${WXHOST_CLUSTER_STATE:-$tmp/cluster}
cleanup() {
    "$deploy/local-cluster" down >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

failures=0
step() { printf '\n== %s\n' "$*"; }
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
sign() { printf '%s\n' "$@" | LC_ALL=C sort | tr -d '\n' | sha1sum | cut -d' ' -f1; }

step "configuration checks"
if "$here/nginx-config-check.sh" >"$tmp/nginx-t.log" 2>&1; then pass "nginx -t (production, cluster)"; else cat "$tmp/nginx-t.log"; fail "nginx -t"; fi
if "$deploy/systemd/verify.sh" >"$tmp/systemd.log" 2>&1; then pass "systemd units"; else cat "$tmp/systemd.log"; fail "systemd units"; fi

step "deploy/local-cluster up"
"$deploy/local-cluster" up > "$tmp/up.out"
cat "$tmp/up.out"
if [ "$(grep -c '^NGINX_URL=' "$tmp/up.out")" = 1 ]; then pass "exactly one NGINX_URL line"; else fail "exactly one NGINX_URL line"; fi
value() { sed -n "s/^$1=//p" "$tmp/up.out"; }
N=$(value NGINX_URL)
NI=$(value NGINX_INTERNAL_URL)
SIM=$(value SIM_URL)
STATE=$(value STATE)
TOKEN=${WECHAT_TOKEN:-$(sed -n 's/^WECHAT_TOKEN=//p' "$STATE/secrets.env")}
# shellcheck disable=SC1091
BIN=$(. "$STATE/cluster.env" && printf '%s' "$BIN")

step "routing"
if WECHAT_TOKEN=$TOKEN "$here/routing-check.sh" "$N" "$NI" > "$tmp/routing.log" 2>&1; then
    pass "routing-check.sh: $(tail -n 1 "$tmp/routing.log")"
else
    grep -v '^ok' "$tmp/routing.log"
    fail "routing-check.sh"
fi

step "QR-code login through nginx"
q=$(curl -fsS -X POST "$N/api/v1/auth/wechat/qrcode")
ticket=$(jq -r .ticket <<<"$q")
scene=$(jq -r .scene <<<"$q")
"$BIN" sim scan --sim-url "$SIM" --ticket "$ticket" --user cluster-alice > "$tmp/scan.out"
if [ "$(jq -r .status "$tmp/scan.out")" = 200 ]; then pass "the simulator's subscribe push through nginx: 200"; else cat "$tmp/scan.out"; fail "subscribe push"; fi
poll=$(curl -fsS "$N/api/v1/auth/wechat/qrcode/$scene")
session=$(jq -r '.token // empty' <<<"$poll")
if [ "$(jq -r .status <<<"$poll")" = scanned ] && [ -n "$session" ]; then pass "scene scanned, session issued"; else echo "$poll"; fail "scene scanned"; fi
me=$(curl -fsS -H "Authorization: Bearer $session" "$N/api/v1/user/me" || true)
if [ "$(jq -r .subscribed <<<"$me" 2>/dev/null)" = true ]; then pass "GET /api/v1/user/me with the session"; else echo "$me"; fail "GET /api/v1/user/me"; fi

step "payment through nginx (when the simulator plays WeChat Pay)"
order=$(curl -sS -X POST -H "Authorization: Bearer $session" -H 'Content-Type: application/json' \
    "$N/api/v1/payment/create-order" -d '{"product_id":"p10"}')
no=$(jq -r '.out_trade_no // empty' <<<"$order" 2>/dev/null || true)
if [ -z "$no" ]; then
    echo "create-order answered: ${order:0:200}"
    echo "skip  payment (no order; this binary or configuration has no WeChat Pay)"
else
    quota_before=$(curl -fsS -H "Authorization: Bearer $session" "$N/api/v1/user/me" | jq -r .quota)
    paid=$("$BIN" sim pay --sim-url "$SIM" --out-trade-no "$no" --user cluster-alice)
    if [ "$(jq -r .notify_status <<<"$paid")" = 204 ]; then pass "paid; the notify through nginx answered 204"; else echo "$paid"; fail "pay notify"; fi
    again=$("$BIN" sim notify --sim-url "$SIM" --out-trade-no "$no" --times 4)
    if [ "$(jq -c '[.statuses[] | select(. != 204 and . != 200)] | length' <<<"$again")" = 0 ]; then pass "4 duplicate notifies acknowledged"; else echo "$again"; fail "duplicate notifies"; fi
    status=$(curl -fsS -H "Authorization: Bearer $session" "$N/api/v1/user/orders/$no" | jq -r .status)
    quota_after=$(curl -fsS -H "Authorization: Bearer $session" "$N/api/v1/user/me" | jq -r .quota)
    if [ "$status" = paid ] && [ $((quota_after - quota_before)) = 10 ]; then
        pass "order paid, credited once ($quota_before -> $quota_after)"
    else
        fail "order $no: status $status, quota $quota_before -> $quota_after"
    fi
fi

# Mixed load: GET and POST on the app role, WeChat pushes (web -> app).
# Prints "<kind> <requests> <unexpected>" lines into $1.
load() {
    local out=$1 seconds=$2
    one() {
        local kind=$1 end=$((SECONDS + seconds)) n=0 bad=0 code ts nonce
        while [ $SECONDS -lt $end ]; do
            n=$((n + 1))
            case $kind in
                get) code=$(curl -s -m 20 -o /dev/null -w '%{http_code}' "$N/api/v1/payment/products")
                     [ "$code" = 200 ] || bad=$((bad + 1)) ;;
                post) code=$(curl -s -m 20 -o /dev/null -w '%{http_code}' -X POST "$N/api/v1/auth/wechat/qrcode")
                      [ "$code" = 201 ] || [ "$code" = 200 ] || bad=$((bad + 1)) ;;
                push) ts=$(date +%s); nonce=n$n$RANDOM
                      code=$(curl -s -m 20 -o /dev/null -w '%{http_code}' -X POST \
                          "$N/api/v1/auth/wechat/verify?signature=$(sign "$TOKEN" "$ts" "$nonce")&timestamp=$ts&nonce=$nonce" \
                          --data-binary "<xml><ToUserName>gh</ToUserName><FromUserName>o_cluster_$n$RANDOM</FromUserName><CreateTime>$ts</CreateTime><MsgType>event</MsgType><Event>subscribe</Event></xml>")
                      [ "$code" = 200 ] || bad=$((bad + 1)) ;;
            esac
        done
        echo "$kind $n $bad"
    }
    { one get & one post & one push & wait; } > "$out"
}
load_verdict() {
    local what=$1 file=$2 total bad
    total=$(awk '{s += $2} END {print s + 0}' "$file")
    bad=$(awk '{s += $3} END {print s + 0}' "$file")
    if [ "$bad" = 0 ] && [ "$total" -gt 0 ]; then
        pass "$what: $total requests under load, none failed ($(tr '\n' ' ' < "$file"))"
    else
        fail "$what: $bad of $total requests failed ($(tr '\n' ' ' < "$file"))"
    fi
}

step "an app process dies"
kill -KILL "$(cat "$STATE/procs/app1/pid")"
sleep 0.2
load "$tmp/load-dead.txt" 4
load_verdict "app1 killed" "$tmp/load-dead.txt"
if "$deploy/rolling-restart" app1 2>"$tmp/restart-app1.log" && "$deploy/local-cluster" status >/dev/null 2>&1; then
    pass "deploy/rolling-restart app1 brought it back"
else
    cat "$tmp/restart-app1.log"
    fail "deploy/rolling-restart app1"
fi

step "rolling restart under load"
load "$tmp/load-restart.txt" 25 &
loader=$!
sleep 1
if "$deploy/rolling-restart" 2>"$tmp/restart.log"; then pass "deploy/rolling-restart"; else cat "$tmp/restart.log"; fail "deploy/rolling-restart"; fi
wait "$loader"
load_verdict "rolling restart" "$tmp/load-restart.txt"

step "rolling plugin update under load"
src=$STATE/procs/web1/plugins/dist/verify.wasm
mkdir -p "$tmp/new" "$tmp/bad"
# The same component plus a custom section: valid, with a new version hash.
{ cat "$src"; printf '\000\015\013wxhost-test1'; } > "$tmp/new/verify.wasm"
head -c "$(($(wc -c < "$src") / 2))" "$src" > "$tmp/bad/verify.wasm"
want=$(sha256sum "$tmp/new/verify.wasm" | cut -c1-16)
load "$tmp/load-plugin.txt" 8 &
loader=$!
sleep 1
if "$deploy/rolling-plugin-update" "$tmp/new/verify.wasm" 2>"$tmp/plugin.log"; then pass "deploy/rolling-plugin-update (verify -> $want)"; else cat "$tmp/plugin.log"; fail "deploy/rolling-plugin-update"; fi
wait "$loader"
load_verdict "plugin update" "$tmp/load-plugin.txt"
if "$deploy/rolling-plugin-update" "$tmp/bad/verify.wasm" 2>"$tmp/plugin-bad.log"; then
    fail "a broken verify.wasm was accepted"
else
    pass "a broken verify.wasm is refused and rolled back"
fi
for a in $(sed -n 's/^ADMIN_URLS=//p' "$tmp/up.out" | tr ',' ' '); do
    v=$(curl -fsS "$a/admin/plugins" | jq -r '[.plugins[] | select(.name == "verify") | .version] | join(",")')
    [ -z "$v" ] || [ "$v" = "$want" ] || fail "$a serves verify $v, expected $want"
done
pass "every web process serves verify $want"

step "deploy/local-cluster down"
mapfile -t pids < <(cat "$STATE"/procs/*/pid "$STATE/nginx/nginx.pid" 2>/dev/null)
if "$deploy/local-cluster" down 2>/dev/null && "$deploy/local-cluster" down 2>/dev/null; then pass "down, twice"; else fail "down"; fi
left=0
for pid in "${pids[@]}"; do
    if [ -r "/proc/$pid/status" ] && [ "$(awk '/^State:/ {print $2}' "/proc/$pid/status")" != Z ]; then
        echo "still running: $pid $(tr '\0' ' ' < "/proc/$pid/cmdline")"
        left=$((left + 1))
    fi
done
for url in $N $NI $SIM $(sed -n 's/^\(WEB\|APP\|ADMIN\)_URLS=//p' "$tmp/up.out" | tr ',' ' '); do
    port=${url##*:}
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port still open"
        left=$((left + 1))
    fi
done
if [ "$left" = 0 ]; then pass "no process and no port left"; else fail "$left processes/ports left"; fi

echo
if [ "$failures" = 0 ]; then echo "cluster test passed"; else echo "cluster test: $failures failures"; exit 1; fi
