//! The world of the proxy's end-to-end tests, all on loopback: an upstream of the test's own
//! (HTTPS with a certificate from a test CA, and plain HTTP) that answers every request with
//! the headers it received, the deployment's CA in a temporary directory, a secret file, and
//! the proxy on a TCP listener, its audit log a file.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use egress::audit::JsonLines;
use egress::ca::Ca;
use egress::config::ProxyConfig;
use egress::policy::{Options, Policy};
use egress::proxy::{Limits, Proxy};
use egress::secrets::SecretStore;
use egress::upstream::Upstream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

/// The value of secret `ECHO_KEY` in the host's secret file.
pub const SECRET: &str = "s3cret-from-the-host";

pub struct World {
    pub dir: tempfile::TempDir,
    /// The test CA, which signed the upstream's certificate.
    pub test_ca: CertificateDer<'static>,
    pub upstream_cert: CertificateDer<'static>,
    pub https_port: u16,
    pub http_port: u16,
    pub ca: Arc<Ca>,
    pub proxy: Proxy,
    pub proxy_addr: SocketAddr,
    pub audit: PathBuf,
    secrets: PathBuf,
}

impl World {
    /// Everything started, the proxy with no egress until [`World::set_policy`].
    pub async fn start() -> World {
        World::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> World {
        let dir = tempfile::tempdir().unwrap();
        let (test_ca, upstream_cert, upstream_key) = test_certificates();
        let https_port = serve_echo(Some(tls_acceptor(upstream_cert.clone(), upstream_key))).await;
        let http_port = serve_echo(None).await;

        let secrets = dir.path().join("secrets.json");
        std::fs::write(&secrets, format!(r#"{{"ECHO_KEY": "{SECRET}"}}"#)).unwrap();
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();

        let ca = Arc::new(Ca::load_or_create(&dir.path().join("ca")).unwrap());
        let upstream =
            Upstream::new(std::slice::from_ref(&test_ca), Duration::from_secs(5)).unwrap();
        let audit = dir.path().join("audit.jsonl");
        let proxy = Proxy::new(
            Policy::no_egress(),
            ca.clone(),
            upstream,
            Arc::new(JsonLines::open(&audit).unwrap()),
            limits,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let serving = proxy.clone();
        tokio::spawn(async move { serving.serve(listener).await });
        World {
            dir,
            test_ca,
            upstream_cert,
            https_port,
            http_port,
            ca,
            proxy,
            proxy_addr,
            audit,
            secrets,
        }
    }

    /// `config` compiled against the secret file, loopback allowed (the upstreams are there).
    pub fn policy(&self, config: serde_json::Value) -> Policy {
        let config = ProxyConfig::from_value(config).unwrap();
        let secrets = SecretStore::from_file(&self.secrets).unwrap();
        Policy::compile(
            &config,
            &secrets,
            Options {
                allow_internal: true,
            },
        )
        .unwrap()
    }

    pub fn set_policy(&self, config: serde_json::Value) {
        self.proxy.set_policy(self.policy(config));
    }

    /// `CONNECT authority` through the proxy: the tunnel, or the status and body it refused
    /// with.
    pub async fn connect(&self, authority: &str) -> Result<Upgraded, (StatusCode, String)> {
        connect_over(
            TcpStream::connect(self.proxy_addr).await.unwrap(),
            authority,
        )
        .await
    }

    /// A plain-HTTP proxy request for `url`.
    pub async fn get_via_proxy(&self, url: &str) -> (StatusCode, String) {
        let mut sender = client(TcpStream::connect(self.proxy_addr).await.unwrap()).await;
        let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        read(sender.send_request(request).await.unwrap()).await
    }

    /// The first audit line `wanted` accepts, waiting for it to be written.
    pub async fn audit_line(
        &self,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
            let found = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|l| wanted(l));
            if let Some(line) = found {
                return line;
            }
            assert!(Instant::now() < deadline, "no such audit line in:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn connect_over<I>(io: I, authority: &str) -> Result<Upgraded, (StatusCode, String)>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    let request = Request::connect(authority)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    if response.status() != StatusCode::OK {
        return Err(read(response).await);
    }
    Ok(hyper::upgrade::on(response).await.unwrap())
}

/// TLS through a proxy's `tunnel` to the upstream `localhost`, trusting `root` only.
pub async fn tls(
    tunnel: Upgraded,
    root: &CertificateDer<'static>,
) -> std::io::Result<TlsStream<TokioIo<Upgraded>>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from("localhost").unwrap(),
            TokioIo::new(tunnel),
        )
        .await
}

pub fn peer_certificate<I>(tls: &TlsStream<I>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

pub async fn client<I>(io: I) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// `GET path` with `headers` on `sender`: the status and what the echo saw (JSON).
pub async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::get(path).header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    sender.ready().await.unwrap();
    let response = sender
        .send_request(request.body(Full::new(Bytes::from_static(b"up"))).unwrap())
        .await
        .unwrap();
    let (status, body) = read(response).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

pub async fn read(response: Response<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The test CA, and a certificate it signed for `localhost` and 127.0.0.1 with its key.
fn test_certificates() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.der().clone(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn tls_acceptor(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> tokio_rustls::TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The echo upstream on 127.0.0.1, over TLS when given an acceptor; returns its port. It
/// answers `{"method", "path", "headers": {name: value}, "body": bytes}`.
async fn serve_echo(tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(echo);
                let builder = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(tls) => match tls.accept(tcp).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                    None => builder.serve_connection(TokioIo::new(tcp), service).await,
                };
            });
        }
    });
    port
}

async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        headers.insert(name.to_string(), values.join(", ").into());
    }
    let answer = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.to_string(),
        "headers": headers,
        "body": body.len(),
    });
    Ok(Response::new(Full::new(Bytes::from(answer.to_string()))))
}
