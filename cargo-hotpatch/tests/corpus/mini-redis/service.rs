//! mini-redis 0.4.1: a tokio network server speaking the Redis protocol.
//!
//! The published `Cargo.lock` pins tokio 1.8 and tracing 0.1.26, older
//! than hotpatch needs: `Cargo.lock` here is the one the marking builds
//! with. The server runs as `mini-redis-server --port PORT`; the load
//! client sends SET then GET of its own key on its own connection; probes
//! are Redis-protocol requests on a fresh connection (or what the server
//! logs).

use super::Reply::*;
use super::*;

pub const SERVICE: Service = Service {
    name: "mini-redis",
    scratch: "mini-redis",
    version: "0.4.1",
    bin: "mini-redis-server",
    mark: include_str!("mark.diff"),
    lock: include_str!("Cargo.lock"),
    fixes: FIXES,
    args,
    prepare: |_| {},
    load,
    request_bytes,
    // tracing-subscriber 0.2 panics parsing any RUST_LOG with today's regex;
    // its default (errors) is what the probes read.
    env_remove: &["RUST_LOG"],
};

fn args(port: u16, _data: &Path) -> Vec<String> {
    vec!["--port".into(), port.to_string()]
}

/// One round of the load client: SET then GET of its own key, each reply
/// checked.
fn load(conn: &mut Conn, i: u64) -> bool {
    let v = i.to_string();
    let set = format!("*3\r\n$3\r\nSET\r\n$4\r\nload\r\n${}\r\n{v}\r\n", v.len());
    let get = "*2\r\n$3\r\nGET\r\n$4\r\nload\r\n";
    conn.exchange(&set, "+OK\r\n") && conn.exchange(get, &format!("${}\r\n{v}\r\n", v.len()))
}

/// The fixes, in the order they run.
const FIXES: &[Fix] = &[
    fix!(
        "mini-redis",
        "upstream-8ca8bbe-publish-name",
        "error reply: PUBLISH in subscribe mode is named 'publish' (Command::get_name)",
        Expect::Effective,
        probe(
            "*2\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n*3\r\n$7\r\npublish\r\n$2\r\nch\r\n$1\r\nm\r\n",
            Bytes("*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n-ERR unknown command 'pub'\r\n"),
            Bytes("*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n-ERR unknown command 'publish'\r\n"),
        )
    ),
    fix!(
        "mini-redis",
        "comment-only",
        "a doc comment of Frame::check",
        Expect::NoChange,
        None
    ),
    fix!(
        "mini-redis",
        "parse-integer-argument",
        "parsing: an integer frame is a string argument (Parse::next_string)",
        Expect::Effective,
        probe("*2\r\n$3\r\nGET\r\n:5\r\n", Closed, Bytes("$-1\r\n"))
    ),
    fix!(
        "mini-redis",
        "limit-unknown-command-name",
        "limits: an unknown command's name is echoed up to 16 bytes (Unknown::new, generic)",
        Expect::Effective,
        probe(
            "*1\r\n$24\r\nabcdefghijklmnopqrstuvwx\r\n",
            Bytes("-ERR unknown command 'abcdefghijklmnopqrstuvwx'\r\n"),
            Bytes("-ERR unknown command 'abcdefghijklmnop'\r\n"),
        )
    ),
    fix!(
        "mini-redis",
        "async-error-reply-unknown",
        "error reply, async handler: Redis's text for an unknown command (Unknown::apply)",
        Expect::Effective,
        probe(
            "*1\r\n$3\r\nfoo\r\n",
            Bytes("-ERR unknown command 'foo'\r\n"),
            Bytes("-ERR unknown command 'foo', with args beginning with: \r\n"),
        )
    ),
    fix!(
        "mini-redis",
        "async-handler-reply-parse-error",
        "async handler: a command that does not parse gets an error reply, the connection stays (Handler::run)",
        Expect::Effective,
        probe(
            "*1\r\n:5\r\n",
            Closed,
            Starts("-ERR protocol error; expected simple frame or bulk frame"),
        )
    ),
    fix!(
        "mini-redis",
        "upstream-3d93b42-null-bulk",
        "parsing: a null bulk string must be $-1 (Frame::check)",
        Expect::Effective,
        probe("*1\r\n$-\r\n", Silent, Closed)
    ),
    fix!(
        "mini-redis",
        "limit-array-length",
        "limits: arrays of more than 1024 frames are refused (Frame::check)",
        Expect::Effective,
        probe("*5000\r\n", Silent, Closed)
    ),
    fix!(
        "mini-redis",
        "limit-bulk-length",
        "limits: bulk strings over 512 MiB are refused (Frame::check)",
        Expect::Effective,
        probe("*1\r\n$999999999999\r\n", Silent, Closed)
    ),
    fix!(
        "mini-redis",
        "limit-read-buffer",
        "limits: an incomplete frame may not grow the read buffer past 64 KiB (Connection::parse_frame)",
        Expect::Effective,
        Some(Probe {
            request: LARGE_INCOMPLETE,
            old: Silent,
            new: Closed,
        })
    ),
    fix!(
        "mini-redis",
        "limit-set-zero-expiry",
        "state: SET with PX 0 is an error, not a key that expires at once (Set::parse_frames)",
        Expect::Effective,
        probe(
            "*5\r\n$3\r\nSET\r\n$1\r\nz\r\n$1\r\nv\r\n$2\r\nPX\r\n$1\r\n0\r\n",
            Bytes("+OK\r\n"),
            Closed,
        )
    ),
    fix!(
        "mini-redis",
        "parse-integer-value",
        "parsing: an integer frame is a value (Parse::next_bytes)",
        Expect::Effective,
        probe(
            "*3\r\n$3\r\nSET\r\n$1\r\nn\r\n:7\r\n",
            Closed,
            Bytes("+OK\r\n")
        )
    ),
    fix!(
        "mini-redis",
        "error-type-parse-error",
        "error type: ParseError from a message says where it came from (From<&str> for ParseError)",
        Expect::Effective,
        probe(
            "*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nEX\r\n$3\r\nabc\r\n",
            Logs("Other(\"protocol error; invalid number\")"),
            Logs("Other(\"parse: protocol error; invalid number\")"),
        )
    ),
    fix!(
        "mini-redis",
        "upstream-ebe4e1f-shutdown-race",
        "state: the purge task stops when the listener's guard drops (new type, Listener's fields change)",
        Expect::Refused,
        None
    ),
    fix!(
        "mini-redis",
        "binary-crate-log",
        "a log line in src/bin/server.rs (the binary crate)",
        Expect::Refused,
        None
    ),
];

/// Stands for `*1\r\n$100000\r\n` and 70,000 of its bytes: more than
/// 64 KiB buffered while the frame is still incomplete.
const LARGE_INCOMPLETE: &str = "@LARGE_INCOMPLETE@";

fn request_bytes(request: &str) -> Vec<u8> {
    if request == LARGE_INCOMPLETE {
        let mut r = b"*1\r\n$100000\r\n".to_vec();
        r.resize(r.len() + 70_000, b'x');
        r
    } else {
        request.as_bytes().to_vec()
    }
}
