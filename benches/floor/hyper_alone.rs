//! The floor under authgate's figures in `scripts/bench`: hyper answering
//! 1 KiB itself, on authgate's own TLS set-up, listeners (one
//! single-threaded runtime per core, `SO_REUSEPORT`) and hyper settings,
//! with no gateway in between. Beside nginx answering itself it shows what
//! the HTTP library costs per request, HTTP/1.1 and HTTP/2, apart from what
//! authgate adds on top.
//!
//!     hyper-alone <cert.pem> <key.pem> <address:port>

use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use authgate::net::{self, tls, Limits};
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

// The allocator authgate's binary uses, so the floor is measured alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper-alone: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cert, key, addr] = args.as_slice() else {
        return Err("usage: hyper-alone <cert.pem> <key.pem> <address:port>".into());
    };
    let key = tls::load(Path::new(cert), Path::new(key))?;
    let acceptor = TlsAcceptor::from(tls::server_config(tls::ReloadableCert::new(key), false)?);
    let addr: SocketAddr = addr.parse()?;
    let cores = std::thread::available_parallelism()?.get();
    let workers: Vec<_> = net::bind_workers(addr, cores)?
        .into_iter()
        .map(|listener| {
            let acceptor = acceptor.clone();
            std::thread::spawn(move || serve(listener, acceptor))
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

/// One worker: accepts, shakes hands, and answers every request with the
/// same 1 KiB, like the benchmark's upstream.
fn serve(listener: std::net::TcpListener, acceptor: TlsAcceptor) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let builder = net::http_builder(&Limits::default());
    // One per protocol, chosen by ALPN as authgate does (no detection read).
    let builders = Arc::new((builder.clone().http1_only(), builder.http2_only()));
    let body = Bytes::from(vec![b'x'; 1024]);
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        loop {
            // A failed accept or socket option ends that connection only.
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, builders, body) = (acceptor.clone(), builders.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let builder = match tls.get_ref().1.alpn_protocol() {
                    Some(b"h2") => &builders.1,
                    _ => &builders.0,
                };
                let answer = service_fn(move |_: Request<Incoming>| {
                    let mut response = Response::new(Full::new(body.clone()));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    async move { Ok::<_, Infallible>(response) }
                });
                // A failed connection ends only itself.
                let _ = builder.serve_connection(TokioIo::new(tls), answer).await;
            });
        }
    })
}
