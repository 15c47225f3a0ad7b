//! The proxy's side towards destinations: resolving a name and connecting to an address the
//! policy allows, TLS to an intercepted host, and the HTTP/1.1 connection requests go over.
//!
//! Upstream certificates are checked against Mozilla's roots (`webpki-roots`, built in, so a
//! jailed proxy needs no file of the host's) plus the extra CA certificates the deployment
//! gives, such as a test's own CA.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::pattern::Host;
use crate::policy::{Policy, Refusal};

/// Why no connection to a destination was made.
#[derive(Debug)]
pub enum ConnectError {
    /// Every address the name resolved to is one the policy refuses.
    Refused(Refusal),
    /// The message for the sandbox's 502.
    Failed(String),
}

/// How the proxy reaches destinations; cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl Upstream {
    /// `extra_roots`: CA certificates trusted for upstreams besides Mozilla's.
    pub fn new(
        extra_roots: &[CertificateDer<'static>],
        connect_timeout: Duration,
    ) -> Result<Upstream, rustls::Error> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for cert in extra_roots {
            roots.add(cert.clone())?;
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        // The proxy speaks HTTP/1.1 to intercepted hosts, so it offers nothing else.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Upstream {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
        })
    }

    /// A TCP connection to `host:port`: to the address itself, or to the first address the
    /// name resolves to that the policy allows and that answers.
    pub async fn connect(
        &self,
        policy: &Policy,
        host: &Host,
        port: u16,
    ) -> Result<TcpStream, ConnectError> {
        let addresses: Vec<SocketAddr> = match host.ip() {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => tokio::net::lookup_host((host.name(), port))
                .await
                .map_err(|e| ConnectError::Failed(format!("cannot resolve {}: {e}", host.name())))?
                .collect(),
        };
        let mut refusal = None;
        let mut failure = None;
        for address in addresses {
            let ip: IpAddr = address.ip().to_canonical();
            if let Err(r) = policy.check_address(ip, port) {
                refusal.get_or_insert(r);
                continue;
            }
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    // Requests and their small responses go out as they are written.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => failure = Some(format!("cannot connect to {address}: {e}")),
                Err(_) => {
                    failure = Some(format!(
                        "no answer from {address} in {:?}",
                        self.connect_timeout
                    ))
                }
            }
        }
        Err(match (failure, refusal) {
            (Some(failure), _) => ConnectError::Failed(failure),
            (None, Some(refusal)) => ConnectError::Refused(refusal),
            (None, None) => ConnectError::Failed(format!("{} has no address", host.name())),
        })
    }

    /// TLS over `tcp` to `host`, its certificate checked for that name.
    pub async fn tls(&self, tcp: TcpStream, host: &Host) -> Result<TlsStream<TcpStream>, String> {
        let name = match host.ip() {
            Some(ip) => ServerName::IpAddress(ip.into()),
            None => ServerName::try_from(host.name().to_string()).map_err(|e| e.to_string())?,
        };
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {}: {e}", host.name()))
    }
}

/// The certificates of PEM file `path`, for [`Upstream::new`]'s extra roots; a file with none
/// is an error (it was named to be trusted).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{shown}: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{shown}: no PEM certificate in it"));
    }
    Ok(certificates)
}

/// An HTTP/1.1 client connection over `io`, its driver spawned.
pub async fn http1<I, B>(io: I) -> Result<SendRequest<B>, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_roots_are_read_from_pem_files_and_a_file_without_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::Ca::load_or_create(&dir.path().join("ca")).unwrap();
        let pem = dir.path().join("roots.pem");
        std::fs::write(&pem, format!("{}{}", ca.cert_pem(), ca.cert_pem())).unwrap();
        let roots = read_certificates(&pem).unwrap();
        assert_eq!(roots, [ca.cert_der().clone(), ca.cert_der().clone()]);
        Upstream::new(&roots, Duration::from_secs(1)).unwrap();

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = read_certificates(&empty).unwrap_err();
        assert!(
            err.contains("empty.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = read_certificates(&dir.path().join("missing.pem")).unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
