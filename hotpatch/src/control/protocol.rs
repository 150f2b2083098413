#![doc = include_str!("protocol.md")]
//!
//! # In Rust
//!
//! [`Operation`] is a request of this version, as the service parses it and
//! as a client writes it ([`Operation::to_line`]); [`ErrorKind`] is the
//! `kind` of a failed request's `error`, and the `hotpatch` tool's exit
//! code for it ([`ErrorKind::exit_code`], [`exit_code`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};

use super::PROTOCOL_VERSION;
use super::events::CAPACITY;
use crate::{Error, StalledRequest, StalledThread};

/// A request of protocol version 1, parsed and checked.
///
/// # Examples
///
/// ```
/// use hotpatch::control::protocol::{PatchRef, Operation};
///
/// let revert = Operation::Revert {
///     patch: PatchRef::parse("#3"),
///     deadline: None,
/// };
/// assert_eq!(revert.to_line(), r#"{"op":"revert","patch":3,"v":1}"#);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Operation {
    /// `status`: the service, its patches and functions.
    Status,
    /// `apply`: load and apply the patch in `file` (an absolute path).
    Apply {
        /// The patch file, absolute: the service's cwd is not the client's.
        file: PathBuf,
        /// A deadline shorter than the service's, if any.
        deadline: Option<Duration>,
        /// A watch window (see `watch`).
        watch: Option<Duration>,
        /// Accept it once applied (after its window, if watched).
        accept: bool,
    },
    /// `accept`: keep an applied patch across restarts.
    Accept {
        /// The applied patch.
        patch: PatchRef,
    },
    /// `check`: every check of an apply, changing nothing.
    Check {
        /// The patch file, absolute.
        file: PathBuf,
    },
    /// `revert`: take an applied patch out.
    Revert {
        /// The applied patch.
        patch: PatchRef,
        /// A deadline shorter than the service's, if any.
        deadline: Option<Duration>,
    },
    /// `replace`: replace an applied patch by the patch in `file` in one
    /// transition.
    Replace {
        /// The applied patch.
        patch: PatchRef,
        /// The new patch file, absolute.
        file: PathBuf,
        /// A deadline shorter than the service's, if any.
        deadline: Option<Duration>,
    },
    /// `events`: the events after sequence number `since`, at most `limit`.
    Events {
        /// The last sequence number already seen (0: from the oldest kept).
        since: u64,
        /// At most this many (the service keeps fewer than it may be asked).
        limit: u64,
    },
}

impl Operation {
    /// The request as a JSON object, `"v"` included.
    ///
    /// # Examples
    ///
    /// ```
    /// use hotpatch::control::protocol::Operation;
    ///
    /// let events = Operation::Events { since: 7, limit: 100 }.to_json();
    /// assert_eq!(events["op"], "events");
    /// assert_eq!(events["v"], 1);
    /// ```
    pub fn to_json(&self) -> Value {
        fn ms(d: &Duration) -> Value {
            json!(d.as_millis() as u64)
        }
        fn file(f: &std::path::Path) -> Value {
            json!(f.to_string_lossy())
        }
        let mut r = Map::new();
        r.insert("v".into(), json!(PROTOCOL_VERSION));
        r.insert("op".into(), json!(self.op()));
        let mut set = |k: &str, v: Value| {
            r.insert(k.into(), v);
        };
        match self {
            Operation::Status => {}
            Operation::Apply {
                file: f,
                deadline,
                watch,
                accept,
            } => {
                set("file", file(f));
                if let Some(d) = deadline {
                    set("deadline_ms", ms(d));
                }
                if let Some(w) = watch {
                    set("watch_ms", ms(w));
                }
                if *accept {
                    set("accept", json!(true));
                }
            }
            Operation::Accept { patch } => set("patch", patch.to_json()),
            Operation::Check { file: f } => set("file", file(f)),
            Operation::Revert { patch, deadline } => {
                set("patch", patch.to_json());
                if let Some(d) = deadline {
                    set("deadline_ms", ms(d));
                }
            }
            Operation::Replace {
                patch,
                file: f,
                deadline,
            } => {
                set("patch", patch.to_json());
                set("file", file(f));
                if let Some(d) = deadline {
                    set("deadline_ms", ms(d));
                }
            }
            Operation::Events { since, limit } => {
                set("since", json!(since));
                set("limit", json!(limit));
            }
        }
        Value::Object(r)
    }

