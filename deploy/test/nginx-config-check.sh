#!/usr/bin/env bash
# `nginx -t` on the production configuration (deploy/nginx/wxhost.conf, inside
# a test http{} wrapper, with a throw-away self-signed certificate and logs in
# a temporary folder) and on the local cluster's configuration (the template
# rendered the way deploy/local-cluster renders it). Exits non-zero if either
# fails. Needs nginx and openssl (installs nginx-light with apt-get if missing).
set -euo pipefail
# shellcheck source=deploy/lib/cluster.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/cluster.sh"

ensure_command nginx nginx-light nginx
ensure_command openssl openssl

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=

# --- production --------------------------------------------------------------
prod=$tmp/prod
mkdir -p "$prod/tls" "$prod/logs" "$prod/tmp"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=your.domain" \
    -keyout "$prod/tls/privkey.pem" -out "$prod/tls/fullchain.pem" >/dev/null 2>&1
ln -s "$DEPLOY_DIR/nginx" "$prod/wxhost"
# The file as shipped, with only the machine-specific paths pointed into
# $prod. (`nginx -t` binds the listen addresses: without root, 80 and 443
# become 18080 and 18443; without IPv6, the [::] listens go.)
sed_args=(-E -e "s#/etc/letsencrypt/live/your.domain/#$prod/tls/#g" -e "s#/var/log/nginx/#$prod/logs/#g")
if [ "$(id -u)" -ne 0 ]; then
    sed_args+=(-e 's/^([[:space:]]*listen[[:space:]]+(\[::\]:)?)80;/\118080;/'
               -e 's/^([[:space:]]*listen[[:space:]]+(\[::\]:)?)443 /\118443 /')
fi
if [ ! -s /proc/net/if_inet6 ]; then
    sed_args+=(-e '/^[[:space:]]*listen[[:space:]]+\[::\]/d')
fi
sed "${sed_args[@]}" "$DEPLOY_DIR/nginx/wxhost.conf" > "$prod/wxhost.conf"
cat > "$prod/nginx.conf" <<EOF
# Test harness: what /etc/nginx/nginx.conf provides around wxhost.conf.
$( [ "$(id -u)" -eq 0 ] && echo "user $(id -un) $(id -gn);" )
pid $prod/nginx.pid;
error_log $prod/logs/error.log;
events { worker_connections 64; }
http {
    types { text/html html; text/css css; application/javascript js; }
    default_type application/octet-stream;
    client_body_temp_path $prod/tmp/body;
    proxy_temp_path $prod/tmp/proxy;
    fastcgi_temp_path $prod/tmp/fastcgi;
    uwsgi_temp_path $prod/tmp/uwsgi;
    scgi_temp_path $prod/tmp/scgi;
    include wxhost.conf;
}
EOF
echo "== nginx -t: production (deploy/nginx/wxhost.conf)"
if out=$(nginx -t -p "$prod/" -c "$prod/nginx.conf" -e "$prod/logs/error.log" 2>&1); then
    printf '%s\n' "$out"
    echo "ok   production configuration"
else
    printf '%s\n' "$out"
    echo "FAIL production configuration"
    failed=1
fi

# --- local cluster -----------------------------------------------------------
STATE=$tmp/cluster
NGINX_DIR=$STATE/nginx
PROCS_DIR=$STATE/procs
FRONTEND_DIR=$STATE/frontend
mkdir -p "$FRONTEND_DIR"
WEB_COUNT=2 APP_COUNT=2
layout_ports 40000
PROCS="sim web1 web2 app1 app2"
i=0
for name in web1 web2 app1 app2; do
    mkdir -p "$PROCS_DIR/$name"
    echo "${name%[0-9]}" > "$PROCS_DIR/$name/role"
    echo "127.0.0.1:$((41000 + i))" > "$PROCS_DIR/$name/listen"
    i=$((i + 1))
done
echo "== nginx -t: local cluster (deploy/nginx/cluster.conf.template, rendered)"
for drained in "" app1; do
    # shellcheck disable=SC2086
    render_nginx $drained
    if out=$(nginx_cmd -t 2>&1); then
        printf '%s\n' "$out"
        echo "ok   cluster configuration${drained:+ (with $drained drained)}"
    else
        printf '%s\n' "$out"
        echo "FAIL cluster configuration${drained:+ (with $drained drained)}"
        failed=1
    fi
done

[ -z "$failed" ] || exit 1
echo "both configurations pass nginx -t"
