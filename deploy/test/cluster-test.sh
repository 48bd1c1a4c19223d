#!/usr/bin/env bash
# End-to-end test of the deployment files on one machine:
#
#   1. nginx -t on the production and cluster configurations, systemd units verified
#   2. deploy/local-cluster up (2 web + 2 app processes, nginx, simulator), with
#      a short access-token lifetime (WXHOST_CLUSTER_TOKEN_TTL, 6 s here) and
#      WeChat Pay's notify retries compressed (WXHOST_CLUSTER_NOTIFY_RETRY_SCALE, 0.2)
#   3. deploy/test/routing-check.sh through nginx (and its internal listener)
#   4. QR-code login and a payment through nginx: the simulator's push and
#      notify go nginx -> web role -> internal listener -> app role; a notify
#      sent 4 times credits once
#   5. OAuth (web authorization) login through nginx; a reused code is refused
#   6. duplicate bursts sent at once to both web processes' own listeners and
#      through nginx: one subscribe push (30 copies) and the first notifies of
#      one paid order (30 copies): all acknowledged, applied once
#   7. the access token across both app processes: QR-code calls to both for 3
#      token lifetimes; the simulator issues at most lifetimes + 1 tokens
#   8. a web process killed (SIGKILL) during a stream of distinct pushes and
#      of paid orders' notifies: every acknowledged push stored once, every
#      order acknowledged to the simulator and credited once; then
#      deploy/rolling-restart brings it back
#   9. an app process killed (SIGKILL): requests still answered (nginx retries
#      the other one), then deploy/rolling-restart brings it back
#  10. deploy/rolling-restart of every process under load: no failed request;
#      p50/p99 latency before and during
#  11. deploy/rolling-plugin-update with a new verify.wasm under load (p50/p99
#      before and during), then with a broken one (refused, rolled back)
#  12. deploy/local-cluster down, twice; no process and no port left
#
# Needs DATABASE_URL (mysql://..., a database of its own: the test writes
# users and orders, and counts rows with the mariadb or mysql client), curl,
# jq, and a built wxhost (WXHOST_BIN, else target/debug/wxhost under
# CARGO_TARGET_DIR). The cluster's state goes to a temporary folder unless
# WXHOST_CLUSTER_STATE is set; it is stopped at the end in any case.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
deploy=$(cd "$here/.." && pwd)

