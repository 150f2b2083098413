//! What a request scope costs (issue 12), with no transition in progress,
//! next to the same future unscoped, in one run.
//!
//! - `request_poll`: one poll of a future that is always pending (the
//!   scope started at its first poll, outside the timing), scoped
//!   (`scoped`) and not (`unscoped`, the baseline): the per-poll cost of
//!   the scope, which sets and restores the thread's request view.
//! - `request_whole`: a whole request: create the future, poll it once to
//!   completion, drop it, with one patchable call inside
//!   (`bench_svc::patched`): unscoped (baseline), scoped, and nested
//!   inside a scope that is being polled (it registers in the outer
//!   request's version). The difference is the per-request cost:
//!   registration in a shard (lock, clock read) and removal.

use std::future::{Future, poll_fn};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};

fn request_poll(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_poll");
    let mut cx = Context::from_waker(Waker::noop());
    {
        let mut fut = pin!(poll_fn(|_| black_box(Poll::<()>::Pending)));
        group.bench_function("unscoped", |b| {
            b.iter(|| black_box(fut.as_mut().poll(&mut cx)))
        });
    }
    {
        let mut fut = pin!(hotpatch::request(poll_fn(|_| black_box(
            Poll::<()>::Pending
        ))));
        // Starts (registers) the request, outside the timing.
        let _ = fut.as_mut().poll(&mut cx);
        group.bench_function("scoped", |b| {
            b.iter(|| black_box(fut.as_mut().poll(&mut cx)))
        });
    }
    group.finish();
}

fn once<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the benched futures complete at once"),
    }
}

fn request_whole(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_whole");
    group.bench_function("unscoped", |b| {
        b.iter(|| once(async { bench_svc::patched(black_box(3)) }))
    });
    group.bench_function("scoped", |b| {
        b.iter(|| {
            once(hotpatch::request(async {
                bench_svc::patched(black_box(3))
            }))
        })
    });
    // Inside an outer scope's poll: the nested request registers too.
    {
        let group = &mut group;
        let mut cx = Context::from_waker(Waker::noop());
        let mut outer = pin!(hotpatch::request(poll_fn(move |_| {
            group.bench_function("nested", |b| {
                b.iter(|| {
                    once(hotpatch::request(async {
                        bench_svc::patched(black_box(3))
                    }))
                })
            });
            Poll::Ready(())
        })));
        let _ = outer.as_mut().poll(&mut cx);
    }
    group.finish();
}

criterion_group!(benches, request_poll, request_whole);
criterion_main!(benches);
