//! The gateway's HTTP server: axum's router behind an accept loop that
//! bounds what a client can hold. Headers must arrive within a deadline
//! (hyper's header timeout), a connection that carries no request for a
//! while is closed, and connections are capped in total and per client
//! address: at a cap, the oldest idle connection (of that address, or of
//! anyone) makes room, so idle or slow clients cannot lock others out.
//! Request bodies have their own whole-body deadline ([`crate::api::Body`]).
//! On shutdown, open requests get a grace period, then the server stops.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::ServiceExt;

/// What one client may hold of the server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Deadline for a request's headers, and for its whole body.
    pub read_timeout: Duration,
    /// A connection without a request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Most open connections in all (lowered to what the file-descriptor
    /// limit allows).
    pub max_connections: usize,
    /// Most open connections from one address.
    pub max_per_address: usize,
    /// How long open requests may run on after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 16_384,
            max_per_address: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// One open connection, as the accept loop sees it.
struct Conn {
    addr: IpAddr,
    /// Requests whose responses are still being sent.
    in_flight: AtomicUsize,
    /// A request's body is still arriving (such a connection may be
    /// evicted like an idle one: it has not cost the server anything yet).
    receiving: std::sync::atomic::AtomicBool,
    /// When the connection last started or finished a request.
    last_active: Mutex<Instant>,
    /// Told to close (evicted to make room).
    evict: Notify,
}

