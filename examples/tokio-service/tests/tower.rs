//! `hotpatch::tower::RequestLayer` (feature `tower`, enabled by this
//! crate): a tower service stack whose every request is a request scope.
//! A request that started before a patch keeps the old version across
//! its `.await`, on a multi-threaded runtime whose workers are not
//! registered (so only the scope can keep it consistent), and the load
//! waits for it; a request that starts during the load runs the new one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio_service::settle::{fee_cents, fee_version, payout_cents, payout_version};
use tower_layer::Layer;
use tower_service::Service;

mod common;

/// Settles an order: fee in `call` (before the future exists), then
/// awaits until `gate` opens, then the payout.
#[derive(Clone)]
struct Settle {
    gate: Arc<AtomicBool>,
}

type Reply = Pin<Box<dyn Future<Output = Result<(u8, u8), ()>> + Send>>;

impl Service<u64> for Settle {
    type Response = (u8, u8);
    type Error = ();
    type Future = Reply;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, amount: u64) -> Reply {
        let fee = fee_cents(amount);
        let gate = self.gate.clone();
        Box::pin(async move {
            // Acquire: pairs with the Release store that opens it.
            while !gate.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let payout = payout_cents(amount);
            Ok((fee_version(amount, fee), payout_version(amount, payout)))
        })
    }
}

/// An outer middleware (a no-op), so the layer sits inside a stack.
struct Outer;

impl<S> Layer<S> for Outer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}

#[test]
fn a_tower_request_keeps_its_version_across_awaits() {
    let fix = common::thin_fix();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let gate = Arc::new(AtomicBool::new(false));
    let stack = tower_layer::Stack::new(hotpatch::tower::RequestLayer::new(), Outer);
    let mut service = stack.layer(Settle { gate: gate.clone() });

    let old = rt.spawn(service.call(1_000_000));
    let loader = std::thread::spawn({
        let fix = fix.clone();
        move || {
            hotpatch::Loader::new()
                .deadline(Duration::from_secs(120))
                .load(fix)
        }
    });
    let started = Instant::now();
    let t = loop {
        if let Some(t) = hotpatch::transition() {
            break t;
        }
        if loader.is_finished() {
            // The load ended without waiting for the request: say why.
            panic!("the load did not wait: {:?}", loader.join().unwrap());
        }
        assert!(started.elapsed() < Duration::from_secs(120), "hang");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        t.waiting_for_requests
            .iter()
            .map(|r| r.count)
            .sum::<usize>(),
        1,
        "{t:?}"
    );
    assert!(
        t.waiting_for_requests[0]
            .location
            .file()
            .ends_with("tower.rs")
    );
    // A request that starts now is on the new version, whole.
    let new = rt.spawn(service.call(1_000_000));
    gate.store(true, Ordering::Release);
    assert_eq!(
        rt.block_on(old).unwrap(),
        Ok((1, 1)),
        "old request: v1, whole"
    );
    assert_eq!(
        rt.block_on(new).unwrap(),
        Ok((2, 2)),
        "new request: v2, whole"
    );
    let patch = loader.join().unwrap().expect("load");
    patch.revert().expect("revert");
    let _ = std::fs::remove_dir_all(fix.parent().unwrap());
}
