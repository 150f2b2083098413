//! `cargo hotpatch build --base REV`: patches made from a source diff of a
//! real service's git repository, applied to the running service.
//!
//! The fixture (tests/fixtures/source-svc, see tests/source_diff/harness.rs)
//! is a git repository with tag `v1` and one branch per case, each a
//! commit on v1. v1 is built once and runs once, as deployed; each case
//! makes a patch with `--base v1 --head BRANCH --binary <v1's binary>`,
//! checks that the tool lists exactly the functions the case expects,
//! loads the patch into the running v1 process, checks that its `call`
//! answers show the fix and nothing else, and reverts it, so that cases do
//! not see each other's patches. Refused cases check the exit code, the
//! `refused:` line and that no file was written.
//!
//! Two tests run a second v1, built with the fixture's `control` feature
//! (the control endpoint, and a state directory of accepted patches), and
//! patch it from source the same way (`--features control`): a hooked
//! function watched and rolled back on its panics, and one accepted,
//! killed, restored at restart and reverted.
//!
//! Each case prints what it ran and what it saw. Every build has a
//! deadline ([`harness::BUILD_DEADLINE`]), every answer of the service
//! one too, so a hang fails.
//!
//! `premises_each_branch_builds_and_changes_what_its_case_says` (ignored:
//! it builds the service once per branch) checks the fixture itself: each
//! branch builds, and its own binary answers `call` as the case expects
//! the patched v1 to answer. Run it when the fixture or a case changes:
//! `cargo test -p cargo-hotpatch --test source_diff -- --ignored premises`.

#[path = "source_diff/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use harness::{Call, Edit, Service, assert_clean, git, line_of, listed, tool};

/// v1's answer to its first `call`.
const V1_CALL: &[(&str, &str)] = &[
    ("calls", "1"),
    // 4e9 * (2^63 - 1), wrapped.
    ("price", "18446744069709551616"),
    // (399 + 500) less 15 %, truncated: the first item is skipped.
    ("total", "765"),
    ("describe", "3 item(s), 850 after 15% off"),
    ("shipping", "1000"),
    ("gross", "1200"),
    ("receipt", "1000 + tax 200"),
    ("capped", "1000"),
    ("rated", "18"),
    ("half", "5"),
    ("halved", "5"),
    ("audited", "42"),
    ("event", ""),
    ("strict", "0"),
    ("bonus", "13"),
    ("doubled", "20"),
    ("tripled", "30"),
    ("points", "101"),
    ("fee", "10"),
    ("applied_twice", "12"),
    ("greeting", "hello from v1"),
    ("by_rate", "20"),
    ("boxes", "1"),
    ("crates", "1"),
    ("tally", "30"),
];

/// A case: its branch (a commit on v1 with `edits`), and how the answers
/// of `call` differ from v1's when the fix runs (from its own build, or
/// patched into v1).
struct Case {
    branch: &'static str,
    edits: &'static [Edit],
    changes: &'static [(&'static str, &'static str)],
}

const fn lib(old: &'static str, new: &'static str) -> Edit {
    Edit {
        file: "src/lib.rs",
        old,
        new,
    }
}

const fn main_rs(old: &'static str, new: &'static str) -> Edit {
    Edit {
        file: "src/main.rs",
        old,
        new,
    }
}

/// The end of the file (the last lines of `describe`): cases that add
/// code or comments add them after it, so that no line moves.
const END: &str = "            self.discount_pct\n        )\n    }\n}\n";

const CASES: &[Case] = &[
    // 1. A free function.
    Case {
        branch: "case-free-fn",
        edits: &[lib(
            "(qty as u64).wrapping_mul(unit_cents)",
            "(qty as u64).saturating_mul(unit_cents)",
        )],
        changes: &[("price", "18446744073709551615")],
    },
    // 2. A method that uses a private helper (`discounted`, unchanged) and
    //    a private field.
    Case {
        branch: "case-method",
        edits: &[lib(
            "discounted(self.items[1..].iter().sum(), self.discount_pct)",
            "discounted(self.items.iter().sum(), self.discount_pct)",
        )],
        changes: &[("total", "850")],
    },
    // 3. A trait method.
    Case {
        branch: "case-trait",
        edits: &[lib(
            "\"{} item(s), {} after {}% off\"",
            "\"{} items, {} after {}% off\"",
        )],
        changes: &[("describe", "3 items, 850 after 15% off")],
    },
    // 4. A fix that adds a private helper.
    Case {
        branch: "case-new-helper",
        edits: &[
            lib(
                "    weight_g / 1000 * 500\n",
                "    kilos_started(weight_g) * 500\n",
            ),
            lib(
                END,
                concat!(
                    "            self.discount_pct\n        )\n    }\n}\n",
                    "\n/// Kilograms started.\n",
                    "/// `#[inline(never)]`: the case expects a new function of its own.\n",
                    "#[inline(never)]\n",
                    "fn kilos_started(weight_g: u64) -> u64 {\n",
                    "    weight_g.div_ceil(1000)\n",
                    "}\n",
                ),
            ),
        ],
        changes: &[("shipping", "1500")],
    },
    // 5. A fix in a non-patchable helper whose callers are all patchable:
    //    rounding in `discounted`.
    Case {
        branch: "case-helper-patchable-callers",
        edits: &[lib(
            "amount - amount * pct / 100",
            "amount - (amount * pct + 50) / 100",
        )],
        changes: &[
            ("total", "764"),
            ("describe", "3 item(s), 849 after 15% off"),
        ],
    },
    // 6. A fix in a non-patchable helper with an unpatched caller: the tax
    //    rate in `tax`, which `receipt` calls (hooked).
    Case {
        branch: "case-helper-unpatched-caller",
        edits: &[lib("amount * 20 / 100", "amount * 21 / 100")],
        changes: &[("gross", "1210"), ("receipt", "1000 + tax 210")],
    },
    // 7. A new field in a struct.
    Case {
        branch: "case-struct-field",
        edits: &[
            lib(
                "    discount_pct: u64,\n}",
                "    discount_pct: u64,\n    coupon_cents: u64,\n}",
            ),
            lib(
                "            discount_pct,\n        }",
                "            discount_pct,\n            coupon_cents: 50,\n        }",
            ),
            lib(
                "discounted(self.items[1..].iter().sum(), self.discount_pct)",
                "discounted(self.items[1..].iter().sum(), self.discount_pct)\n            .saturating_sub(self.coupon_cents)",
            ),
        ],
        changes: &[("total", "715")],
    },
    // 8. A new signature of a patchable function (the binary's call
    //    compiles with both).
    Case {
        branch: "case-signature",
        edits: &[lib(
            "pub fn price(qty: u32, unit_cents: u64) -> u64 {\n    (qty as u64).wrapping_mul(unit_cents)",
            "pub fn price(qty: u64, unit_cents: u64) -> u64 {\n    qty.saturating_mul(unit_cents)",
        )],
        changes: &[("price", "18446744073709551615")],
    },
    // 9. A static's initial value.
    Case {
        branch: "case-static",
        edits: &[lib("AtomicU64::new(0)", "AtomicU64::new(1000)")],
        changes: &[("calls", "1001")],
    },
    // 10. Only a const, which a patchable function uses.
    Case {
        branch: "case-const",
        edits: &[lib(
            "pub const LIMIT: u64 = 1000;",
            "pub const LIMIT: u64 = 2000;",
        )],
        changes: &[("capped", "2000")],
    },
    // 11a. Comments only: one reworded in place, lines added at the end.
    Case {
        branch: "case-comment",
        edits: &[
            lib(
                "// Relaxed: a counter read on its own.",
                "// Relaxed: the count is read on its own; it publishes nothing.",
            ),
            lib(
                END,
                concat!(
                    "            self.discount_pct\n        )\n    }\n}\n",
                    "\n// Reviewed for the next release: nothing to change here.\n",
                    "// (tests/source_diff.rs, case 11)\n",
                ),
            ),
        ],
        changes: &[],
    },
    // 11b. Formatting only: spaces in a signature, and the last function's
    //      call on one line.
    Case {
        branch: "case-format",
        edits: &[
            lib(
                "pub fn capped(x: u64) -> u64 {",
                "pub fn capped( x : u64 )  ->  u64 {",
            ),
            lib(
                "        format!(\n            \"{} item(s), {} after {}% off\",\n            self.items.len(),\n            discounted(gross, self.discount_pct),\n            self.discount_pct\n        )\n",
                "        format!(\"{} item(s), {} after {}% off\", self.items.len(), discounted(gross, self.discount_pct), self.discount_pct)\n",
            ),
        ],
        changes: &[],
    },
    // 15. A function that reads a private static by value (a thunk in the
    //     patch): the patched answer is 9 * 3, from the running process's
    //     value; a copy of the static would give 7 * 3.
    Case {
        branch: "case-private-static",
        edits: &[lib("unsafe { RATE * 2 }", "unsafe { RATE * 3 }")],
        changes: &[("rated", "27")],
    },
    // 16. A changed Cargo.toml (a new feature): refused before any build.
    Case {
        branch: "case-manifest",
        edits: &[Edit {
            file: "Cargo.toml",
            old: "control = [\"hotpatch/control\"]\n",
            new: "control = [\"hotpatch/control\"]\nfaster = []\n",
        }],
        changes: &[],
    },
    // 18. A public #[inline] helper: the binary's own `call` has a copy of
    //     it: both copies are hooked.
    Case {
        branch: "case-inline",
        edits: &[lib("    x / 2\n", "    x.div_ceil(2)\n")],
        changes: &[("half", "6"), ("halved", "6")],
    },
    // 19. A fix that adds a tracing event: the event reaches the
    //     service's subscriber (the patch's own call site, registered
    //     with the service's tracing).
    Case {
        branch: "case-tracing",
        edits: &[lib(
            "pub fn audited(x: u64) -> u64 {\n    x + 1\n",
            "pub fn audited(x: u64) -> u64 {\n    tracing::warn!(x, \"audited\");\n    x + 2\n",
        )],
        changes: &[("audited", "43"), ("event", "message=audited x=41")],
    },
    // 20. A fix that panics (on 0): the patch counts the panic, as a
    //     `#[patch]` shim does, for a watch window to see.
    Case {
        branch: "case-panics",
        edits: &[lib(
            "pub fn strict(x: u64) -> u64 {\n    x\n",
            "pub fn strict(x: u64) -> u64 {\n    assert!(x != 0, \"strict: zero\");\n    x\n",
        )],
        changes: &[("strict", "panicked")],
    },
    // 21. A change only in an inlined callee: `bonus_of`'s source is the
    //     same, its code is not.
    Case {
        branch: "case-inlined-callee",
        edits: &[lib("    x + 3\n", "    x + 4\n")],
        changes: &[("bonus", "14")],
    },
    // 22. A change only in a macro: `doubled`'s source is the same.
    Case {
        branch: "case-macro",
        edits: &[lib("        $e * 2\n", "        $e * 2 + 1\n")],
        changes: &[("doubled", "21")],
    },
    // 24. A thread-local's initial value.
    Case {
        branch: "case-thread-local",
        edits: &[lib(
            "const { std::cell::Cell::new(0) }",
            "const { std::cell::Cell::new(1) }",
        )],
        changes: &[],
    },
    // 25. The build script.
    Case {
        branch: "case-build-rs",
        edits: &[Edit {
            file: "build.rs",
            old: "    println!(\"cargo::rustc-link-arg-bins=-rdynamic\");\n",
            new: "    println!(\"cargo::rustc-link-arg-bins=-rdynamic\");\n    println!(\"cargo::rerun-if-changed=build.rs\");\n",
        }],
        changes: &[],
    },
    // 26. The committed Cargo.lock (any change of it: the tool does not
    //     judge which are harmless).
    Case {
        branch: "case-lock",
        edits: &[Edit {
            file: "Cargo.lock",
            old: "# It is not intended for manual editing.\n",
            new: "# It is not intended for manual editing.\n# Reviewed for INC-1234.\n",
        }],
        changes: &[],
    },
    // 30. A changed private helper whose base caller (itself private,
    //     reached from a patchable function) the head removes.
    Case {
        branch: "case-removed-caller",
        edits: &[
            lib(
                "    points_via(amount)\n}\n\n#[inline(never)]\nfn points_via(amount: u64) -> u64 {\n    points_rate(amount) + 1\n}\n",
                "    points_rate(amount) + 1\n}\n",
            ),
            lib("    amount / 10\n", "    amount / 5\n"),
        ],
        changes: &[("points", "201")],
    },
    // 31. A patchable function of a private module.
    Case {
        branch: "case-private-module",
        edits: &[lib("        amount / 100\n", "        amount / 50\n")],
        changes: &[("fee", "20")],
    },
    // 32. A generic function of the library that only the binary's crate
    //     instantiates.
    Case {
        branch: "case-generic-in-binary",
        edits: &[lib("    f(f(x))\n", "    f(f(f(x)))\n")],
        changes: &[("applied_twice", "13")],
    },
    // 34. A method called only through a trait object (the vtable is
    //     the binary's): hooked.
    Case {
        branch: "case-trait-object",
        edits: &[lib("        amount / 50\n", "        amount / 40\n")],
        changes: &[("by_rate", "25")],
    },
    // 35. An async fn's second step: the state machine is the same
    //     (hooked; an order suspended at the gate finishes in the new
    //     code). `call` does not run it: the order commands do.
    Case {
        branch: "case-async-same",
        edits: &[lib("    subtotal + 7\n", "    subtotal + 9\n")],
        changes: &[],
    },
    // 36. An async fn that keeps a new value across its wait: a different
    //     state machine (refused).
    Case {
        branch: "case-async-state",
        edits: &[
            lib(
                "    let subtotal = items * 100;\n",
                "    let subtotal = items * 100; let fee = items * 3;\n",
            ),
            lib("    subtotal + 7\n", "    subtotal + fee\n"),
        ],
        changes: &[],
    },
    // 33. Only a file the library compiles in (`include_str!`) changed:
    //     no Rust source did, yet the running code's data does.
    Case {
        branch: "case-included-file",
        edits: &[Edit {
            file: "src/greeting.txt",
            old: "hello from v1",
            new: "hello from the fix",
        }],
        changes: &[("greeting", "hello from the fix")],
    },
    // 37. A function of the binary crate's own source (`call` in
    //     src/main.rs, which main's loop calls for each `call` command):
    //     hooked.
    Case {
        branch: "case-bin-fn",
        edits: &[main_rs(
            "svc::rated_by(&svc::Flat, 1000)",
            "svc::rated_by(&svc::Flat, 2000)",
        )],
        changes: &[("by_rate", "40")],
    },
    // 38. A static added to the binary crate's source: refused by the
    //     source check, naming src/main.rs, before any build.
    Case {
        branch: "case-bin-static",
        edits: &[main_rs(
            "const BANNER: &str = \"svc v1\";\n",
            "const BANNER: &str = \"svc v1\";\n\n/// Commands read.\npub static READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);\n",
        )],
        changes: &[],
    },
    // 41. Two hooked functions' fixes that panic (on 0), one with a
    //     value to drop on the way out: the patch counts each panic
    //     once, as it counts a replaced function's.
    Case {
        branch: "case-hook-panics",
        edits: &[
            lib(
                "pub fn boxes_for(n: u64) -> u64 {\n    n / 4 + 1\n",
                "pub fn boxes_for(n: u64) -> u64 {\n    assert!(n != 0, \"boxes_for: no items\");\n    n / 4 + 1\n",
            ),
            lib(
                "pub fn crates_for(n: u64) -> u64 {\n    n / 10 + 1\n",
                "pub fn crates_for(n: u64) -> u64 {\n    let why = format!(\"crates_for: {n} items\");\n    assert!(n != 0, \"{why}\");\n    n / 10 + 1\n",
            ),
        ],
        changes: &[("boxes", "panicked"), ("crates", "panicked")],
    },
    // 42. A fix of a function whose entry is a loop's head (3 bytes in):
    //     refused (each iteration would jump into the middle of the hook's
    //     jump).
    Case {
        branch: "case-loop-entry",
        edits: &[lib("\"cmp rax, 30\"", "\"cmp rax, 40\"")],
        changes: &[("tally", "42")],
    },
    // 14. Another build of the service: a commit after v1 that changes only
    //     the binary's banner (so its build-id, and none of its library).
    Case {
        branch: "other",
        edits: &[Edit {
            file: "src/main.rs",
            old: "const BANNER: &str = \"svc v1\";",
            new: "const BANNER: &str = \"svc v1, rebuilt\";",
        }],
        changes: &[],
    },
];

