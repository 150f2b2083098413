//! dufs 0.46.0: an HTTP file server on hyper 1 and tokio, published as a
//! binary only.
//!
//! The marking gives it a library crate as the README tells users to:
//! `src/lib.rs` declares the modules `main.rs` declared, and `main.rs`
//! uses them from the library; `#[patchable]` goes on every function and
//! impl the macro accepts (async and generic methods opted out with
//! `skip`), `build.rs` has the host setting, `main` starts the control
//! endpoint. It also removes dufs's own release profile (fat LTO, one
//! codegen unit, `panic = "abort"`, `strip = "symbols"`, which drops the
//! symbol table patches bind to) for the default one. `Cargo.lock` is the
//! published one completed with hotpatch's dependencies.
//!
//! The server runs as `dufs ROOT --bind 127.0.0.1 --port PORT
//! --path-prefix /files --allow-upload` over a small tree made by
//! [`prepare`]; the load client sends `GET /files/load.txt` on its own
//! keep-alive connection and checks the status and body; probes are raw
//! HTTP/1.1 requests with `Connection: close` on a fresh connection (or
//! the access log).

use super::Reply::*;
use super::*;

pub const SERVICE: Service = Service {
    name: "dufs",
    scratch: "dufs",
    version: "0.46.0",
    bin: "dufs",
    mark: include_str!("mark.diff"),
    lock: include_str!("Cargo.lock"),
    fixes: FIXES,
    args,
    prepare,
    load,
    request_bytes,
    env_remove: &[],
};

/// dufs 0.46.0 as published, a binary only, with nothing marked: what a
/// user of a binary-only service adds is the dependency, the host setting
/// (`build.rs`), the control endpoint in `main` and the default release
/// profile (`../dufs-bin-only/mark.diff`). Every function is the
/// executable's crate's, so a fix there is hooked or refused. The same
/// fixes and probes as [`SERVICE`]; #753's diff is made on this source
/// (the marked one has `#[hotpatch::patchable]` in its context).
pub const SERVICE_BIN_ONLY: Service = Service {
    scratch: "dufs-bin-only",
    mark: include_str!("../dufs-bin-only/mark.diff"),
    fixes: FIXES_BIN_ONLY,
    ..SERVICE
};

/// [`FIXES`], #753's diff made on the unmarked source.
const FIXES_BIN_ONLY: &[Fix] = &[
    FIXES[0],
    FIXES[1],
    FIXES[2],
    Fix {
        diff: include_str!("../dufs-bin-only/fixes/upstream-753-range-count.diff"),
        ..FIXES[3]
    },
    FIXES[4],
    FIXES[5],
    FIXES[6],
    FIXES[7],
    FIXES[8],
    FIXES[9],
    FIXES[10],
    FIXES[11],
    FIXES[12],
    FIXES[13],
    FIXES[14],
];

/// What the load client reads, again and again.
const LOAD_BODY: &str = "the load client's file\n";