    /// The request line, without its newline.
    ///
    /// # Examples
    ///
    /// ```
    /// use hotpatch::control::protocol::Operation;
    ///
    /// assert_eq!(Operation::Status.to_line(), r#"{"op":"status","v":1}"#);
    /// ```
    pub fn to_line(&self) -> String {
        self.to_json().to_string()
    }

    /// The verb (`"op"`).
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(hotpatch::control::protocol::Operation::Status.op(), "status");
    /// ```
    pub fn op(&self) -> &'static str {
        match self {
            Operation::Status => "status",
            Operation::Apply { .. } => "apply",
            Operation::Accept { .. } => "accept",
            Operation::Check { .. } => "check",
            Operation::Revert { .. } => "revert",
            Operation::Replace { .. } => "replace",
            Operation::Events { .. } => "events",
        }
    }
}

/// An applied patch, by id or by name.
///
/// # Examples
///
/// ```
/// use hotpatch::control::protocol::PatchRef;
///
/// assert_eq!(PatchRef::parse("3"), PatchRef::Id(3));
/// assert_eq!(PatchRef::parse("#3"), PatchRef::Id(3));
/// assert_eq!(PatchRef::parse("pricing-fix"), PatchRef::Name("pricing-fix".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PatchRef {
    /// Its id (a JSON number).
    Id(u64),
    /// Its name (a JSON string): the only applied patch of that name.
    Name(String),
}

impl PatchRef {
    /// `3` and `#3` are ids; anything else is a name.
    pub fn parse(s: &str) -> PatchRef {
        match s.strip_prefix('#').unwrap_or(s).parse::<u64>() {
            Ok(id) => PatchRef::Id(id),
            Err(_) => PatchRef::Name(s.to_owned()),
        }
    }

    /// As the protocol writes it: a number or a string.
    pub fn to_json(&self) -> Value {
        match self {
            PatchRef::Id(id) => json!(id),
            PatchRef::Name(name) => json!(name),
        }
    }
}

/// The exit codes of the `hotpatch` tool (its `--help` and the README
/// list them with their meaning).
pub mod exit_code {
    /// Done.
    pub const OK: u8 = 0;
    /// Any other error (socket unusable, bad reply, request not
    /// understood, state directory, slot table).
    pub const ERROR: u8 = 1;
    /// Usage error, or several patchable processes and no `--pid`.
    pub const USAGE: u8 = 2;
    /// Refused: the patch failed a check, nothing changed.
    pub const REFUSED: u8 = 3;
    /// Timed out: the transition was reversed, nothing changed.
    pub const TIMED_OUT: u8 = 4;
    /// Nothing to do: already applied or accepted, or no such patch.
    pub const NOTHING_TO_DO: u8 = 5;
    /// Not permitted.
    pub const NOT_PERMITTED: u8 = 6;
    /// No such process.
    pub const NO_PROCESS: u8 = 7;
    /// Rolled back in its watch window.
    pub const ROLLED_BACK: u8 = 8;
}

/// The `kind` of a failed request's `error` (the table above), and the
/// `hotpatch` tool's exit code for it.
///
/// # Examples
///
/// ```
/// use hotpatch::control::protocol::{ErrorKind, exit_code};
///
/// assert_eq!(ErrorKind::from_name("timeout"), ErrorKind::Timeout);
/// assert_eq!(ErrorKind::Timeout.exit_code(), exit_code::TIMED_OUT);
/// // Every check's refusal, and kinds of a later version.
/// assert_eq!(ErrorKind::from_name("rustc_mismatch"), ErrorKind::Refused);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `bad_request`
    BadRequest,
    /// `unsupported_version`
    UnsupportedVersion,
    /// `unknown_op`
    UnknownOp,
    /// `line_too_long`
    LineTooLong,
    /// `not_permitted`
    NotPermitted,
    /// `overloaded`
    Overloaded,
    /// `ambiguous_patch`
    AmbiguousPatch,
    /// `no_state_dir`
    NoStateDir,
    /// `already_accepted`
    AlreadyAccepted,
    /// `file_changed`
    FileChanged,
    /// `state`
    State,
    /// `cancelled`
    Cancelled,
    /// `rolled_back`
    RolledBack,
    /// `rollback_failed`
    RollbackFailed,
    /// `already_applied`
    AlreadyApplied,
    /// `not_applied`
    NotApplied,
    /// `timeout`
    Timeout,
    /// `busy`
    Busy,
    /// `slot_table`
    SlotTable,
    /// A check refused the patch: on the wire, the kind of the runtime's
    /// error ([`Error::kind`], e.g. `untrusted`, `unknown_target`), never
    /// `refused`; also any kind this version does not know.
    Refused,
}

