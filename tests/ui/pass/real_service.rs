// The forms of the README's list as a real tokio service writes them (the
// shapes of a Redis-protocol server's frame parser, connection, database
// and commands), every function the macro accepts marked.

use std::fmt;
use std::io::Cursor;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Simple(String),
    Error(String),
    Integer(u64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Frame>),
}

#[derive(Debug)]
pub enum FrameError {
    Incomplete,
    Other(Error),
}

#[hotpatch::patchable]
impl Frame {
    pub(crate) fn array() -> Frame {
        Frame::Array(vec![])
    }

    pub(crate) fn push_bulk(&mut self, bytes: Vec<u8>) {
        match self {
            Frame::Array(vec) => vec.push(Frame::Bulk(bytes)),
            _ => panic!("not an array frame"),
        }
    }

    pub fn check(src: &mut Cursor<&[u8]>) -> std::result::Result<(), FrameError> {
        match get_u8(src)? {
            b'+' | b'-' => get_line(src).map(|_| ()),
            b':' => get_decimal(src).map(|_| ()),
            actual => Err(format!("protocol error; invalid frame type byte `{actual}`").into()),
        }
    }

    pub(crate) fn to_error(&self) -> Error {
        format!("unexpected frame: {self}").into()
    }

    pub fn into_parts(self) -> Option<Vec<Frame>> {
        match self {
            Frame::Array(parts) => Some(parts),
            _ => None,
        }
    }

    pub fn boxed_len(self: Box<Self>) -> usize {
        match *self {
            Frame::Array(parts) => parts.len(),
            _ => 1,
        }
    }
}

#[hotpatch::patchable]
fn get_u8(src: &mut Cursor<&[u8]>) -> std::result::Result<u8, FrameError> {
    let pos = src.position() as usize;
    let byte = *src.get_ref().get(pos).ok_or(FrameError::Incomplete)?;
    src.set_position(pos as u64 + 1);
    Ok(byte)
}

#[hotpatch::patchable]
fn get_decimal(src: &mut Cursor<&[u8]>) -> std::result::Result<u64, FrameError> {
    let line = get_line(src)?;
    let text = std::str::from_utf8(line).map_err(|_| "protocol error; invalid frame format")?;
    text.parse::<u64>()
        .map_err(|_| "protocol error; invalid frame format".into())
}

#[hotpatch::patchable]
fn get_line<'a>(src: &mut Cursor<&'a [u8]>) -> std::result::Result<&'a [u8], FrameError> {
    let start = src.position() as usize;
    let end = src.get_ref().len().saturating_sub(1);
    for i in start..end {
        if src.get_ref()[i] == b'\r' && src.get_ref()[i + 1] == b'\n' {
            src.set_position((i + 2) as u64);
            return Ok(&src.get_ref()[start..i]);
        }
    }
    Err(FrameError::Incomplete)
}

#[hotpatch::patchable]
impl PartialEq<&str> for Frame {
    fn eq(&self, other: &&str) -> bool {
        match self {
            Frame::Simple(s) | Frame::Error(s) => s.eq(other),
            Frame::Bulk(s) => s.as_slice() == other.as_bytes(),
            _ => false,
        }
    }
}

#[hotpatch::patchable]
impl fmt::Display for Frame {
    fn fmt(&self, fmt: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Frame::Simple(response) => response.fmt(fmt),
            Frame::Error(msg) => write!(fmt, "error: {msg}"),
            Frame::Integer(num) => num.fmt(fmt),
            Frame::Bulk(msg) => write!(fmt, "{}", String::from_utf8_lossy(msg)),
            Frame::Null => "(nil)".fmt(fmt),
            Frame::Array(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        write!(fmt, " ")?;
                    }
                    part.fmt(fmt)?;
                }
                Ok(())
            }
        }
    }
}

#[hotpatch::patchable]
impl From<String> for FrameError {
    fn from(src: String) -> FrameError {
        FrameError::Other(src.into())
    }
}

#[hotpatch::patchable]
impl From<&str> for FrameError {
    fn from(src: &str) -> FrameError {
        src.to_string().into()
    }
}

#[hotpatch::patchable]
impl From<std::string::FromUtf8Error> for FrameError {
    fn from(_src: std::string::FromUtf8Error) -> FrameError {
        "protocol error; invalid frame format".into()
    }
}

#[hotpatch::patchable]
impl fmt::Display for FrameError {
    fn fmt(&self, fmt: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Incomplete => "stream ended early".fmt(fmt),
            FrameError::Other(err) => err.fmt(fmt),
        }
    }
}

impl std::error::Error for FrameError {}

#[derive(Debug, PartialEq)]
pub struct Set {
    key: String,
    value: Vec<u8>,
    expire_ms: Option<u64>,
}

