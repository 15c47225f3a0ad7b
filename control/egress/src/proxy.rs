//! The egress proxy of one sandbox: HTTP/1.1 on a listener it is given (a Unix socket, which
//! the guest's connections reach through the VMM's vsock, or TCP), where every request is a
//! proxy request:
//!
//! - `CONNECT host:port` to an allowed destination no rule covers: the bytes are tunnelled,
//!   uninspected (the upstream's own certificate reaches the sandbox).
//! - `CONNECT` to a destination a rule covers: intercepted (see [`crate::intercept`]).
//! - `GET http://host/...` (absolute form): forwarded over plain HTTP, the sandbox's own
//!   credentials stripped if a rule covers the host; rules add headers only inside TLS.
//! - A refused destination: `403` with `ember: egress to HOST:PORT denied by this sandbox's
//!   policy`; an upstream that cannot be reached: `502` saying why; anything that is not a
//!   proxy request: `400`.
//!
//! The policy is swapped whole ([`Proxy::set_policy`]); each connection (and each plain
//! request) takes the policy current when it starts.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::{Audit, Event, Mode};
use crate::ca::Ca;
use crate::meter::{Audited, Counted};
use crate::pattern::Host;
use crate::policy::{Decision, Policy, Refusal};
use crate::upstream::{self, ConnectError, Upstream};

/// What the proxy sends the sandbox.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections from the sandbox served at once; more wait to be accepted.
    pub max_connections: usize,
    /// A request's start line and headers.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// For a request's headers to arrive.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the proxy's connections come from.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// One sandbox's proxy; clones share it.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    policy: RwLock<Arc<Policy>>,
    pub(crate) ca: Arc<Ca>,
    pub(crate) upstream: Upstream,
    pub(crate) audit: Arc<dyn Audit>,
    limits: Limits,
}

impl Proxy {
    pub fn new(
        policy: Policy,
        ca: Arc<Ca>,
        upstream: Upstream,
        audit: Arc<dyn Audit>,
        limits: Limits,
    ) -> Proxy {
        Proxy {
            shared: Arc::new(Shared {
                policy: RwLock::new(Arc::new(policy)),
                ca,
                upstream,
                audit,
                limits,
            }),
        }
    }

    /// From now on, new connections and requests are decided by `policy`; those under way
    /// finish under the one they started with.
    pub fn set_policy(&self, policy: Policy) {
        *self.shared.policy.write().unwrap() = Arc::new(policy);
    }

