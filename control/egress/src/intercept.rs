//! An intercepted CONNECT: the sandbox's TLS is terminated with a leaf the deployment's CA
//! mints for the host, its HTTP/1.1 requests are read, given the rules' headers in place of
//! its own credentials, and sent on over the proxy's own TLS to the host, whose certificate
//! the proxy checks; responses stream back as they come.
//!
//! Only HTTP/1.1 is offered to the sandbox (ALPN), and protocol upgrades (WebSocket) are not
//! passed through an intercepted connection.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;

use crate::audit::Mode;
use crate::meter::Counted;
use crate::policy::Policy;
use crate::proxy::{remove_hop_by_hop, ProxyBody, Shared, Target};
use crate::upstream::{self, ConnectError};

type Sender = SendRequest<Counted<Incoming>>;

/// Serves one intercepted connection until the sandbox closes it. `sender` is the first
/// connection to the upstream; a new one is made when the upstream closes it.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    target: Target,
    by: String,
    client: Upgraded,
    sender: Sender,
) {
    let leaf = match shared.ca.leaf(target.host.name()) {
        Ok(leaf) => leaf,
        Err(e) => {
            tracing::warn!("no certificate for {}: {e}", target.shown);
            return;
        }
    };
    let config = match server_config(leaf) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!("no TLS for {}: {e}", target.shown);
            return;
        }
    };
    let tls = match TlsAcceptor::from(config).accept(TokioIo::new(client)).await {
        Ok(tls) => tls,
        Err(e) => {
            // Most often a client that does not trust the deployment's CA.
            tracing::debug!(
                "intercepting {}: the sandbox's TLS failed: {e}",
                target.shown
            );
            return;
        }
    };
    let connection = Arc::new(Connection {
        shared: shared.clone(),
        policy,
        target,
        by,
        sender: Mutex::new(Some(sender)),
    });
    let service = service_fn(move |req| {
        let connection = connection.clone();
        async move { Ok::<_, std::convert::Infallible>(connection.request(req).await) }
    });
    if let Err(e) = shared
        .http1_server()
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!("intercepted connection: {e}");
    }
}

fn server_config(leaf: Arc<CertifiedKey>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Leaf(leaf)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The one certificate of an intercepted connection, whatever name the client asks for: a
/// client that asks for another than it CONNECTed to fails its own check.
#[derive(Debug)]
struct Leaf(Arc<CertifiedKey>);

impl ResolvesServerCert for Leaf {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

struct Connection {
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    target: Target,
    by: String,
    sender: Mutex<Option<Sender>>,
}

impl Connection {
    async fn request(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        let mut event = self.target.event(
            parts.method.as_str(),
            Some(path_and_query.clone()),
            self.by.clone(),
            Mode::Intercepted,
        );
        // Inside the tunnel a request names its host in `Host`; an absolute-form one is made
        // origin-form, since it goes to the CONNECTed host whatever it says.
        if parts.uri.authority().is_some() {
            parts.uri = path_and_query
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/"));
        }
        remove_hop_by_hop(&mut parts.headers);
        let (host, port) = (&self.target.host, self.target.port);
        event.rule = self
            .policy
            .rules()
            .apply(host, port, parts.uri.path(), &mut parts.headers)
            .map(str::to_string);
        let up = Arc::new(AtomicU64::new(0));
        let request = Request::from_parts(parts, Counted::new(body, up.clone()));
        match self.send(request).await {
            Ok(response) => self.shared.respond(response, up, event),
            Err(message) => self.shared.bad_gateway(&self.target, event, &message),
        }
    }

    /// Sends over the upstream connection, or a new one if the upstream has closed it.
    async fn send(
        &self,
        request: Request<Counted<Incoming>>,
    ) -> Result<Response<Incoming>, String> {
        let mut slot = self.sender.lock().await;
        let mut current = slot.take();
        if let Some(sender) = current.as_mut() {
            if sender.ready().await.is_err() {
                current = None;
            }
        }
        let sender = match current {
            Some(sender) => slot.insert(sender),
            None => slot.insert(self.reconnect().await?),
        };
        sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())
    }

    async fn reconnect(&self) -> Result<Sender, String> {
        let upstream = &self.shared.upstream;
        let tcp = match upstream
            .connect(&self.policy, &self.target.host, self.target.port)
            .await
        {
            Ok(tcp) => tcp,
            Err(ConnectError::Failed(message)) => return Err(message),
            Err(ConnectError::Refused(reason)) => return Err(format!("refused ({reason})")),
        };
        upstream::http1(upstream.tls(tcp, &self.target.host).await?).await
    }
}