#[hotpatch::patchable]
impl Set {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn expire(&self) -> Option<u64> {
        self.expire_ms
    }

    // Generic arguments (`impl ToString`) and `async fn` are opted out.
    #[hotpatch::patchable(skip)]
    pub fn new(key: impl ToString, value: Vec<u8>, expire_ms: Option<u64>) -> Set {
        Set {
            key: key.to_string(),
            value,
            expire_ms,
        }
    }

    #[hotpatch::patchable(skip)]
    pub(crate) async fn apply(self, db: &Db) -> Result<Frame> {
        db.set(self.key, self.value);
        Ok(Frame::Simple("OK".to_string()))
    }

    pub(crate) fn into_frame(self) -> Frame {
        let mut frame = Frame::array();
        frame.push_bulk(b"set".to_vec());
        frame.push_bulk(self.key.into_bytes());
        frame.push_bulk(self.value);
        frame
    }
}

#[hotpatch::patchable]
impl FromStr for Set {
    type Err = Error;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let mut parts = s.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some("set"), Some(key), Some(value)) => {
                Ok(Set::new(key, value.as_bytes().to_vec(), None))
            }
            _ => Err("protocol error; expected `set key value`".into()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Db {
    shared: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
}

#[hotpatch::patchable]
impl Db {
    pub(crate) fn new() -> Db {
        Db::default()
    }

    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        let state = self.shared.lock().unwrap();
        state.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    pub(crate) fn set(&self, key: String, value: Vec<u8>) {
        self.shared.lock().unwrap().push((key, value));
    }
}

#[hotpatch::patchable]
impl Drop for Db {
    fn drop(&mut self) {
        if Arc::strong_count(&self.shared) == 1 {
            self.shared.lock().unwrap().clear();
        }
    }
}

pub struct Messages {
    pending: Vec<Frame>,
}

#[hotpatch::patchable]
impl Iterator for Messages {
    type Item = Result<Frame>;

    fn next(&mut self) -> Option<Self::Item> {
        self.pending.pop().map(Ok)
    }
}

pub struct Ready(pub Option<u64>);

#[hotpatch::patchable]
impl std::future::Future for Ready {
    type Output = u64;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<u64> {
        match self.0.take() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

#[hotpatch::patchable]
pub(crate) fn shutdown_requested(flag: &std::sync::atomic::AtomicBool) -> bool {
    flag.load(std::sync::atomic::Ordering::Acquire)
}

fn main() {
    let mut src = Cursor::new(&b"+OK\r\n"[..]);
    assert!(Frame::check(&mut src).is_ok());
    let mut src = Cursor::new(&b":12\r\n"[..]);
    assert!(Frame::check(&mut src).is_ok());
    let mut src = Cursor::new(&b"*"[..]);
    assert!(matches!(Frame::check(&mut src), Err(FrameError::Other(_))));
    assert!(Frame::Simple("OK".into()) == "OK");
    assert_eq!(Frame::Null.to_error().to_string(), "unexpected frame: (nil)");

    let set: Set = "set k v".parse().unwrap();
    assert_eq!((set.key(), set.expire()), ("k", None));
    assert_eq!(set.into_frame().to_string(), "set k v");
    assert_eq!(Box::new(Frame::array()).boxed_len(), 0);
    assert_eq!(Frame::Integer(3).into_parts(), None);

    let db = Db::new();
    db.set("a".into(), b"1".to_vec());
    assert_eq!(db.get("a"), Some(b"1".to_vec()));
    drop(db);

    let mut messages = Messages {
        pending: vec![Frame::Integer(1)],
    };
    assert!(matches!(messages.next(), Some(Ok(Frame::Integer(1)))));
    assert!(messages.next().is_none());

    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut ready = Ready(Some(7));
    assert_eq!(Pin::new(&mut ready).poll(&mut cx), Poll::Ready(7));
    assert!(!shutdown_requested(&std::sync::atomic::AtomicBool::new(false)));
    let _ = FrameError::from(String::from_utf8(vec![0xff]).unwrap_err());
    let _unused = Set::apply;

    let paths: Vec<_> = hotpatch::functions().into_iter().map(|f| f.path).collect();
    for name in [
        "::Frame::check",
        "::get_line",
        "as PartialEq<&str>>::eq",
        "::Frame as Display>::fmt",
        "as From<String>>::from",
        "as From<&str>>::from",
        "::Set as FromStr>::from_str",
        "::Db as Drop>::drop",
        "::Messages as Iterator>::next",
        "::Ready as Future>::poll",
        "::shutdown_requested",
    ] {
        assert!(paths.iter().any(|p| p.ends_with(name)), "{name} not in {paths:?}");
    }
    assert!(!paths.iter().any(|p| p.ends_with("::Set::new")), "skipped");
}