/// 13. The fix left uncommitted in the working tree (on `main`, at v1).
const DIRTY: Case = Case {
    branch: "(working tree)",
    edits: &[lib(
        "(qty as u64).wrapping_mul(unit_cents)",
        "(qty as u64).checked_mul(unit_cents).unwrap_or(0)",
    )],
    changes: &[("price", "0")],
};

fn case(branch: &str) -> &'static Case {
    CASES
        .iter()
        .find(|c| c.branch == branch)
        .unwrap_or_else(|| panic!("no case {branch}"))
}

/// v1's answers with `changes`.
fn expected(changes: &[(&str, &str)]) -> Call {
    let mut call: Call = V1_CALL
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in changes {
        assert!(call.contains_key(*k), "no answer {k}");
        call.insert(k.to_string(), v.to_string());
    }
    call
}

/// The answers a long-running process can be compared on: its call
/// counter aside.
fn but_calls(mut call: Call) -> Call {
    call.remove("calls");
    call
}

// ---- the shared state: one repository, one running v1 ----

struct Fixture {
    v1_bin: PathBuf,
    /// v1's GNU build-id, in hex.
    v1_id: String,
    v1: Service,
}

/// The fixture, made once per process, one case at a time.
fn fixture() -> MutexGuard<'static, Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    let fixture = FIXTURE.get_or_init(|| {
        let branches: Vec<(&str, &[Edit])> = CASES.iter().map(|c| (c.branch, c.edits)).collect();
        harness::make_repo(&branches);
        let v1_bin = harness::build_service("svc-v1");
        let v1_id = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&v1_bin).unwrap());
        let mut v1 = Service::start(&v1_bin, "v1");
        assert_eq!(v1.banner, "ready svc v1");
        assert_eq!(v1.call(), expected(&[]), "v1's first call");
        Mutex::new(Fixture { v1_bin, v1_id, v1 })
    });
    // A case that failed leaves no patch applied (see `Applied`): the
    // next one can go on.
    fixture.lock().unwrap_or_else(|e| e.into_inner())
}

fn out_path(name: &str) -> PathBuf {
    let dir = harness::scratch().join("out");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.so"));
    let _ = std::fs::remove_file(&path);
    path
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A function the tool must list: `replaced` or `included`, its path, and
/// a text on the line of its `fn` in the new source (the line it must
/// report).
type Want = (&'static str, &'static str, &'static str);

/// An item of the service's library (`svc::...`, `<svc::... as ...>::...`).
fn is_service_path(path: &str) -> bool {
    path.starts_with("svc::") || path.starts_with("<svc::")
}

/// Checks a successful run: exit 0, exactly the service functions of `want` (no
/// more), each at its line of `head_lib` (the new src/lib.rs), and the last
/// line naming the file, its size and v1's build-id.
fn check_built(
    v1_id: &str,
    out: &harness::Output,
    so: &std::path::Path,
    head_lib: &str,
    want: &[Want],
) {
    assert_eq!(out.status.code(), Some(0), "exit code: {out:?}");
    let got = listed(&out.stdout);
    // A changed function can bring a new copy of generic or inline code
    // of another crate into the service's object (`saturating_mul` in
    // case 1: `core::num::<impl u64>::saturating_mul`); the tool may list
    // it as included. Exactly the service's own functions are checked.
    let got_names: Vec<(&str, &str)> = got
        .iter()
        .filter(|l| l.kind == "replaced" || is_service_path(&l.path))
        .map(|l| (l.kind.as_str(), l.path.as_str()))
        .collect();
    let mut want_names: Vec<(&str, &str)> = want.iter().map(|(k, p, _)| (*k, *p)).collect();
    want_names.sort();
    assert_eq!(
        got_names, want_names,
        "the functions listed: {}",
        out.stdout
    );
    for (kind, path, needle) in want {
        let line = line_of(head_lib, needle);
        let l = got
            .iter()
            .find(|l| l.kind == *kind && l.path == *path)
            .unwrap();
        assert!(
            harness::at_lib_line(&l.at, line),
            "{path} is at src/lib.rs:{line}, the tool says {}",
            l.at
        );
    }
    let last = out
        .stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let size = std::fs::metadata(so)
        .unwrap_or_else(|e| panic!("{}: {e}", so.display()))
        .len();
    let last = last.trim();
    assert!(last.starts_with("patch: "), "last line: {last:?}");
    assert!(
        last.contains(s(so)),
        "last line names {}: {last:?}",
        so.display()
    );
    assert!(
        last.contains(&format!("({size} bytes)")),
        "last line has the size {size}: {last:?}"
    );
    assert!(
        last.ends_with(&format!("for build-id {v1_id}")),
        "last line names v1's build-id {v1_id}: {last:?}"
    );
    let id =
        cargo_hotpatch::identity(&std::fs::read(so).unwrap()).map(|id| cargo_hotpatch::hex(&id));
    assert_eq!(
        id.as_deref(),
        Some(v1_id),
        "the identity stamped in {}",
        so.display()
    );
}

/// A patch loaded into the running v1: reverted when dropped if the case
/// did not revert it (a failed case leaves v1 as it was).
struct Applied<'a> {
    v1: &'a mut Service,
    reverted: bool,
}

impl<'a> Applied<'a> {
    fn load(v1: &'a mut Service, so: &std::path::Path) -> Applied<'a> {
        let answer = v1.ask(&format!("load {}", s(so)));
        assert_eq!(answer, "ok", "v1 loads {}", so.display());
        Applied {
            v1,
            reverted: false,
        }
    }

    fn revert(mut self) {
        self.reverted = true;
        assert_eq!(self.v1.ask("revert"), "ok");
    }
}

impl Drop for Applied<'_> {
    fn drop(&mut self) {
        if !self.reverted {
            let _ = self.v1.ask("revert");
        }
    }
}

/// Loads `so` into v1, checks that `call` answers as `changes` say, then
/// reverts it and checks that v1 answers as before.
fn apply_and_revert(v1: &mut Service, so: &std::path::Path, changes: &[(&str, &str)]) {
    let before = but_calls(v1.call());
    assert_eq!(before, but_calls(expected(&[])), "v1 before the patch");
    let applied = Applied::load(v1, so);
    assert_eq!(
        but_calls(applied.v1.call()),
        but_calls(expected(changes)),
        "v1 patched"
    );
    applied.revert();
    assert_eq!(but_calls(v1.call()), before, "v1 reverted");
}

/// Case `branch` patched: the tool lists `want`, v1 answers with the
/// case's changes while the patch is applied.
fn patched(branch: &str, want: &[Want]) -> harness::Output {
    let c = case(branch);
    let mut fx = fixture();
    let so = out_path(branch);
    let out = build_patch(branch, s(&fx.v1_bin), &so);
    check_built(
        &fx.v1_id,
        &out,
        &so,
        &harness::edited("src/lib.rs", c.edits),
        want,
    );
    apply_and_revert(&mut fx.v1, &so, c.changes);
    out
}

/// The callers the tool lists under an included function (`called
/// from: a (replaced), b (included)`), sorted.
fn called_from(out: &harness::Output, included: &str) -> Vec<String> {
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("included") && l.split_whitespace().nth(1) == Some(included))
        .unwrap_or_else(|| panic!("{included} is not listed as included: {}", out.stdout));
    let Some(list) = lines
        .get(at + 1)
        .and_then(|l| l.trim().strip_prefix("called from: "))
    else {
        panic!("no callers listed under {included}: {}", out.stdout);
    };
    let mut callers: Vec<String> = list.split(", ").map(str::to_owned).collect();
    callers.sort();
    callers
}

/// `cargo hotpatch build --base v1 --head HEAD -p svc --binary BINARY -o SO`.
fn build_patch(head: &str, binary: &str, so: &std::path::Path) -> harness::Output {
    build_patch_with(head, binary, so, &[])
}

/// [`build_patch`] with more arguments (`--release`).
fn build_patch_with(
    head: &str,
    binary: &str,
    so: &std::path::Path,
    more: &[&str],
) -> harness::Output {
    let mut args = build_args(head, binary, so);
    args.extend_from_slice(more);
    tool(&args)
}

/// The arguments of [`build_patch`].
fn build_args<'a>(head: &'a str, binary: &'a str, so: &'a std::path::Path) -> Vec<&'a str> {
    vec![
        "build",
        "--base",
        "v1",
        "--head",
        head,
        "-p",
        "svc",
        "--binary",
        binary,
        "-o",
        s(so),
    ]
}

