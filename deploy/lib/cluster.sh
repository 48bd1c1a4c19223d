# shellcheck shell=bash
# shellcheck disable=SC2016,SC2034,SC2119,SC2120
# (single quotes are meant literally; the variables are used by the scripts
# that source this file; cluster_paths' argument comes from them too.)
# Shared by deploy/local-cluster, deploy/rolling-restart and
# deploy/rolling-plugin-update: the layout of the state folder, starting and
# stopping processes, rendering and reloading the cluster's nginx.
#
# State folder ($WXHOST_CLUSTER_STATE, default ./data/cluster):
#   secrets.env        generated secrets (0600), reused by every `up`
#   cluster.env        ports, binary, process list (no secrets)
#   cluster.info       the KEY=VALUE lines `up` printed
#   frontend/          placeholder frontend, when the repository has none
#   nginx/             nginx.conf (rendered), wxhost -> deploy/nginx, logs/, tmp/, nginx.pid
#   procs/<name>/      one wxhost process (web1, web2, app1, app2) or the simulator (sim):
#       args           its command line after the binary, one argument a line
#       env            its environment (0600), sourced into an empty one
#       unset          variables removed from it after that (env -u)
#       health         URLs that answer 200 when it is up
#       pid, pid.start its pid and start time (so a recycled pid is never signalled)
#       ident          a string its command line contains (the check when pid.start is missing)
#       log
#       plugins.toml, plugins/dist/...   its own copy of the configuration and plugins

set -euo pipefail
# `&` in a ${var//pattern/replacement} is literal (bash 5.2 would insert the match).
shopt -u patsub_replacement 2>/dev/null || true

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$DEPLOY_DIR/.." && pwd)

log() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Settings that never reach a web process (secrets and settings of the app role).
WEB_FORBIDDEN=(DATABASE_URL WECHAT_APPSECRET WECHATPAY_PRIVATE_KEY WECHATPAY_MCHID WECHATPAY_SERIAL
               WECHATPAY_API_BASE WECHATPAY_NOTIFY_URL WECHATPAY_API_VERSION
               SESSION_SECRET WXHOST_ADMIN_TOKEN WECHAT_API_BASE WECHAT_QRCODE_BASE
               WECHAT_OAUTH_AUTHORIZE_URL WXHOST_DEV_SIMULATOR_URL)
# Nothing of the web role's is kept from the app role: it checks WeChat's
# signatures again itself (WECHAT_TOKEN, WECHAT_AES_KEY).
APP_FORBIDDEN=()

# The environment a cluster process starts from: these names and prefixes of
# the caller's environment (the rest of it is not passed on).
ENV_KEEP_NAMES=(PATH HOME USER LOGNAME LANG LC_ALL TZ TMPDIR XDG_CACHE_HOME SSL_CERT_FILE SSL_CERT_DIR
                RUST_LOG RUST_BACKTRACE NO_COLOR DATABASE_URL INTERNAL_SECRET SESSION_SECRET APP_INTERNAL_URL
                http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY)
ENV_KEEP_PREFIXES=(WECHAT_ WECHATPAY_ WXHOST_)
# ...except these, which describe the cluster itself.
ENV_SKIP_NAMES=(WXHOST_BIN WXHOST_CLUSTER_STATE WXHOST_CLUSTER_BASE_PORT WXHOST_CLUSTER_TIMEOUT
                WXHOST_CLUSTER_WEB WXHOST_CLUSTER_APP WXHOST_FRONTEND_DIR WXHOST_CONFIG WXHOST_PLUGIN_DIST
                WXHOST_WEB_LISTEN WXHOST_APP_LISTEN WXHOST_ADMIN_LISTEN WXHOST_STOP_TIMEOUT WXHOST_TEST_MYSQL_URL
                WXHOST_CLUSTER_TOKEN_TTL WXHOST_CLUSTER_NOTIFY_RETRY_SCALE)

# --- paths -------------------------------------------------------------------

# Sets STATE (absolute), NGINX_DIR, PROCS_DIR. With "create", makes the folder.
cluster_paths() {
    local state=${WXHOST_CLUSTER_STATE:-./data/cluster}
    if [ "${1:-}" = create ]; then
        mkdir -p "$state"
    fi
    if [ -d "$state" ]; then
        STATE=$(cd "$state" && pwd)
    else
        STATE=$state
    fi
    NGINX_DIR=$STATE/nginx
    PROCS_DIR=$STATE/procs
}

