//! The executable's start-up code: its `main` and what runs it. The
//! running process has run it (and is still inside `main`, or inside its
//! `async` body polled by `main`'s runtime): a hook there would redirect
//! calls that never come again, and a change there takes effect only at a
//! start, which runs the deployed build. So a change there is refused
//! (`Refusal::StartupCode`), never reported as hooked.

/// Whether the function `demangled` (without its hash) is start-up code
/// of the executable whose crate is `crate_name`: its `main` and every
/// closure or `async` body written in it (`#[tokio::main]` puts the body
/// in one), the C `main` rustc generates, and std's `lang_start` and
/// `__rust_begin_short_backtrace`, into which the optimiser may inline
/// `main`.
///
/// # Examples
///
/// ```ignore
/// assert!(is_startup("svc::main", Some("svc")));
/// assert!(is_startup("svc::main::{{closure}}", Some("svc")));
/// assert!(!is_startup("svc::call", Some("svc")));
/// ```
pub(super) fn is_startup(demangled: &str, crate_name: Option<&str>) -> bool {
    let path = demangled;
    if path == "main" {
        return true;
    }
    if let Some(krate) = crate_name {
        let main = format!("{krate}::main");
        if path == main || path.starts_with(&format!("{main}::")) {
            return true;
        }
    }
    path.starts_with("std::rt::lang_start")
        || path.contains("::__rust_begin_short_backtrace")
        || path.starts_with("core::ops::function::FnOnce::call_once{{vtable.shim}}")
            && path.contains("lang_start")
}

#[cfg(test)]
mod tests {
    use super::is_startup;

    #[test]
    fn main_its_bodies_and_what_runs_it_are_start_up_code() {
        for path in [
            "svc::main",
            "svc::main::{{closure}}",
            "svc::main::{{closure}}::{{closure}}",
            "main",
            "std::rt::lang_start",
            "std::rt::lang_start::{{closure}}",
            "std::sys::backtrace::__rust_begin_short_backtrace",
        ] {
            assert!(is_startup(path, Some("svc")), "{path}");
        }
        for path in [
            "svc::call",
            "svc::mainly",
            "svc::main_loop",
            "other::main",
            "svc::Server::main",
            "core::ops::function::FnOnce::call_once",
        ] {
            assert!(!is_startup(path, Some("svc")), "{path}");
        }
        // A library's code has no `main` of its own.
        assert!(!is_startup("util::main", None));
    }
}