    /// Serves `listener`'s connections until accepting fails for good.
    pub async fn serve<L: Listener>(&self, listener: L) -> io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.shared.limits.max_connections));
        loop {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let io = match listener.accept().await {
                Ok(io) => io,
                Err(e) if is_transient(&e) => {
                    tracing::warn!("egress proxy: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let shared = self.shared.clone();
            tokio::spawn(async move { shared.serve_connection(io, Arc::new(permit)).await });
        }
    }
}

/// Errors after which the next accept may well succeed: a connection that went away before
/// it was taken, or no file descriptor free for a moment.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

/// A destination as the sandbox wrote it, parsed.
pub(crate) struct Target {
    pub(crate) host: Host,
    pub(crate) port: u16,
    /// `HOST:PORT` as written, for messages.
    pub(crate) shown: String,
}

impl Target {
    fn parse(authority: &Authority, default_port: Option<u16>) -> Option<Target> {
        let port = authority.port_u16().or(default_port)?;
        let host = Host::parse(authority.host())?;
        Some(Target {
            shown: format!("{}:{port}", authority.host()),
            host,
            port,
        })
    }

    pub(crate) fn event(
        &self,
        method: &str,
        path: Option<String>,
        decided_by: String,
        mode: Mode,
    ) -> Event {
        Event {
            at: SystemTime::now(),
            host: self.host.name().to_string(),
            port: self.port,
            method: method.to_string(),
            path,
            status: 0,
            bytes_up: 0,
            bytes_down: 0,
            decided_by,
            rule: None,
            mode,
        }
    }
}

impl Shared {
    fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap().clone()
    }

    /// The HTTP/1.1 server of the sandbox's connections, and of the requests inside an
    /// intercepted one.
    pub(crate) fn http1_server(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .max_header_size(self.limits.max_header_bytes)
            .max_headers(self.limits.max_headers);
        builder
    }

    async fn serve_connection<I>(self: Arc<Self>, io: I, permit: Arc<OwnedSemaphorePermit>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = self.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            let permit = permit.clone();
            async move { Ok::<_, Infallible>(shared.handle(req, permit).await) }
        });
        if let Err(e) = self
            .http1_server()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
        {
            tracing::debug!("egress proxy connection: {e}");
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Response<ProxyBody> {
        let policy = self.policy();
        if req.method() == Method::CONNECT {
            self.connect(req, policy, permit).await
        } else if req.uri().scheme().is_some() {
            self.forward(req, policy).await
        } else {
            text(
                StatusCode::BAD_REQUEST,
                "ember: this is an egress proxy: it takes CONNECT HOST:PORT and http:// URLs\n",
            )
        }
    }

    async fn connect(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        policy: Arc<Policy>,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Response<ProxyBody> {
        let Some(target) = req.uri().authority().and_then(|a| Target::parse(a, None)) else {
            return text(StatusCode::BAD_REQUEST, "ember: CONNECT takes HOST:PORT\n");
        };
        let by = match self.decide(&policy, &target, "CONNECT", None) {
            Ok(by) => by,
            Err(refused) => return *refused,
        };
        let intercept = policy.rules().covers(&target.host, target.port);
        let mode = if intercept {
            Mode::Intercepted
        } else {
            Mode::Tunnelled
        };
        let event = target.event("CONNECT", None, by.clone(), mode);
        let tcp = match self.dial(&policy, &target, &event).await {
            Ok(tcp) => tcp,
            Err(answer) => return *answer,
        };
        let upgrade = hyper::upgrade::on(&mut req);
        if intercept {
            // The upstream's TLS is made before the sandbox is answered, so that a failure is
            // this CONNECT's 502 and not a broken connection later.
            let sender = match self.upstream.tls(tcp, &target.host).await {
                Ok(tls) => upstream::http1(tls).await,
                Err(message) => Err(message),
            };
            let sender = match sender {
                Ok(sender) => sender,
                Err(message) => return self.bad_gateway(&target, event, &message),
            };
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(client) => {
                        crate::intercept::serve(self, policy, target, by, client, sender).await
                    }
                    Err(e) => tracing::debug!("CONNECT {}: no upgrade: {e}", target.shown),
                }
                drop(permit);
            });
        } else {
            tokio::spawn(async move {
                self.tunnel(target, event, upgrade, tcp).await;
                drop(permit);
            });
        }
        Response::new(empty())
    }

    async fn tunnel(
        &self,
        target: Target,
        mut event: Event,
        upgrade: hyper::upgrade::OnUpgrade,
        mut tcp: TcpStream,
    ) {
        event.status = StatusCode::OK.as_u16();
        match upgrade.await {
            Ok(client) => {
                match tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut tcp).await {
                    Ok((up, down)) => (event.bytes_up, event.bytes_down) = (up, down),
                    Err(e) => tracing::debug!("tunnel to {} ended: {e}", target.shown),
                }
            }
            Err(e) => tracing::debug!("CONNECT {}: no upgrade: {e}", target.shown),
        }
        self.audit.record(event);
    }

    async fn forward(&self, req: Request<Incoming>, policy: Arc<Policy>) -> Response<ProxyBody> {
        if req.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
            return text(
                StatusCode::BAD_REQUEST,
                "ember: https:// goes through CONNECT\n",
            );
        }
        let (mut parts, body) = req.into_parts();
        let Some(authority) = parts.uri.authority().cloned() else {
            return text(StatusCode::BAD_REQUEST, "ember: the URL has no host\n");
        };
        let Some(target) = Target::parse(&authority, Some(80)) else {
            return text(
                StatusCode::BAD_REQUEST,
                "ember: the URL's host is not a host name\n",
            );
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let method = parts.method.to_string();
        let by = match self.decide(&policy, &target, &method, Some(path.to_string())) {
            Ok(by) => by,
            Err(refused) => return *refused,
        };
        let event = target.event(&method, Some(path.to_string()), by, Mode::Forwarded);
        let tcp = match self.dial(&policy, &target, &event).await {
            Ok(tcp) => tcp,
            Err(answer) => return *answer,
        };
        parts.uri = Uri::from(path);
        remove_hop_by_hop(&mut parts.headers);
        policy
            .rules()
            .strip(&target.host, target.port, &mut parts.headers);
        match HeaderValue::from_str(authority.as_str()) {
            Ok(host) => parts.headers.insert(HOST, host),
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "ember: the URL's host is not a header value\n",
                )
            }
        };
        let up = Arc::new(AtomicU64::new(0));
        let request = Request::from_parts(parts, Counted::new(body, up.clone()));
        let sent = match upstream::http1(tcp).await {
            Ok(mut sender) => sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string()),
            Err(message) => Err(message),
        };
        match sent {
            Ok(response) => self.respond(response, up, event),
            Err(message) => self.bad_gateway(&target, event, &message),
        }
    }

    /// The upstream's response, streamed to the sandbox; its event is written when it ends.
    pub(crate) fn respond(
        &self,
        response: Response<Incoming>,
        up: Arc<AtomicU64>,
        mut event: Event,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        event.status = parts.status.as_u16();
        Response::from_parts(
            parts,
            Audited::new(body, up, self.audit.clone(), event).boxed(),
        )
    }

    /// The list entry that allows `target`, or the 403 its refusal gets (audited).
    fn decide(
        &self,
        policy: &Policy,
        target: &Target,
        method: &str,
        path: Option<String>,
    ) -> Result<String, Box<Response<ProxyBody>>> {
        match policy.decide(target.host.name(), target.port) {
            Decision::Allow { by } => Ok(by.to_string()),
            Decision::Deny { reason } => Err(Box::new(self.denied(target, method, path, &reason))),
        }
    }

    /// The upstream connection for `event`'s request, or its answer (audited): a 403 for an
    /// address the policy refuses once resolved, a 502 for one that cannot be reached.
    async fn dial(
        &self,
        policy: &Policy,
        target: &Target,
        event: &Event,
    ) -> Result<TcpStream, Box<Response<ProxyBody>>> {
        match self
            .upstream
            .connect(policy, &target.host, target.port)
            .await
        {
            Ok(tcp) => Ok(tcp),
            Err(ConnectError::Refused(reason)) => Err(Box::new(self.denied(
                target,
                &event.method,
                event.path.clone(),
                &reason,
            ))),
            Err(ConnectError::Failed(message)) => {
                Err(Box::new(self.bad_gateway(target, event.clone(), &message)))
            }
        }
    }

    fn denied(
        &self,
        target: &Target,
        method: &str,
        path: Option<String>,
        reason: &Refusal,
    ) -> Response<ProxyBody> {
        let mut event = target.event(method, path, reason.to_string(), Mode::Denied);
        event.status = StatusCode::FORBIDDEN.as_u16();
        self.audit.record(event);
        text(
            StatusCode::FORBIDDEN,
            &format!(
                "ember: egress to {} denied by this sandbox's policy\n",
                target.shown
            ),
        )
    }

    pub(crate) fn bad_gateway(
        &self,
        target: &Target,
        mut event: Event,
        message: &str,
    ) -> Response<ProxyBody> {
        tracing::debug!("egress to {}: {message}", target.shown);
        event.status = StatusCode::BAD_GATEWAY.as_u16();
        self.audit.record(event);
        text(
            StatusCode::BAD_GATEWAY,
            &format!("ember: cannot reach {}: {message}\n", target.shown),
        )
    }
}

/// Headers that belong to one connection (RFC 9110 7.6.1), which a proxy does not pass on,
/// and those the `Connection` header names.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
