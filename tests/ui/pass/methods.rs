// Inherent methods with every receiver, associated functions, and
// `#[patchable(skip)]`.

#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    count: u64,
}

#[hotpatch::patchable]
impl Counter {
    pub const START: u64 = 5;

    pub fn new() -> Self {
        Counter { count: Self::START }
    }

    pub fn with(count: u64) -> Counter {
        Counter { count }
    }

    pub fn get(&self) -> u64 {
        self.count
    }

    pub fn bump(&mut self, by: u64) {
        self.count += by;
    }

    pub fn into_inner(self) -> u64 {
        self.count
    }

    pub fn into_inner_mut(mut self) -> u64 {
        self.count += 1;
        self.count
    }

    pub fn boxed(self: Box<Self>) -> u64 {
        self.count
    }

    pub fn typed_ref(self: &Self) -> u64 {
        self.count
    }

    pub fn typed_mut(self: &mut Self) -> &mut u64 {
        &mut self.count
    }

    pub fn count_ref(&self) -> &u64 {
        &self.count
    }

    fn private_method(&self) -> u64 {
        self.count * 2
    }

    pub fn call_private(&self) -> u64 {
        self.private_method()
    }

    #[hotpatch::patchable(skip)]
    pub fn skipped(&self) -> u64 {
        self.count + 1000
    }

    #[hotpatch::patchable(skip)]
    pub const fn skipped_const(&self) -> u64 {
        self.count
    }
}

fn main() {
    let mut c = Counter::new();
    assert_eq!(c.get(), 5);
    c.bump(2);
    assert_eq!(c.get(), 7);
    assert_eq!(*c.count_ref(), 7);
    *c.typed_mut() += 1;
    assert_eq!(c.typed_ref(), 8);
    assert_eq!(c.call_private(), 16);
    assert_eq!(c.skipped(), 1008);
    assert_eq!(c.skipped_const(), 8);
    assert_eq!(Box::new(c.clone()).boxed(), 8);
    assert_eq!(c.clone().into_inner_mut(), 9);
    assert_eq!(c.into_inner(), 8);
    assert_eq!(Counter::with(3).get(), 3);

    let paths: Vec<_> = hotpatch::functions().into_iter().map(|f| f.path).collect();
    for name in [
        "new",
        "with",
        "get",
        "bump",
        "into_inner",
        "into_inner_mut",
        "boxed",
        "typed_ref",
        "typed_mut",
        "count_ref",
        "private_method",
        "call_private",
    ] {
        let suffix = format!("::Counter::{name}");
        assert!(
            paths.iter().any(|p| p.ends_with(&suffix)),
            "{suffix} not in {paths:?}"
        );
    }
    assert!(!paths.iter().any(|p| p.contains("skipped")), "{paths:?}");
}