[ -n "${DATABASE_URL:-}" ] || { echo "DATABASE_URL is required (mysql://...)" >&2; exit 2; }
sql_client=$(command -v mariadb || command -v mysql || true)
[ -n "$sql_client" ] || { echo "the mariadb (or mysql) client is required: the test counts rows" >&2; exit 2; }
tmp=$(mktemp -d)
export WXHOST_CLUSTER_STATE=${WXHOST_CLUSTER_STATE:-$tmp/cluster}
# A short token lifetime for the whole run: every stage that calls WeChat does
# so across refreshes, and the token stage sees several lifetimes in seconds.
export WXHOST_CLUSTER_TOKEN_TTL=${WXHOST_CLUSTER_TOKEN_TTL:-6}
# WeChat Pay's retries (15 s, 15 s, 30 s, ...) at a fifth: the first after 3 s.
export WXHOST_CLUSTER_NOTIFY_RETRY_SCALE=${WXHOST_CLUSTER_NOTIFY_RETRY_SCALE:-0.2}
# Names of this run's test users (openids), unique in a reused database.
RUN=$(date +%s)$((RANDOM % 1000))
cleanup() {
    "$deploy/local-cluster" down >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

failures=0
step() { printf '\n== %s\n' "$*"; }
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
info() { printf 'info  %s\n' "$*"; }
sign() { printf '%s\n' "$@" | LC_ALL=C sort | tr -d '\n' | sha1sum | cut -d' ' -f1; }

# The cluster's database (DATABASE_URL's host, port, user and password) for counts.
db_rest=${DATABASE_URL#*://}
db_rest=${db_rest%%\?*}
db_creds=
case $db_rest in *@*) db_creds=${db_rest%%@*}; db_rest=${db_rest#*@} ;; esac
db_hostport=${db_rest%%/*}
db_name=${db_rest#*/}
db_host=${db_hostport%%:*}
db_port=3306
case $db_hostport in *:*) db_port=${db_hostport##*:} ;; esac
db_user=${db_creds%%:*}
db_pass=
case $db_creds in *:*) db_pass=${db_creds#*:} ;; esac
db_user=$(printf '%b' "${db_user//%/\\x}")
db_pass=$(printf '%b' "${db_pass//%/\\x}")
sql() {
    MYSQL_PWD=$db_pass "$sql_client" -N -B -u"${db_user:-root}" -h"$db_host" -P"$db_port" "$db_name" -e "$1"
}

jpost() { curl -sS -m 20 -X POST -H 'Content-Type: application/json' "$1" -d "$2"; }

# The same POST to every URL given, all at once (curl --parallel): BODY_FILE
# HEADER_FILE URL...; prints each answer's status, one a line (000: none).
burst() {
    local body=$1 headers=$2 u
    shift 2
    local -a args=()
    for u in "$@"; do args+=(-o /dev/null "$u"); done
    curl -s -m 20 -Z --parallel-immediate --parallel-max 100 -X POST -H "@$headers" \
        --data-binary "@$body" -w '%{http_code}\n' "${args[@]}" 2>/dev/null || true
}

# "N x STATUS" for each status among the arguments.
tally() { printf '%s\n' "$@" | sort | uniq -c | awk '{printf "%s%d x %s", (NR > 1 ? ", " : ""), $1, $2}'; }

# A plaintext subscribe push from FromUserName $1 at CreateTime $2.
push_xml() {
    printf '<xml><ToUserName>gh_cluster</ToUserName><FromUserName>%s</FromUserName><CreateTime>%s</CreateTime><MsgType>event</MsgType><Event>subscribe</Event></xml>' "$1" "$2"
}

# p50 and p99 (nearest rank, ms) of the latencies (seconds, one a line) in the files.
percentiles() {
    cat "$@" 2>/dev/null | sort -g | awk '
        function rank(p,   i) { i = int(p * NR / 100); if (i < p * NR / 100) i++; if (i < 1) i = 1; return v[i] }
        { v[NR] = $1 }
        END { if (NR == 0) { print "-/-"; exit } printf "%.1f/%.1f\n", rank(50) * 1000, rank(99) * 1000 }'
}

# Takes the named processes out of nginx's upstreams (none: every one back in).
nginx_route() {
    (
        # shellcheck source=/dev/null
        . "$deploy/lib/cluster.sh"
        cluster_load
        render_nginx "$@"
        nginx_reload
    )
}

step "configuration checks"
if "$here/nginx-config-check.sh" >"$tmp/nginx-t.log" 2>&1; then pass "nginx -t (production, cluster)"; else cat "$tmp/nginx-t.log"; fail "nginx -t"; fi
if "$deploy/systemd/verify.sh" >"$tmp/systemd.log" 2>&1; then pass "systemd units"; else cat "$tmp/systemd.log"; fail "systemd units"; fi

step "deploy/local-cluster up"
# The cluster holds an EncodingAESKey (the simulator pushes in safe mode), but
# the streams below are plaintext pushes made with curl: this run's copy of
# plugins.toml accepts them (`accept_plaintext_with_aes_key`, as during a
# switch of mode). The shipped default refusing them is a test of its own.
repo=$(cd "$deploy/.." && pwd)
# The load below also creates QR codes from one address far past the shipped
# per-client limit, which this copy lifts (the limit has tests of its own).
sed -e 's/^accept_plaintext_with_aes_key = false$/accept_plaintext_with_aes_key = true/' \
    -e 's|^"POST /api/v1/auth/wechat/qrcode" = { per_minute = 30, burst = 30 }$|"POST /api/v1/auth/wechat/qrcode" = { per_minute = 100000, burst = 100000 }|' \
    -e "s|^root = \"frontend\"$|root = \"$repo/frontend\"|" "$repo/plugins.toml" > "$tmp/plugins.toml"
grep -q '^accept_plaintext_with_aes_key = true$' "$tmp/plugins.toml" || { echo "plugins.toml has no accept_plaintext_with_aes_key line" >&2; exit 1; }
grep -q 'per_minute = 100000' "$tmp/plugins.toml" || { echo "plugins.toml has no QR-code rate limit line" >&2; exit 1; }
export WXHOST_CONFIG=$tmp/plugins.toml WXHOST_PLUGIN_DIST=${WXHOST_PLUGIN_DIST:-$repo/plugins/dist}
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
IFS=, read -r -a WEB < <(value WEB_URLS)
IFS=, read -r -a APP < <(value APP_URLS)
W1=${WEB[0]}
W2=${WEB[1]:-${WEB[0]}}

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
    paid_no=$no
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

step "OAuth login through nginx"
payer=ct-payer-$RUN
code_json=$(jpost "$SIM/sim/oauth/code" "{\"name\":\"$payer\",\"scope\":\"snsapi_userinfo\"}" || true)
oauth_code=$(jq -r '.code // empty' <<<"$code_json" 2>/dev/null || true)
payer_openid=$(jq -r '.openid // empty' <<<"$code_json" 2>/dev/null || true)
login_status=$(curl -sS -m 20 -o "$tmp/login.json" -w '%{http_code}' "$N/api/v1/auth/wechat?code=$oauth_code" || true)
oauth_session=$(jq -r '.token // empty' "$tmp/login.json" 2>/dev/null || true)
if [ "$login_status" = 200 ] && [ -n "$oauth_session" ] && [ "$(jq -r .openid "$tmp/login.json")" = "$payer_openid" ]; then
    pass "GET /api/v1/auth/wechat?code=... -> 200, session for $payer_openid"
else
    echo "simulator: $code_json"; head -c 300 "$tmp/login.json" 2>/dev/null; echo
    fail "OAuth login: $login_status"
fi
me=$(curl -sS -m 20 -H "Authorization: Bearer $oauth_session" "$N/api/v1/user/me" || true)
if [ "$(jq -r '.openid // .user.openid // empty' <<<"$me" 2>/dev/null)" = "$payer_openid" ]; then
    pass "GET /api/v1/user/me with the OAuth session: $(jq -c '{nickname, subscribed, quota}' <<<"$me")"
else
    echo "${me:0:300}"
    fail "GET /api/v1/user/me with the OAuth session"
fi
reused=$(curl -sS -m 20 -o "$tmp/reused.json" -w '%{http_code}' "$N/api/v1/auth/wechat?code=$oauth_code" || true)
if [ "$reused" = 400 ]; then
    pass "the same code again -> 400 ($(jq -r '.error.code // empty' "$tmp/reused.json" 2>/dev/null))"
else
    fail "the same code again -> $reused, expected 400"
fi

quota() { curl -fsS -m 20 -H "Authorization: Bearer $oauth_session" "$N/api/v1/user/me" | jq -r .quota; }
new_order() {
    curl -sS -m 20 -X POST -H "Authorization: Bearer $oauth_session" -H 'Content-Type: application/json' \
        "$N/api/v1/payment/create-order" -d '{"product_id":"p10"}' | jq -r '.out_trade_no // empty' 2>/dev/null
}
# Whether the simulator hands out signed notifies (POST /sim/pay/notify-request).
notify_request=
[ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    "$SIM/sim/pay/notify-request" -d '{"out_trade_no":"ct-none"}' || true)" = 400 ] && notify_request=1
# Fetches a paid order's signed notify into $tmp/nr-$1.{h,json,path}.
fetch_notify() {
    local nr
    nr=$(jpost "$SIM/sim/pay/notify-request" "{\"out_trade_no\":\"$1\"}") || return 1
    jq -r '.headers | to_entries[] | "\(.key): \(.value)"' <<<"$nr" > "$tmp/nr-$1.h" || return 1
    jq -j .body <<<"$nr" > "$tmp/nr-$1.json"
    jq -r .url <<<"$nr" | sed 's|^[a-z]*://[^/]*||' > "$tmp/nr-$1.path"
}

# After `nginx -s reload` an old nginx worker may still take one more request
# on a connection the simulator keeps alive, and route it with the old
# upstreams. Uses them up with duplicates of an order paid before (they credit
# nothing) until every copy gets STATUS ($1) from the new configuration.
flush_sim_connections() {
    local want=$1 what=$2 n old=0
    for _ in 1 2 3 4 5 6; do
        n=$(jpost "$SIM/sim/pay/notify" "{\"out_trade_no\":\"$paid_no\",\"times\":4}" |
            jq -r --argjson w "$want" '[.statuses[] | select(. != $w)] | length' || echo 4)
        [ "$n" = 0 ] && break
        old=$((old + n))
    done
    [ "$old" = 0 ] || info "$old of the simulator's duplicate notifies were still routed by an old nginx worker after the reload ($what)"
}

step "duplicate bursts over both web processes: applied once"
# (a) One subscribe push (one FromUserName + CreateTime), 30 copies at once:
# 10 to web1's own listener, 10 to web2's, 10 through nginx.
printf 'Content-Type: text/xml\n' > "$tmp/xml.h"
dup_openid=o_ct${RUN}_dup
ts=$(date +%s)
nonce=dup$RUN
push_xml "$dup_openid" "$ts" > "$tmp/dup.xml"
q="signature=$(sign "$TOKEN" "$ts" "$nonce")&timestamp=$ts&nonce=$nonce"
urls=()
for _ in $(seq 1 10); do
    urls+=("$W1/api/v1/auth/wechat/verify?$q" "$W2/api/v1/auth/wechat/verify?$q" "$N/api/v1/auth/wechat/verify?$q")
done
mapfile -t codes < <(burst "$tmp/dup.xml" "$tmp/xml.h" "${urls[@]}")
ok=$(printf '%s\n' "${codes[@]}" | grep -c '^200$' || true)
if [ "$ok" = 30 ]; then pass "30 copies of one push (10 web1, 10 web2, 10 nginx) at once: all 200"; else fail "30 copies of one push: $(tally "${codes[@]}")"; fi
events=$(sql "SELECT COUNT(*) FROM processed_events WHERE event_key LIKE '%$dup_openid%'" || echo error)
users=$(sql "SELECT COUNT(*), COALESCE(SUM(subscribed = 1), 0) FROM users WHERE openid = '$dup_openid'" | tr '\t' ' ' || echo error)
if [ "$events" = 1 ] && [ "$users" = "1 1" ]; then
    pass "applied once: 1 processed_events row, 1 users row with subscribed=1"
else
    fail "the duplicated push: $events processed_events rows, users (rows, subscribed) = $users"
fi

# (b) The first notifies of one paid order, 30 copies at once. The web role
# is taken out of nginx while the simulator pays, so its own delivery fails
# (502) and the burst is what first reaches the app role; the simulator's
# retry comes 3 s later as one more duplicate.
no=$(new_order || true)
if [ -z "$no" ] || [ -z "${paid_no:-}" ]; then
    fail "create-order with the OAuth session, or no order paid before"
else
    q0=$(quota || echo 0)
    # shellcheck disable=SC1091,SC2086
    web_names=$(. "$STATE/cluster.env" && printf '%s\n' $PROCS | grep '^web' | tr '\n' ' ')
    # shellcheck disable=SC2086
    nginx_route $web_names 2>"$tmp/drain.log" || { cat "$tmp/drain.log"; fail "taking the web processes out of nginx"; }
    flush_sim_connections 502 "with both web processes out of nginx"
    first=$(jpost "$SIM/sim/pay" "{\"out_trade_no\":\"$no\",\"user\":\"$payer\"}" | jq -r .notify_status || true)
    nginx_route 2>"$tmp/undrain.log" || { cat "$tmp/undrain.log"; fail "putting the web processes back into nginx"; }
    flush_sim_connections 204 "with the web processes back in nginx"
    before=$(sql "SELECT status FROM orders WHERE out_trade_no = '$no'" || true)
    if [ "$first" != 204 ] && [ "$before" != paid ]; then
        pass "paid while no web process was in nginx: the simulator's delivery got $first, the order is still '$before'"
    else
        fail "the simulator's first delivery got $first (order '$before'); the burst is not the first notify"
    fi
    marker=$(wc -l < "$STATE/nginx/logs/access.log")
    if [ -n "$notify_request" ] && fetch_notify "$no"; then
        path=$(cat "$tmp/nr-$no.path")
        urls=()
        for _ in $(seq 1 10); do urls+=("$W1$path" "$W2$path" "$N$path"); done
        mapfile -t codes < <(burst "$tmp/nr-$no.json" "$tmp/nr-$no.h" "${urls[@]}")
        how="one signed notify (/sim/pay/notify-request) replayed 30 times at once: 10 web1, 10 web2, 10 nginx"
    else
        codes=()
        while IFS= read -r c; do codes+=("$c"); done < <(jpost "$SIM/sim/pay/notify" "{\"out_trade_no\":\"$no\",\"times\":30}" | jq -r '.statuses[]' || true)
        spread=$(tail -n +"$((marker + 1))" "$STATE/nginx/logs/access.log" | grep ' /api/v1/payment/notify ' |
            sed -n 's/.* upstream=\([^ ]*\) .*/\1/p' | sort | uniq -c | awk '{printf "%s%d to %s", (NR > 1 ? ", " : ""), $1, $2}')
        how="30 notifies at once from the simulator through nginx ($spread; no /sim/pay/notify-request in this binary)"
    fi
    ok=$(printf '%s\n' "${codes[@]}" | grep -c '^204$' || true)
    if [ "$ok" = 30 ]; then pass "$how: all 204"; else fail "$how: $(tally "${codes[@]}")"; fi
    # The simulator retries its failed delivery (3 s later): acknowledged too.
    deadline=$((SECONDS + 15))
    until [ "$(curl -fsS -m 5 "$SIM/sim/pay/orders/$no" | jq -r .acknowledged || true)" = true ] || [ $SECONDS -ge $deadline ]; do
        sleep 0.5
    done
    sim_order=$(curl -fsS -m 5 "$SIM/sim/pay/orders/$no" | jq -c '{acknowledged, deliveries: (.deliveries | group_by(.) | map("\(length) x \(.[0])"))}' || true)
    if [ "$(jq -r .acknowledged <<<"$sim_order" 2>/dev/null)" = true ]; then
        pass "acknowledged at the simulator: $sim_order"
    else
        fail "not acknowledged at the simulator: $sim_order"
    fi
    q1=$(quota || echo 0)
    status=$(sql "SELECT status FROM orders WHERE out_trade_no = '$no'" || true)
    if [ "$status" = paid ] && [ $((q1 - q0)) = 10 ]; then
        pass "order paid, credited once (quota $q0 -> $q1)"
    else
        fail "order $no: status $status, quota $q0 -> $q1 (expected +10)"
    fi
fi

step "the access token across both app processes"
ttl=$(awk 'p { print; exit } $0 == "--token-ttl" { p = 1 }' "$STATE/procs/sim/args")
if ! [[ ${ttl:-x} =~ ^[0-9]+$ ]] || [ "$ttl" -gt 30 ]; then
    echo "skip  access token (the simulator's token lifetime is ${ttl:-unknown} s; set WXHOST_CLUSTER_TOKEN_TTL <= 30)"
else
    issued() { curl -fsS -m 5 "$SIM/sim/stats" | jq -r .tokens_issued; }
    refreshes() { grep -c 'access_token refreshed' "$STATE/procs/$1/log" 2>/dev/null || true; }
    # QR codes (cgi-bin/qrcode/create, with the access token) from each app
    # process's own listener, two callers each, until told to stop.
    qr_loop() {
        local url=$1 n=0 bad=0 code
        while [ ! -e "$tmp/stop-qr" ]; do
            n=$((n + 1))
            code=$(curl -s -m 20 -o /dev/null -w '%{http_code}' -X POST "$url/api/v1/auth/wechat/qrcode" || true)
            [ "$code" = 201 ] || [ "$code" = 200 ] || bad=$((bad + 1))
        done
        echo "$url $n $bad"
    }
    r1a=$(refreshes app1); r2a=$(refreshes app2)
    for a in "${APP[@]}" "${APP[@]}"; do qr_loop "$a" >> "$tmp/qr.txt" & done
    app_name() { local i; for i in "${!APP[@]}"; do [ "${APP[$i]}" = "$1" ] && echo "app$((i + 1))"; done; }
    # Count from a refresh on, over 3 lifetimes: each process refreshes a
    # fifth of the lifetime ahead, so a shared token gives at most 4 issuances
    # (a token of its own per process, or thrashing, gives more).
    lifetimes=3
    i0=$(issued || true)
    deadline=$((SECONDS + ttl + 3))
    while [ "$(issued)" = "$i0" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    t0=$(date +%s.%N)
    i1=$(issued || true)
    sleep $((lifetimes * ttl))
    i2=$(issued || true)
    t1=$(date +%s.%N)
    touch "$tmp/stop-qr"
    wait
    r1b=$(refreshes app1); r2b=$(refreshes app2)
    total=$(awk '{s += $2} END {print s + 0}' "$tmp/qr.txt")
    bad=$(awk '{s += $3} END {print s + 0}' "$tmp/qr.txt")
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$i1" = "$i0" ]; then
        fail "no access token was issued within a lifetime ($ttl s) of calls"
    elif [ $((i2 - i1)) -le $((lifetimes + 1)) ]; then
        pass "$((i2 - i1)) tokens issued in $secs s = $lifetimes lifetimes of $ttl s (at most $((lifetimes + 1))), from a refresh on (tokens_issued $i1 -> $i2; refreshes over the whole stage: app1 $((r1b - r1a)), app2 $((r2b - r2a)))"
    else
        fail "$((i2 - i1)) tokens issued in $secs s = $lifetimes lifetimes of $ttl s, more than $((lifetimes + 1)) (tokens_issued $i1 -> $i2; app1 refreshed $((r1b - r1a)), app2 $((r2b - r2a)))"
    fi
    if [ "$bad" = 0 ] && [ "$total" -gt 0 ]; then
        pass "$total QR-code calls straight to both app processes (two callers each), none failed ($(while read -r u n _; do echo "$(app_name "$u") $n"; done < "$tmp/qr.txt" | awk '{s[$1] += $2} END {for (a in s) printf "%s: %d\n", a, s[a]}' | sort | paste -sd ' ' -))"
    else
        fail "$bad of $total QR-code calls failed ($(tr '\n' ' ' < "$tmp/qr.txt"))"
    fi
fi

step "a web process killed during a stream of pushes and notifies"
# Distinct pushes (a FromUserName each): two streams through nginx and one
# straight to web1; six orders paid one after another through the simulator
# (which retries what is not acknowledged), each notify then repeated; web1
# SIGKILLed in the middle.
K=6
orders=()
for _ in $(seq 1 "$K"); do
    no=$(new_order || true)
    [ -n "$no" ] && orders+=("$no")
done
q0=$(quota || echo 0)
stream_pushes() {
    local label=$1 base=$2 n=0 ts nonce oid code
    while [ ! -e "$tmp/stop-stream" ]; do
        n=$((n + 1))
        ts=$(date +%s)
        nonce=k$label$n
        oid=o_ct${RUN}_s${label}_$n
        code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: text/xml' \
            "$base/api/v1/auth/wechat/verify?signature=$(sign "$TOKEN" "$ts" "$nonce")&timestamp=$ts&nonce=$nonce" \
            --data-binary "$(push_xml "$oid" "$ts")" || true)
        echo "$oid $code $label"
    done
}
stream_pays() {
    local no status c
    for no in "${orders[@]}"; do
        status=$(jpost "$SIM/sim/pay" "{\"out_trade_no\":\"$no\",\"user\":\"$payer\"}" | jq -r '.notify_status // "error"' || echo error)
        echo "pay $no $status"
        # WeChat Pay's repeats of the same notify: through nginx and to web1.
        if [ -n "$notify_request" ] && fetch_notify "$no"; then
            for c in "$N" "$N" "$W1"; do
                echo "repeat $no $c $(curl -s -m 10 -o /dev/null -w '%{http_code}' -X POST -H "@$tmp/nr-$no.h" \
                    --data-binary "@$tmp/nr-$no.json" "$c$(cat "$tmp/nr-$no.path")" || true)"
            done
        else
            for c in $(jpost "$SIM/sim/pay/notify" "{\"out_trade_no\":\"$no\",\"times\":2}" | jq -r '.statuses[]' || true); do
                echo "repeat $no $N $c"
            done
        fi
        sleep 0.7
    done
}
rm -f "$tmp/stop-stream"
marker=$(wc -l < "$STATE/nginx/logs/access.log")
stream_pushes a "$N" > "$tmp/stream-a.txt" &
stream_pushes b "$N" > "$tmp/stream-b.txt" &
stream_pushes c "$W1" > "$tmp/stream-c.txt" &
stream_pays > "$tmp/stream-pay.txt" &
payer_pid=$!
sleep 2.5
web1_pid=$(cat "$STATE/procs/web1/pid")
kill -KILL "$web1_pid"
sleep 4
wait "$payer_pid" || true
touch "$tmp/stop-stream"
wait
cat "$tmp"/stream-[abc].txt > "$tmp/stream.txt"
pushes=$(wc -l < "$tmp/stream.txt")
acked=$(awk '$2 == 200' "$tmp/stream.txt" | wc -l)
via_nginx=$(awk '$3 != "c"' "$tmp/stream.txt" | wc -l)
via_nginx_ok=$(awk '$3 != "c" && $2 == 200' "$tmp/stream.txt" | wc -l)
info "web1 (pid $web1_pid) SIGKILLed 2.5 s in; $pushes pushes: $(awk '{print $3 ":" $2}' "$tmp/stream.txt" | sort | uniq -c | awk '{printf "%s%s x %s", (NR > 1 ? ", " : ""), $1, $2}') (a, b: nginx; c: web1 direct)"
retried=$(tail -n +"$((marker + 1))" "$STATE/nginx/logs/access.log" | grep -c 'upstream=[^ ]*, ' || true)
info "nginx passed $retried requests on to the other process after a failure (access log)"
if [ "$via_nginx_ok" = "$via_nginx" ] && [ "$via_nginx" -gt 0 ]; then
    pass "every push through nginx answered 200 ($via_nginx)"
else
    fail "$((via_nginx - via_nginx_ok)) of $via_nginx pushes through nginx were not answered 200"
fi
sql "SELECT openid FROM users WHERE openid LIKE 'o\\_ct${RUN}\\_s%'" | sort > "$tmp/stored-users.txt" || true
sql "SELECT event_key FROM processed_events WHERE event_key LIKE '%o\\_ct${RUN}\\_s%'" |
    grep -o "o_ct${RUN}_s[a-z]*_[0-9]*" | sort > "$tmp/stored-events.txt" || true
awk '$2 == 200 {print $1}' "$tmp/stream.txt" | sort > "$tmp/acked.txt"
missing_users=$(comm -23 "$tmp/acked.txt" "$tmp/stored-users.txt" | wc -l)
missing_events=$(comm -23 "$tmp/acked.txt" <(uniq "$tmp/stored-events.txt") | wc -l)
twice=$(uniq -d "$tmp/stored-events.txt" | wc -l)
unacked_stored=$(awk '$2 != 200 {print $1}' "$tmp/stream.txt" | sort | comm -12 - "$tmp/stored-users.txt" | wc -l)
if [ "$missing_users" = 0 ] && [ "$missing_events" = 0 ] && [ "$twice" = 0 ] && [ "$acked" -gt 0 ]; then
    pass "each of the $acked pushes answered 200 is stored once (users row and processed_events row; $unacked_stored of the $((pushes - acked)) unanswered ones were stored too)"
else
    fail "pushes answered 200: $acked; without a users row: $missing_users; without a processed_events row: $missing_events; with two: $twice"
fi
info "payments: the simulator's first deliveries $(grep '^pay ' "$tmp/stream-pay.txt" | awk '{print $3}' | tr '\n' ' '); repeats: $(grep '^repeat ' "$tmp/stream-pay.txt" | awk -v w1="$W1" '{print ($3 == w1 ? "web1" : "nginx") ":" $4}' | sort | uniq -c | awk '{printf "%s%s x %s", (NR > 1 ? ", " : ""), $1, $2}')"
# Every order acknowledged at the simulator (its retries deliver what was not).
deadline=$((SECONDS + 40))
pending=("${orders[@]}")
while [ ${#pending[@]} -gt 0 ] && [ $SECONDS -lt $deadline ]; do
    unacked=()
    for no in "${pending[@]}"; do
        [ "$(curl -fsS -m 5 "$SIM/sim/pay/orders/$no" | jq -r .acknowledged || true)" = true ] || unacked+=("$no")
    done
    pending=("${unacked[@]}")
    [ ${#pending[@]} -eq 0 ] || sleep 0.5
done
deliveries=$(for no in "${orders[@]}"; do curl -fsS -m 5 "$SIM/sim/pay/orders/$no" | jq -c .deliveries || true; done | tr '\n' ' ')
if [ ${#orders[@]} = "$K" ] && [ ${#pending[@]} = 0 ]; then
    pass "all $K orders acknowledged at the simulator (deliveries: $deliveries)"
else
    fail "${#orders[@]} orders created of $K; not acknowledged: ${pending[*]:-none} (deliveries: $deliveries)"
fi
in_list=$(printf "'%s'," "${orders[@]}")
paid=$(sql "SELECT COUNT(*) FROM orders WHERE out_trade_no IN (${in_list%,}) AND status = 'paid'" || echo error)
q1=$(quota || echo 0)
if [ "$paid" = "$K" ] && [ $((q1 - q0)) = $((10 * K)) ]; then
    pass "$K orders paid, each credited once (quota $q0 -> $q1)"
else
    fail "$paid of $K orders paid; quota $q0 -> $q1 (expected +$((10 * K)))"
fi
if "$deploy/rolling-restart" web1 2>"$tmp/restart-web1.log" && "$deploy/local-cluster" status >/dev/null 2>&1; then
    pass "deploy/rolling-restart web1 brought it back"
else
    cat "$tmp/restart-web1.log"
    fail "deploy/rolling-restart web1"
fi

# Mixed load: GET and POST on the app role, WeChat pushes (web -> app).
# Prints "<kind> <requests> <unexpected>" lines into $1, and each request's
# latency (seconds) into $1.<kind>.lat.
load() {
    local out=$1 seconds=$2
    one() {
        local kind=$1 end=$((SECONDS + seconds)) n=0 bad=0 r want ts nonce
        : > "$out.$kind.lat"
        while [ $SECONDS -lt $end ]; do
            n=$((n + 1))
            case $kind in
                get) want='^200$'
                     r=$(curl -s -m 20 -o /dev/null -w '%{http_code} %{time_total}' "$N/api/v1/payment/products" || true) ;;
                post) want='^20[01]$'
                      r=$(curl -s -m 20 -o /dev/null -w '%{http_code} %{time_total}' -X POST "$N/api/v1/auth/wechat/qrcode" || true) ;;
                push) want='^200$'
                      ts=$(date +%s); nonce=n$n$RANDOM
                      r=$(curl -s -m 20 -o /dev/null -w '%{http_code} %{time_total}' -X POST \
                          "$N/api/v1/auth/wechat/verify?signature=$(sign "$TOKEN" "$ts" "$nonce")&timestamp=$ts&nonce=$nonce" \
                          --data-binary "$(push_xml "o_cluster_$n$RANDOM" "$ts")" || true) ;;
            esac
            [[ ${r%% *} =~ $want ]] || { bad=$((bad + 1)); echo "$(date +%T.%N | cut -c1-12) $kind ${r%% *}" >> "$out.bad"; }
            printf '%s\n' "${r#* }" >> "$out.$kind.lat"
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
        fail "$what: $bad of $total requests failed ($(tr '\n' ' ' < "$file"); time, kind, status: $(head -n 5 "$file.bad" 2>/dev/null | paste -sd ',' -))"
    fi
}
# "p50/p99 before X ms, during Y ms" of a procedure: all requests, then by kind.
latency_report() {
    local what=$1 before=$2 during=$3 kind by=""
    for kind in get post push; do
        by+="${by:+, }$kind $(percentiles "$before.$kind.lat") -> $(percentiles "$during.$kind.lat")"
    done
    info "$what: p50/p99 before $(percentiles "$before".*.lat) ms, during $(percentiles "$during".*.lat) ms ($by)"
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
load "$tmp/load-restart-before.txt" 4
load_verdict "before the rolling restart" "$tmp/load-restart-before.txt"
load "$tmp/load-restart.txt" 25 &
loader=$!
sleep 1
if "$deploy/rolling-restart" 2>"$tmp/restart.log"; then pass "deploy/rolling-restart"; else cat "$tmp/restart.log"; fail "deploy/rolling-restart"; fi
wait "$loader"
load_verdict "rolling restart" "$tmp/load-restart.txt"
latency_report "rolling restart" "$tmp/load-restart-before.txt" "$tmp/load-restart.txt"

step "rolling plugin update under load"
src=$STATE/procs/web1/plugins/dist/verify.wasm
mkdir -p "$tmp/new" "$tmp/bad"
# The same component plus a custom section: valid, with a new version hash.
{ cat "$src"; printf '\000\015\013wxhost-test1'; } > "$tmp/new/verify.wasm"
head -c "$(($(wc -c < "$src") / 2))" "$src" > "$tmp/bad/verify.wasm"
want=$(sha256sum "$tmp/new/verify.wasm" | cut -c1-16)
load "$tmp/load-plugin-before.txt" 4
load_verdict "before the plugin update" "$tmp/load-plugin-before.txt"
load "$tmp/load-plugin.txt" 8 &
loader=$!
sleep 1
if "$deploy/rolling-plugin-update" "$tmp/new/verify.wasm" 2>"$tmp/plugin.log"; then pass "deploy/rolling-plugin-update (verify -> $want)"; else cat "$tmp/plugin.log"; fail "deploy/rolling-plugin-update"; fi
wait "$loader"
load_verdict "plugin update" "$tmp/load-plugin.txt"
latency_report "rolling plugin update" "$tmp/load-plugin-before.txt" "$tmp/load-plugin.txt"
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