/// Does `text` name `src/lib.rs:LINE` (not a longer number)?
fn names_line(text: &str, line: usize) -> bool {
    let want = format!("src/lib.rs:{line}");
    text.match_indices(&want).any(|(i, m)| {
        !text[i + m.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Case `branch` refused: exit 3, no file, and a `refused:` line that
/// names `item`, the line of `needle` and says one of `reasons` and all
/// of `names`.
fn refused(branch: &str, item: &str, needle: &str, reasons: &[&str], names: &[&str]) {
    let c = case(branch);
    let fx = fixture();
    let so = out_path(branch);
    let out = build_patch(branch, s(&fx.v1_bin), &so);
    assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
    assert!(!so.exists(), "no patch file is written: {}", so.display());
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("patch:")),
        "{}",
        out.stdout
    );
    let line = line_of(&harness::edited("src/lib.rs", c.edits), needle);
    let refusals: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    let found = refusals.iter().find(|l| {
        l.contains(item)
            && names_line(l, line)
            && reasons.iter().any(|r| l.to_lowercase().contains(r))
            && names.iter().all(|n| l.contains(n))
    });
    assert!(
        found.is_some(),
        "a `refused:` line naming {item} at src/lib.rs:{line}, saying one of {reasons:?} and \
         naming {names:?}; the refusals: {refusals:#?}"
    );
}

/// Case `branch` is no change: exit 5, `no change`, no file.
fn no_change(args: &[&str], so: &std::path::Path) {
    let out = tool(args);
    assert_eq!(out.status.code(), Some(5), "exit code: {out:?}");
    assert!(out.stderr.contains("no change"), "{}", out.stderr);
    assert!(!so.exists(), "no patch file is written: {}", so.display());
}

// ---- the cases ----

#[test]
fn case_01_a_changed_free_function_is_replaced() {
    patched(
        "case-free-fn",
        &[("replaced", "svc::price", "pub fn price(")],
    );
}

#[test]
fn case_02_a_method_using_a_private_helper_and_field_is_replaced_alone() {
    // `discounted` did not change: the new `total` calls the running
    // binary's copy, so it is not listed.
    patched(
        "case-method",
        &[("replaced", "svc::Cart::total", "pub fn total(&self)")],
    );
}

#[test]
fn case_03_a_changed_trait_method_is_replaced() {
    patched(
        "case-trait",
        &[(
            "replaced",
            // The path the service registers (`hotpatch::functions()`
            // shows the same): the trait as the impl names it.
            "<svc::Cart as Describe>::describe",
            "fn describe(&self) -> String {",
        )],
    );
}

#[test]
fn case_04_a_new_private_helper_is_included() {
    patched(
        "case-new-helper",
        &[
            ("replaced", "svc::shipping", "pub fn shipping("),
            ("included", "svc::kilos_started", "fn kilos_started("),
        ],
    );
}

#[test]
fn case_05_a_changed_helper_with_only_patchable_callers_is_included_and_its_callers_replaced() {
    // Only `discounted` changed. It is not patchable, so the fix reaches
    // the process through its callers: both are patchable, so the patch
    // includes the new `discounted` (`included`) and replaces both callers
    // (`replaced`, although their own source did not change) with copies
    // that call it. Nothing else.
    let out = patched(
        "case-helper-patchable-callers",
        &[
            ("included", "svc::discounted", "fn discounted("),
            ("replaced", "svc::Cart::total", "pub fn total(&self)"),
            (
                "replaced",
                "<svc::Cart as Describe>::describe",
                "fn describe(&self) -> String {",
            ),
        ],
    );
    // Every caller in the deployed build, and what the patch does with it.
    assert_eq!(
        called_from(&out, "svc::discounted"),
        [
            "<svc::Cart as Describe>::describe (replaced)",
            "svc::Cart::total (replaced)"
        ]
    );
}

#[test]
fn case_06_a_changed_helper_with_an_unpatched_caller_is_hooked() {
    // `receipt` (public, called by the binary) cannot be replaced, so
    // `tax`'s entry is redirected; every caller of `tax` in v1 compiled
    // to the same code in the head (none inlined it), so they call the
    // new body as it expects. `gross` is replaced (it calls a changed
    // function) and `receipt` included (its caller chain was followed
    // before the hook was chosen): both run the patch's own `tax`.
    let out = patched(
        "case-helper-unpatched-caller",
        &[
            ("hooked", "svc::tax", "fn tax("),
            ("included", "svc::receipt", "pub fn receipt("),
            ("replaced", "svc::gross", "pub fn gross("),
        ],
    );
    assert!(
        out.stdout.contains("    because svc::receipt is public"),
        "{}",
        out.stdout
    );
}

#[test]
fn case_07_a_changed_struct_layout_is_refused() {
    refused(
        "case-struct-field",
        "svc::Cart",
        "pub struct Cart",
        &["layout", "field"],
        &[],
    );
}

#[test]
fn case_08_a_changed_signature_is_refused() {
    refused(
        "case-signature",
        "svc::price",
        "pub fn price(",
        &["signature"],
        &[],
    );
}

#[test]
fn case_09_a_changed_static_is_refused() {
    refused(
        "case-static",
        "svc::CALLS",
        "pub static CALLS",
        &["static"],
        &[],
    );
}

#[test]
fn case_10_a_changed_const_replaces_the_function_that_uses_it() {
    // Only `LIMIT` changed: the change is seen in `capped`'s code.
    patched(
        "case-const",
        &[("replaced", "svc::capped", "pub fn capped(")],
    );
}

#[test]
fn case_11_comments_and_formatting_are_no_change() {
    let fx = fixture();
    for branch in ["case-comment", "case-format"] {
        let so = out_path(branch);
        no_change(
            &[
                "build",
                "--base",
                "v1",
                "--head",
                branch,
                "-p",
                "svc",
                "--binary",
                s(&fx.v1_bin),
                "-o",
                s(&so),
            ],
            &so,
        );
    }
}

#[test]
fn case_12_a_base_that_does_not_exist_exits_2_naming_it() {
    let fx = fixture();
    let so = out_path("no-base");
    let out = tool(&[
        "build",
        "--base",
        "v0-never-tagged",
        "--head",
        "case-free-fn",
        "-p",
        "svc",
        "--binary",
        s(&fx.v1_bin),
        "-o",
        s(&so),
    ]);
    assert_eq!(out.status.code(), Some(2), "exit code: {out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
    assert!(
        lines[0].contains("v0-never-tagged"),
        "it names the revision: {}",
        lines[0]
    );
    assert!(!so.exists());
}

/// Puts the working tree back at `main` (v1) when dropped.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        git(&["checkout", "--quiet", "--force", "main"]);
    }
}

#[test]
fn case_13_without_head_the_dirty_tree_is_the_fix_and_with_head_it_is_ignored() {
    let mut fx = fixture();
    assert_clean();
    let _restore = Restore;
    harness::write_tree(DIRTY.edits);
    assert!(
        !git(&["status", "--porcelain"]).is_empty(),
        "the fix is uncommitted"
    );
    let so = out_path("dirty");
    let out = tool(&[
        "build",
        "--base",
        "v1",
        "-p",
        "svc",
        "--binary",
        s(&fx.v1_bin),
        "-o",
        s(&so),
    ]);
    check_built(
        &fx.v1_id,
        &out,
        &so,
        &harness::edited("src/lib.rs", DIRTY.edits),
        &[("replaced", "svc::price", "pub fn price(")],
    );
    apply_and_revert(&mut fx.v1, &so, DIRTY.changes);
    // `--head v1`: the same as the base, whatever the working tree holds.
    let so = out_path("dirty-head-v1");
    no_change(
        &[
            "build",
            "--base",
            "v1",
            "--head",
            "v1",
            "-p",
            "svc",
            "--binary",
            s(&fx.v1_bin),
            "-o",
            s(&so),
        ],
        &so,
    );
}

#[test]
fn case_14_a_patch_for_v1_is_refused_by_another_build_and_accepted_by_v1() {
    let mut fx = fixture();
    assert_clean();
    let other_bin = {
        let _restore = Restore;
        git(&["checkout", "--quiet", "--force", "other"]);
        harness::build_service("svc-other")
    };
    let other_id = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&other_bin).unwrap());
    assert_ne!(other_id, fx.v1_id, "the other revision is another build");
    let mut other = Service::start(&other_bin, "other");
    assert_eq!(other.banner, "ready svc v1, rebuilt");

    let so = out_path("identity");
    let out = build_patch("case-free-fn", s(&fx.v1_bin), &so);
    check_built(
        &fx.v1_id,
        &out,
        &so,
        &harness::edited("src/lib.rs", case("case-free-fn").edits),
        &[("replaced", "svc::price", "pub fn price(")],
    );

    let before = but_calls(other.call());
    let answer = other.ask(&format!("load {}", s(&so)));
    // hotpatch::Error::WrongBuild's message names both builds.
    assert!(answer.starts_with("error: "), "{answer}");
    assert!(answer.contains("was made for service build"), "{answer}");
    assert!(
        answer.contains(&fx.v1_id) && answer.contains(&other_id),
        "{answer}"
    );
    assert_eq!(
        but_calls(other.call()),
        before,
        "the other build is unchanged"
    );
    assert_eq!(other.ask("revert"), "error: no patch to revert");

    apply_and_revert(&mut fx.v1, &so, case("case-free-fn").changes);
}

// ---- the fixture's own premises ----

#[test]
#[ignore = "builds the service once per case branch; run when the fixture changes"]
fn premises_each_branch_builds_and_changes_what_its_case_says() {
    let _fx = fixture();
    assert_clean();
    let _restore = Restore;
    let check = |name: &str, c: &Case| {
        let bin = harness::build_service(&format!("premise-{name}"));
        let mut svc = Service::start(&bin, name);
        assert_eq!(
            svc.call(),
            expected(c.changes),
            "{name}: its own build's first call"
        );
    };
    for c in CASES {
        git(&["checkout", "--quiet", "--force", c.branch]);
        check(c.branch, c);
    }
    git(&["checkout", "--quiet", "--force", "main"]);
    harness::write_tree(DIRTY.edits);
    check("dirty", &DIRTY);
}

#[test]
fn case_15_a_private_static_read_by_value_is_the_running_processs() {
    patched(
        "case-private-static",
        &[("replaced", "svc::rated", "pub fn rated(")],
    );
}

#[test]
fn case_16_a_changed_cargo_toml_is_refused_before_any_build() {
    refused_file("case-manifest", "Cargo.toml", "dependencies, features");
}

/// Case `branch` changed `file` and is refused before any build, with a
/// `refused:` line naming the file and saying `needle`.
fn refused_file(branch: &str, file: &str, needle: &str) {
    let fx = fixture();
    let so = out_path(branch);
    let out = build_patch(branch, s(&fx.v1_bin), &so);
    assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
    assert!(!so.exists(), "no patch file is written");
    let refusal = out
        .stderr
        .lines()
        .find(|l| l.starts_with(&format!("refused: {file} changed")))
        .unwrap_or_else(|| panic!("a refusal naming {file}: {}", out.stderr));
    assert!(refusal.contains(needle), "{refusal}");
    assert!(
        !out.stderr.contains("building the base"),
        "refused before building: {}",
        out.stderr
    );
}

#[test]
fn case_17_a_deployed_binary_the_base_does_not_rebuild_is_refused_with_both_build_ids() {
    let fx = fixture();
    assert_clean();
    let other_bin = {
        let _restore = Restore;
        git(&["checkout", "--quiet", "--force", "other"]);
        harness::build_service("svc-other-17")
    };
    let other_id = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&other_bin).unwrap());
    let so = out_path("case-17");
    let out = build_patch("case-free-fn", s(&other_bin), &so);
    assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
    assert!(!so.exists(), "no patch file is written");
    let refusal = out
        .stderr
        .lines()
        .find(|l| l.starts_with("refused: ") && l.contains("is not what v1"))
        .unwrap_or_else(|| panic!("an identity refusal: {}", out.stderr));
    assert!(
        refusal.contains(&other_id) && refusal.contains(&fx.v1_id),
        "both build-ids ({other_id}, {}): {refusal}",
        fx.v1_id
    );
}

#[test]
fn case_18_a_changed_public_inline_function_is_hooked_in_each_crate_s_copy() {
    // `half` is public and `#[inline]`: the library has its own copy and
    // the binary's `call` compiles another. Both are hooked (each new body
    // from its own crate's objects); `halved` calls the changed copy and
    // is replaced.
    patched(
        "case-inline",
        &[
            ("hooked", "svc::half", "pub fn half("),
            ("hooked", "svc::half", "pub fn half("),
            ("replaced", "svc::halved", "pub fn halved("),
        ],
    );
}

#[test]
fn case_19_a_new_tracing_event_reaches_the_services_subscriber() {
    patched(
        "case-tracing",
        &[("replaced", "svc::audited", "pub fn audited(")],
    );
}