# Loads cluster.env (written by `up`); fails if there is no cluster here.
cluster_load() {
    cluster_paths
    [ -f "$STATE/cluster.env" ] || die "no cluster in $STATE (run deploy/local-cluster up first)"
    # shellcheck disable=SC1091
    . "$STATE/cluster.env"
    if [ -n "${WXHOST_BIN:-}" ]; then
        BIN=$(abs_path "$WXHOST_BIN")
    fi
}

abs_path() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

# The wxhost binary: $WXHOST_BIN, else target/debug/wxhost under CARGO_TARGET_DIR.
find_binary() {
    local bin=${WXHOST_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/debug/wxhost}
    bin=$(abs_path "$bin")
    [ -x "$bin" ] || die "no wxhost binary at $bin (build it with cargo build, or set WXHOST_BIN)"
    BIN=$bin
}

# --- tools -------------------------------------------------------------------

# Installs a Debian package when its command is missing (as root, or with sudo -n).
ensure_command() {
    local cmd=$1; shift
    command -v "$cmd" >/dev/null 2>&1 && return 0
    [ -x "/usr/sbin/$cmd" ] && { PATH=$PATH:/usr/sbin; return 0; }
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            die "$cmd is missing; install it (apt-get install $1)"
        fi
    fi
    command -v apt-get >/dev/null 2>&1 || die "$cmd is missing and there is no apt-get; install $1"
    log "installing $* (for $cmd)"
    local pkg
    for pkg in "$@"; do
        if "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 ||
            { "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 &&
              "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1; }; then
            break
        fi
    done
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || die "could not install $cmd"
    [ -x "/usr/sbin/$cmd" ] && PATH=$PATH:/usr/sbin
    return 0
}

# --- ports -------------------------------------------------------------------

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Port layout from a base: nginx +0, nginx internal +1, simulator +2,
# web i: +10+2(i-1) (role) and +11+2(i-1) (admin), app i: +20+2(i-1) and +21+2(i-1).
layout_ports() {
    local base=$1
    NGINX_PORT=$base
    NGINX_INTERNAL_PORT=$((base + 1))
    SIM_PORT=$((base + 2))
    PORTS=("$NGINX_PORT" "$NGINX_INTERNAL_PORT" "$SIM_PORT")
    local i
    for i in $(seq 1 "$WEB_COUNT"); do PORTS+=($((base + 8 + 2 * i)) $((base + 9 + 2 * i))); done
    for i in $(seq 1 "$APP_COUNT"); do PORTS+=($((base + 18 + 2 * i)) $((base + 19 + 2 * i))); done
}

choose_ports() {
    local base p busy
    if [ -n "${WXHOST_CLUSTER_BASE_PORT:-}" ]; then
        base=$WXHOST_CLUSTER_BASE_PORT
        if ! [[ $base =~ ^[0-9]+$ ]] || [ "$base" -lt 1024 ] || [ "$base" -gt 65500 ]; then
            die "WXHOST_CLUSTER_BASE_PORT=$base is not a port between 1024 and 65500"
        fi
        layout_ports "$base"
        for p in "${PORTS[@]}"; do
            port_in_use "$p" && die "port $p (from WXHOST_CLUSTER_BASE_PORT=$base) is in use"
        done
        BASE_PORT=$base
        return 0
    fi
    for _ in $(seq 1 50); do
        # Below Linux's ephemeral range (32768+), so that no outgoing or
        # port-0 socket of another program can take a port between check and bind.
        base=$((20000 + (RANDOM % 400) * 30))
        layout_ports "$base"
        busy=
        for p in "${PORTS[@]}"; do
            if port_in_use "$p"; then busy=1; break; fi
        done
        if [ -z "$busy" ]; then
            BASE_PORT=$base
            return 0
        fi
    done
    die "found no free range of ports; set WXHOST_CLUSTER_BASE_PORT"
}

# --- secrets -----------------------------------------------------------------

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

# 43 characters: 32 random bytes in base64 without the padding (an EncodingAESKey).
random_aes_key() {
    local k
    k=$(head -c 32 /dev/urandom | base64 -w0 | tr -d '=')
    [ ${#k} -eq 43 ] || die "could not make an AES key"
    printf '%s' "$k"
}

# Every secret the cluster needs: from the environment when set, else
# generated once into secrets.env (mode 0600) and read back from there.
load_secrets() {
    local file=$STATE/secrets.env
    if [ ! -f "$file" ]; then
        (umask 077 && : > "$file")
    fi
    chmod 600 "$file"
    local name value
    for name in WECHAT_TOKEN WECHAT_AES_KEY WECHAT_APPSECRET INTERNAL_SECRET SESSION_SECRET WXHOST_ADMIN_TOKEN \
        WXHOST_CONTROL_TOKEN WECHATPAY_APIV3_KEY; do
        [ -n "${!name:-}" ] && continue
        value=$(sed -n "s/^$name=//p" "$file" | tail -n 1)
        if [ -z "$value" ]; then
            case $name in
                WECHAT_AES_KEY) value=$(random_aes_key) ;;
                INTERNAL_SECRET | SESSION_SECRET | WXHOST_CONTROL_TOKEN) value=$(random_hex 32) ;;
                WECHATPAY_APIV3_KEY) value=$(random_hex 16) ;;    # 32 characters
                *) value=$(random_hex 16) ;;
            esac
            printf '%s=%s\n' "$name" "$value" >> "$file"
        fi
        printf -v "$name" '%s' "$value"
        export "${name?}"
    done
    export WECHAT_APPID=${WECHAT_APPID:-wxcluster0000000a}
}