impl ErrorKind {
    /// Every kind but [`Refused`](Self::Refused), which has many names.
    const NAMED: [(ErrorKind, &'static str); 19] = [
        (ErrorKind::BadRequest, "bad_request"),
        (ErrorKind::UnsupportedVersion, "unsupported_version"),
        (ErrorKind::UnknownOp, "unknown_op"),
        (ErrorKind::LineTooLong, "line_too_long"),
        (ErrorKind::NotPermitted, "not_permitted"),
        (ErrorKind::Overloaded, "overloaded"),
        (ErrorKind::AmbiguousPatch, "ambiguous_patch"),
        (ErrorKind::NoStateDir, "no_state_dir"),
        (ErrorKind::AlreadyAccepted, "already_accepted"),
        (ErrorKind::FileChanged, "file_changed"),
        (ErrorKind::State, "state"),
        (ErrorKind::Cancelled, "cancelled"),
        (ErrorKind::RolledBack, "rolled_back"),
        (ErrorKind::RollbackFailed, "rollback_failed"),
        (ErrorKind::AlreadyApplied, "already_applied"),
        (ErrorKind::NotApplied, "not_applied"),
        (ErrorKind::Timeout, "timeout"),
        (ErrorKind::Busy, "busy"),
        (ErrorKind::SlotTable, "slot_table"),
    ];

    /// The kind named `name` on the wire; [`Refused`](Self::Refused) for
    /// every other name.
    pub fn from_name(name: &str) -> ErrorKind {
        Self::NAMED
            .iter()
            .find(|(_, n)| *n == name)
            .map_or(ErrorKind::Refused, |(k, _)| *k)
    }

    /// Its name on the wire; `"refused"` for [`Refused`](Self::Refused),
    /// which is never sent by that name.
    ///
    /// # Examples
    ///
    /// ```
    /// use hotpatch::control::protocol::ErrorKind;
    ///
    /// assert_eq!(ErrorKind::NoStateDir.name(), "no_state_dir");
    /// ```
    pub fn name(self) -> &'static str {
        Self::NAMED
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("refused", |(_, n)| n)
    }

    /// The `hotpatch` tool's exit code for a reply of this kind.
    pub fn exit_code(self) -> u8 {
        use ErrorKind::*;
        match self {
            AlreadyApplied | NotApplied | AlreadyAccepted => exit_code::NOTHING_TO_DO,
            RolledBack | RollbackFailed => exit_code::ROLLED_BACK,
            NoStateDir | State | Cancelled | SlotTable => exit_code::ERROR,
            Timeout | Busy => exit_code::TIMED_OUT,
            NotPermitted => exit_code::NOT_PERMITTED,
            AmbiguousPatch => exit_code::USAGE,
            BadRequest | UnsupportedVersion | UnknownOp | LineTooLong | Overloaded => {
                exit_code::ERROR
            }
            FileChanged | Refused => exit_code::REFUSED,
        }
    }
}

/// A failed request: an error kind of the protocol, a message, and fields
/// particular to the kind.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    /// The wire name: [`ErrorKind::name`], or a runtime error's kind.
    pub kind: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl Failure {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind: kind.name(),
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub(crate) fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// Whether it is of kind `kind`.
    pub(crate) fn is(&self, kind: ErrorKind) -> bool {
        ErrorKind::from_name(self.kind) == kind
    }

    pub(crate) fn to_line(&self) -> String {
        let mut error = Map::new();
        error.insert("kind".into(), self.kind.into());
        error.insert("message".into(), self.message.clone().into());
        for (k, v) in &self.extra {
            error.insert(k.clone(), v.clone());
        }
        json!({ "v": PROTOCOL_VERSION, "ok": false, "error": error }).to_string()
    }
}