#[test]
fn case_20_a_panic_in_a_patch_made_from_source_is_counted() {
    let mut fx = fixture();
    let so = out_path("case-panics");
    let out = build_patch("case-panics", s(&fx.v1_bin), &so);
    check_built(
        &fx.v1_id,
        &out,
        &so,
        &harness::edited("src/lib.rs", case("case-panics").edits),
        &[("replaced", "svc::strict", "pub fn strict(")],
    );
    let applied = Applied::load(&mut fx.v1, &so);
    assert_eq!(applied.v1.ask("panics"), "Some(0)", "none before a call");
    for n in 1..=3 {
        assert_eq!(applied.v1.call()["strict"], "panicked");
        assert_eq!(
            applied.v1.ask("panics"),
            format!("Some({n})"),
            "each call of the patched strict(0) panicked once"
        );
    }
    applied.revert();
    assert_eq!(fx.v1.call()["strict"], "0", "reverted");
}

#[test]
fn case_21_a_change_in_an_inlined_callee_replaces_its_unchanged_caller() {
    patched(
        "case-inlined-callee",
        &[("replaced", "svc::bonus_of", "pub fn bonus_of(")],
    );
}

#[test]
fn case_22_a_change_in_a_macro_replaces_the_functions_that_use_it() {
    patched(
        "case-macro",
        &[("replaced", "svc::doubled", "pub fn doubled(")],
    );
}

#[test]
fn release_a_release_build_is_patched_from_source_with_its_own_profile() {
    // Deployed services are release builds: inlining, merged constants
    // and rip-relative reads of private statics are what the optimiser
    // makes of the same source. v1 in release, and patches built with
    // `--release`, for the cases where optimised code differs most: a
    // method whose private helper is inlined, a private static read by
    // value, a new tracing event (its metadata is merged constant data),
    // and a change only in an inlined callee.
    let fx = fixture();
    assert_clean();
    let v1_bin = harness::build_service_with("svc-v1-release", true);
    let v1_id = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&v1_bin).unwrap());
    assert_ne!(v1_id, fx.v1_id, "the release build is another build");
    drop(fx);
    let mut v1 = Service::start(&v1_bin, "v1-release");
    assert_eq!(v1.banner, "ready svc v1");
    assert_eq!(v1.call(), expected(&[]), "v1 (release)'s first call");
    let cases: &[(&str, &[Want])] = &[
        (
            "case-method",
            &[("replaced", "svc::Cart::total", "pub fn total(&self)")],
        ),
        (
            "case-private-static",
            &[("replaced", "svc::rated", "pub fn rated(")],
        ),
        (
            "case-tracing",
            &[("replaced", "svc::audited", "pub fn audited(")],
        ),
        (
            "case-inlined-callee",
            &[("replaced", "svc::bonus_of", "pub fn bonus_of(")],
        ),
    ];
    for (branch, want) in cases {
        let c = case(branch);
        let so = out_path(&format!("release-{branch}"));
        let out = {
            let _fx = fixture();
            build_patch_with(branch, s(&v1_bin), &so, &["--release"])
        };
        check_built(
            &v1_id,
            &out,
            &so,
            &harness::edited("src/lib.rs", c.edits),
            want,
        );
        apply_and_revert(&mut v1, &so, c.changes);
    }
    // A patch built for the debug profile is not one for this binary: the
    // debug base does not rebuild it, and the tool says so.
    let so = out_path("release-as-debug");
    let out = {
        let _fx = fixture();
        build_patch("case-free-fn", s(&v1_bin), &so)
    };
    assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
    assert!(!so.exists(), "no patch file is written");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("refused: ") && l.contains(&v1_id)),
        "a refusal naming the release build-id {v1_id}: {}",
        out.stderr
    );
}

#[test]
fn case_23_a_deployed_binary_that_cannot_be_patched_is_refused_before_any_build() {
    let fx = fixture();
    let dir = harness::scratch().join("bin");
    // Not an ELF file; and v1 stripped of its symbol table (a patch from
    // source reaches the service's private items by their symbols).
    let text = dir.join("not-a-binary");
    std::fs::write(&text, "#!/bin/sh\necho svc\n").unwrap();
    let stripped = dir.join("svc-v1-stripped");
    std::fs::copy(&fx.v1_bin, &stripped).unwrap();
    let strip = Command::new("strip").arg(&stripped).status().unwrap();
    assert!(strip.success(), "strip {}", stripped.display());
    for (binary, needle) in [
        (&text, "not a readable ELF file"),
        (&stripped, "has no symbol table (stripped)"),
    ] {
        let so = out_path("case-23");
        let out = build_patch("case-free-fn", s(binary), &so);
        assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
        assert!(!so.exists(), "no patch file is written");
        assert!(
            out.stderr
                .lines()
                .any(|l| l.contains(s(binary)) && l.contains(needle)),
            "one line naming {} and saying {needle:?}: {}",
            binary.display(),
            out.stderr
        );
        assert!(
            !out.stderr.contains("building the base"),
            "refused before building: {}",
            out.stderr
        );
    }
}

#[test]
fn case_24_a_changed_thread_local_is_refused() {
    refused(
        "case-thread-local",
        "svc::THREAD_CALLS",
        "static THREAD_CALLS",
        &["thread-local"],
        &["initialiser", "every running thread keeps its old state"],
    );
}

#[test]
fn case_25_a_changed_build_script_is_refused_before_any_build() {
    refused_file("case-build-rs", "build.rs", "the build script");
}

#[test]
fn case_26_a_changed_committed_lock_file_is_refused_before_any_build() {
    refused_file(
        "case-lock",
        "Cargo.lock",
        "dependencies, features and versions",
    );
}

#[test]
fn case_27_without_binary_the_patch_is_for_the_rebuilt_base_named_by_its_commit() {
    // `--base` by commit hash, and no `--binary`: the patch is bound to the
    // base the tool rebuilt, which is bit for bit the deployed v1 (built in
    // this workspace), so the running v1 takes it.
    let mut fx = fixture();
    let v1_commit = git(&["rev-parse", "v1^{commit}"]).trim().to_owned();
    let so = out_path("case-27");
    let out = tool(&[
        "build",
        "--base",
        &v1_commit,
        "--head",
        "case-free-fn",
        "-p",
        "svc",
        "-o",
        s(&so),
    ]);
    assert!(
        out.stdout
            .contains(&format!("base: {v1_commit} ({})", &v1_commit[..12])),
        "the base is named as given, with its commit: {}",
        out.stdout
    );
    check_built(
        &fx.v1_id,
        &out,
        &so,
        &harness::edited("src/lib.rs", case("case-free-fn").edits),
        &[("replaced", "svc::price", "pub fn price(")],
    );
    apply_and_revert(&mut fx.v1, &so, case("case-free-fn").changes);
}

/// Whether `needle` occurs in `haystack`.
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn case_28_a_patch_is_named_by_its_head_commit_or_as_the_options_say() {
    // Two fixes of one service get two names (so `hotpatch revert NAME`
    // is never ambiguous): the package and the head's short commit hash,
    // the version from the base and that hash, the description from the
    // head commit's subject (here the branch name). The manifest the
    // runtime reads carries them.
    let fx = fixture();
    let mut lines = Vec::new();
    for branch in ["case-free-fn", "case-method"] {
        let so = out_path(&format!("case-28-{branch}"));
        let out = build_patch(branch, s(&fx.v1_bin), &so);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let commit = git(&["rev-parse", &format!("{branch}^{{commit}}")]);
        let short = &commit.trim()[..12];
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with("name: "))
            .unwrap_or_else(|| panic!("a `name:` line: {}", out.stdout))
            .to_owned();
        let name = format!("svc-{short}");
        assert!(
            line.starts_with(&format!("name: {name} v1+{short} ({branch} (")),
            "named by the head commit {short} and its subject {branch}: {line}"
        );
        let bytes = std::fs::read(&so).unwrap();
        assert!(
            contains_bytes(&bytes, name.as_bytes()),
            "{} carries the name {name}",
            so.display()
        );
        lines.push(line);
    }
    assert_ne!(lines[0], lines[1], "two fixes, two names");

    let so = out_path("case-28-named");
    let out = build_patch_with(
        "case-free-fn",
        s(&fx.v1_bin),
        &so,
        &[
            "--name",
            "INC-4711",
            "--patch-version",
            "2.0.1",
            "--description",
            "price saturates",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l == "name: INC-4711 2.0.1 (price saturates)"),
        "named as the options say: {}",
        out.stdout
    );
    let bytes = std::fs::read(&so).unwrap();
    for given in ["INC-4711", "2.0.1", "price saturates"] {
        assert!(
            contains_bytes(&bytes, given.as_bytes()),
            "{} carries {given}",
            so.display()
        );
    }
}

#[test]
fn case_29_a_function_whose_source_is_the_same_says_why_it_is_replaced() {
    // The user changed a callee, a const or a macro, not the function the
    // tool lists as replaced: the line says what changed. A function the
    // user changed says nothing more.
    let fx = fixture();
    for (branch, path, why) in [
        (
            "case-inlined-callee",
            "svc::bonus_of",
            Some("inlined svc::bonus changed"),
        ),
        (
            "case-const",
            "svc::capped",
            Some("const svc::LIMIT changed"),
        ),
        ("case-macro", "svc::doubled", Some("macro twice! changed")),
        ("case-free-fn", "svc::price", None),
    ] {
        let so = out_path(&format!("case-29-{branch}"));
        let out = build_patch(branch, s(&fx.v1_bin), &so);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(
            harness::listed(&out.stdout)
                .iter()
                .any(|l| l.kind == "replaced" && l.path == path),
            "{branch}: {path} is replaced: {}",
            out.stdout
        );
        assert_eq!(
            harness::why_listed(&out.stdout, "replaced", path).as_deref(),
            why,
            "{branch}: why {path} is replaced: {}",
            out.stdout
        );
    }
}

#[test]
fn case_30_a_changed_helper_whose_base_caller_the_head_removed_is_included() {
    // `points_rate` changed and `points_via`, its only caller in the base,
    // is gone from the head: the old `points_via` stays unreachable once
    // its own caller, the patchable `points`, runs the new code.
    let out = patched(
        "case-removed-caller",
        &[
            ("replaced", "svc::points", "pub fn points("),
            ("included", "svc::points_rate", "fn points_rate("),
        ],
    );
    assert_eq!(
        called_from(&out, "svc::points_rate"),
        ["svc::points_via (gone from the head)"]
    );
}

#[test]
fn case_31_a_patchable_function_of_a_private_module_is_replaced() {
    // Nothing in the crate calls its entry getter, which the record binds
    // to: the macro keeps it compiled.
    patched(
        "case-private-module",
        &[("replaced", "svc::ledger::fee", "pub(crate) fn fee(")],
    );
}

#[test]
fn case_32_a_change_compiled_only_into_the_binary_crate_is_hooked() {
    // The library's objects have no code of `apply_twice`: only the
    // comparison of the executable's own objects sees the change (it was
    // "no change" before that comparison). Its instance there is hooked,
    // its new body copied from the head executable's own objects.
    let out = patched(
        "case-generic-in-binary",
        &[("hooked", "svc::apply_twice", "pub fn apply_twice<")],
    );
    assert!(
        out.stdout
            .contains("    because it is compiled into the executable svc's own crate"),
        "{}",
        out.stdout
    );
}

// ---- a workspace of two packages ----

