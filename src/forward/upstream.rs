//! Connections to the upstreams: HTTP/1.1 with keep-alive, one pool per
//! worker thread, each connection driven by the request using it.
//!
//! A hyper client connection does nothing unless its `Connection` future
//! is polled. A general-purpose client (hyper-util's) gives every
//! connection a task of its own and passes each request and response
//! between that task and the request's through channels. Here the
//! request's own task polls the connection, first while waiting for the
//! response head and then from the response body, so a request costs no
//! hand-offs (figures in docs/performance.md).
//! Upgraded connections (WebSocket) outlive the request, and get a task
//! after all.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::routes::UpstreamUrl;
use crate::outbound::{error_chain, Connector};
use crate::{Body, BoxError};

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Failed(#[from] hyper::Error),
    #[error("no response headers by the deadline")]
    TimedOut,
}

/// Idle connections of one worker, by upstream.
#[derive(Clone)]
pub struct Pool {
    idle: Arc<Mutex<Idle>>,
    connector: Connector,
    idle_timeout: Duration,
}

/// One upstream's idle connections with the time each went idle: most
/// recently used last, the oldest leave from the front.
type IdleConns = VecDeque<(Box<Conn>, Instant)>;

#[derive(Default)]
struct Idle {
    by_upstream: Vec<(UpstreamUrl, IdleConns)>,
    sweeping: bool,
}

/// One connection: the handle requests go in through, and the state
/// machine that must be polled for anything to move. Several KiB, so it is
/// kept boxed and moved as a pointer between pool, request and body.
struct Conn {
    sender: http1::SendRequest<Body>,
    driver: http1::Connection<Io, Body>,
    /// The driver has finished: closed, or failed.
    ended: bool,
    /// Bounds the wait for a response head. It stays armed from one
    /// request to the next and is moved only when it fires before the
    /// current request's deadline: a timer armed and removed for every
    /// request cost two updates of the runtime's timer wheel each. It never
    /// fires late: a request's deadline is set just before it takes the
    /// connection, and the connection serves one request at a time, so
    /// each deadline is later than the one before.
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    /// Lets the connection do what it can now; false once it has ended.
    fn poll_driver(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended {
            if let Poll::Ready(result) = Pin::new(&mut self.driver).poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection failed");
                }
                self.ended = true;
            }
        }
        !self.ended
    }

    /// Whether a request can go out on it now: not closed by the upstream
    /// while idle, and done with the previous exchange.
    fn is_usable(&mut self) -> bool {
        self.poll_driver(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Awaits `work` while driving the connection; `None` when `deadline`
    /// comes first.
    async fn drive<F: Future>(&mut self, work: F, deadline: Instant) -> Option<F::Output> {
        let mut work = pin!(work);
        poll_fn(|cx| {
            self.poll_driver(cx);
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(None);
                }
                self.timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }
}

impl Pool {
    pub fn new(connector: Connector, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Arc::default(),
            connector,
            idle_timeout,
        }
    }

    /// The same connector and idle timeout, with no connections yet: a
    /// worker's own pool.
    pub fn empty_copy(&self) -> Pool {
        Pool::new(self.connector.clone(), self.idle_timeout)
    }

    /// Sends `req` to `upstream` in origin form; the response head must
    /// come by `deadline`. An `upgrade` request's connection is handed to a
    /// task of its own and not reused.
    ///
    /// Every request moves this future into a box, so it is kept under
    /// 1 KiB, what mimalloc serves from its fast path: not an `async fn`,
    /// whose state would hold `req` twice (as argument and as the local a
    /// retry reassigns), and a new connection's state boxed apart.
    pub fn send<'a>(
        &'a self,
        upstream: &'a UpstreamUrl,
        mut req: Request<Body>,
        upgrade: bool,
        deadline: Instant,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Error>> + 'a {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        async move {
            loop {
                let (mut conn, reused) = match self.checkout(upstream) {
                    Some(conn) => (conn, true),
                    None => (Box::pin(self.connect(upstream, deadline)).await?, false),
                };
                let sent = if upgrade {
                    let Conn {
                        mut sender, driver, ..
                    } = *conn;
                    tokio::spawn(async move {
                        if let Err(e) = driver.with_upgrades().await {
                            tracing::debug!(error = %e, "upgraded upstream connection failed");
                        }
                    });
                    tokio::time::timeout_at(deadline, sender.try_send_request(req))
                        .await
                        .map_err(|_| Error::TimedOut)?
                        .map(|r| r.map(ResponseBody::detached))
                } else {
                    let sending = conn.sender.try_send_request(req);
                    let sent = conn.drive(sending, deadline).await.ok_or(Error::TimedOut)?;
                    let owner = Some((conn, self.clone(), upstream.clone()));
                    sent.map(|r| {
                        r.map(|body| ResponseBody {
                            body,
                            finished: false,
                            owner,
                        })
                    })
                };
                match sent {
                    Ok(response) => return Ok(response),
                    // An idle connection the upstream closed just before it
                    // was taken: the request never left, so another may carry it.
                    Err(mut e) if reused && e.message().is_some() => {
                        req = e.take_message().expect("checked above");
                    }
                    Err(e) => return Err(e.into_error().into()),
                }
            }
        }
    }

    fn checkout(&self, upstream: &UpstreamUrl) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let (_, conns) = idle.by_upstream.iter_mut().find(|(u, _)| u == upstream)?;
        while let Some((mut conn, since)) = conns.pop_back() {
            if since.elapsed() < self.idle_timeout && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection by `deadline`, its timer armed for it.
    async fn connect(&self, upstream: &UpstreamUrl, deadline: Instant) -> Result<Box<Conn>, Error> {
        let uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority were valid already");
        let connecting = async {
            let io = self
                .connector
                .clone()
                .call(uri)
                .await
                .map_err(|e| Error::Connect(error_chain(&*e)))?;
            http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| Error::Connect(error_chain(&e)))
        };
        let (sender, driver) = tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| Error::TimedOut)??;
        Ok(Box::new(Conn {
            sender,
            driver,
            ended: false,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        }))
    }

    fn put(&self, upstream: UpstreamUrl, conn: Box<Conn>) {
        // Outside a runtime (a body dropped at shutdown) there is nobody
        // to sweep the pool, and no request to come.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut idle = self.idle.lock().expect("pool lock");
        let now = Instant::now();
        match idle.by_upstream.iter_mut().find(|(u, _)| *u == upstream) {
            Some((_, conns)) => conns.push_back((conn, now)),
            None => idle
                .by_upstream
                .push((upstream, VecDeque::from([(conn, now)]))),
        }
        if !idle.sweeping {
            idle.sweeping = true;
            runtime.spawn(sweep(Arc::downgrade(&self.idle), self.idle_timeout));
        }
    }
}

