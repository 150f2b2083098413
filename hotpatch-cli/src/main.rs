//! `hotpatch`: operate the patches of running services through their
//! control endpoint (`hotpatch::control`). See `--help` and the README,
//! "Operating a running service"; the protocol and the `--json` schema
//! are in `hotpatch::control::protocol`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hotpatch::control::protocol::{ErrorKind, Operation, PatchRef};
use serde_json::{Value, json};

mod prometheus;
mod sign;
mod text;

/// Exit codes: the contract with scripts. What each means is written once,
/// in `exit_codes.txt` (printed by `--help`); the codes of the service's
/// error kinds are the protocol's ([`ErrorKind::exit_code`]).
use hotpatch::control::protocol::exit_code as code;

/// The exit codes (`exit_codes.txt`: the one table, which the README and
/// the `code` constants refer to) and more, for `--help`.
const EXIT_CODES: &str = concat!(
    include_str!("exit_codes.txt"),
    "\n",
    "\
With --json, a command the service answered prints its reply on stdout, one
JSON object (schema: hotpatch::control::protocol); `ps --json` prints
{\"v\":1,\"processes\":[{\"pid\",\"service\",\"patches\",\"socket\"}]}. Errors of the
tool itself (no socket, not permitted to connect) are one line on stderr.

Signing (keygen, sign, verify; not through a service): keys and signatures
in minisign's format; `sign` writes <file>.minisig beside each patch, where
the runtime looks for it. Passwords come from $HOTPATCH_SIGN_PASSWORD, or
are asked for on a terminal; with neither, the command fails rather than
wait for input. Examples:
  hotpatch keygen --public patches.pub --secret patches.key
  hotpatch sign --secret patches.key target/release/libfix.so
  hotpatch verify --public patches.pub target/release/libfix.so"
);

/// Operate the patches of running services (hotpatch control endpoint).
#[derive(Parser, Debug)]
#[command(name = "hotpatch", version, after_help = EXIT_CODES)]
struct Cli {
    /// Print the reply as JSON (one object on stdout).
    #[arg(long, global = true)]
    json: bool,

    /// Where to look for control sockets (default: $HOTPATCH_SOCKET_DIR, or
    /// /run/hotpatch, $XDG_RUNTIME_DIR/hotpatch and /run/user/*/hotpatch).
    #[arg(long, global = true, value_name = "DIR")]
    socket_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the processes with a control socket this user may use.
    Ps,
    /// Show a process's patches, patchable functions and transition.
    Status {
        /// Print the state in the Prometheus text format (for
        /// node_exporter's textfile collector) instead.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Apply a patch file.
    Apply {
        /// The patch (`.so`); sent as an absolute path.
        file: PathBuf,
        /// How long to wait for registered threads (at most the service's own).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        deadline: Option<Duration>,
        /// Keep the patch on trial this long: panics out of it or a failed
        /// health check of the service revert it (exit code 8).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        watch: Option<Duration>,
        /// Accept the patch once applied (after its watch window): it is
        /// re-applied when the service restarts.
        #[arg(long)]
        accept: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Accept an applied patch, by id or name: it is re-applied when the
    /// service restarts.
    Accept {
        /// The patch's id (`3` or `#3`) or its name.
        patch: String,
        #[command(flatten)]
        target: Target,
    },
    /// Run every check of `apply` on a patch file without applying it.
    Check {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Revert an applied patch, by id or name.
    Revert {
        /// The patch's id (`3` or `#3`) or its name.
        patch: String,
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        deadline: Option<Duration>,
        #[command(flatten)]
        target: Target,
    },
    /// Replace an applied patch by a (cumulative) patch file in one transition.
    Replace {
        /// The applied patch's id (`3` or `#3`) or its name.
        patch: String,
        file: PathBuf,
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        deadline: Option<Duration>,
        #[command(flatten)]
        target: Target,
    },
    #[command(flatten)]
    Sign(sign::Command),
    /// Show the endpoint's recent events (operations and refusals).
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many (the last ones).
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Keep printing new events as they happen (asks twice a second)
        /// until interrupted or the service is gone; with --json, one
        /// event object per line.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// Which process: by pid, by socket, or the only one there is.
#[derive(Args, Debug)]
struct Target {
    /// The process (may be omitted when only one is patchable).
    #[arg(long, conflicts_with = "socket")]
    pid: Option<u32>,
    /// The control socket to use.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// A failure: its exit code and its one line for stderr.
struct Fail {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Fail {
    Fail {
        code,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("hotpatch: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: &Cli) -> Result<u8, Fail> {
    let dirs = match &cli.socket_dir {
        Some(d) => vec![d.clone()],
        None => hotpatch::control::socket_dirs(),
    };
    let (target, req, timeout) = match &cli.command {
        Command::Ps => return ps(cli, &dirs),
        Command::Sign(command) => {
            return sign::run(command)
                .map(|()| code::OK)
                .map_err(|e| fail(code::ERROR, e.to_string()));
        }
        Command::Status { target, .. } => (target, Operation::Status, None),
        Command::Apply {
            file,
            deadline,
            watch,
            accept,
            target,
        } => {
            let r = Operation::Apply {
                file: absolute(file)?,
                deadline: *deadline,
                watch: *watch,
                accept: *accept,
            };
            // The reply comes after the window.
            let wait = deadline.map(|d| d + watch.unwrap_or_default());
            (
                target,
                r,
                Some(wait.or(watch.map(|w| w + Duration::from_secs(120)))),
            )
        }
        Command::Accept { patch, target } => (
            target,
            Operation::Accept {
                patch: PatchRef::parse(patch),
            },
            None,
        ),
        Command::Check { file, target } => (
            target,
            Operation::Check {
                file: absolute(file)?,
            },
            None,
        ),
        Command::Revert {
            patch,
            deadline,
            target,
        } => {
            let r = Operation::Revert {
                patch: PatchRef::parse(patch),
                deadline: *deadline,
            };
            (target, r, Some(*deadline))
        }
        Command::Replace {
            patch,
            file,
            deadline,
            target,
        } => {
            let r = Operation::Replace {
                patch: PatchRef::parse(patch),
                file: absolute(file)?,
                deadline: *deadline,
            };
            (target, r, Some(*deadline))
        }
        Command::Events {
            since,
            limit,
            target,
            follow: true,
        } => return follow(cli, &resolve(target, &dirs)?, *since, *limit),
        Command::Events {
            since,
            limit,
            target,
            ..
        } => (
            target,
            Operation::Events {
                since: *since,
                limit: *limit,
            },
            None,
        ),
    };
    let socket = resolve(target, &dirs)?;
    // Operations that wait for a transition get their deadline and a margin;
    // a service's own deadline may be longer than ours is told.
    let timeout = match timeout {
        Some(d) => d.unwrap_or(Duration::from_secs(120)) + Duration::from_secs(30),
        None => Duration::from_secs(15),
    };
    let reply = request(&socket, &req, timeout)?;
    report(cli, &reply)
}

/// The file as the service must see it: absolute (its cwd is not ours).
fn absolute(file: &Path) -> Result<PathBuf, Fail> {
    let path = std::path::absolute(file).map_err(|e| {
        fail(
            code::USAGE,
            format!("cannot make {} absolute: {e}", file.display()),
        )
    })?;
    path.to_str().map(PathBuf::from).ok_or_else(|| {
        fail(
            code::USAGE,
            format!("{} is not valid UTF-8", path.display()),
        )
    })
}

/// `10s`, `500ms`, `2m`, `1.5s`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|e| format!("`{s}`: {e}"))
}

/// One control socket found in a directory.
struct Found {
    pid: u32,
    service: String,
    socket: PathBuf,
}

/// Sockets named `<service>.<pid>.sock` whose process is alive, and the
/// directories this user may not look in.
fn scan(dirs: &[PathBuf]) -> (Vec<Found>, Vec<PathBuf>) {
    let mut found = Vec::new();
    let mut denied = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                denied.push(dir.clone());
                continue;
            }
            Err(_) => continue,
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some((service, pid)) = name.to_str().and_then(hotpatch::control::parse_socket_name)
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                continue; // Its process is gone: a stale socket.
            }
            found.push(Found {
                pid,
                service,
                socket: e.path(),
            });
        }
    }
    found.sort_by_key(|f| f.pid);
    (found, denied)
}

/// Connects, sends `request`, reads the one reply line.
fn request(socket: &Path, request: &Operation, timeout: Duration) -> Result<Value, Fail> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::PermissionDenied => code::NOT_PERMITTED,
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                code::NO_PROCESS
            }
            _ => code::ERROR,
        };
        fail(code, format!("cannot connect to {}: {e}", socket.display()))
    })?;
    let io = |e: std::io::Error| fail(code::ERROR, format!("{}: {e}", socket.display()));
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = request.to_line();
    line.push('\n');
    // A refused peer is told so and disconnected, maybe before our write.
    let written = (&stream).write_all(line.as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(&stream).read_line(&mut reply);
    match (read, written) {
        (Ok(n), _) if n > 0 => {}
        (Err(e), _) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(fail(
                code::ERROR,
                format!("{}: no reply within {timeout:?}", socket.display()),
            ));
        }
        (Err(e), _) | (_, Err(e)) => return Err(io(e)),
        (Ok(_), Ok(())) => {
            return Err(fail(
                code::ERROR,
                format!("{}: connection closed without a reply", socket.display()),
            ));
        }
    }
    let value: Value = serde_json::from_str(&reply).map_err(|e| {
        fail(
            code::ERROR,
            format!("{}: reply is not JSON: {e}", socket.display()),
        )
    })?;
    if value["v"] != json!(hotpatch::control::PROTOCOL_VERSION) {
        return Err(fail(
            code::ERROR,
            format!(
                "{}: reply of protocol version {}, this tool speaks {}",
                socket.display(),
                value["v"],
                hotpatch::control::PROTOCOL_VERSION
            ),
        ));
    }
    Ok(value)
}