/// The reply line of a failure of kind `kind`.
pub(crate) fn protocol_failure(kind: ErrorKind, message: &str) -> String {
    Failure::new(kind, message).to_line()
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::new(ErrorKind::BadRequest, message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    file: String,
    deadline_ms: Option<u64>,
    watch_ms: Option<u64>,
    accept: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    patch: PatchRef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    patch: PatchRef,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    patch: PatchRef,
    file: String,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    since: Option<u64>,
    limit: Option<u64>,
}

/// The verbs of protocol version 1.
pub(crate) const OPS: &[&str] = &[
    "status", "apply", "check", "revert", "replace", "accept", "events",
];

/// Parses one request line. Never panics: anything that is not a request
/// of this protocol version is a [`Failure`] saying why.
pub(crate) fn parse(line: &[u8]) -> Result<Operation, Failure> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| bad_request(format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(bad_request("a request is a JSON object"));
    };
    match obj.get("v") {
        Some(v) if v.as_u64() == Some(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Failure::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {v} is not supported; this service speaks {PROTOCOL_VERSION}"
                ),
            )
            .with("supported", json!([PROTOCOL_VERSION])));
        }
        None => return Err(bad_request("missing \"v\" (the protocol version)")),
    }
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(bad_request("\"op\" must be a string")),
        None => return Err(bad_request("missing \"op\"")),
    };
    let fields = |e: serde_json::Error| bad_request(format!("{op}: {e}"));
    match op {
        "status" => {
            StatusReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Status)
        }
        "apply" => {
            let r = ApplyReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Apply {
                file: absolute(op, r.file)?,
                deadline: r.deadline_ms.map(Duration::from_millis),
                watch: r.watch_ms.map(Duration::from_millis),
                accept: r.accept.unwrap_or(false),
            })
        }
        "accept" => {
            let r = AcceptReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Accept { patch: r.patch })
        }
        "check" => {
            let r = CheckReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Check {
                file: absolute(op, r.file)?,
            })
        }
        "revert" => {
            let r = RevertReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Revert {
                patch: r.patch,
                deadline: r.deadline_ms.map(Duration::from_millis),
            })
        }
        "replace" => {
            let r = ReplaceReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Replace {
                patch: r.patch,
                file: absolute(op, r.file)?,
                deadline: r.deadline_ms.map(Duration::from_millis),
            })
        }
        "events" => {
            let r = EventsReq::deserialize(&value).map_err(fields)?;
            Ok(Operation::Events {
                since: r.since.unwrap_or(0),
                limit: r.limit.map_or(100, |l| l.min(CAPACITY as u64)),
            })
        }
        other => Err(Failure::new(
            ErrorKind::UnknownOp,
            format!(
                "unknown op `{other}`; this service knows {}",
                OPS.join(", ")
            ),
        )
        .with("ops", json!(OPS))),
    }
}

/// The service's cwd is not the client's: a relative path would name
/// another file.
fn absolute(op: &str, file: String) -> Result<PathBuf, Failure> {
    let path = PathBuf::from(file);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(bad_request(format!(
            "{op}: \"file\" must be an absolute path, not `{}`",
            path.display()
        )))
    }
}

/// The protocol's kind for each runtime error.
pub(crate) fn kind(e: &Error) -> &'static str {
    e.kind()
}

/// The failure a runtime error makes: its kind, its message and the
/// fields particular to it.
pub(crate) fn failure_of(e: &Error) -> Failure {
    let f = Failure {
        kind: kind(e),
        message: e.to_string(),
        extra: Map::new(),
    };
    match e {
        Error::AlreadyApplied { name, id, .. } => {
            f.with("patch", json!({ "id": id.get(), "name": name }))
        }
        Error::Timeout {
            stalled,
            deadline,
            requests,
            ..
        } => f
            .with("deadline_ms", json!(deadline.as_millis() as u64))
            .with("stalled", stalled.iter().map(thread_json).collect())
            .with("requests", requests.iter().map(request_json).collect()),
        Error::NotApplied { id } => f.with("patch", json!({ "id": id.get() })),
        _ => f,
    }
}