/// `git ARGS` in `dir`, as [`git`] runs it in the fixture repository.
fn git_in(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "source-diff test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "source-diff test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .env("GIT_AUTHOR_DATE", "2025-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2025-01-01T00:00:00Z")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The workspace's `rates/src/lib.rs` with the `edits` of that file.
fn rates_lib(edits: &[Edit]) -> String {
    let mut text = concat!(
        "//! The rates the executable answers with.\n",
        "\n/// The flat rate of `amount` (the executable's `by_rate` answer).\n",
        "#[inline(never)]\n",
        "pub fn by_rate(amount: u64) -> u64 {\n    svc::rated_by(&svc::Flat, amount)\n}\n",
        "\n/// The rate of `amount`, after a step that waits.\n",
        "pub async fn rated_later(amount: u64) -> u64 {\n",
        "    let rate = svc::rated_by(&svc::Flat, amount);\n",
        "    std::future::ready(()).await;\n",
        "    rate\n",
        "}\n",
        "\n/// `rated_later` polled to its end (it never waits).\n",
        "#[inline(never)]\n",
        "pub fn by_rate_async(amount: u64) -> u64 {\n",
        "    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());\n",
        "    let mut f = std::pin::pin!(rated_later(amount));\n",
        "    match f.as_mut().poll(&mut cx) {\n",
        "        std::task::Poll::Ready(v) => v,\n",
        "        std::task::Poll::Pending => 0,\n",
        "    }\n",
        "}\n",
    )
    .to_owned();
    for e in edits.iter().filter(|e| e.file == "rates/src/lib.rs") {
        assert_eq!(text.matches(e.old).count(), 1, "{:?}", e.old);
        text = text.replacen(e.old, e.new, 1);
    }
    text
}

/// The fixture's service as many services are laid out: the library in
/// package `svc` (directory `svc/`, its build script generating code),
/// the executable in package `host` (directory `host/`, the host setting
/// in its own build script), with tag `v1` and one branch per edit of
/// `svc/src/lib.rs`. Returns the repository.
fn make_workspace_repo(branches: &[(&str, &[Edit])]) -> PathBuf {
    let repo = harness::scratch().join("workspace-repo");
    let _ = std::fs::remove_dir_all(&repo);
    let put = |path: &str, text: &str| {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    };
    let svc_manifest = harness::edited("Cargo.toml", &[]);
    let (svc_manifest, _) = svc_manifest
        .split_once("\n# Its own workspace")
        .expect("the template ends with its own [workspace]");
    let hotpatch = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../hotpatch"))
        .canonicalize()
        .unwrap();
    put(
        "Cargo.toml",
        "[workspace]\nmembers = [\"svc\", \"util\", \"rates\", \"host\"]\nresolver = \"3\"\n",
    );
    // A library between the service and the executable, which compiles
    // its own copy of the service's generic `apply_twice`.
    put(
        "util/Cargo.toml",
        "[package]\nname = \"util\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [dependencies]\nsvc = { path = \"../svc\" }\n",
    );
    put(
        "util/src/lib.rs",
        "pub fn twice_plus_two(x: u64) -> u64 {\n    svc::apply_twice(|v| v + 2, x)\n}\n",
    );
    // A library the executable calls (`util` it does not).
    put(
        "rates/Cargo.toml",
        "[package]\nname = \"rates\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [dependencies]\nsvc = { path = \"../svc\" }\n",
    );
    put("rates/src/lib.rs", &rates_lib(&[]));
    put("svc/Cargo.toml", &format!("{svc_manifest}\n"));
    // The library's build script generates code; the host setting is the
    // executable's (cargo refuses `rustc-link-arg-bins` without a bin).
    let build_rs = harness::edited("build.rs", &[]).replace(
        "    println!(\"cargo::rustc-link-arg-bins=-rdynamic\");\n",
        "",
    );
    put("svc/build.rs", &build_rs);
    put(
        "host/Cargo.toml",
        &format!(
            "[package]\nname = \"host\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
             [dependencies]\nsvc = {{ path = \"../svc\" }}\nutil = {{ path = \"../util\" }}\n\
             rates = {{ path = \"../rates\" }}\n\
             hotpatch = {{ path = \"{}\", default-features = false }}\n",
            hotpatch.display()
        ),
    );
    put(
        "host/build.rs",
        "fn main() {\n    println!(\"cargo::rustc-link-arg-bins=-rdynamic\");\n}\n",
    );
    // The executable reaches one answer through `rates`'s own code.
    put(
        "host/src/main.rs",
        &harness::V1_MAIN.replace(
            "svc::rated_by(&svc::Flat, 1000)",
            "rates::by_rate(1000) + rates::by_rate_async(0)",
        ),
    );
    put("svc/src/lib.rs", harness::V1_LIB);
    put("svc/src/greeting.txt", harness::V1_GREETING);
    put(".gitignore", "/target\n");
    put(
        "Cargo.lock",
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap(),
    );
    let meta = harness::cargo()
        .args(["metadata", "--format-version", "1", "--quiet"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(meta.status.success(), "cargo metadata: {meta:?}");
    git_in(&repo, &["init", "--quiet", "-b", "main"]);
    let commit = |edits: &[Edit], parent: Option<&str>, msg: &str| {
        put("svc/src/lib.rs", &harness::edited("src/lib.rs", edits));
        put("rates/src/lib.rs", &rates_lib(edits));
        git_in(&repo, &["add", "--all"]);
        let tree = git_in(&repo, &["write-tree"]);
        let mut args = vec!["commit-tree", tree.trim(), "-m", msg];
        if let Some(p) = parent {
            args.extend(["-p", p]);
        }
        git_in(&repo, &args).trim().to_owned()
    };
    let v1 = commit(&[], None, "v1");
    git_in(&repo, &["tag", "v1", &v1]);
    for (branch, edits) in branches {
        let c = commit(edits, Some(&v1), branch);
        git_in(&repo, &["update-ref", &format!("refs/heads/{branch}"), &c]);
    }
    git_in(&repo, &["update-ref", "refs/heads/main", &v1]);
    git_in(&repo, &["checkout", "--quiet", "--force", "main"]);
    repo
}

#[test]
fn workspace_a_library_package_and_an_executable_package_are_patched() {
    // One case at a time: the builds share the fixture's target directory.
    let _fx = fixture();
    let fix = case("case-free-fn");
    let layout = case("case-struct-field");
    let generic = case("case-generic-in-binary");
    let repo = make_workspace_repo(&[
        ("fix", fix.edits),
        ("layout", layout.edits),
        ("generic", generic.edits),
    ]);
    let mut build = harness::cargo();
    build
        .args(["build", "--quiet", "-p", "host"])
        .current_dir(&repo);
    let out = harness::run(build, "cargo build -p host (v1)");
    assert!(out.status.success(), "{out:?}");
    let bin = harness::scratch().join("bin").join("host");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(harness::target_dir().join("debug/host"), &bin).unwrap();
    let manifest = repo.join("Cargo.toml");
    let run = |head: &str, so: &std::path::Path| {
        tool(&[
            "build",
            "--manifest-path",
            s(&manifest),
            "--base",
            "v1",
            "--head",
            head,
            "-p",
            "svc",
            "--binary",
            s(&bin),
            "-o",
            s(so),
        ])
    };

    // The fix: built for the host package's executable, and it runs.
    let so = out_path("workspace-fix");
    let out = run("fix", &so);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lib = harness::edited("src/lib.rs", fix.edits);
    let line = line_of(&lib, "pub fn price(");
    let listed = listed(&out.stdout);
    assert!(
        listed.iter().any(|l| l.kind == "replaced"
            && l.path == "svc::price"
            && l.at == format!("svc/src/lib.rs:{line}")),
        "{}",
        out.stdout
    );
    let mut host = Service::start(&bin, "host v1");
    apply_and_revert(&mut host, &so, fix.changes);

    // A refusal names the file as the workspace does.
    let so = out_path("workspace-layout");
    let out = run("layout", &so);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let line = line_of(
        &harness::edited("src/lib.rs", layout.edits),
        "pub struct Cart",
    );
    let refusal = out
        .stderr
        .lines()
        .find(|l| l.starts_with("refused: "))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(
        refusal.starts_with("refused: type svc::Cart (")
            && refusal.contains(&format!("svc/src/lib.rs:{line})")),
        "{refusal}"
    );

    // The service's generic, changed: `util`'s library compiled its own
    // copy, which the linker dropped (nothing in the host calls it: a
    // note says so), and the executable its own, which is hooked, its new
    // body copied from the executable's objects; the host answers with
    // the fix.
    let so = out_path("workspace-generic");
    let out = run("generic", &so);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("hooked  svc::apply_twice")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("    because it is compiled into the executable host's own crate"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("svc::apply_twice (in package util's library)"),
        "{}",
        out.stdout
    );
    apply_and_revert(&mut host, &so, generic.changes);
}

#[test]
fn the_base_is_built_once_and_one_run_at_a_time_builds() {
    let fx = fixture();
    let so = out_path("kept-base");
    let first = build_patch("case-free-fn", s(&fx.v1_bin), &so);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    // The same base again: its outputs were kept, only the head builds.
    let again = build_patch("case-free-fn", s(&fx.v1_bin), &so);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(
        again.stderr.contains("was built before: reusing")
            && !again.stderr.contains("building the base"),
        "the second run builds the base again: {}",
        again.stderr
    );
    // A path dependency outside the workspace (the hotpatch crate) is
    // touched: what the base was built with is no longer known to be what
    // the base builds now, so it is built again (the deployed binary, built
    // from the same bytes, still matches it).
    let runtime = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hotpatch/src/lib.rs");
    std::fs::File::options()
        .write(true)
        .open(&runtime)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .unwrap_or_else(|e| panic!("{}: {e}", runtime.display()));
    let touched = build_patch("case-free-fn", s(&fx.v1_bin), &so);
    assert_eq!(touched.status.code(), Some(0), "{touched:?}");
    assert!(
        touched.stderr.contains("building the base"),
        "a kept base is reused after a path dependency changed: {}",
        touched.stderr
    );

    // Another run holds the target directory: this one waits, says so,
    // and builds once it is free.
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let lock_path = harness::target_dir().join("hotpatch/.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut cmd = harness::tool_command(&build_args("case-free-fn", s(&fx.v1_bin), &so));
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    let waiting = loop {
        match rx.recv_timeout(harness::BUILD_DEADLINE) {
            Ok(line) if line.contains("waiting for another cargo hotpatch build") => break true,
            Ok(line) => said.push(line),
            Err(_) => break false,
        }
    };
    drop(lock);
    let status = child.wait().unwrap();
    let _ = reader.join();
    assert!(waiting, "the run did not wait for the lock: {said:?}");
    assert!(status.success(), "after the lock was released: {status:?}");
}

#[test]
fn case_33_a_changed_file_the_library_includes_is_a_change() {
    // Not a "no change": the compiled code decides, and the string the
    // patchable `greeting` returns is the file's.
    let out = patched(
        "case-included-file",
        &[("replaced", "svc::greeting", "pub fn greeting(")],
    );
    assert!(
        out.stdout
            .contains("src/greeting.txt changed: not Rust source, but the library may include it"),
        "{}",
        out.stdout
    );
}

#[test]
fn case_34_a_method_called_through_a_trait_object_is_hooked() {
    // `<Flat as Rate>::rate` is public: the binary's vtable holds it, so
    // no caller can be replaced instead.
    patched(
        "case-trait-object",
        &[(
            "hooked",
            "<svc::Flat as svc::Rate>::rate",
            "fn rate(&self, amount: u64) -> u64 {",
        )],
    );
}

#[test]
fn case_35_an_async_fn_with_the_same_state_machine_is_hooked_and_a_suspended_order_finishes_in_it()
{
    let c = case("case-async-same");
    let mut fx = fixture();
    let so = out_path(c.branch);
    let out = build_patch(c.branch, s(&fx.v1_bin), &so);
    assert_eq!(out.status.code(), Some(0), "exit code: {out:?}");
    assert!(
        listed(&out.stdout)
            .iter()
            .any(|l| l.kind == "hooked" && l.path.starts_with("svc::checkout")),
        "{}",
        out.stdout
    );
    // 3 items: 300, then + 7 (v1) or + 9 (the fix) after the gate.
    assert_eq!(fx.v1.ask("order"), "pending");
    assert_eq!(fx.v1.ask("finish"), "307", "v1 before the patch");
    // An order suspended at the gate while the patch is applied resumes
    // in the new poll function, reading the state the old one saved.
    assert_eq!(fx.v1.ask("order"), "pending");
    let applied = Applied::load(&mut fx.v1, &so);
    assert_eq!(applied.v1.ask("finish"), "309", "the suspended order");
    assert_eq!(applied.v1.ask("order"), "pending");
    assert_eq!(applied.v1.ask("finish"), "309", "a new order");
    // Suspended while patched, finished after the revert: the old code.
    assert_eq!(applied.v1.ask("order"), "pending");
    applied.revert();
    assert_eq!(fx.v1.ask("finish"), "307", "reverted");
    assert_eq!(but_calls(fx.v1.call()), but_calls(expected(&[])));
}

#[test]
fn case_36_an_async_fn_whose_state_machine_changed_is_refused() {
    refused(
        "case-async-state",
        "svc::checkout",
        "pub async fn checkout(",
        &["state machine"],
        &[],
    );
}

// ---- the binary crate's own source (issue 18) ----

#[test]
fn case_37_a_function_of_the_binary_crate_is_hooked() {
    // `call` is the binary crate's own function: its new body is copied
    // from the head executable's objects and its entry redirected; `main`
    // (its only caller, unchanged) calls it again for each `call`.
    let c = case("case-bin-fn");
    let mut fx = fixture();
    let so = out_path(c.branch);
    let out = build_patch(c.branch, s(&fx.v1_bin), &so);
    assert_eq!(out.status.code(), Some(0), "exit code: {out:?}");
    let line = line_of(
        &harness::edited("src/main.rs", c.edits),
        "fn call() -> String {",
    );
    assert_eq!(
        listed(&out.stdout),
        [harness::Listed {
            kind: "hooked".into(),
            path: "svc::call".into(),
            at: format!("src/main.rs:{line}"),
        }],
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("    because it is a function of the executable svc's own crate"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("only svc::main calls it: its new code runs when main calls it again"),
        "{}",
        out.stdout
    );
    apply_and_revert(&mut fx.v1, &so, c.changes);
}

#[test]
fn case_38_a_static_added_to_the_binary_crate_is_refused_naming_its_file() {
    let c = case("case-bin-static");
    let fx = fixture();
    let so = out_path(c.branch);
    let out = build_patch(c.branch, s(&fx.v1_bin), &so);
    assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
    assert!(!so.exists(), "no patch file is written");
    let line = line_of(&harness::edited("src/main.rs", c.edits), "pub static READ");
    let refusals: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    assert_eq!(refusals.len(), 1, "one clear reason: {}", out.stderr);
    assert!(
        refusals[0].contains("added static svc::READ")
            && refusals[0].contains(&format!("(src/main.rs:{line})")),
        "{}",
        refusals[0]
    );
    assert!(
        !out.stderr.contains("building the base"),
        "refused before building: {}",
        out.stderr
    );
}

#[test]
fn case_39_a_change_of_main_is_refused_it_has_run() {
    // The other revision changes only the banner `main` prints when it
    // starts: the running v1 printed it already and never runs that code
    // again, so no patch can carry it: refused, naming `main`, never a
    // hook that changes nothing.
    let fx = fixture();
    let so = out_path("case-39");
    let out = build_patch("other", s(&fx.v1_bin), &so);
    assert_eq!(out.status.code(), Some(3), "exit code: {out:?}");
    assert!(!so.exists(), "no patch file is written");
    let line = line_of(
        &harness::edited("src/main.rs", case("other").edits),
        "fn main() {",
    );
    let refusals: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    assert_eq!(refusals.len(), 1, "one clear reason: {}", out.stderr);
    assert!(
        refusals[0].starts_with(&format!("refused: svc::main (src/main.rs:{line}) changed"))
            && refusals[0].contains("already entered and never calls again"),
        "{}",
        refusals[0]
    );
    assert!(!out.stdout.contains("hooked"), "{}", out.stdout);
}

// ---- other packages of the workspace (issue 18) ----

/// The workspace repository's v1 built (`cargo build -p host`), its
/// executable copied to `bin/NAME/host` (named as its bin target).
fn build_workspace_host(repo: &std::path::Path, name: &str) -> PathBuf {
    let mut build = harness::cargo();
    build
        .args(["build", "--quiet", "-p", "host"])
        .current_dir(repo);
    let out = harness::run(build, "cargo build -p host (v1)");
    assert!(out.status.success(), "{out:?}");
    let bin = harness::scratch().join("bin").join(name).join("host");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(harness::target_dir().join("debug/host"), &bin).unwrap();
    bin
}

#[test]
fn workspace_a_changed_function_of_another_package_is_hooked() {
    // `rates::by_rate`, a function of package `rates` that the executable
    // calls: its source is checked, its library's objects compared, its
    // type information read (no async state machine), and its entry
    // redirected; the running host answers with the fix, then without.
    let _fx = fixture();
    let rates_fix: &[Edit] = &[Edit {
        file: "rates/src/lib.rs",
        old: "-> u64 {\n    svc::rated_by(&svc::Flat, amount)\n",
        new: "-> u64 {\n    svc::rated_by(&svc::Flat, amount * 2)\n",
    }];
    let rates_static: &[Edit] = &[Edit {
        file: "rates/src/lib.rs",
        old: "//! The rates the executable answers with.\n",
        new: "//! The rates the executable answers with.\n\npub static SEEN: u64 = 0;\n",
    }];
    // A value kept across the `.await` of an `async fn` of `rates`: its
    // state machine differs, which its library's type information shows.
    let rates_async: &[Edit] = &[Edit {
        file: "rates/src/lib.rs",
        old: "    std::future::ready(()).await;\n    rate\n",
        new: "    let twice = rate * 2;\n    std::future::ready(()).await;\n    twice - rate\n",
    }];
    let repo = make_workspace_repo(&[
        ("rates-fix", rates_fix),
        ("rates-static", rates_static),
        ("rates-async", rates_async),
    ]);
    let bin = build_workspace_host(&repo, "workspace-rates");
    let manifest = repo.join("Cargo.toml");
    let run = |head: &str, so: &std::path::Path| {
        tool(&[
            "build",
            "--manifest-path",
            s(&manifest),
            "--base",
            "v1",
            "--head",
            head,
            "-p",
            "svc",
            "--binary",
            s(&bin),
            "-o",
            s(so),
        ])
    };
    let so = out_path("workspace-rates-fix");
    let out = run("rates-fix", &so);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = line_of(&rates_lib(rates_fix), "pub fn by_rate(");
    assert_eq!(
        listed(&out.stdout),
        [harness::Listed {
            kind: "hooked".into(),
            path: "rates::by_rate".into(),
            at: format!("rates/src/lib.rs:{line}"),
        }],
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("    because it is a function of package rates's library"),
        "{}",
        out.stdout
    );
    let mut host = Service::start(&bin, "host v1 (rates)");
    apply_and_revert(&mut host, &so, &[("by_rate", "40")]);

    // Its source is checked as the library's is: a static added there is
    // refused before any build, naming the file.
    let so = out_path("workspace-rates-static");
    let out = run("rates-static", &so);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!so.exists());
    let line = line_of(&rates_lib(rates_static), "pub static SEEN");
    let refusals: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    assert_eq!(refusals.len(), 1, "one clear reason: {}", out.stderr);
    assert!(
        refusals[0].contains("added static rates::SEEN")
            && refusals[0].contains(&format!("(rates/src/lib.rs:{line})")),
        "{}",
        refusals[0]
    );
    assert!(
        !out.stderr.contains("building the base"),
        "refused before building: {}",
        out.stderr
    );

    // Its async state machines are compared with its own type
    // information: a value kept across an `.await` refuses the hook.
    let so = out_path("workspace-rates-async");
    let out = run("rates-async", &so);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!so.exists());
    let line = line_of(&rates_lib(rates_async), "pub async fn rated_later(");
    assert!(
        out.stderr.lines().any(|l| l.starts_with(&format!(
            "refused: rates::rated_later::{{{{closure}}}} (rates/src/lib.rs:{line}) changed in the code of package rates's library"
        )) && l.contains("state machine that differs")
            && l.contains("twice")),
        "{}",
        out.stderr
    );
}

// ---- several local copies of one function (issue 18) ----

/// A small release service whose executable has two local copies of one
/// library function: `fib` is `#[inline]` (each codegen unit that calls it
/// compiles its own copy) and recursive (no caller inlines it whole), and
/// the executable calls it from two modules, which the release profile's
/// 16 codegen units compile apart.
const COPIES_LIB: &str = "//! The service of the several-copies case.

/// Fibonacci, wrapping.
#[inline]
pub fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1).wrapping_add(fib(n - 2)) }
}
";

const COPIES_MAIN: &str = r#"//! `call` answers `a=.. b=..`; `load PATH`, `revert`.

use std::io::{BufRead, Write};

mod a {
    #[inline(never)]
    pub fn rate(n: u64) -> u64 {
        cpy::fib(n) + 7
    }
}

mod b {
    #[inline(never)]
    pub fn zero(n: u64) -> u64 {
        cpy::fib(n).wrapping_sub(1)
    }
}

fn call() -> String {
    let h = std::hint::black_box;
    format!("a={} b={}", a::rate(h(7)), b::zero(h(3)))
}

fn main() {
    let loader = hotpatch::Loader::new().allow_insecure_permissions();
    let mut loaded: Vec<hotpatch::Patch> = Vec::new();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready cpy v1").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let reply = match line.trim().split_once(' ') {
            None if line.trim() == "call" => call(),
            None if line.trim() == "quit" => break,
            None if line.trim() == "revert" => match loaded.pop() {
                None => "error: no patch to revert".to_owned(),
                Some(patch) => match loader.revert(patch) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("error: {e}"),
                },
            },
            Some(("load", path)) => match loader.load(path) {
                Ok(patch) => {
                    loaded.push(patch);
                    "ok".to_owned()
                }
                Err(e) => format!("error: {e}"),
            },
            _ => format!("error: unknown command {line:?}"),
        };
        writeln!(out, "{}", reply.replace('\n', " ")).unwrap();
        out.flush().unwrap();
    }
}
"#;