/// The socket to use: `--socket`, the socket of `--pid`, or the only
/// patchable process this user may use.
fn resolve(target: &Target, dirs: &[PathBuf]) -> Result<PathBuf, Fail> {
    if let Some(socket) = &target.socket {
        return Ok(socket.clone());
    }
    let looked = || {
        if dirs.is_empty() {
            // socket_dirs() lists only the directories that exist.
            return "none of /run/hotpatch, $XDG_RUNTIME_DIR/hotpatch, /run/user/*/hotpatch \
                    exists"
                .to_owned();
        }
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (found, denied) = scan(dirs);
    if let Some(pid) = target.pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(fail(code::NO_PROCESS, format!("no process {pid}")));
        }
        if let Some(f) = found.into_iter().find(|f| f.pid == pid) {
            return Ok(f.socket);
        }
        if !denied.is_empty() {
            let denied: Vec<String> = denied.iter().map(|d| d.display().to_string()).collect();
            return Err(fail(
                code::NOT_PERMITTED,
                format!(
                    "not permitted: this user may not look in {} (where the control socket of \
                     process {pid} may be)",
                    denied.join(", ")
                ),
            ));
        }
        return Err(fail(
            code::NO_PROCESS,
            format!(
                "process {pid} has no control socket (looked in {})",
                looked()
            ),
        ));
    }
    let usable: Vec<Found> = found.into_iter().filter(|f| probe(f).is_some()).collect();
    match usable.len() {
        1 => Ok(usable
            .into_iter()
            .next()
            .map(|f| f.socket)
            .unwrap_or_default()),
        0 => Err(fail(
            code::NO_PROCESS,
            format!(
                "no patchable process this user may use (looked in {})",
                looked()
            ),
        )),
        n => {
            let list: Vec<String> = usable
                .iter()
                .map(|f| format!("{} ({})", f.pid, f.service))
                .collect();
            Err(fail(
                code::USAGE,
                format!(
                    "{n} patchable processes: {}; choose one with --pid",
                    list.join(", ")
                ),
            ))
        }
    }
}