/// Closes connections idle for `timeout`, until the pool is gone.
async fn sweep(pool: Weak<Mutex<Idle>>, timeout: Duration) {
    let mut ticks = tokio::time::interval((timeout / 4).max(Duration::from_secs(1)));
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.lock().expect("pool lock");
        for (_, conns) in &mut idle.by_upstream {
            while conns
                .front()
                .is_some_and(|(_, since)| since.elapsed() >= timeout)
            {
                conns.pop_front();
            }
        }
    }
}

/// An upstream response body that drives its connection while it is read,
/// and gives the connection back to the pool once it has been read whole.
pub struct ResponseBody {
    body: Incoming,
    /// Read to its end.
    finished: bool,
    /// The connection it came on, when this body drives it.
    owner: Option<(Box<Conn>, Pool, UpstreamUrl)>,
}

impl ResponseBody {
    /// A body whose connection a task of its own drives.
    fn detached(body: Incoming) -> ResponseBody {
        ResponseBody {
            body,
            finished: false,
            owner: None,
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some((conn, _, _)) = &mut self.owner {
            conn.poll_driver(cx);
        }
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        self.finished |= frame.is_none();
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A connection with part of a response still unread cannot carry
        // the next one.
        if let Some((conn, pool, upstream)) = self.owner.take() {
            if (self.finished || self.body.is_end_stream()) && !conn.ended {
                pool.put(upstream, conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::uri::{Authority, Scheme};

    use super::*;
    use crate::outbound::{connector, Egress};

    #[test]
    fn a_request_future_fits_the_allocator_fast_path() {
        let connector = connector(None, &Default::default(), &Egress::direct()).unwrap();
        let pool = Pool::new(connector, Duration::from_secs(1));
        let upstream = UpstreamUrl {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("upstream:80"),
        };
        let sending = pool.send(
            &upstream,
            Request::new(Body::default()),
            false,
            Instant::now(),
        );
        let size = std::mem::size_of_val(&sending);
        // mimalloc's small sizes end at 128 words.
        assert!(size <= 1024, "{size} bytes");
    }
}