/// The several-copies service's repository (`cpy`, tag `v1`, branch
/// `fix`: `fib`'s first values are one more), written under the scratch
/// directory. Returns it.
fn make_copies_repo() -> PathBuf {
    make_small_repo(
        "copies-repo",
        "cpy",
        Some(COPIES_LIB),
        COPIES_MAIN,
        &[(
            "fix",
            &[Edit {
                file: "src/lib.rs",
                old: "if n < 2 { n } else",
                new: "if n < 2 { n + 1 } else",
            }],
        )],
    )
}

/// A small release service's repository, written under the scratch
/// directory as `dir`: package `package` (built with 16 codegen units),
/// `lib` and `main` its sources at tag `v1`, and a branch on v1 for each of
/// `branches`, its edits of `src/lib.rs` and `src/main.rs` applied. Returns
/// it, `main` checked out.
fn make_small_repo(
    dir: &str,
    package: &str,
    lib: Option<&str>,
    main: &str,
    branches: &[(&str, &[Edit])],
) -> PathBuf {
    let repo = harness::scratch().join(dir);
    let _ = std::fs::remove_dir_all(&repo);
    let put = |path: &str, text: &str| {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    };
    let hotpatch = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../hotpatch"))
        .canonicalize()
        .unwrap();
    put(
        "Cargo.toml",
        &format!(
            "[package]\nname = \"{package}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
             [dependencies]\nhotpatch = {{ path = \"{}\", default-features = false }}\n\n\
             # rustc merges codegen units it finds small unless their number is given:\n\
             # a service's modules are big enough to stay apart, this one's are not.\n\
             [profile.release]\ncodegen-units = 16\n\n[workspace]\n",
            hotpatch.display()
        ),
    );
    put(
        "build.rs",
        "fn main() {\n    println!(\"cargo::rustc-link-arg-bins=-rdynamic\");\n}\n",
    );
    put("src/main.rs", main);
    if let Some(lib) = lib {
        put("src/lib.rs", lib);
    }
    put(".gitignore", "/target\n");
    put(
        "Cargo.lock",
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap(),
    );
    let meta = harness::cargo()
        .args(["metadata", "--format-version", "1", "--quiet"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(meta.status.success(), "cargo metadata: {meta:?}");
    git_in(&repo, &["init", "--quiet", "-b", "main"]);
    git_in(&repo, &["add", "--all"]);
    let tree = git_in(&repo, &["write-tree"]);
    let v1 = git_in(&repo, &["commit-tree", tree.trim(), "-m", "v1"]);
    let v1 = v1.trim();
    git_in(&repo, &["tag", "v1", v1]);
    for (branch, edits) in branches {
        let files = lib.map(|l| ("src/lib.rs", l)).into_iter();
        for (file, text) in files.chain([("src/main.rs", main)]) {
            let mut text = text.to_owned();
            for e in edits.iter().filter(|e| e.file == file) {
                assert_eq!(text.matches(e.old).count(), 1, "{branch}: {:?}", e.old);
                text = text.replacen(e.old, e.new, 1);
            }
            put(file, &text);
        }
        git_in(&repo, &["add", "--all"]);
        let tree = git_in(&repo, &["write-tree"]);
        let fix = git_in(&repo, &["commit-tree", tree.trim(), "-p", v1, "-m", branch]);
        git_in(
            &repo,
            &["update-ref", &format!("refs/heads/{branch}"), fix.trim()],
        );
    }
    git_in(&repo, &["update-ref", "refs/heads/main", v1]);
    git_in(&repo, &["checkout", "--quiet", "--force", "main"]);
    repo
}

#[test]
fn case_40_a_function_with_several_local_copies_is_hooked_in_every_copy() {
    // Release, as deployed: the executable has two local copies of
    // `cpy::fib` under one name, one per codegen unit that calls it. Each
    // is hooked with its own unit's new body (a hook of one would leave
    // the other answering the old way); `a::rate` and `b::zero`, which
    // inlined a level of it, changed too and are hooked themselves.
    let _fx = fixture();
    let repo = make_copies_repo();
    let mut build = harness::cargo();
    build
        .args(["build", "--quiet", "--release"])
        .current_dir(&repo);
    let out = harness::run(build, "cargo build --release (cpy v1)");
    assert!(out.status.success(), "{out:?}");
    let bin = harness::scratch().join("bin").join("copies").join("cpy");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(harness::target_dir().join("release/cpy"), &bin).unwrap();
    let mut v1 = Service::start(&bin, "cpy v1");
    let before = v1.call();
    assert_eq!(before["a"], "20");
    assert_eq!(before["b"], "1");

    let so = out_path("case-40");
    let manifest = repo.join("Cargo.toml");
    let out = tool(&[
        "build",
        "--manifest-path",
        s(&manifest),
        "--base",
        "v1",
        "--head",
        "fix",
        "-p",
        "cpy",
        "--release",
        "--binary",
        s(&bin),
        "-o",
        s(&so),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let fib: Vec<harness::Listed> = listed(&out.stdout)
        .into_iter()
        .filter(|l| l.path == "cpy::fib")
        .collect();
    assert_eq!(fib.len(), 2, "every copy is hooked: {}", out.stdout);
    assert!(
        fib.iter()
            .all(|l| l.kind == "hooked" && l.at == "src/lib.rs:5"),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stdout
            .matches("the deployed binary has 2 local copies of it: this one, at 0x")
            .count(),
        2,
        "{}",
        out.stdout
    );
    let applied = Applied::load(&mut v1, &so);
    let patched = applied.v1.call();
    // fib(7) is 34 with the fix (13 before), fib(3) is 5 (2 before): each
    // through the copy of its own module's codegen unit, below the level
    // its caller inlined.
    assert_eq!((patched["a"].as_str(), patched["b"].as_str()), ("41", "4"));
    applied.revert();
    assert_eq!(v1.call(), before, "reverted");
}

#[test]
fn case_41_a_panic_in_a_hooked_function_s_new_body_is_counted() {
    // `boxes_for` and `crates_for` are public and the binary calls them:
    // hooked. Their new bodies are the head's code as compiled, with no
    // counted form; their unwind information names the patch's counting
    // personality instead (one without a personality of its own, one
    // with rustc's and a landing pad that drops a `String`).
    let c = case("case-hook-panics");
    let mut fx = fixture();
    let so = out_path(c.branch);
    let out = build_patch(c.branch, s(&fx.v1_bin), &so);
    check_built(
        &fx.v1_id,
        &out,
        &so,
        &harness::edited("src/lib.rs", c.edits),
        &[
            ("hooked", "svc::boxes_for", "pub fn boxes_for("),
            ("hooked", "svc::crates_for", "pub fn crates_for("),
        ],
    );
    let applied = Applied::load(&mut fx.v1, &so);
    assert_eq!(applied.v1.ask("panics"), "Some(0)", "none before a call");
    for n in 1..=3 {
        let call = applied.v1.call();
        assert_eq!(
            but_calls(call),
            but_calls(expected(c.changes)),
            "only the hooked function panics"
        );
        assert_eq!(
            applied.v1.ask("panics"),
            format!("Some({})", 2 * n),
            "each call of the hooked boxes_for(0) and crates_for(0) panicked once, out of \
             its new body (crates_for's through its landing pad)"
        );
    }
    applied.revert();
    let after = fx.v1.call();
    assert_eq!(
        (&*after["boxes"], &*after["crates"]),
        ("1", "1"),
        "reverted"
    );
}

#[test]
fn case_42_a_function_whose_entry_is_a_loop_head_is_refused() {
    // `tally`'s `jb` goes back to +0x3, inside the 7 bytes a hook's jump
    // would replace: the reason is hotpatch-entry's, from v1's code.
    refused(
        "case-loop-entry",
        "svc::tally",
        "pub fn tally(",
        &["inside the entry bytes"],
        &["branches to +0x3", "a loop whose head is at the entry"],
    );
}

// ---- the executable's own crate compiled differently (issue 18) ----

/// The library of the compiled-differently service: the executable is
/// what the cases change.
const NOISE_LIB: &str = "//! The service of the compiled-differently cases.

/// The service's version.
pub fn version() -> u64 {
    1
}
";

/// The executable of the compiled-differently service. `mix` is private
/// and big; `hashed` is its only caller, and inlines it. A fix that calls
/// `mix` from `scaled` too gives it two callers: then neither inlines it,
/// and `hashed`'s code is other code (a call) from the same source.
const NOISE_MAIN: &str = r#"//! `call` answers `hashed=.. scaled=..`; `load PATH`, `revert`.

use std::hint::black_box;
use std::io::{BufRead, Write};

/// Mixes a value (big enough that with two callers neither inlines it).
fn mix(mut x: u64) -> u64 {
    for i in 0..black_box(3) {
        x = x.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1);
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 31);
        x = x.wrapping_add(black_box(0x94d0_49bb_1331_11eb));
        if x % 7 == 3 { x = x.wrapping_sub(black_box(11)); }
        if x % 5 == 1 { x ^= black_box(x >> 3); }
        x = x.rotate_left(8) ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 2);
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 29);
        x = x.wrapping_add(black_box(0x94d0_49bb_1331_11eb));
        if x % 9 == 3 { x = x.wrapping_sub(black_box(13)); }
        if x % 5 == 2 { x ^= black_box(x >> 5); }
        x = x.rotate_left(9) ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 3);
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 27);
        x = x.wrapping_add(black_box(0x94d0_49bb_1331_11eb));
        if x % 11 == 3 { x = x.wrapping_sub(black_box(17)); }
        if x % 5 == 3 { x ^= black_box(x >> 7); }
        x = x.rotate_left(10) ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 4);
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 25);
        x = x.wrapping_add(black_box(0x94d0_49bb_1331_11eb));
        if x % 13 == 3 { x = x.wrapping_sub(black_box(19)); }
        if x % 5 == 4 { x ^= black_box(x >> 9); }
    }
    x
}

