//! Request scopes: a future that runs every patchable call in the version
//! that was current when it started, across `.await`s and worker threads
//! (issue 12). The protocol is in `quiesce/in_flight.rs`; see the crate
//! docs ("Async requests") for what each case gets.

use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::quiesce::{self, in_flight::Ticket};

/// Marks `fut` as one request: every `#[patchable]` call it makes, on any
/// thread that polls it, runs the version that was current when it was
/// first polled, however many `.await`s lie between the calls.
///
/// A transition (a [`load`](crate::load), a revert) completes only once
/// every request that started on the old version has finished or been
/// dropped; a request that starts meanwhile starts on the new version. At
/// the deadline the transition is reversed as for registered threads, and
/// [`Error::Timeout`](crate::Error::Timeout) names the requests it waited
/// for by where they were created (this call's location).
///
/// - The request starts at the first poll, not here: a scope dropped
///   without being polled never holds a transition.
/// - Nested: a scope first polled while another is being polled on the
///   same thread is part of it and runs its version.
/// - Code the request hands to other tasks or threads (`tokio::spawn`,
///   `spawn_blocking`) is not polled inside it and runs as unscoped code
///   there; to carry the request's version along, wrap it with
///   [`inherit`] (a future) or [`RequestVersion::current`] (a closure).
/// - `block_on` inside a scoped poll polls its future on this thread,
///   inside the scope: it runs the request's version.
///
/// # Cost
///
/// With no transition in progress each poll adds one thread-local load
/// and two stores; the first poll also registers the request (a lock of
/// one of 32 shards, uncontended unless many threads share a shard, and a
/// clock read), and completion removes it. Nothing is allocated per poll.
/// See `BENCHMARKS.md`.
///
/// # Examples
///
/// ```
/// # #[hotpatch::patchable] fn fee(x: u64) -> u64 { x / 10 }
/// # #[hotpatch::patchable] fn payout(x: u64) -> u64 { x - x / 10 }
/// # async fn tick() {}
/// async fn settle(amount: u64) -> (u64, u64) {
///     let fee = fee(amount);
///     tick().await; // may resume on another worker, after a patch landed
///     (fee, payout(amount)) // still the same version as `fee`
/// }
/// # let mut fut = std::pin::pin!(hotpatch::request(settle(100)));
/// # let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
/// # assert_eq!(fut.as_mut().poll(&mut cx), std::task::Poll::Ready((10, 90)));
/// // In the service: `hotpatch::request(settle(amount)).await`.
/// ```
#[track_caller]
pub fn request<F: Future>(fut: F) -> Request<F> {
    Request {
        fut,
        state: State::Idle,
        location: Location::caller(),
    }
}

/// Wraps `fut` in the version of the request being polled on this thread,
/// for a task spawned from it: `tokio::spawn(hotpatch::inherit(fut))`.
///
/// Inside a request scope it registers at once, in that request's version,
/// so a transition waits for the spawned task even if the parent finishes
/// first. Outside one it is [`request`]: a new request, started at its
/// first poll.
///
/// # Examples
///
/// ```
/// # #[hotpatch::patchable] fn audit(x: u64) -> u64 { x }
/// async fn handler(x: u64) {
///     // Same version as the handler, wherever the runtime runs it.
///     let _task = hotpatch::inherit(async move { audit(x) });
///     // tokio::spawn(_task);
/// }
/// # drop(hotpatch::request(handler(1)));
/// ```
#[track_caller]
pub fn inherit<F: Future>(fut: F) -> Request<F> {
    match RequestVersion::current() {
        Some(version) => version.scope(fut),
        None => request(fut),
    }
}

/// [`request`] as a method: `handler(req).hotpatch_scope().await`.
pub trait RequestExt: Future + Sized {
    /// See [`request`].
    #[track_caller]
    fn hotpatch_scope(self) -> Request<Self> {
        request(self)
    }
}

impl<F: Future> RequestExt for F {}

/// A future run as one request: see [`request`].
#[must_use = "futures do nothing unless polled"]
pub struct Request<F> {
    fut: F,
    state: State,
    location: &'static Location<'static>,
}

enum State {
    /// Not polled yet: not registered.
    Idle,
    /// Registered in `universe`.
    Running { ticket: Ticket, universe: u64 },
    /// Completed: no longer registered.
    Done,
}

/// Sets this thread's request view for the duration of a poll; restores
/// the previous one when dropped, also by a panic.
struct View(u64);

impl View {
    #[inline(always)]
    fn enter(universe: u64) -> View {
        View(quiesce::enter(universe))
    }
}

impl Drop for View {
    #[inline(always)]
    fn drop(&mut self) {
        quiesce::leave(self.0);
    }
}

impl<F: Future> Future for Request<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `fut` is structurally pinned: it is never moved out of
        // `self` (no method hands it out by value, and `Drop` leaves it in
        // place), so pinning `self` pins it; the other fields are not
        // pinned and are only read or replaced here.
        let this = unsafe { self.get_unchecked_mut() };
        let universe = match &this.state {
            State::Running { universe, .. } => *universe,
            State::Idle => {
                let (ticket, universe) = quiesce::start_request(this.location);
                this.state = State::Running { ticket, universe };
                universe
            }
            // Polled after completion: the inner future's contract.
            // SAFETY: as above.
            State::Done => return unsafe { Pin::new_unchecked(&mut this.fut) }.poll(cx),
        };
        let view = View::enter(universe);
        // SAFETY: as above.
        let out = unsafe { Pin::new_unchecked(&mut this.fut) }.poll(cx);
        drop(view);
        if out.is_ready()
            && let State::Running { ticket, .. } = std::mem::replace(&mut this.state, State::Done)
        {
            quiesce::finish_request(ticket);
        }
        out
    }
}

