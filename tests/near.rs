//! Near placement (issue 22): a thin patch's code is mapped within ±2 GiB
//! of the executable's code, where an indirect call costs what a call to
//! the original does; where no range is free there (simulated with the
//! `load::near_range` failpoint), the patch is opened by `dlopen` as
//! before, works the same, and says so.

mod support;

use std::panic::catch_unwind;

use fail::FailGuard;

const REACH: u64 = 1 << 31;

/// One line of `/proc/self/maps`: `(start, end, permissions, path)`.
fn maps() -> Vec<(u64, u64, String, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next().unwrap();
            let perms = fields.next().unwrap().to_owned();
            let path = fields.nth(3).unwrap_or("").to_owned();
            let (a, b) = range.split_once('-').unwrap();
            (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
                perms,
                path,
            )
        })
        .collect()
}

/// The executable's code: its executable mappings.
fn executable_text() -> (u64, u64) {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let exe = exe.to_string_lossy();
    let text: Vec<_> = maps()
        .into_iter()
        .filter(|(_, _, perms, path)| perms.contains('x') && *path == exe)
        .collect();
    assert!(!text.is_empty(), "no executable mapping of {exe}");
    (
        text.iter().map(|m| m.0).min().unwrap(),
        text.iter().map(|m| m.1).max().unwrap(),
    )
}

/// The executable mappings of the private copy of the patch file named
/// `label` (the memfd `hotpatch:<label>`).
fn patch_code(label: &str) -> Vec<(u64, u64)> {
    let name = format!("memfd:hotpatch:{label}");
    maps()
        .into_iter()
        .filter(|(_, _, perms, path)| perms.contains('x') && path.contains(&name))
        .map(|(s, e, _, _)| (s, e))
        .collect()
}

/// Every byte of `code` is within ±2 GiB of every byte of `text`: a
/// `rel32` from any one reaches any other.
fn within_reach(code: (u64, u64), text: (u64, u64)) -> bool {
    let (c, t) = (
        (i128::from(code.0), i128::from(code.1)),
        (i128::from(text.0), i128::from(text.1)),
    );
    (c.1 - t.0).abs() <= i128::from(REACH) && (t.1 - c.0).abs() <= i128::from(REACH)
}

#[test]
fn a_patch_is_mapped_within_2_gib_of_the_executable() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch("fixture-patch-basic"), "near-basic.so");
    let patch = hotpatch::Loader::new().perf_map(true).load(&so).unwrap();
    let hotpatch::Placement::Near { address, size } = *patch.placement() else {
        panic!("not placed near: {}", patch.placement());
    };
    let text = executable_text();
    let code = patch_code("near-basic.so");
    assert!(!code.is_empty(), "no executable mapping of the patch");
    for range in &code {
        assert!(
            within_reach(*range, text),
            "patch code {:#x}-{:#x} is not within 2 GiB of the executable's {:#x}-{:#x}",
            range.0,
            range.1,
            text.0,
            text.1
        );
        assert!(
            range.0 >= address && range.1 <= address + size,
            "the placement's range holds its code"
        );
    }
    // It runs, from there.
    assert_eq!(svc::answer(), 2);
    let cart = svc::Cart {
        items: vec![1, 2, 3],
        discount: 1,
    };
    assert_eq!(cart.total(), 1005);
    assert!(patch.placement().to_string().contains("near"));
    // `perf` can name its code: the perf map (asked for) lists its entry
    // shim, inside the placement's range.
    let map_path = format!("/tmp/perf-{}.map", std::process::id());
    let map = std::fs::read_to_string(&map_path).expect("the perf map");
    let _ = std::fs::remove_file(&map_path);
    let entry = map
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ' ');
            let start = u64::from_str_radix(f.next()?, 16).ok()?;
            let len = u64::from_str_radix(f.next()?, 16).ok()?;
            Some((start, len, f.next()?.to_owned()))
        })
        .find(|(start, _, name)| {
            name.ends_with("__hotpatch_entry_answer") && (address..address + size).contains(start)
        });
    assert!(
        entry.is_some(),
        "no perf map line for the patch's entry:\n{map}"
    );
    patch.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}

