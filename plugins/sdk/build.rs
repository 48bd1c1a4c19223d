//! The bindings are generated from `wit/` by a macro, whose output cargo does
//! not tie to those files: without this, a change to the WIT would leave the
//! SDK (and every plugin on it) built against the old interfaces.

fn main() {
    println!("cargo:rerun-if-changed=../../wit");
}
