# Shared by bench/run and bench/breakdown: the release build of wxhost-bench in
# its own target folder (CARGO_TARGET_DIR, default /var/cache/wxhost-bench-target
# when writable, else target/), so that it does not wait on other builds of the
# workspace. Sourced from the workspace root.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/wxhost-bench-target 2>/dev/null && [ -w /var/cache/wxhost-bench-target ]; then
    CARGO_TARGET_DIR=/var/cache/wxhost-bench-target
  else
    CARGO_TARGET_DIR=target
  fi
fi
export CARGO_TARGET_DIR
# Cargo takes plugins built from another checkout at another path as fresh
# (with that checkout's sources): when this folder is not the one the target
# folder last built, the plugins are rebuilt (their dependencies are kept).
mkdir -p "$CARGO_TARGET_DIR"
if [ "$(cat "$CARGO_TARGET_DIR/.wxhost-checkout" 2>/dev/null)" != "$PWD" ]; then
  for manifest in plugins/*/Cargo.toml plugins/fixtures/*/Cargo.toml; do
    package=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | head -n 1)
    rm -rf "$CARGO_TARGET_DIR/wasm-plugins/wasm32-wasip2/plugin/.fingerprint/$package"-*
  done
  cargo clean --release --quiet -p wxhost -p wxhost-testkit -p wxhost-bench 2>/dev/null || true
  echo "$PWD" > "$CARGO_TARGET_DIR/.wxhost-checkout"
fi
cargo build --release -p wxhost-bench
BENCH_BIN=$CARGO_TARGET_DIR/release/wxhost-bench