/// A panic in near-mapped patch code unwinds through its frames (their
/// unwind tables are registered) into the host's `catch_unwind`, and a
/// host panic unwinds back through them.
#[test]
fn panics_unwind_through_near_patch_code() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch("fixture-patch-panics"), "near-panics.so");
    let patch = hotpatch::load(&so).unwrap();
    assert!(patch.placement().is_near(), "{}", patch.placement());
    let caught = catch_unwind(|| svc::checked_div(1, 0)).unwrap_err();
    assert_eq!(
        caught.downcast_ref::<&str>(),
        Some(&"patched: division by zero")
    );
    assert!(catch_unwind(|| svc::relay(3)).is_err());
    assert_eq!(svc::describe(0), "caught &str: host panic");
    assert_eq!(svc::checked_div(4, 2), 3);
    patch.revert().unwrap();
}

/// No free range near the executable (the failpoint makes the reservation
/// fail): the patch is opened by the dynamic loader instead, works, and
/// its placement says why. (A patch no other test of this file loads: the
/// same bytes loaded again reuse the library already mapped.)
#[test]
fn without_a_near_range_the_patch_is_opened_by_dlopen_and_says_so() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch("fixture-patch-stack-a"), "far-stack-a.so");
    let patch = {
        let _no_range = FailGuard::new("load::near_range", "return").unwrap();
        hotpatch::load(&so).unwrap()
    };
    match patch.placement() {
        hotpatch::Placement::Dlopen {
            reason: hotpatch::NearRefusal::NoRange { size },
        } => assert!(*size > 0),
        other => panic!("expected the dlopen fallback for want of a range, got {other:?}"),
    }
    let said = patch.placement().to_string();
    assert!(
        said.contains("dlopen") && said.contains("no free range"),
        "{said}"
    );
    assert_eq!(
        hotpatch::applied()
            .iter()
            .find(|p| p.id == patch.id())
            .map(|p| p.placement.clone()),
        Some(patch.placement().clone()),
        "applied() says it too"
    );
    let text = executable_text();
    let code = patch_code("far-stack-a.so");
    assert!(!code.is_empty(), "mapped from its copy");
    assert!(
        code.iter().all(|c| !within_reach(*c, text)),
        "the dynamic loader mapped it far: {code:x?}, executable {text:x?}"
    );
    assert_eq!(svc::answer(), 10);
    assert_eq!(svc::add(1, 2), 1003);
    patch.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}

/// `Loader::near(false)`: the dynamic loader, and the placement says why.
/// (Another patch of its own, for the reason above.)
#[test]
fn near_placement_can_be_turned_off() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch("fixture-patch-stack-b"), "off-stack-b.so");
    let patch = hotpatch::Loader::new().near(false).load(&so).unwrap();
    assert_eq!(
        *patch.placement(),
        hotpatch::Placement::Dlopen {
            reason: hotpatch::NearRefusal::Off
        }
    );
    assert_eq!(svc::add(1, 2), 2003);
    patch.revert().unwrap();
}

/// A patch with thread-locals of its own (`PT_TLS`): only the dynamic
/// loader allocates and binds those, so the near loader refuses it, by
/// reason, and the patch is opened by `dlopen` and works. (The library is
/// never reclaimed: tests/reclaim.rs.)
#[test]
fn a_patch_with_thread_locals_is_opened_by_dlopen_and_says_why() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-tls");
    let patch = hotpatch::load(&so).unwrap();
    match patch.placement() {
        hotpatch::Placement::Dlopen {
            reason: hotpatch::NearRefusal::ThreadLocals { what },
        } => assert!(what.contains("PT_TLS"), "{what}"),
        other => panic!("expected the thread-local refusal, got {other:?}"),
    }
    assert!(
        patch.placement().to_string().contains("thread-locals"),
        "{}",
        patch.placement()
    );
    let first = svc::touch_tls();
    assert_eq!(svc::touch_tls(), first + 1, "its thread-local works");
    patch.revert().unwrap();
}
