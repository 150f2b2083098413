// Elided and named lifetimes, in free functions and methods.

#[hotpatch::patchable]
pub fn first_word(s: &str) -> &str {
    s.split(' ').next().unwrap_or("")
}

#[hotpatch::patchable]
pub fn first_word_anon(s: &'_ str) -> &'_ str {
    s.split(' ').next().unwrap_or("")
}

#[hotpatch::patchable]
pub fn longest<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.len() >= b.len() { a } else { b }
}

#[hotpatch::patchable]
pub fn two<'a, 'b>(a: &'a str, b: &'b str) -> (&'a str, &'b str) {
    (b.get(..0).map_or(a, |_| a), b)
}

#[hotpatch::patchable]
pub fn statics(s: &'static str) -> &'static str {
    s
}

#[hotpatch::patchable]
pub fn callback(f: &dyn Fn(&str) -> usize, s: &str) -> usize {
    f(s)
}

#[hotpatch::patchable]
pub fn fn_ptr(f: fn(&str) -> &str, s: &str) -> usize {
    f(s).len()
}

pub struct Doc {
    pub text: String,
}

pub struct View<'a> {
    pub text: &'a str,
}

#[hotpatch::patchable]
impl Doc {
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn word(&self, i: usize) -> Option<&str> {
        self.text.split(' ').nth(i)
    }

    pub fn view(&self) -> View<'_> {
        View { text: &self.text }
    }

    pub fn named<'a>(&'a self, other: &str) -> &'a str {
        if other.is_empty() { "" } else { &self.text }
    }

    pub fn either<'a>(&'a self, other: &'a str) -> &'a str {
        if other.len() > self.text.len() {
            other
        } else {
            &self.text
        }
    }

    pub fn mut_text(&mut self) -> &mut String {
        &mut self.text
    }
}

#[hotpatch::patchable]
impl View<'static> {
    pub fn get(&self) -> &'static str {
        self.text
    }
}

// A lifetime that only the output names (clap's `ValueEnum::value_variants`
// has one): not constrained by the inputs.
pub trait Variants: Sized + 'static {
    fn variants<'a>() -> &'a [Self];
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Mode {
    Fast,
    Safe,
}

#[hotpatch::patchable]
impl Variants for Mode {
    fn variants<'a>() -> &'a [Self] {
        &[Mode::Fast, Mode::Safe]
    }
}

#[hotpatch::patchable]
pub fn greeting<'a>() -> &'a str {
    "hello"
}

#[hotpatch::patchable]
pub fn tagged<'a, 'b>(s: &'a str) -> (&'a str, &'b str) {
    (s, "tag")
}

fn main() {
    assert_eq!(first_word("hello world"), "hello");
    assert_eq!(first_word_anon("hello world"), "hello");
    assert_eq!(longest("a", "bb"), "bb");
    assert_eq!(two("a", "b"), ("a", "b"));
    assert_eq!(statics("s"), "s");
    assert_eq!(callback(&|s: &str| s.len(), "abc"), 3);
    assert_eq!(fn_ptr(first_word, "ab cd"), 2);
    let mut d = Doc {
        text: "one two".into(),
    };
    assert_eq!(d.text(), "one two");
    assert_eq!(d.word(1), Some("two"));
    assert_eq!(d.view().text, "one two");
    assert_eq!(d.named("x"), "one two");
    assert_eq!(d.either("much longer"), "much longer");
    d.mut_text().push('!');
    assert_eq!(d.text(), "one two!");
    assert_eq!(View { text: "v" }.get(), "v");
    // A borrowed result outlives a temporary argument only if the
    // signature says so.
    let held = {
        let tmp = String::from("tmp");
        d.named(&tmp)
    };
    assert_eq!(held, "one two!");
    assert_eq!(Mode::variants(), &[Mode::Fast, Mode::Safe]);
    assert_eq!(greeting(), "hello");
    assert_eq!(tagged("x"), ("x", "tag"));
}