impl Conn {
    /// Since when the connection has held nothing the server works on
    /// (`None`: a request is being answered).
    fn idle_since(&self) -> Option<Instant> {
        let idle = self.in_flight.load(Ordering::Acquire) == 0 || self.receiving.load(Ordering::Acquire);
        idle.then(|| *self.last_active.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// The connection a request arrived on (a request extension), so that the
/// body reader can say when the body is still arriving.
#[derive(Clone)]
pub(crate) struct Connection(Arc<Conn>);

impl Connection {
    /// Marks the request's body as arriving until the guard drops.
    pub(crate) fn receiving(&self) -> Receiving {
        self.0.receiving.store(true, Ordering::Release);
        Receiving(Arc::clone(&self.0))
    }
}

pub(crate) struct Receiving(Arc<Conn>);

impl Drop for Receiving {
    fn drop(&mut self) {
        self.0.receiving.store(false, Ordering::Release);
    }
}

/// Marks a request in flight on its connection until its response body
/// is done (or dropped).
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.touch();
        Self(Arc::clone(conn))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every open connection.
#[derive(Default)]
struct Registry {
    inner: Mutex<Connections>,
    next: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Connections {
    conns: HashMap<u64, Arc<Conn>>,
    /// Open connections per client address (what admission checks each time).
    per_addr: HashMap<IpAddr, usize>,
}

impl Connections {
    fn remove(&mut self, id: u64) -> Option<Arc<Conn>> {
        let conn = self.conns.remove(&id)?;
        if let std::collections::hash_map::Entry::Occupied(mut count) = self.per_addr.entry(conn.addr) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        Some(conn)
    }
}

impl Registry {
    /// Admits a connection from `addr`, evicting the oldest idle one where
    /// a cap is reached; `None` when nothing can make room.
    fn admit(&self, addr: IpAddr, limits: &HttpLimits) -> Option<(u64, Arc<Conn>)> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let full_here = inner.per_addr.get(&addr).copied().unwrap_or(0) >= limits.max_per_address;
        if full_here || inner.conns.len() >= limits.max_connections {
            let victim = inner
                .conns
                .iter()
                .filter(|(_, c)| !full_here || c.addr == addr)
                .filter_map(|(&id, c)| c.idle_since().map(|since| (since, id)))
                .min()
                .map(|(_, id)| id);
            let victim = inner.remove(victim?)?;
            victim.evict.notify_one();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn =
            Arc::new(Conn { addr, in_flight: AtomicUsize::new(0), receiving: false.into(), last_active: Mutex::new(Instant::now()), evict: Notify::new() });
        inner.conns.insert(id, Arc::clone(&conn));
        *inner.per_addr.entry(addr).or_default() += 1;
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).conns.len()
    }
}

/// Raises this process's open-file limit to its hard limit; returns the
/// soft limit now in force.
pub fn raise_fd_limit() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) == 0 {
                limit = raised;
            }
        }
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// File descriptors kept for everything but HTTP connections (the swarm,
/// model files, stores).
const FD_RESERVE: usize = 512;

/// Serves `router` on `listener` under `limits` until `shutdown` resolves;
/// then stops accepting, lets open requests finish within the grace
/// period, and returns.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, mut limits: HttpLimits, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let fds = raise_fd_limit();
    limits.max_connections = limits.max_connections.min(fds.saturating_sub(FD_RESERVE).max(64));
    limits.max_per_address = limits.max_per_address.min(limits.max_connections);
    let registry = Arc::new(Registry::default());
    let stopping = tokio_util::sync::CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.read_timeout).keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors or a connection reset while queued:
                    // wait a moment rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((id, conn)) = registry.admit(peer.ip(), &limits) else {
            tracing::debug!(%peer, "refusing a connection: every slot holds a request in flight");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, registry, stopping, idle_timeout) = (router.clone(), Arc::clone(&registry), stopping.clone(), limits.idle_timeout);
        let service_conn = Arc::clone(&conn);
        let service = hyper::service::service_fn(move |mut request: axum::http::Request<hyper::body::Incoming>| {
            let in_flight = InFlight::new(&service_conn);
            request.extensions_mut().insert(Connection(Arc::clone(&service_conn)));
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(Body::new)).await?;
                // The request stays in flight until its body is sent.
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::from_stream(body.into_data_stream().map(move |chunk| {
                        let _held = &in_flight;
                        chunk
                    }))
                }))
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            tokio::pin!(connection);
            let mut draining = false;
            loop {
                let idle_deadline = conn.idle_since().map_or_else(|| Instant::now() + idle_timeout, |since| since + idle_timeout);
                tokio::select! {
                    _ = connection.as_mut() => break,
                    () = conn.evict.notified() => break,
                    () = stopping.cancelled(), if !draining => {
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    () = tokio::time::sleep_until(idle_deadline) => {
                        if conn.idle_since().is_some_and(|since| since + idle_timeout <= Instant::now()) {
                            break;
                        }
                    }
                }
            }
            registry.remove(id);
        });
    }
    drop(listener);
    stopping.cancel();
    let deadline = Instant::now() + limits.shutdown_grace;
    while registry.len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = registry.len();
    if left > 0 {
        tracing::warn!(connections = left, grace = ?limits.shutdown_grace, "shutdown grace period over; closing the remaining connections");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> HttpLimits {
        HttpLimits { max_connections: total, max_per_address: per, ..HttpLimits::default() }
    }

    #[test]
    fn a_full_address_makes_room_from_its_own_idle_connections() {
        let registry = Registry::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let (first, first_conn) = registry.admit(a, &limits(10, 2)).expect("room");
        let (_, busy) = registry.admit(a, &limits(10, 2)).expect("room");
        let _request = InFlight::new(&busy);
        let (_, other) = registry.admit(b, &limits(10, 2)).expect("room");
        // `a` is at its cap: its oldest idle connection goes, not `b`'s.
        let (_, _third) = registry.admit(a, &limits(10, 2)).expect("room made");
        assert!(!registry.inner.lock().expect("lock").conns.contains_key(&first));
        assert_eq!(registry.inner.lock().expect("lock").per_addr.get(&a), Some(&2), "counts follow evictions");
        assert!(Arc::strong_count(&first_conn) == 1 && Arc::strong_count(&other) == 2);
        // Only connections with requests in flight left at `a`'s cap and
        // none idle: nothing can make room.
        let registry = Registry::default();
        let (_, only) = registry.admit(a, &limits(10, 1)).expect("room");
        let _held = InFlight::new(&only);
        assert!(registry.admit(a, &limits(10, 1)).is_none());
        assert!(registry.admit(b, &limits(10, 1)).is_some());
        // A request whose body is still arriving holds nothing yet.
        let receiving = Connection(Arc::clone(&only)).receiving();
        assert!(registry.admit(a, &limits(10, 1)).is_some());
        drop(receiving);
    }

    #[test]
    fn the_total_cap_evicts_the_oldest_idle_connection_anywhere() {
        let registry = Registry::default();
        let ips: Vec<IpAddr> = (1..=3).map(|i| format!("10.0.0.{i}").parse().expect("ip")).collect();
        let ids: Vec<u64> = ips.iter().map(|&ip| registry.admit(ip, &limits(3, 3)).expect("room").0).collect();
        registry.admit("10.0.0.9".parse().expect("ip"), &limits(3, 3)).expect("room made");
        let inner = registry.inner.lock().expect("lock");
        let conns = &inner.conns;
        assert_eq!(conns.len(), 3);
        assert!(!conns.contains_key(&ids[0]), "the oldest idle connection was evicted");
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        assert!(raise_fd_limit() >= 1024);
    }
}
