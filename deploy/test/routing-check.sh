#!/usr/bin/env bash
# Checks wxhost's nginx routing through a running nginx: what WeChat calls
# reaches the web role, every other /api/ route the app role, the static
# frontend is served with its headers, and the app role's internal API is
# never reachable, whatever the method, case or encoding of the path.
#
# Usage: deploy/test/routing-check.sh NGINX_URL [NGINX_INTERNAL_URL]
#   NGINX_URL            the public server, e.g. http://127.0.0.1:20000
#   NGINX_INTERNAL_URL   also check the internal listener (web -> app)
# Environment:
#   WECHAT_TOKEN         for the signed verify/push checks; default: read from
#                        $WXHOST_CLUSTER_STATE/secrets.env (./data/cluster) if there
#   ROUTING_CHECK_WRITES 1: also push a subscribe event (creates a test user in
#                        the database). Default 1 when nginx sends X-Wxhost-Route
#                        (the local cluster), else 0.
#
# Prints one line per case (ok / FAIL / skip) and exits 1 if any case failed.
# Where nginx sends X-Wxhost-Route (the local cluster), each case also checks
# which rule answered (web, app, static, denied); without it, a refusal is
# recognised by nginx's own body ("message":"not found"; wxhost says "no such
# route").
set -uo pipefail

url=${1:-}
internal_url=${2:-}
[ -n "$url" ] || { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
url=${url%/}
internal_url=${internal_url%/}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
skipped=0

token=${WECHAT_TOKEN:-}
if [ -z "$token" ]; then
    secrets=${WXHOST_CLUSTER_STATE:-./data/cluster}/secrets.env
    [ -f "$secrets" ] && token=$(sed -n 's/^WECHAT_TOKEN=//p' "$secrets" | tail -n 1)
fi

# request [--base URL] METHOD TARGET [curl args...]: sends TARGET as the
# request target, byte for byte (no normalisation by curl). Sets STATUS, BODY,
# ROUTE, CTYPE, and keeps the headers in $tmp/h.
request() {
    local base=$url
    if [ "$1" = --base ]; then base=$2; shift 2; fi
    local method=$1 target=$2
    shift 2
    local -a m=(-X "$method")
    case $method in
        GET) m=() ;;
        HEAD) m=(-I) ;;
    esac
    : > "$tmp/h"
    : > "$tmp/b"
    STATUS=$(curl -sS -m 15 --path-as-is "${m[@]}" --request-target "$target" -D "$tmp/h" -o "$tmp/b" \
        -w '%{http_code}' "$@" "$base/" 2>"$tmp/err") || STATUS=${STATUS:-000}
    [ -n "$STATUS" ] || STATUS=000
    BODY=$(head -c 400 "$tmp/b" | tr -d '\r' | tr '\n' ' ')
    ROUTE=$(header X-Wxhost-Route)
    CTYPE=$(header Content-Type)
}

header() {
    grep -i "^$1:" "$tmp/h" | tail -n 1 | cut -d: -f2- | sed 's/^[[:space:]]*//; s/[[:space:]]*$//' | tr -d '\r'
}

