// Several impls of one generic trait with different type arguments on one
// type, as every error type has (`From<String>` and `From<&str>`), and
// `PartialEq` against several types.

use std::fmt;
use std::num::TryFromIntError;
use std::string::FromUtf8Error;

#[derive(Debug)]
pub enum Error {
    Incomplete,
    Other(String),
}

#[hotpatch::patchable]
impl From<String> for Error {
    fn from(src: String) -> Error {
        Error::Other(src)
    }
}

#[hotpatch::patchable]
impl From<&str> for Error {
    fn from(src: &str) -> Error {
        src.to_string().into()
    }
}

#[hotpatch::patchable]
impl From<FromUtf8Error> for Error {
    fn from(_src: FromUtf8Error) -> Error {
        "protocol error; invalid frame format".into()
    }
}

#[hotpatch::patchable]
impl From<TryFromIntError> for Error {
    fn from(_src: TryFromIntError) -> Error {
        "protocol error; invalid frame format".into()
    }
}

#[hotpatch::patchable]
impl fmt::Display for Error {
    fn fmt(&self, fmt: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Incomplete => "stream ended early".fmt(fmt),
            Error::Other(err) => err.fmt(fmt),
        }
    }
}

impl std::error::Error for Error {}

#[derive(Debug)]
pub struct Frame(pub String);

#[hotpatch::patchable]
impl PartialEq<&str> for Frame {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[hotpatch::patchable]
impl PartialEq<String> for Frame {
    fn eq(&self, other: &String) -> bool {
        self.0 == *other
    }
}

#[hotpatch::patchable]
impl PartialEq<&'static [u8]> for Frame {
    fn eq(&self, other: &&'static [u8]) -> bool {
        self.0.as_bytes() == *other
    }
}

// The same trait with and without arguments on one type.
#[hotpatch::patchable]
impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.0 == other.0
    }
}

fn main() {
    assert!(matches!(Error::from("bad".to_string()), Error::Other(s) if s == "bad"));
    assert!(matches!(Error::from("worse"), Error::Other(s) if s == "worse"));
    let utf8 = String::from_utf8(vec![0xff]).unwrap_err();
    assert_eq!(Error::from(utf8).to_string(), "protocol error; invalid frame format");
    let int = u8::try_from(300u32).unwrap_err();
    assert_eq!(Error::from(int).to_string(), "protocol error; invalid frame format");
    assert_eq!(Error::Incomplete.to_string(), "stream ended early");

    let f = Frame("OK".to_owned());
    assert!(f == "OK");
    assert!(f == "OK".to_string());
    assert!(f == &b"OK"[..]);
    assert!(f == Frame("OK".to_owned()));

    let paths: Vec<_> = hotpatch::functions().into_iter().map(|f| f.path).collect();
    for name in [
        "as From<String>>::from",
        "as From<&str>>::from",
        "as From<FromUtf8Error>>::from",
        "as From<TryFromIntError>>::from",
        "as PartialEq<&str>>::eq",
        "as PartialEq<String>>::eq",
        "as PartialEq<&'static [u8]>>::eq",
        "as PartialEq>::eq",
    ] {
        assert_eq!(
            paths.iter().filter(|p| p.ends_with(name)).count(),
            1,
            "{name} once in {paths:?}"
        );
    }
}
