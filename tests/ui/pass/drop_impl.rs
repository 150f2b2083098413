// `impl Drop`, as real services write it: a guard that signals shutdown
// and a handler that releases a permit. `Drop::drop` is patchable.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Permits(pub Arc<AtomicUsize>);

pub struct Handler {
    pub permits: Arc<AtomicUsize>,
    pub name: String,
}

#[hotpatch::patchable]
impl Handler {
    pub fn new(permits: &Permits, name: &str) -> Handler {
        // Relaxed: a count the test reads after the threads are done.
        permits.0.fetch_sub(1, Ordering::Relaxed);
        Handler {
            permits: permits.0.clone(),
            name: name.to_owned(),
        }
    }
}

#[hotpatch::patchable]
impl Drop for Handler {
    fn drop(&mut self) {
        // Relaxed: as above.
        self.permits.fetch_add(1, Ordering::Relaxed);
        // The fields are dropped after this body, as without the macro.
        self.name.push_str(" (dropped)");
    }
}

pub struct Guard<'a>(pub &'a AtomicUsize);

#[hotpatch::patchable]
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // Relaxed: as above.
        self.0.fetch_add(10, Ordering::Relaxed);
    }
}

fn main() {
    let permits = Permits(Arc::new(AtomicUsize::new(5)));
    {
        let _a = Handler::new(&permits, "a");
        let _b = Handler::new(&permits, "b");
        assert_eq!(permits.0.load(Ordering::Relaxed), 3);
    }
    assert_eq!(permits.0.load(Ordering::Relaxed), 5);
    let boxed: Box<Handler> = Box::new(Handler::new(&permits, "c"));
    drop(boxed);
    assert_eq!(permits.0.load(Ordering::Relaxed), 5);

    let count = AtomicUsize::new(0);
    drop(Guard(&count));
    assert_eq!(count.load(Ordering::Relaxed), 10);

    let paths: Vec<_> = hotpatch::functions().into_iter().map(|f| f.path).collect();
    for name in ["Handler as Drop>::drop", "Guard<'_> as Drop>::drop", "Handler::new"] {
        assert!(paths.iter().any(|p| p.ends_with(name)), "{name} not in {paths:?}");
    }
}
