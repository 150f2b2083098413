//! The executable's start-up code: its `main` and what runs it. The
//! running process has entered it once and never calls it again (it is
//! still inside `main`, or has left it): a hook there would redirect
//! calls that never come, and a change there would take effect only at a
//! start, which runs the deployed build. So a change there is refused
//! (`Refusal::StartupCode`), never reported as hooked.
//!
//! A change of `main`'s own lines is refused before this, from the
//! source (`Refusal::MainChanged`, `CrateSource::main_own_changed`):
//! its body without the closures, `async` blocks and items written in
//! it, an `async fn main`'s body included, wherever the compiler put that
//! code. What is compared here is compiled code.
//!
//! A closure or `async` block written in `main` is not start-up code: it
//! may be a thread's body or a task spawned per connection. Nor is the
//! state machine of an `async fn main`'s body (`#[tokio::main]`), which
//! the runtime polls again at each wake-up: when its code changed because
//! code inlined into it did, the next poll runs the new code from its
//! saved state. Each is hooked or refused like any other function (its
//! callers, its entry, its state machine).

/// Whether the function `demangled` (without its hash) is start-up code
/// of the executable whose crate is `crate_name`: its `main` itself, and
/// what runs `main` once ([`runs_main`]). Closures and `async` bodies
/// written in `main` are not.
///
/// # Examples
///
/// ```ignore
/// assert!(is_startup("svc::main", Some("svc")));
/// assert!(!is_startup("svc::main::{{closure}}", Some("svc")));
/// assert!(!is_startup("svc::call", Some("svc")));
/// ```
pub(super) fn is_startup(demangled: &str, crate_name: Option<&str>) -> bool {
    runs_main(demangled) || crate_name.is_some_and(|krate| demangled == format!("{krate}::main"))
}

/// Whether `demangled` is the code that runs `main`, once per process:
/// the C `main` rustc generates and std's `lang_start` and its closures
/// (a function only they call, such as std's `__rust_begin_short_backtrace`
/// instance for `main`, with `main` inlined into it, runs once too: the
/// caller checks that).
pub(super) fn runs_main(demangled: &str) -> bool {
    demangled == "main" || demangled.starts_with("std::rt::lang_start")
}

#[cfg(test)]
mod tests {
    use super::{is_startup, runs_main};

    #[test]
    fn main_and_what_runs_it_are_start_up_code_its_closures_are_not() {
        for path in [
            "svc::main",
            "main",
            "std::rt::lang_start",
            "std::rt::lang_start::{{closure}}",
        ] {
            assert!(is_startup(path, Some("svc")), "{path}");
        }
        for path in [
            // A thread's body, a task spawned per connection, an async
            // main's body: called or polled again.
            "svc::main::{{closure}}",
            "svc::main::{{closure}}::{{closure}}",
            "svc::call",
            "svc::mainly",
            "svc::main_loop",
            "other::main",
            "svc::Server::main",
            // A thread's body runs through it too: not main's alone.
            "std::sys::backtrace::__rust_begin_short_backtrace",
            "core::ops::function::FnOnce::call_once",
        ] {
            assert!(!is_startup(path, Some("svc")), "{path}");
        }
        // A library's code has no `main` of its own.
        assert!(!is_startup("util::main", None));
        assert!(runs_main("std::rt::lang_start::{{closure}}") && !runs_main("svc::main"));
    }
}