#[inline(never)]
fn hashed(x: u64) -> u64 {
    mix(x) % 1000
}

#[inline(never)]
fn scaled(x: u64) -> u64 {
    black_box(x) * 3
}

fn call() -> String {
    let h = black_box;
    format!("hashed={} scaled={} version={}", hashed(h(5)), scaled(h(7)), nz::version())
}

fn main() {
    let loader = hotpatch::Loader::new().allow_insecure_permissions();
    let mut loaded: Vec<hotpatch::Patch> = Vec::new();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready nz v1").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let reply = match line.trim().split_once(' ') {
            None if line.trim() == "call" => call(),
            None if line.trim() == "quit" => break,
            None if line.trim() == "revert" => match loaded.pop() {
                None => "error: no patch to revert".to_owned(),
                Some(patch) => match loader.revert(patch) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("error: {e}"),
                },
            },
            Some(("load", path)) => match loader.load(path) {
                Ok(patch) => {
                    loaded.push(patch);
                    "ok".to_owned()
                }
                Err(e) => format!("error: {e}"),
            },
            _ => format!("error: unknown command {line:?}"),
        };
        writeln!(out, "{}", reply.replace('\n', " ")).unwrap();
        out.flush().unwrap();
    }
}
"#;

/// `scaled` calls `mix` too (a real change of `scaled`; `hashed`, whose
/// source is the same, is compiled to a call of `mix`).
const NOISE_SCALED: Edit = Edit {
    file: "src/main.rs",
    old: "    black_box(x) * 3\n",
    new: "    mix(x) % 10 + black_box(x) * 3\n",
};

/// `mix`'s first round rotates by 6: `hashed`, which inlines it, runs
/// other code from a changed line.
const NOISE_MIX: Edit = Edit {
    file: "src/main.rs",
    old: "x.rotate_left(7)",
    new: "x.rotate_left(6)",
};

/// `mix` as the service has it, rotating by `first` in its first round
/// (`black_box` is the identity): what the patched service must answer.
fn mix_model(mut x: u64, first: u32) -> u64 {
    for i in 0..3u64 {
        let rounds: [(u32, u64, u32, u64, u64, u64, u32); 4] = [
            (first, 1, 31, 7, 11, 1, 3),
            (8, 2, 29, 9, 13, 2, 5),
            (9, 3, 27, 11, 17, 3, 7),
            (10, 4, 25, 13, 19, 4, 9),
        ];
        for (rot, k, shr, m, sub, r, shr2) in rounds {
            x = x.rotate_left(rot) ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + k);
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> shr);
            x = x.wrapping_add(0x94d0_49bb_1331_11eb);
            if x % m == 3 {
                x = x.wrapping_sub(sub);
            }
            if x % 5 == r {
                x ^= x >> shr2;
            }
        }
    }
    x
}

/// The compiled-differently service built for release as deployed
/// (tag v1), running; and its repository.
fn noise_v1() -> (Service, PathBuf, PathBuf) {
    let repo = make_small_repo(
        "noise-repo",
        "nz",
        Some(NOISE_LIB),
        NOISE_MAIN,
        &[("fix-scaled", &[NOISE_SCALED]), ("fix-mix", &[NOISE_MIX])],
    );
    let mut build = harness::cargo();
    build
        .args(["build", "--quiet", "--release"])
        .current_dir(&repo);
    let out = harness::run(build, "cargo build --release (nz v1)");
    assert!(out.status.success(), "{out:?}");
    let bin = harness::scratch().join("bin").join("noise").join("nz");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(harness::target_dir().join("release/nz"), &bin).unwrap();
    let mut v1 = Service::start(&bin, "nz v1");
    let call = v1.call();
    assert_eq!(call["hashed"], (mix_model(5, 7) % 1000).to_string());
    assert_eq!(call["scaled"], "21");
    (v1, repo, bin)
}

/// `cargo hotpatch build --base v1 --head BRANCH --release` of the
/// compiled-differently service, for its v1 binary.
fn noise_patch(
    repo: &std::path::Path,
    bin: &std::path::Path,
    branch: &str,
) -> (harness::Output, PathBuf) {
    let so = out_path(&format!("noise-{branch}"));
    let manifest = repo.join("Cargo.toml");
    let out = tool(&[
        "build",
        "--manifest-path",
        s(&manifest),
        "--base",
        "v1",
        "--head",
        branch,
        "-p",
        "nz",
        "--release",
        "--binary",
        s(bin),
        "-o",
        s(&so),
    ]);
    (out, so)
}

/// The functions a patch hooks, as the tool lists them (`PATH (FILE:LINE)`).
/// (Not [`listed`]: a function of the executable's crate that a fix adds,
/// as `mix` standalone, is listed as included without a place.)
fn hooked(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("hooked "))
        .map(|rest| rest.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn case_43_a_function_of_the_binary_crate_that_only_compiled_differently_is_noise() {
    // Release, as deployed (no debug info): the executable's crate gets its
    // line tables from a second compile. The fix changes `scaled` (hooked);
    // `hashed`'s code changed too, from the same source (`mix` is no
    // longer inlined into it): set aside as noise, not hooked. Then a fix
    // of `mix` itself, inlined into `hashed`: `hashed` really changed.
    let _fx = fixture();
    let (mut v1, repo, bin) = noise_v1();
    let before = v1.call();

    let (out, so) = noise_patch(&repo, &bin, "fix-scaled");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let main_rs = NOISE_MAIN.replacen(NOISE_SCALED.old, NOISE_SCALED.new, 1);
    let line = line_of(&main_rs, "fn scaled(");
    assert_eq!(
        hooked(&out.stdout),
        [format!("nz::scaled (src/main.rs:{line})")],
        "only the changed function is hooked: {}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("note: 1 function compiled to other code")
                && l.ends_with(": nz::hashed")),
        "hashed only compiled differently: {}",
        out.stdout
    );
    let applied = Applied::load(&mut v1, &so);
    let patched = applied.v1.call();
    assert_eq!(
        patched["scaled"],
        (mix_model(7, 7) % 10 + 21).to_string(),
        "the fix runs"
    );
    assert_eq!(patched["hashed"], before["hashed"], "hashed is as it was");
    applied.revert();
    assert_eq!(v1.call(), before, "reverted");

    // `mix`'s own line changed, and `hashed` inlines it: a change of
    // `hashed`, found by its lines, hooked.
    let (out, so) = noise_patch(&repo, &bin, "fix-mix");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let main_rs = NOISE_MAIN.replacen(NOISE_MIX.old, NOISE_MIX.new, 1);
    let line = line_of(&main_rs, "fn hashed(");
    assert_eq!(
        hooked(&out.stdout),
        [format!("nz::hashed (src/main.rs:{line})")],
        "hashed changed: {}",
        out.stdout
    );
    let applied = Applied::load(&mut v1, &so);
    let patched = applied.v1.call();
    assert_ne!(mix_model(5, 6) % 1000, mix_model(5, 7) % 1000);
    assert_eq!(patched["hashed"], (mix_model(5, 6) % 1000).to_string());
    assert_eq!(patched["scaled"], before["scaled"]);
    applied.revert();
    assert_eq!(v1.call(), before, "reverted");
}

// ---- a v1 with the control endpoint: watch windows and restarts ----

/// v1 built with the control endpoint (`--features control`), once per
/// process: its binary. Called with the fixture held (the build uses the
/// repository's working tree).
fn control_v1(_fx: &Fixture) -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| harness::build_service_features("svc-v1-control", false, &["control"]))
        .clone()
}