impl<F> Drop for Request<F> {
    fn drop(&mut self) {
        // A request dropped before it completed releases the transition.
        if let State::Running { ticket, .. } = std::mem::replace(&mut self.state, State::Done) {
            quiesce::finish_request(ticket);
        }
    }
}

impl<F> fmt::Debug for Request<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Idle => "not started",
            State::Running { .. } => "running",
            State::Done => "done",
        };
        f.debug_struct("Request")
            .field("location", &format_args!("{}", self.location))
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// A request's version, held: while it is alive a transition waits for it
/// as for the request itself. For carrying a request's version into work
/// it hands off: a closure on another thread ([`run`](Self::run), e.g. in
/// `spawn_blocking`) or a spawned future ([`scope`](Self::scope), what
/// [`inherit`] does).
///
/// # Examples
///
/// ```
/// # #[hotpatch::patchable] fn fee(x: u64) -> u64 { x / 10 }
/// async fn handler(amount: u64) -> u64 {
///     let version = hotpatch::RequestVersion::current().expect("in a request");
///     // e.g. tokio::task::spawn_blocking(move || version.run(|| fee(amount)))
///     std::thread::spawn(move || version.run(|| fee(amount))).join().unwrap()
/// }
/// # let mut fut = std::pin::pin!(hotpatch::request(handler(100)));
/// # let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
/// # assert_eq!(fut.as_mut().poll(&mut cx), std::task::Poll::Ready(10));
/// ```
pub struct RequestVersion {
    ticket: Option<Ticket>,
    universe: u64,
    location: &'static Location<'static>,
}

impl RequestVersion {
    /// The version of the request scope being polled on this thread, held
    /// by a registration of its own (created here); `None` outside one.
    #[track_caller]
    pub fn current() -> Option<RequestVersion> {
        let universe = quiesce::current_request()?;
        let location = Location::caller();
        Some(RequestVersion {
            // The scope being polled here is registered until its poll
            // returns, so this registration continues it.
            ticket: Some(quiesce::start_request_in(universe, location)),
            universe,
            location,
        })
    }

    /// Starts a request now (nested in the scope being polled here, if
    /// any, else on the newest version), for code that has to run in it
    /// before its future exists: what the `tower` layer does around
    /// `Service::call`.
    #[track_caller]
    pub fn start() -> RequestVersion {
        Self::start_at(Location::caller())
    }

    pub(crate) fn start_at(location: &'static Location<'static>) -> RequestVersion {
        let (ticket, universe) = quiesce::start_request(location);
        RequestVersion {
            ticket: Some(ticket),
            universe,
            location,
        }
    }

    /// Runs `f` on this thread in this version: its patchable calls run
    /// what the request runs.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _view = View::enter(self.universe);
        f()
    }

    /// `fut` as part of this request: it runs this version wherever it is
    /// polled, and the registration moves into it (released when it
    /// completes or is dropped).
    pub fn scope<F: Future>(mut self, fut: F) -> Request<F> {
        let state = match self.ticket.take() {
            Some(ticket) => State::Running {
                ticket,
                universe: self.universe,
            },
            None => State::Done,
        };
        Request {
            fut,
            state,
            location: self.location,
        }
    }
}

impl Drop for RequestVersion {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            quiesce::finish_request(ticket);
        }
    }
}

impl fmt::Debug for RequestVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestVersion")
            .field("location", &format_args!("{}", self.location))
            .finish_non_exhaustive()
    }
}

/// A `tower` layer that runs every request of a service as a request
/// scope (feature `tower`): for axum, hyper and tonic services.
///
/// The scope starts before the inner service's `call`, so patchable code
/// that `call` runs before returning its future is part of the request.
///
/// # Examples
///
/// ```
/// use tower_layer::Layer;
/// # #[derive(Clone)] struct Svc;
/// # impl tower_service::Service<u64> for Svc {
/// #     type Response = u64; type Error = ();
/// #     type Future = std::future::Ready<Result<u64, ()>>;
/// #     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), ()>> { std::task::Poll::Ready(Ok(())) }
/// #     fn call(&mut self, x: u64) -> Self::Future { std::future::ready(Ok(x)) }
/// # }
/// let service = hotpatch::tower::RequestLayer::new().layer(Svc);
/// ```
#[cfg(feature = "tower")]
pub mod tower {
    use super::*;

    /// Wraps a service in [`RequestService`].
    #[derive(Clone, Copy, Debug)]
    pub struct RequestLayer {
        location: &'static Location<'static>,
    }

    impl RequestLayer {
        /// A layer whose requests a timeout report names by this call's
        /// location.
        #[track_caller]
        #[allow(clippy::new_without_default)] // `Default` has no caller location.
        pub fn new() -> Self {
            RequestLayer {
                location: Location::caller(),
            }
        }
    }

    impl<S> tower_layer::Layer<S> for RequestLayer {
        type Service = RequestService<S>;

        fn layer(&self, inner: S) -> RequestService<S> {
            RequestService {
                inner,
                location: self.location,
            }
        }
    }

    /// A service whose every call runs as a request scope.
    #[derive(Clone, Debug)]
    pub struct RequestService<S> {
        inner: S,
        location: &'static Location<'static>,
    }

    impl<S, R> tower_service::Service<R> for RequestService<S>
    where
        S: tower_service::Service<R>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = Request<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: R) -> Request<S::Future> {
            let version = RequestVersion::start_at(self.location);
            let fut = version.run(|| self.inner.call(req));
            version.scope(fut)
        }
    }
}