# --- processes ---------------------------------------------------------------

in_list() {
    local x=$1; shift
    local y
    for y in "$@"; do [ "$x" = "$y" ] && return 0; done
    return 1
}

# Writes procs/<name>/env: the kept part of the current environment plus
# NAME=VALUE arguments, minus the names in the role's forbidden list.
write_proc_env() {
    local name=$1 role=$2; shift 2
    local dir=$PROCS_DIR/$name
    local -a forbidden=()
    case $role in
        web) forbidden=("${WEB_FORBIDDEN[@]}") ;;
        app) forbidden=("${APP_FORBIDDEN[@]}") ;;
        sim) forbidden=(DATABASE_URL SESSION_SECRET INTERNAL_SECRET WXHOST_ADMIN_TOKEN WXHOST_CONTROL_TOKEN WECHATPAY_PRIVATE_KEY) ;;
    esac
    local -A extra=()
    local kv
    for kv in "$@"; do extra[${kv%%=*}]=${kv#*=}; done
    local tmp=$dir/env.tmp v p keep
    (umask 077 && : > "$tmp")
    {
        echo "# wxhost local cluster: the environment of $name ($role). Generated by deploy/local-cluster."
        for v in $(compgen -e | sort); do
            [[ $v =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
            [ -n "${extra[$v]+x}" ] && continue
            in_list "$v" "${ENV_SKIP_NAMES[@]}" && continue
            in_list "$v" "${forbidden[@]}" && continue
            keep=
            in_list "$v" "${ENV_KEEP_NAMES[@]}" && keep=1
            for p in "${ENV_KEEP_PREFIXES[@]}"; do [[ $v == "$p"* ]] && keep=1; done
            [ -n "$keep" ] || continue
            printf 'export %s=%q\n' "$v" "${!v}"
        done
        for v in $(printf '%s\n' "${!extra[@]}" | sort); do
            in_list "$v" "${forbidden[@]}" && continue
            printf 'export %s=%q\n' "$v" "${extra[$v]}"
        done
    } >> "$tmp"
    mv "$tmp" "$dir/env"
    printf '%s\n' "${forbidden[@]}" > "$dir/unset"
}

# Runs a command in process <name>'s environment, in the foreground.
run_in_proc_env() {
    local name=$1; shift
    local dir=$PROCS_DIR/$name
    local -a unset_args=()
    local v
    while IFS= read -r v; do [ -n "$v" ] && unset_args+=(-u "$v"); done < "$dir/unset"
    (cd "$dir" && env -i bash -c 'set -a; . "$1"; set +a; shift; exec "$@"' wxhost-env "$dir/env" \
        env "${unset_args[@]}" "$@")
}

# Starts process <name> in the background, in a session of its own (so the
# caller's Ctrl-C or process-group kill does not reach it), stdio on its log.
start_proc() {
    local name=$1
    local dir=$PROCS_DIR/$name
    local -a args unset_args=()
    mapfile -t args < "$dir/args"
    local v
    while IFS= read -r v; do [ -n "$v" ] && unset_args+=(-u "$v"); done < "$dir/unset"
    printf -- '--- %s start: %s %s\n' "$(date '+%F %T')" "$BIN" "${args[*]}" >> "$dir/log"
    # Every step execs the next one: $! is the wxhost process itself (setsid
    # does not fork: a background job of a script is not a group leader).
    (cd "$dir" && exec env -i bash -c 'set -a; . "$1"; set +a; shift; exec "$@"' wxhost-env "$dir/env" \
        env "${unset_args[@]}" setsid "$BIN" "${args[@]}") </dev/null >>"$dir/log" 2>&1 &
    local pid=$!
    echo "$pid" > "$dir/pid"
    # Its start time identifies it for good (stable across exec, unlike the
    # command line; a later process reusing the pid has another).
    start_time "$pid" > "$dir/pid.start" || true
}

# The start time of a process (field 22 of /proc/PID/stat), after the
# command name, which may contain spaces.
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    awk '{print $20}' <<<"$stat"
}

# The pid in a pid file if that process is alive and its command line contains
# the identity string; else nothing (and status 1).
live_pid() {
    local pidfile=$1 ident=$2 pid
    [ -f "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' < "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # A zombie is not alive.
    [ "$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$ident" || return 1
    printf '%s\n' "$pid"
}

proc_pid() {
    local dir=$PROCS_DIR/$1 pid
    [ -f "$dir/ident" ] || return 1
    if [ -s "$dir/pid.start" ]; then
        pid=$(tr -dc '0-9' < "$dir/pid" 2>/dev/null) || return 1
        [ -n "$pid" ] && [ "$(start_time "$pid")" = "$(cat "$dir/pid.start")" ] || return 1
        [ "$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
        printf '%s\n' "$pid"
    else
        live_pid "$dir/pid" "$(cat "$dir/ident")"
    fi
}

# Sends SIGTERM to the given pids, waits up to $WXHOST_STOP_TIMEOUT seconds
# (default 20) for all of them, then SIGKILLs what is left.
stop_pids() {
    [ $# -gt 0 ] || return 0
    local timeout=${WXHOST_STOP_TIMEOUT:-20} pid left i
    kill -TERM "$@" 2>/dev/null || true
    for i in $(seq 1 $((timeout * 10))); do
        left=
        for pid in "$@"; do
            if kill -0 "$pid" 2>/dev/null && [ "$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ]; then
                left=1
            fi
        done
        [ -z "$left" ] && return 0
        sleep 0.1
    done
    for pid in "$@"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop within ${timeout}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    sleep 0.2
}

stop_proc() {
    local name=$1 pid
    if pid=$(proc_pid "$name"); then
        stop_pids "$pid"
        printf -- '--- %s stopped\n' "$(date '+%F %T')" >> "$PROCS_DIR/$name/log"
    fi
    rm -f "$PROCS_DIR/$name/pid" "$PROCS_DIR/$name/pid.start"
}

# Waits until every health URL of <name> answers 200; fails early if the
# process exits, and shows the end of its log on failure.
wait_healthy() {
    local name=$1 timeout=${2:-${WXHOST_CLUSTER_TIMEOUT:-180}}
    local dir=$PROCS_DIR/$name url ok deadline
    deadline=$((SECONDS + timeout))
    while :; do
        if ! proc_pid "$name" >/dev/null; then
            log "$name exited while starting; the end of $dir/log:"
            tail -n 40 "$dir/log" >&2 || true
            return 1
        fi
        ok=1
        while IFS= read -r url; do
            [ -n "$url" ] || continue
            curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null || { ok=; break; }
        done < "$dir/health"
        [ -n "$ok" ] && return 0
        if [ $SECONDS -ge $deadline ]; then
            log "$name did not answer $(tr '\n' ' ' < "$dir/health")within ${timeout}s; the end of $dir/log:"
            tail -n 40 "$dir/log" >&2 || true
            return 1
        fi
        sleep 0.25
    done
}

# Names of the wxhost serve processes (not the simulator), in start order.
serve_procs() {
    local n
    for n in $PROCS; do
        [ "$n" = sim ] || printf '%s\n' "$n"
    done
}

proc_role() { cat "$PROCS_DIR/$1/role"; }

# --- nginx -------------------------------------------------------------------

# The static pages' CSP when the app role does not say (the production one,
# as in deploy/nginx/wxhost.conf).
DEFAULT_CSP="default-src 'self'; img-src 'self' data: https://thirdwx.qlogo.cn https://wx.qlogo.cn https://mp.weixin.qq.com; connect-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"

nginx_cmd() {
    nginx -p "$NGINX_DIR/" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/logs/error.log" "$@"
}

nginx_pid() {
    live_pid "$NGINX_DIR/nginx.pid" "$NGINX_DIR"
}

# Renders nginx.conf from deploy/nginx/cluster.conf.template. Arguments:
# process names to mark `down` in their upstream (drained).
render_nginx() {
    local -a drained=("$@")
    local web_servers="" app_servers="" name role listen mark
    for name in $(serve_procs); do
        role=$(proc_role "$name")
        listen=$(cat "$PROCS_DIR/$name/listen")
        mark=""
        in_list "$name" "${drained[@]}" && mark=" down"
        local line="        server $listen max_fails=1 fail_timeout=2s$mark;    # $name"
        if [ "$role" = web ]; then
            web_servers+="$line"$'\n'
        else
            app_servers+="$line"$'\n'
        fi
    done
    local generation=1
    [ -f "$NGINX_DIR/generation" ] && generation=$(( $(cat "$NGINX_DIR/generation") + 1 ))
    local user_line="# (not root: nginx runs as the current user)"
    if [ "$(id -u)" -eq 0 ]; then
        user_line="user $(id -un) $(id -gn);    # workers run as the invoking user"
    fi
    local text
    text=$(cat "$DEPLOY_DIR/nginx/cluster.conf.template")
    text=${text//'${NGINX_USER_LINE}'/$user_line}
    text=${text//'${NGINX_DIR}'/$NGINX_DIR}
    text=${text//'${NGINX_PORT}'/$NGINX_PORT}
    text=${text//'${NGINX_INTERNAL_PORT}'/$NGINX_INTERNAL_PORT}
    text=${text//'${FRONTEND_DIR}'/$FRONTEND_DIR}
    text=${text//'${WEB_SERVERS}'/${web_servers%$'\n'}}
    text=${text//'${APP_SERVERS}'/${app_servers%$'\n'}}
    text=${text//'${GENERATION}'/$generation}
    text=${text//'${CSP}'/${CSP:-$DEFAULT_CSP}}
    if [[ $text == *'${'* ]]; then
        die "cluster.conf.template has a placeholder render_nginx does not know: $(grep -o '\${[A-Z_]*}' <<<"$text" | head -n 1)"
    fi
    mkdir -p "$NGINX_DIR/logs" "$NGINX_DIR/tmp"
    ln -sfn "$DEPLOY_DIR/nginx" "$NGINX_DIR/wxhost"
    printf '%s\n' "$text" > "$NGINX_DIR/nginx.conf.new"
    mv "$NGINX_DIR/nginx.conf.new" "$NGINX_DIR/nginx.conf"
    printf '%s\n' "$generation" > "$NGINX_DIR/generation"
}

# Reloads the running nginx with the current nginx.conf and waits until its
# workers serve it (the internal listener reports the generation).
nginx_reload() {
    local want out i
    local master old_workers alive p
    want=$(cat "$NGINX_DIR/generation")
    out=$(nginx_cmd -t 2>&1) || { log "$out"; die "the rendered nginx.conf does not pass nginx -t"; }
    master=$(nginx_pid || true)
    old_workers=
    if [ -n "$master" ]; then old_workers=$(pgrep -P "$master" 2>/dev/null || true); fi
    nginx_cmd -s reload </dev/null >>"$NGINX_DIR/logs/stderr.log" 2>&1
    # Old workers keep serving their kept-alive connections with the old
    # upstream list until they exit (worker_shutdown_timeout bounds it): wait
    # for them, so that "out of nginx" really means no new request gets there.
    for _ in $(seq 1 150); do
        alive=
        for p in $old_workers; do [ -d "/proc/$p" ] && alive=1; done
        [ -z "$alive" ] && break
        sleep 0.1
    done
    for i in $(seq 1 100); do
        # Several answers in a row: an old worker may still take one connection.
        if [ "$(curl -fsS -m 1 "http://127.0.0.1:$NGINX_INTERNAL_PORT/_wxhost/generation" 2>/dev/null)" = "$want" ] &&
            [ "$(curl -fsS -m 1 "http://127.0.0.1:$NGINX_INTERNAL_PORT/_wxhost/generation" 2>/dev/null)" = "$want" ] &&
            [ "$(curl -fsS -m 1 "http://127.0.0.1:$NGINX_INTERNAL_PORT/_wxhost/generation" 2>/dev/null)" = "$want" ]; then
            return 0
        fi
        sleep 0.1
    done
    die "nginx did not take the new configuration (generation $want) within 10s; see $NGINX_DIR/logs/error.log"
}

# --- admin API ---------------------------------------------------------------

# curl arguments for the admin API: the control token, when there is one (as
# `-H @file`, so that it does not show in the process list).
admin_auth_args() {
    local token=${WXHOST_CONTROL_TOKEN:-}
    if [ -z "$token" ] && [ -f "$STATE/secrets.env" ]; then
        token=$(sed -n 's/^WXHOST_CONTROL_TOKEN=//p' "$STATE/secrets.env" | tail -n 1)
    fi
    if [ -n "$token" ]; then
        (umask 077 && printf 'Authorization: Bearer %s\n' "$token" > "$STATE/admin.header")
        printf '%s\n' -H "@$STATE/admin.header"
    fi
}