fn args(port: u16, data: &Path) -> Vec<String> {
    vec![
        data.join("root").to_str().unwrap().to_owned(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--path-prefix".into(),
        "/files".into(),
        "--allow-upload".into(),
    ]
}

/// The served tree.
fn prepare(data: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let root = data.join("root");
    for dir in ["x", "sort/b", "raw"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (file, text) in [
        ("load.txt", LOAD_BODY),
        ("hello.txt", "hello"),
        ("x/a.txt", "x/a.txt in the root\n"),
        ("sort/a.txt", "a\n"),
        ("sort/c.txt", "c\n"),
        ("up.txt", "0123456789"),
        ("q\"uote.txt", "quoted\n"),
        ("sixty-four.txt", &"0123456789abcdef".repeat(4)),
    ] {
        std::fs::write(root.join(file), text).unwrap();
    }
    // A name that is not UTF-8.
    let name = std::ffi::OsStr::from_bytes(b"bad\xff.txt");
    std::fs::write(root.join("raw").join(name), "?\n").unwrap();
}

/// One round of the load client: a GET of `load.txt` on the kept-alive
/// connection, its status and body checked.
fn load(conn: &mut Conn, _: u64) -> bool {
    conn.send(b"GET /files/load.txt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        && conn
            .http_response()
            .is_some_and(|(status, body)| status == 200 && body == LOAD_BODY.as_bytes())
}

/// Stands for a GET of `sixty-four.txt` with 40 one-byte ranges.
const MANY_RANGES: &str = "@MANY_RANGES@";

fn request_bytes(request: &str) -> Vec<u8> {
    if request == MANY_RANGES {
        let ranges: Vec<String> = (0..40).map(|i| format!("{i}-{i}")).collect();
        format!(
            "GET /files/sixty-four.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Range: bytes={}\r\n\r\n",
            ranges.join(",")
        )
        .into_bytes()
    } else {
        request.as_bytes().to_vec()
    }
}

/// `METHOD PATH` with the headers every probe sends.
macro_rules! req {
    ($line:literal) => {
        concat!(
            $line,
            " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
    };
    ($line:literal, $headers:literal) => {
        concat!(
            $line,
            " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n",
            $headers,
            "\r\n"
        )
    };
}

/// The fixes, in the order they run.
const FIXES: &[Fix] = &[
    fix!(
        "dufs",
        "upstream-738-range-clamp",
        "request parsing: a range's last byte past the end is clamped (utils::parse_range, RFC 9110)",
        Expect::Effective,
        probe(
            req!("GET /files/hello.txt", "Range: bytes=0-99\r\n"),
            Starts("HTTP/1.1 416"),
            All(&[
                Starts("HTTP/1.1 206"),
                Contains("content-range: bytes 0-4/5")
            ]),
        )
    ),
    fix!(
        "dufs",
        "comment-only",
        "a comment in utils::parse_range",
        Expect::NoChange,
        None
    ),
    fix!(
        "dufs",
        "upstream-725-path-prefix-boundary",
        "path handling: --path-prefix /files does not serve /filesx/ (Server::resolve_path)",
        Expect::Effective,
        probe(
            req!("GET /filesx/a.txt"),
            All(&[Starts("HTTP/1.1 200"), Contains("x/a.txt in the root")]),
            Starts("HTTP/1.1 400"),
        )
    ),
    fix!(
        "dufs",
        "upstream-753-range-count",
        "limits: at most 32 ranges in one request (utils::parse_range)",
        Expect::Effective,
        probe(MANY_RANGES, Starts("HTTP/1.1 206"), Starts("HTTP/1.1 416"))
    ),
    fix!(
        "dufs",
        "upstream-732-sort-desc-dirs-first",
        "state of a listing: directories stay on top in descending order (Server::send_index)",
        Expect::Effective,
        probe(
            req!("GET /files/sort/?sort=name&order=desc&simple"),
            Contains("c.txt\na.txt\nb/\n"),
            Contains("b/\nc.txt\na.txt\n"),
        )
    ),
    fix!(
        "dufs",
        "upstream-722-patch-forbid-return",
        "async handler: a PATCH that would overwrite without --allow-delete stops at 403 (Server::handle)",
        Expect::Effective,
        probe(
            concat!(
                "PATCH /files/up.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n",
                "X-Update-Range: bytes=0-\r\nContent-Length: 10\r\n\r\n0123456789"
            ),
            Starts("HTTP/1.1 204"),
            Starts("HTTP/1.1 403"),
        )
    ),
    fix!(
        "dufs",
        "upstream-750-head-health",
        "async handler: HEAD of the health check answers like GET (Server::handle, Server::handle_internal)",
        Expect::Effective,
        probe(
            req!("HEAD /files/__dufs__/health"),
            Starts("HTTP/1.1 404"),
            All(&[
                Starts("HTTP/1.1 200"),
                Contains("content-type: application/json")
            ]),
        )
    ),
    fix!(
        "dufs",
        "headers-content-disposition-quote",
        "headers: a '\"' in a file name is escaped in Content-Disposition (set_content_disposition)",
        Expect::Effective,
        probe(
            req!("GET /files/q%22uote.txt"),
            Contains("content-disposition: inline; filename=\"q\"uote.txt\""),
            Contains("content-disposition: inline; filename=\"q\\\"uote.txt\""),
        )
    ),
    fix!(
        "dufs",
        "error-reply-bad-request-type",
        "error reply: a 400's text says it is text/plain (status_bad_request)",
        Expect::Effective,
        probe(
            req!("GET /other/x"),
            All(&[Starts("HTTP/1.1 400"), Lacks("content-type")]),
            All(&[
                Starts("HTTP/1.1 400"),
                Contains("content-type: text/plain; charset=utf-8")
            ]),
        )
    ),
    fix!(
        "dufs",
        "parse-query-flag-value",
        "request parsing: ?simple=1 and ?simple=true are the flag too (has_query_flag)",
        Expect::Effective,
        probe(
            req!("GET /files/sort/?simple=1"),
            All(&[Starts("HTTP/1.1 200"), Lacks("b/\na.txt\nc.txt\n")]),
            Contains("b/\na.txt\nc.txt\n"),
        )
    ),
    fix!(
        "dufs",
        "async-handler-nosniff",
        "async handler, headers: files are sent with X-Content-Type-Options: nosniff (Server::handle_send_file)",
        Expect::Effective,
        probe(
            req!("GET /files/hello.txt"),
            All(&[Starts("HTTP/1.1 200"), Lacks("x-content-type-options")]),
            Contains("x-content-type-options: nosniff"),
        )
    ),
    fix!(
        "dufs",
        "generic-helper-lossy-name",
        "generic helper: a file name that is not UTF-8 is listed lossily, not as '' (normalize_path<P>)",
        Expect::Effective,
        probe(
            req!("GET /files/raw/?simple"),
            All(&[Starts("HTTP/1.1 200"), Lacks("bad")]),
            Contains("bad\u{fffd}.txt\n"),
        )
    ),
    fix!(
        "dufs",
        "log-request-protocol",
        "access log: $request has the protocol, as nginx's (HttpLogger::data)",
        Expect::Effective,
        probe(
            req!("GET /files/hello.txt"),
            Logs("\"GET /files/hello.txt\" 200"),
            Logs("\"GET /files/hello.txt HTTP/1.1\" 200"),
        )
    ),
    fix!(
        "dufs",
        "state-server-request-count",
        "state: the server counts requests (a new field of Server: its layout changes)",
        Expect::Refused,
        None
    ),
    fix!(
        "dufs",
        "binary-crate-listening",
        "the listening banner in src/main.rs (the binary crate)",
        Expect::Refused,
        None
    ),
];
