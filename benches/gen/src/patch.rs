//! A patch of the first M functions of `gen-svc-N` (see `build_patch.rs`).

hotpatch::manifest!();

include!(concat!(env!("OUT_DIR"), "/fns.rs"));