ok() { passed=$((passed + 1)); printf 'ok    %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf 'FAIL  %s: %s\n' "$1" "$2"; }
skip() { skipped=$((skipped + 1)); printf 'skip  %s: %s\n' "$1" "$2"; }
got() { printf 'status=%s route=%s body=%s' "$STATUS" "${ROUTE:--}" "${BODY:0:160}"; }

# The rule that answered is $1 (only checked where nginx says).
route_is() {
    [ -z "$debug" ] || [ "$ROUTE" = "$1" ]
}

# The request was refused by nginx with a 404, before any wxhost process.
expect_denied() {
    local desc=$1
    if [ "$STATUS" = 404 ] && { if [ -n "$debug" ]; then [ "$ROUTE" = denied ]; else [[ $BODY == *'"message":"not found"'* ]]; fi; }; then
        ok "$desc -> 404 from nginx"
    else
        fail "$desc" "expected 404 from nginx, $(got)"
    fi
}

sign() {
    printf '%s\n' "$@" | LC_ALL=C sort | tr -d '\n' | sha1sum | cut -d' ' -f1
}

# --- Is X-Wxhost-Route on? -------------------------------------------------------
request GET /api/v1/payment/products
debug=
[ -n "$ROUTE" ] && debug=1
writes=${ROUTING_CHECK_WRITES:-$([ -n "$debug" ] && echo 1 || echo 0)}
echo "# $url (X-Wxhost-Route: $([ -n "$debug" ] && echo on || echo off); writes: $writes)"

# --- App role ----------------------------------------------------------------------
if [ "$STATUS" = 200 ] && route_is app && [[ $BODY == *'"id"'* ]]; then
    ok "GET /api/v1/payment/products -> app role (catalog)"
else
    fail "GET /api/v1/payment/products -> app role" "$(got)"
fi
if [[ $CTYPE == application/json* ]]; then
    ok "products answer is JSON ($CTYPE)"
else
    fail "products answer is JSON" "content-type=$CTYPE"
fi

request GET /api/v1/user/me
if [ "$STATUS" = 401 ] && route_is app; then
    ok "GET /api/v1/user/me without a session -> app role, 401"
else
    fail "GET /api/v1/user/me without a session -> app role, 401" "$(got)"
fi

request GET /api/v1/auth/wechat/get-menu
if route_is app && [ "$STATUS" != 404 ] && [ "$STATUS" != 000 ]; then
    ok "GET /api/v1/auth/wechat/get-menu -> app role ($STATUS)"
else
    fail "GET /api/v1/auth/wechat/get-menu -> app role" "$(got)"
fi

request GET '/api/v1/auth/wechat?code=routing-check-invalid'
if route_is app && [ "$STATUS" -ge 400 ] && [ "$STATUS" -lt 500 ]; then
    ok "GET /api/v1/auth/wechat?code=<invalid> -> app role ($STATUS)"
else
    fail "GET /api/v1/auth/wechat?code=<invalid> -> app role, 4xx" "$(got)"
fi

request GET /api/v1/auth/wechat/verify/
if route_is app && [ "$STATUS" = 404 ]; then
    ok "GET /api/v1/auth/wechat/verify/ (trailing slash) -> app role, 404 (not the web role)"
else
    fail "GET /api/v1/auth/wechat/verify/ -> app role, 404" "$(got)"
fi

# --- Web role ----------------------------------------------------------------------
if [ -n "$token" ]; then
    ts=$(date +%s)
    nonce=rc$RANDOM$RANDOM
    sig=$(sign "$token" "$ts" "$nonce")
    echostr=routing-check-$RANDOM
    request GET "/api/v1/auth/wechat/verify?signature=$sig&timestamp=$ts&nonce=$nonce&echostr=$echostr"
    if [ "$STATUS" = 200 ] && [ "$BODY" = "$echostr" ] && route_is web; then
        ok "GET /api/v1/auth/wechat/verify (valid signature) -> web role echoes echostr"
    else
        fail "GET /api/v1/auth/wechat/verify (valid signature) -> web role" "$(got)"
    fi

    request GET "/api/v1/auth/wechat/verify?signature=0000000000000000000000000000000000000000&timestamp=$ts&nonce=$nonce&echostr=x"
    if [ "$STATUS" -ge 400 ] && [ "$STATUS" -lt 500 ] && route_is web && [ "$BODY" != x ]; then
        ok "GET /api/v1/auth/wechat/verify (wrong signature) -> web role refuses ($STATUS)"
    else
        fail "GET /api/v1/auth/wechat/verify (wrong signature) -> web role, 4xx" "$(got)"
    fi

    ts=$(date +%s)
    nonce=rc$RANDOM$RANDOM
    sig=$(sign "$token" "$ts" "$nonce")
    xml="<xml><ToUserName><![CDATA[gh_routing_check]]></ToUserName><FromUserName><![CDATA[o_routing_check]]></FromUserName><CreateTime>$ts</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[routing-check]]></Content><MsgId>$ts$RANDOM</MsgId></xml>"
    request POST "/api/v1/auth/wechat/verify?signature=$sig&timestamp=$ts&nonce=$nonce" \
        -H 'Content-Type: text/xml' --data-binary "$xml"
    if [ "$STATUS" = 200 ] && route_is web; then
        ok "POST /api/v1/auth/wechat/verify (signed text message) -> web role, 200"
    else
        fail "POST /api/v1/auth/wechat/verify (signed text message) -> web role, 200" "$(got)"
    fi

    if [ "$writes" = 1 ]; then
        # A subscribe event: the web role stores it through the internal
        # listener (APP_INTERNAL_URL) in the app role; 503 if that path is broken.
        ts=$(date +%s)
        nonce=rc$RANDOM$RANDOM
        sig=$(sign "$token" "$ts" "$nonce")
        user=o_routing_check_$RANDOM$RANDOM
        xml="<xml><ToUserName><![CDATA[gh_routing_check]]></ToUserName><FromUserName><![CDATA[$user]]></FromUserName><CreateTime>$ts</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event></xml>"
        request POST "/api/v1/auth/wechat/verify?signature=$sig&timestamp=$ts&nonce=$nonce" \
            -H 'Content-Type: text/xml' --data-binary "$xml"
        if [ "$STATUS" = 200 ] && route_is web; then
            ok "POST /api/v1/auth/wechat/verify (subscribe event) -> web role -> internal listener -> app role, 200"
        else
            fail "POST /api/v1/auth/wechat/verify (subscribe event) -> web -> app, 200" "$(got)"
        fi
    else
        skip "subscribe push through web -> app" "ROUTING_CHECK_WRITES=0"
    fi
else
    skip "signed verify / push checks" "no WECHAT_TOKEN (and no secrets.env)"
    request GET '/api/v1/auth/wechat/verify?signature=x&timestamp=1&nonce=n&echostr=e'
    if route_is web && [ "$STATUS" != 404 ] && [ "$BODY" != e ]; then
        ok "GET /api/v1/auth/wechat/verify (unsigned) -> web role refuses ($STATUS)"
    else
        fail "GET /api/v1/auth/wechat/verify (unsigned) -> web role" "$(got)"
    fi
fi

# An APIv3 notify (JSON, Wechatpay-* headers) with a stale timestamp and a
# wrong signature: the web role answers {"code":"FAIL",...} with a 4xx/5xx.
request POST /api/v1/payment/notify -H 'Content-Type: application/json' \
    -H 'Wechatpay-Timestamp: 1' -H 'Wechatpay-Nonce: routing-check' -H 'Wechatpay-Signature: AAAA' \
    -H 'Wechatpay-Serial: PUB_KEY_ID_0000000000000000000000000000000000000000' --data-binary '{"id":"routing-check"}'
if route_is web && [ "$STATUS" -ge 400 ] && [ "$STATUS" != 404 ] && [ "$STATUS" != 405 ] && [[ $BODY == *FAIL* ]]; then
    ok "POST /api/v1/payment/notify (APIv3, bad signature) -> web role refuses ($STATUS)"
else
    fail "POST /api/v1/payment/notify (APIv3, bad signature) -> web role, FAIL" "$(got)"
fi
# An APIv2 notify (XML) without a valid sign: FAIL in APIv2's XML (HTTP 200 is
# APIv2's convention) or a 4xx/5xx.
request POST /api/v1/payment/notify -H 'Content-Type: text/xml' \
    --data-binary '<xml><return_code><![CDATA[SUCCESS]]></return_code><sign>0</sign></xml>'
if route_is web && [ "$STATUS" != 404 ] && [ "$STATUS" != 405 ] && [[ $BODY == *FAIL* ]]; then
    ok "POST /api/v1/payment/notify (APIv2, bad sign) -> web role refuses ($STATUS)"
else
    fail "POST /api/v1/payment/notify (APIv2, bad sign) -> web role, FAIL" "$(got)"
fi

request GET /api/v1/payment/notify
if route_is web && [ "$STATUS" = 405 ]; then
    ok "GET /api/v1/payment/notify -> web role, 405"
else
    fail "GET /api/v1/payment/notify -> web role, 405" "$(got)"
fi

# --- Request ids and headers ---------------------------------------------------------
rid=routing-check-$RANDOM$RANDOM
request GET /api/v1/payment/products -H "X-Request-Id: $rid"
if [ "$(header X-Request-Id)" = "$rid" ]; then
    ok "X-Request-Id from the client is kept ($rid)"
else
    fail "X-Request-Id from the client is kept" "got '$(header X-Request-Id)'"
fi
request GET /api/v1/payment/products -H 'X-Request-Id: bad id <script>'
if [[ $(header X-Request-Id) =~ ^[0-9a-f]{32}$ ]]; then
    ok "an unsafe X-Request-Id is replaced by nginx's ($(header X-Request-Id))"
else
    fail "an unsafe X-Request-Id is replaced" "got '$(header X-Request-Id)'"
fi
request GET /api/v1/payment/products
if [[ -n $(header X-Request-Id) ]] && [ "$(grep -ci '^x-request-id:' "$tmp/h")" = 1 ]; then
    ok "one X-Request-Id on every answer ($(header X-Request-Id))"
else
    fail "one X-Request-Id on every answer" "$(grep -i '^x-request-id:' "$tmp/h" | tr -d '\r' | tr '\n' ' ')"
fi
if [ "$(header X-Content-Type-Options)" = nosniff ]; then
    ok "X-Content-Type-Options: nosniff on API answers"
else
    fail "X-Content-Type-Options: nosniff on API answers" "got '$(header X-Content-Type-Options)'"
fi

# --- Body limits (plugins.toml max_body_kib: web 64, app 1024) -------------------
head -c $((64 * 1024 + 1)) /dev/zero | tr '\0' a > "$tmp/big-web"
request POST /api/v1/payment/notify --data-binary "@$tmp/big-web"
if [ "$STATUS" = 413 ]; then ok "POST to the web role over 64 KiB -> 413"; else fail "POST to the web role over 64 KiB -> 413" "$(got)"; fi
head -c $((1024 * 1024 + 1)) /dev/zero | tr '\0' a > "$tmp/big-app"
request POST /api/v1/auth/wechat/qrcode --data-binary "@$tmp/big-app"
if [ "$STATUS" = 413 ]; then ok "POST to the app role over 1 MiB -> 413"; else fail "POST to the app role over 1 MiB -> 413" "$(got)"; fi

# --- The internal API: never through the public server ----------------------------
internal_paths=(
    /api/v1/internal/user/create-or-update
    /api/v1/internal/binding/create
    /api/v1/internal/binding/update
    /api/v1/internal/payment/order/update
    /api/v1/internal
    /api/v1/internal/
    /api/v1/internal/no-such-route
    /api/v1/internals
    /api/v1/internal.
    # %-encoded slashes, dots and letters
    /api/v1%2Finternal/user/create-or-update
    /api/v1%2finternal/user/create-or-update
    /api%2Fv1%2Finternal%2Fuser%2Fcreate-or-update
    /api/v1/internal%2Fuser%2Fcreate-or-update
    /api/v1/%69nternal/user/create-or-update
    /api/v1/inte%72nal/user/create-or-update
    /api/v1/%49NTERNAL/user/create-or-update
    /%61pi/v1/internal/user/create-or-update
    /api/v1/%2e/internal/user/create-or-update
    /api/v1/%2E/internal/user/create-or-update
    /api/v1/x/%2e%2e/internal/user/create-or-update
    /api/v1/x/%2E%2E%2Finternal/user/create-or-update
    /api/v1/x/..%2finternal/user/create-or-update
    /api/v1/x/.%2e/internal/user/create-or-update
    /api/v1/%c0%afinternal/user/create-or-update
    # doubled slashes, dot segments
    //api/v1/internal/user/create-or-update
    /api//v1/internal/user/create-or-update
    /api/v1//internal/user/create-or-update
    /api/v1/internal//user/create-or-update
    /api/v1/./internal/user/create-or-update
    /./api/v1/internal/user/create-or-update
    /api/v1/x/../internal/user/create-or-update
    /api/v1/user/../internal/user/create-or-update
    /api/v2/../v1/internal/user/create-or-update
    /api/v1/payment/notify/../../internal/payment/order/update
    # case
    /API/V1/INTERNAL/user/create-or-update
    /api/v1/Internal/user/create-or-update
    /api/v1/INTERNAL/binding/create
    /Api/V1/Internal/
    /api/V1/internal/binding/update
    # ; parameters
    '/api/v1/internal;a=b/user/create-or-update'
    '/api/v1;a=b/internal/user/create-or-update'
    '/api/v1/internal/user/create-or-update;jsessionid=1'
    # trailing tricks
    /api/v1/internal/user/create-or-update/
    /api/v1/internal/user/create-or-update/.
    /api/v1/internal/user/create-or-update/./
    /api/v1/internal/user/create-or-update%2F
    /api/v1/internal/user/create-or-update%20
    /api/v1/internal/user/create-or-update%09
    /api/v1/internal/user/create-or-update%3F
    /api/v1/internal/user/create-or-update%23
    '/api/v1/internal/user/create-or-update#fragment'
    '/api/v1/internal/user/create-or-update?x=1'
    '/api/v1/internal/user/create-or-update?'
    /api/v1/internal/user/create-or-update%0d%0aX-Injected:%201
    # backslashes
    '/api/v1/internal\user/create-or-update'
    '/api\v1\internal/user/create-or-update'
    /api/v1/internal%5cuser/create-or-update
    # absolute-form request target
    http://localhost/api/v1/internal/user/create-or-update
    http://localhost//api/v1/%69nternal/binding/create
)
for target in "${internal_paths[@]}"; do
    request POST "$target" -H 'Content-Type: application/json' --data-binary '{}'
    expect_denied "POST $target"
    request GET "$target"
    expect_denied "GET $target"
done
for method in PUT DELETE PATCH OPTIONS HEAD PROPFIND; do
    for target in /api/v1/internal/binding/update /API/v1/internal/payment/order/update /api/v1/%69nternal/binding/update; do
        request "$method" "$target"
        if [ "$method" = HEAD ]; then
            if [ "$STATUS" = 404 ] && route_is denied; then ok "HEAD $target -> 404 from nginx"; else fail "HEAD $target" "expected 404 from nginx, $(got)"; fi
        else
            expect_denied "$method $target"
        fi
    done
done
request POST /api/v1/internal/user/create-or-update --http1.0 -H 'Content-Type: application/json' --data-binary '{}'
expect_denied "POST /api/v1/internal/user/create-or-update over HTTP/1.0"
# With the internal API's own signature headers (they must not help).
request POST /api/v1/internal/user/create-or-update -H 'X-Wxhost-Timestamp: 1' -H 'X-Wxhost-Signature: 00' --data-binary '{}'
expect_denied "POST /api/v1/internal/user/create-or-update with X-Wxhost-* headers"
# Refused by nginx's parser (400) before any routing: still never reaches wxhost.
for target in /api/v1/internal/user/create-or-update%00 /../api/v1/internal/user/create-or-update /api/../../api/v1/internal/binding/create; do
    request GET "$target"
    if [ "$STATUS" = 400 ] || { [ "$STATUS" = 404 ] && route_is denied; }; then
        ok "GET $target -> $STATUS from nginx"
    else
        fail "GET $target" "expected 400/404 from nginx, $(got)"
    fi
done

# Non-canonical paths to ordinary routes are refused too (wxhost would see
# something other than what nginx routed on).
for target in /api/v1/payment/%70roducts /api//v1/payment/products /api/v1/./payment/products \
    /api/v1/x/../payment/products /api/v1/auth/wechat/%76erify /api/v1/payment/notify%2F; do
    request GET "$target"
    expect_denied "GET $target (non-canonical)"
done

# --- Static frontend -----------------------------------------------------------------
# /config.json comes from the app role, with the CSP the app role sends with
# its pages: nginx must send the same one with the static files.
request GET /config.json
csp=$(header Content-Security-Policy)
if [ "$STATUS" = 200 ] && route_is app && [[ $BODY == *'"appid"'* ]] && [ -n "$csp" ]; then
    ok "GET /config.json -> app role (the pages' settings, CSP: $csp)"
else
    fail "GET /config.json -> app role" "$(got) csp=$csp"
    # Without it: the production policy of deploy/nginx/wxhost.conf.
    csp="default-src 'self'; img-src 'self' data: https://thirdwx.qlogo.cn https://wx.qlogo.cn https://mp.weixin.qq.com; connect-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
fi
for target in / /index.html /member.html; do
    request GET "$target"
    if [ "$STATUS" = 200 ] && route_is static && [[ $CTYPE == text/html* ]]; then
        ok "GET $target -> static file ($CTYPE)"
    else
        fail "GET $target -> static file" "$(got) content-type=$CTYPE"
        continue
    fi
    if [ "$(header Content-Security-Policy)" = "$csp" ]; then
        ok "GET $target has the app role's CSP"
    else
        fail "GET $target has the app role's CSP" "got '$(header Content-Security-Policy)'"
    fi
    if [ "$(header Cache-Control)" = no-cache ]; then
        ok "GET $target: Cache-Control: no-cache"
    else
        fail "GET $target: Cache-Control: no-cache" "got '$(header Cache-Control)'"
    fi
    etag=$(header ETag)
    if [ -n "$etag" ]; then
        request GET "$target" -H "If-None-Match: $etag"
        if [ "$STATUS" = 304 ]; then
            ok "GET $target revalidates (ETag $etag -> 304)"
        else
            fail "GET $target revalidates with its ETag" "$(got)"
        fi
    else
        fail "GET $target has an ETag" "none"
    fi
done
# An asset the index page links to.
request GET /
asset=$(grep -o 'assets/[A-Za-z0-9._-]*' "$tmp/b" | head -n 1)
if [ -n "$asset" ]; then
    request GET "/$asset"
    if [ "$STATUS" = 200 ] && route_is static && [ "$(header Cache-Control)" = no-cache ] && [ "$(header Content-Security-Policy)" = "$csp" ]; then
        ok "GET /$asset -> static file ($CTYPE, no-cache, CSP)"
    else
        fail "GET /$asset -> static file" "$(got) cache-control=$(header Cache-Control)"
    fi
else
    skip "GET /assets/<file>" "the index page links no asset"
fi
request GET /assets/no-such-file.js
if [ "$STATUS" = 404 ] && route_is static; then ok "GET /assets/no-such-file.js -> 404 (static)"; else fail "GET /assets/no-such-file.js -> 404" "$(got)"; fi
for target in /healthz /admin/plugins /plugins.toml /no-such-page /.env /api /tests/package.json; do
    request GET "$target"
    if [ "$STATUS" = 404 ] && route_is none; then ok "GET $target -> 404"; else fail "GET $target -> 404" "$(got)"; fi
done

# --- The internal listener (web -> app) ------------------------------------------------
if [ -n "$internal_url" ]; then
    request --base "$internal_url" POST /api/v1/internal/user/create-or-update -H 'Content-Type: application/json' --data-binary '{}'
    if [ "$STATUS" = 401 ]; then
        ok "internal listener: an unsigned internal call reaches the app role, which answers 401"
    else
        fail "internal listener: unsigned internal call -> app role 401" "$(got)"
    fi
    for target in /api/v1/payment/products /api/v1/auth/wechat/verify /healthz /api/v1/%69nternal/binding/create /api/v1/internal/../internal/binding/create; do
        request --base "$internal_url" GET "$target"
        if [ "$STATUS" = 404 ] && [[ $BODY == *'"message":"not found"'* ]]; then
            ok "internal listener: GET $target -> 404 from nginx"
        else
            fail "internal listener: GET $target -> 404 from nginx" "$(got)"
        fi
    done
fi

echo "# $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