/// A fresh state directory (also the socket's directory) named `name`.
fn state_dir(name: &str) -> PathBuf {
    let dir = harness::scratch().join("state").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `control_v1` started with the control endpoint on `state`; the
/// service and its socket.
fn start_control_v1(bin: &std::path::Path, state: &std::path::Path) -> (Service, PathBuf) {
    let svc = Service::start_args(bin, "v1-control", &["--state-dir", s(state)]);
    let socket = svc
        .banner
        .split_once(" socket=")
        .map(|(_, p)| PathBuf::from(p))
        .unwrap_or_else(|| panic!("no socket in {:?}", svc.banner));
    (svc, socket)
}

/// One request to the control endpoint at `socket`; its reply.
fn control(socket: &std::path::Path, request: serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    println!("  [control] {request} -> {}", line.trim_end());
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// Case `branch` built for [`control_v1`] (`--features control`).
fn control_patch(branch: &str, bin: &std::path::Path) -> PathBuf {
    let so = out_path(&format!("{branch}-control"));
    let out = build_patch_with(branch, s(bin), &so, &["--features", "control"]);
    assert_eq!(out.status.code(), Some(0), "exit code: {out:?}");
    assert!(
        listed(&out.stdout).iter().any(|l| l.kind == "hooked"),
        "{}",
        out.stdout
    );
    so
}

#[test]
fn watch_a_hooked_function_made_from_source_that_panics_is_rolled_back() {
    // Case 41's patch, applied under a watch window while `call` runs
    // (each call panics in the hooked `boxes_for`): the window sees the
    // panics on the patch's counter and rolls the patch back.
    let fx = fixture();
    let bin = control_v1(&fx);
    let so = control_patch("case-hook-panics", &bin);
    let state = state_dir("watch");
    let (mut svc, socket) = start_control_v1(&bin, &state);
    assert_eq!(svc.call()["boxes"], "1");
    let request = serde_json::json!({"v": 1, "op": "apply", "file": s(&so), "watch_ms": 60_000});
    let apply = {
        let socket = socket.clone();
        std::thread::spawn(move || control(&socket, request))
    };
    // Traffic until the window's reply: a rollback comes at its first
    // check after a panic; a window that saw none would last 60 s.
    let mut answers = std::collections::BTreeSet::new();
    while !apply.is_finished() {
        answers.insert(svc.call()["boxes"].clone());
        // Paced: each answer is printed (kept by the harness).
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let reply = apply.join().unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["kind"], "rolled_back", "{reply}");
    assert!(reply["error"]["panics"].as_u64().unwrap() >= 1, "{reply}");
    assert!(answers.contains("panicked"), "the fix ran: {answers:?}");
    // The old code serves again, and the process lists no patch.
    let after = svc.call();
    assert_eq!(after["boxes"], "1", "rolled back");
    let status = control(&socket, serde_json::json!({"v": 1, "op": "status"}));
    assert_eq!(status["patches"], serde_json::json!([]), "{status}");
    drop(fx);
}

#[test]
fn restart_a_hooked_function_made_from_source_is_restored_from_the_state_directory() {
    // Case 34's patch hooks `<Flat as Rate>::rate` (20 -> 25): applied
    // and accepted, the process killed (SIGKILL) and started again on the
    // same state directory: hooked again before it serves; then reverted.
    let fx = fixture();
    let bin = control_v1(&fx);
    let so = control_patch("case-trait-object", &bin);
    let state = state_dir("restart");
    let (mut svc, socket) = start_control_v1(&bin, &state);
    assert_eq!(svc.call()["by_rate"], "20");
    let reply = control(
        &socket,
        serde_json::json!({"v": 1, "op": "apply", "file": s(&so), "accept": true}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let name = reply["patch"]["name"].as_str().unwrap().to_owned();
    assert_eq!(
        reply["patch"]["hooked"],
        serde_json::json!(["<svc::Flat as svc::Rate>::rate"]),
        "{reply}"
    );
    assert_eq!(svc.call()["by_rate"], "25", "the fix runs");
    drop(svc); // SIGKILL

    let (mut svc, socket) = start_control_v1(&bin, &state);
    assert_eq!(svc.call()["by_rate"], "25", "restored before serving");
    let status = control(&socket, serde_json::json!({"v": 1, "op": "status"}));
    let patches = status["patches"].as_array().unwrap();
    assert_eq!(patches.len(), 1, "{status}");
    assert_eq!(patches[0]["name"], name.as_str(), "{status}");
    assert_eq!(patches[0]["state"], "accepted", "{status}");
    assert_eq!(
        patches[0]["hooked"],
        serde_json::json!(["<svc::Flat as svc::Rate>::rate"])
    );
    let reply = control(
        &socket,
        serde_json::json!({"v": 1, "op": "revert", "patch": name}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(svc.call()["by_rate"], "20", "reverted");
    drop(svc);

    // Reverted, it left the record: the next start runs v1's code.
    let (mut svc, _) = start_control_v1(&bin, &state);
    assert_eq!(svc.call()["by_rate"], "20", "not restored once reverted");
    drop(svc);
    drop(fx);
}

#[test]
fn restart_every_kind_of_source_built_hook_is_restored_together() {
    // A hooked private helper with an unpatched caller (case 6), a
    // generic function instantiated only in the executable's crate (case
    // 32) and a function of the binary crate's own source (case 37),
    // each its own patch from source, applied and accepted on one
    // process: after a SIGKILL, the restart re-applies all three before
    // it serves (each hooked again, in the order they were accepted);
    // reverted one by one, each fix leaves and the next start runs v1.
    let fx = fixture();
    let bin = control_v1(&fx);
    let cases = [
        "case-helper-unpatched-caller",
        "case-generic-in-binary",
        "case-bin-fn",
    ];
    let patches: Vec<PathBuf> = cases.iter().map(|b| control_patch(b, &bin)).collect();
    let all: Vec<(&str, &str)> = cases
        .iter()
        .flat_map(|b| case(b).changes.iter().copied())
        .collect();
    let state = state_dir("restart-kinds");
    let (mut svc, socket) = start_control_v1(&bin, &state);
    assert_eq!(answers(svc.call()), answers(expected(&[])), "v1");
    let mut names = Vec::new();
    for so in &patches {
        let reply = control(
            &socket,
            serde_json::json!({"v": 1, "op": "apply", "file": s(so), "accept": true}),
        );
        assert_eq!(reply["ok"], true, "{reply}");
        assert!(
            !reply["patch"]["hooked"].as_array().unwrap().is_empty(),
            "{reply}"
        );
        names.push(reply["patch"]["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        answers(svc.call()),
        answers(expected(&all)),
        "the three fixes run"
    );
    drop(svc); // SIGKILL

    let (mut svc, socket) = start_control_v1(&bin, &state);
    assert_eq!(
        answers(svc.call()),
        answers(expected(&all)),
        "restored before serving"
    );
    let status = control(&socket, serde_json::json!({"v": 1, "op": "status"}));
    let listed: Vec<&str> = status["patches"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|p| {
            assert_eq!(p["state"], "accepted", "{status}");
            assert!(!p["hooked"].as_array().unwrap().is_empty(), "{status}");
        })
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names, "{status}");
    for (i, name) in names.iter().enumerate().rev() {
        let reply = control(
            &socket,
            serde_json::json!({"v": 1, "op": "revert", "patch": name}),
        );
        assert_eq!(reply["ok"], true, "{reply}");
        let left: Vec<(&str, &str)> = cases[..i]
            .iter()
            .flat_map(|b| case(b).changes.iter().copied())
            .collect();
        assert_eq!(
            answers(svc.call()),
            answers(expected(&left)),
            "{name} reverted"
        );
    }
    drop(svc);
    let (mut svc, _) = start_control_v1(&bin, &state);
    assert_eq!(
        answers(svc.call()),
        answers(expected(&[])),
        "nothing restored once reverted"
    );
    drop(svc);
    drop(fx);
}

/// `call`'s answers but the call count and the last event (the control
/// endpoint's own events land there).
fn answers(call: Call) -> Call {
    let mut call = but_calls(call);
    call.remove("event");
    call
}

// ---- a package with only an executable (issue 18) ----

/// The executable of the one-package, no-library service: commands on
/// stdin (`call`, `load PATH`, `revert`), as the fixture's.
const ONLY_BIN_MAIN: &str = r#"use std::io::{BufRead, Write};

#[inline(never)]
fn handle(n: u64) -> u64 {
    n * 2 + 1
}

#[hotpatch::patchable]
fn label(n: u64) -> String {
    format!("n{n}")
}

fn main() {
    let loader = hotpatch::Loader::new().allow_insecure_permissions();
    let mut loaded = Vec::new();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready only-bin v1").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let reply = match line.trim().split_once(' ') {
            None if line.trim() == "call" => format!(
                "handle={} label={:?}",
                handle(std::hint::black_box(20)),
                label(std::hint::black_box(3))
            ),
            None if line.trim() == "revert" => match loaded.pop() {
                None => "error: no patch to revert".to_owned(),
                Some(p) => match loader.revert(p) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("error: {e}"),
                },
            },
            Some(("load", path)) => match loader.load(path) {
                Ok(p) => {
                    loaded.push(p);
                    "ok".to_owned()
                }
                Err(e) => format!("error: {e}"),
            },
            _ => format!("error: unknown command {line:?}"),
        };
        writeln!(out, "{}", reply.replace('\n', " ")).unwrap();
        out.flush().unwrap();
    }
}
"#;

#[test]
fn a_package_with_only_an_executable_is_patched() {
    // `cargo new`'s layout: `src/main.rs` and no `src/lib.rs`. Its
    // functions are the executable's crate's: a changed one is hooked
    // and the running v1 answers with it; a `#[patchable]` one there is
    // refused with its reason, never built into a patch the loader
    // refuses; a change of main's own lines is refused before any build.
    let _fx = fixture();
    let edit = |old, new| Edit {
        file: "src/main.rs",
        old,
        new,
    };
    let fix = [edit("n * 2 + 1", "n * 3 + 1")];
    let label = [edit("\"n{n}\"", "\"#{n}\"")];
    let banner = [edit("ready only-bin v1", "ready only-bin v2")];
    let repo = make_small_repo(
        "only-bin-repo",
        "only-bin",
        None,
        ONLY_BIN_MAIN,
        &[("fix", &fix), ("label", &label), ("banner", &banner)],
    );
    let text = |edits: &[Edit]| ONLY_BIN_MAIN.replacen(edits[0].old, edits[0].new, 1);
    let branches = [text(&fix), text(&label), text(&banner)];

    let mut build = harness::cargo();
    build.args(["build", "--quiet"]).current_dir(&repo);
    let out = harness::run(build, "cargo build (only-bin v1)");
    assert!(out.status.success(), "{out:?}");
    let bin = harness::scratch()
        .join("bin")
        .join("only-bin-v1")
        .join("only-bin");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(harness::target_dir().join("debug/only-bin"), &bin).unwrap();
    let manifest = repo.join("Cargo.toml");
    let run = |head: &str, so: &std::path::Path| {
        tool(&[
            "build",
            "--manifest-path",
            s(&manifest),
            "--base",
            "v1",
            "--head",
            head,
            "--binary",
            s(&bin),
            "-o",
            s(so),
        ])
    };

    let so = out_path("only-bin-fix");
    let out = run("fix", &so);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = line_of(&branches[0], "fn handle(");
    assert_eq!(
        listed(&out.stdout),
        [harness::Listed {
            kind: "hooked".into(),
            path: "only_bin::handle".into(),
            at: format!("src/main.rs:{line}"),
        }],
        "{}",
        out.stdout
    );
    let mut v1 = Service::start(&bin, "only-bin v1");
    assert_eq!(v1.ask("call"), "handle=41 label=\"n3\"");
    let applied = Applied::load(&mut v1, &so);
    assert_eq!(applied.v1.ask("call"), "handle=61 label=\"n3\"");
    applied.revert();
    assert_eq!(v1.ask("call"), "handle=41 label=\"n3\"");

    let so = out_path("only-bin-label");
    let out = run("label", &so);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!so.exists(), "no patch file is written");
    let refusals: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    assert!(!refusals.is_empty(), "{}", out.stderr);
    assert!(
        refusals.iter().all(|r| r.contains("label")
            && r.contains("it is #[patchable] code outside the service's library")),
        "{refusals:#?}"
    );

    let so = out_path("only-bin-banner");
    let out = run("banner", &so);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!so.exists(), "no patch file is written");
    let line = line_of(&branches[2], "fn main()");
    assert!(
        out.stderr.contains(&format!(
            "refused: only_bin::main (src/main.rs:{line}) changed: its own lines"
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("building the base"), "{}", out.stderr);
}