/// The status of `f`, if this user may use it.
fn probe(f: &Found) -> Option<Value> {
    let reply = request(&f.socket, &Operation::Status, Duration::from_secs(3)).ok()?;
    (reply["ok"] == json!(true)).then_some(reply)
}

fn ps(cli: &Cli, dirs: &[PathBuf]) -> Result<u8, Fail> {
    let rows: Vec<Value> = scan(dirs)
        .0
        .iter()
        .filter_map(|f| {
            let status = probe(f)?;
            Some(json!({
                "pid": f.pid,
                "service": status["service"].as_str().unwrap_or(&f.service),
                "patches": status["patches"].as_array().map_or(0, Vec::len),
                "socket": f.socket.to_string_lossy(),
            }))
        })
        .collect();
    if cli.json {
        println!("{}", json!({"v": 1, "processes": rows}));
    } else if rows.is_empty() {
        println!("no patchable process this user may use");
    } else {
        print!("{}", text::ps(&rows));
    }
    Ok(code::OK)
}

/// `events --follow`: prints events as they come, until the service is gone
/// (exit 7) or an error.
fn follow(cli: &Cli, socket: &Path, mut since: u64, limit: u64) -> Result<u8, Fail> {
    let mut header = !cli.json;
    loop {
        let reply = request(
            socket,
            &Operation::Events { since, limit },
            Duration::from_secs(15),
        )?;
        if reply["ok"] != json!(true) {
            return report(cli, &reply);
        }
        let events = reply["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            if cli.json {
                println!("{e}");
            } else {
                if header {
                    println!("{}", text::event_header());
                    header = false;
                }
                println!("{}", text::event_line(e));
            }
        }
        if !events.is_empty() {
            let _ = std::io::stdout().flush();
        }
        since = reply["last_seq"].as_u64().unwrap_or(since);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The exit code of an error kind.
fn code_of(kind: &str) -> u8 {
    ErrorKind::from_name(kind).exit_code()
}

/// Prints a reply; its exit code.
fn report(cli: &Cli, reply: &Value) -> Result<u8, Fail> {
    if reply["ok"] == json!(true) {
        if let Command::Status {
            prometheus: true, ..
        } = cli.command
        {
            print!("{}", prometheus::status(reply));
        } else if cli.json {
            println!("{reply}");
        } else {
            print!("{}", text::reply(&cli.command, reply));
        }
        return Ok(code::OK);
    }
    let kind = reply["error"]["kind"].as_str().unwrap_or("unknown");
    let message = reply["error"]["message"].as_str().unwrap_or("(no message)");
    let code = code_of(kind);
    if cli.json {
        println!("{reply}");
    }
    if code == code::NOTHING_TO_DO {
        // Not a failure: the state asked for is the state there is.
        if !cli.json {
            println!("nothing to do: {message}");
        }
        return Ok(code);
    }
    Err(fail(code, format!("{kind}: {message}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_patch_refs() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "10parsecs", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let patch_ref = |s: &str| PatchRef::parse(s).to_json();
        assert_eq!(patch_ref("3"), json!(3));
        assert_eq!(patch_ref("#3"), json!(3));
        assert_eq!(patch_ref("pricing-fix"), json!("pricing-fix"));
    }

    #[test]
    fn exit_codes_of_error_kinds() {
        assert_eq!(code_of("already_applied"), code::NOTHING_TO_DO);
        assert_eq!(code_of("not_applied"), code::NOTHING_TO_DO);
        assert_eq!(code_of("timeout"), code::TIMED_OUT);
        assert_eq!(code_of("busy"), code::TIMED_OUT);
        assert_eq!(code_of("not_permitted"), code::NOT_PERMITTED);
        assert_eq!(code_of("unknown_target"), code::REFUSED);
        assert_eq!(code_of("untrusted"), code::REFUSED);
        assert_eq!(code_of("bad_request"), code::ERROR);
        assert_eq!(code_of("already_accepted"), code::NOTHING_TO_DO);
        assert_eq!(code_of("rolled_back"), code::ROLLED_BACK);
        assert_eq!(code_of("no_state_dir"), code::ERROR);
    }
}