pub(crate) fn thread_json(t: &StalledThread) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "tid": t.os_tid,
        "without_safepoint_ms": t.without_safepoint.as_millis() as u64,
    })
}

/// In-flight request scopes created at one place (issue 12).
pub(crate) fn request_json(r: &StalledRequest) -> Value {
    json!({
        "location": r.location.to_string(),
        "count": r.count,
        "oldest_ms": r.oldest.as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PatchId;
    use proptest::prelude::*;

    fn reply_is_well_formed(line: &str) -> Value {
        let v: Value = serde_json::from_str(line).expect("the reply is JSON");
        assert_eq!(v["v"], json!(1), "{line}");
        assert_eq!(v["ok"], json!(false), "{line}");
        assert!(v["error"]["kind"].is_string(), "{line}");
        assert!(v["error"]["message"].is_string(), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
        v
    }

    #[test]
    fn parses_each_verb() {
        let p = |s: &str| parse(s.as_bytes());
        assert_eq!(p(r#"{"v":1,"op":"status"}"#), Ok(Operation::Status));
        assert_eq!(
            p(r#"{"v":1,"op":"apply","file":"/x/fix.so","deadline_ms":1500}"#),
            Ok(Operation::Apply {
                file: "/x/fix.so".into(),
                deadline: Some(Duration::from_millis(1500)),
                watch: None,
                accept: false,
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"apply","file":"/x/fix.so","watch_ms":2000,"accept":true}"#),
            Ok(Operation::Apply {
                file: "/x/fix.so".into(),
                deadline: None,
                watch: Some(Duration::from_millis(2000)),
                accept: true,
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"accept","patch":"fix"}"#),
            Ok(Operation::Accept {
                patch: PatchRef::Name("fix".into())
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"check","file":"/x/fix.so"}"#),
            Ok(Operation::Check {
                file: "/x/fix.so".into()
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"revert","patch":3}"#),
            Ok(Operation::Revert {
                patch: PatchRef::Id(3),
                deadline: None
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"revert","patch":"fix"}"#),
            Ok(Operation::Revert {
                patch: PatchRef::Name("fix".into()),
                deadline: None
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"replace","patch":1,"file":"/y.so"}"#),
            Ok(Operation::Replace {
                patch: PatchRef::Id(1),
                file: "/y.so".into(),
                deadline: None
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"events","since":4}"#),
            Ok(Operation::Events {
                since: 4,
                limit: 100
            })
        );
    }

    #[test]
    fn refuses_what_is_not_a_request() {
        let kind = |s: &str| parse(s.as_bytes()).unwrap_err().kind;
        assert_eq!(kind("status"), "bad_request");
        assert_eq!(kind("[1]"), "bad_request");
        assert_eq!(kind(r#"{"op":"status"}"#), "bad_request");
        assert_eq!(kind(r#"{"v":2,"op":"status"}"#), "unsupported_version");
        assert_eq!(kind(r#"{"v":"1","op":"status"}"#), "unsupported_version");
        assert_eq!(kind(r#"{"v":1,"op":"explode"}"#), "unknown_op");
        assert_eq!(kind(r#"{"v":1,"op":7}"#), "bad_request");
        assert_eq!(kind(r#"{"v":1,"op":"apply"}"#), "bad_request");
        assert_eq!(kind(r#"{"v":1,"op":"apply","file":7}"#), "bad_request");
        assert_eq!(
            kind(r#"{"v":1,"op":"apply","file":"fix.so"}"#),
            "bad_request"
        );
        assert_eq!(
            kind(r#"{"v":1,"op":"apply","file":"/f.so","deadline_ms":-1}"#),
            "bad_request"
        );
        assert_eq!(kind(r#"{"v":1,"op":"status","force":true}"#), "bad_request");
        assert_eq!(kind(r#"{"v":1,"op":"revert","patch":[1]}"#), "bad_request");
        let deep = "[".repeat(10_000);
        assert_eq!(kind(&deep), "bad_request");
    }

    /// JSON values, nested, with the protocol's keys and verbs likely.
    fn json_value() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("v".to_owned()),
            Just("op".to_owned()),
            Just("file".to_owned()),
            Just("patch".to_owned()),
            Just("deadline_ms".to_owned()),
            Just("since".to_owned()),
            Just("limit".to_owned()),
            Just("watch_ms".to_owned()),
            Just("accept".to_owned()),
            "[a-z_]{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            proptest::sample::select(OPS).prop_map(Value::from),
            "/?[a-z./]{0,12}".prop_map(Value::from),
            ".*".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_get_a_well_formed_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Err(f) = parse(&bytes) {
                reply_is_well_formed(&f.to_line());
            }
        }

        #[test]
        fn arbitrary_json_parses_or_gets_a_well_formed_error(
            mut value in json_value(),
            v in prop_oneof![Just(json!(1)), any::<i64>().prop_map(Value::from), Just(Value::Null)],
            op in prop_oneof![proptest::sample::select(OPS).prop_map(Value::from), any::<u8>().prop_map(Value::from)],
        ) {
            if let Value::Object(m) = &mut value {
                m.insert("v".into(), v);
                m.insert("op".into(), op);
            }
            let line = value.to_string();
            match parse(line.as_bytes()) {
                Ok(Operation::Apply { file, .. } | Operation::Check { file } | Operation::Replace { file, .. }) => {
                    prop_assert!(file.is_absolute());
                }
                Ok(Operation::Events { limit, .. }) => prop_assert!(limit <= CAPACITY as u64),
                Ok(_) => {}
                Err(f) => {
                    let reply = reply_is_well_formed(&f.to_line());
                    prop_assert_eq!(reply["error"]["kind"].as_str(), Some(f.kind));
                }
            }
        }
    }

    /// Requests of each verb with some of its fields (and sometimes one
    /// more), each of a random type: near misses of valid requests.
    fn near_request() -> impl Strategy<Value = Value> {
        let field_value = prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "/[a-z]{1,8}(/[a-z.]{1,8}){0,2}".prop_map(Value::from),
            "[a-z./]{0,12}".prop_map(Value::from),
            Just(Value::Null),
            Just(json!([1])),
        ];
        let fields = prop::collection::btree_map(
            proptest::sample::select(vec![
                "file",
                "patch",
                "deadline_ms",
                "since",
                "limit",
                "watch_ms",
                "accept",
                "x",
            ]),
            field_value,
            0..4,
        );
        (proptest::sample::select(OPS), fields).prop_map(|(op, fields)| {
            let mut m: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            m.insert("v".into(), json!(1));
            m.insert("op".into(), json!(op));
            Value::Object(m)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn near_requests_parse_to_valid_requests_or_well_formed_errors(value in near_request()) {
            let line = value.to_string();
            match parse(line.as_bytes()) {
                Ok(Operation::Apply { file, .. } | Operation::Check { file } | Operation::Replace { file, .. }) => {
                    prop_assert!(file.is_absolute(), "{}", line);
                    prop_assert_eq!(Some(file.to_str().unwrap()), value["file"].as_str());
                }
                Ok(Operation::Events { limit, .. }) => prop_assert!(limit <= CAPACITY as u64),
                Ok(Operation::Status) => prop_assert_eq!(value.as_object().unwrap().len(), 2, "{}", line),
                Ok(Operation::Revert { .. } | Operation::Accept { .. }) => {}
                Err(f) => {
                    let reply = reply_is_well_formed(&f.to_line());
                    prop_assert_eq!(reply["error"]["kind"].as_str(), Some("bad_request"), "{}", line);
                }
            }
        }
    }

    #[test]
    fn every_runtime_error_has_its_own_kind() {
        let path = PathBuf::from("/f.so");
        let kinds = [
            kind(&Error::NotApplied { id: PatchId(1) }),
            kind(&Error::AlreadyApplied {
                path: path.clone(),
                name: "x".into(),
                id: PatchId(1),
            }),
            kind(&Error::Timeout {
                what: "apply".into(),
                deadline: Duration::ZERO,
                stalled: vec![],
                requests: vec![],
            }),
            kind(&Error::Busy {
                what: "apply".into(),
                waited: Duration::ZERO,
            }),
            kind(&Error::UnknownTarget {
                path,
                function: "f".into(),
            }),
        ];
        let distinct: std::collections::HashSet<_> = kinds.iter().collect();
        assert_eq!(distinct.len(), kinds.len(), "{kinds:?}");
    }
}
