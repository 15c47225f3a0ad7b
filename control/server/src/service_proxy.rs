//! The service URLs' reverse proxy: `/services/{box id}/{port}/...` is HTTP to that port of the
//! box (and, with a service domain, so is every path of host `{port}-{box id}.DOMAIN`), for a holder of one of its tokens (see `service_tokens`): in the SDK's header
//! (`X-Langsmith-Sandbox-Service-Token`), as `Authorization: Bearer`, or in the cookie that the
//! login URL (`.../.ember-login?token=T`) sets for that path. No token, a wrong one: 401;
//! expired: 401 saying so; a stopped box: 503; nothing listening on the port: 502 naming it.
//!
//! Each request is one HTTP/1.1 connection to the service over its own agent connection
//! (`Dial`); the response streams through as it comes, and an upgrade (a WebSocket) becomes a
//! byte splice. The proxy takes its own credentials out of the request and adds the
//! `X-Forwarded-*` headers; it adds nothing to the response.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::error::ApiError;
use crate::ports::{dial, Via};
use crate::grants::Refusal;
use crate::state::Shared;

/// The SDK's header for a service token.
pub const TOKEN_HEADER: &str = "x-langsmith-sandbox-service-token";
/// The last path segment of the login URL (a service's own paths do not start with a dot
/// this way often; the login route shadows only this one).
pub const LOGIN: &str = ".ember-login";

fn cookie_name(port: u16) -> String {
    format!("ember_service_{port}")
}

/// The path a box's port is served under.
pub fn prefix(box_id: &str, port: u16) -> String {
    format!("/services/{box_id}/{port}")
}

/// An error in the API's shape with a status `ApiError` has not (503) or a kind of its own.
pub(crate) fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (status, axum::Json(json!({"detail": {"error": kind, "message": message}}))).into_response()
}

/// The token the request carries, from the header, the bearer, or the port's cookie.
fn token(headers: &HeaderMap, port: u16) -> Option<String> {
    let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(t) = text(HeaderName::from_static(TOKEN_HEADER)) {
        return Some(t.to_string());
    }
    if let Some(t) = text(header::AUTHORIZATION).and_then(|a| a.strip_prefix("Bearer ")) {
        return Some(t.to_string());
    }
    let name = cookie_name(port);
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|c| c.split(';')).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

pub async fn proxy(State(state): State<Shared>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    let box_id = params.get("box_id").cloned().unwrap_or_default();
    let Some(port) = params.get("port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "a service URL's port is a number from 1 to 65535".into());
    };
    let rest = params.get("rest").cloned().unwrap_or_default();
    let base = prefix(&box_id, port);
    serve(&state, &box_id, port, &rest, &base, req).await
}

/// The box and port a request's Host names under the service domain `domain`
/// (`{port}-{box id}.{domain}`, any port after it), if it names one.
pub fn by_host(host: &str, domain: &str) -> Option<(u16, String)> {
    let host = host.to_ascii_lowercase();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host.as_str(),
    };
    let label = name.strip_suffix(&domain.to_ascii_lowercase())?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    (!id.is_empty() && !id.contains('.')).then(|| (port, id.to_string()))
}

/// Routing by host name, before the routes: a request for `{port}-{box id}.{service domain}`
/// is that box's service at its root path; any other goes on to the routes.
pub async fn route_by_host(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let target = state.config.service_domain.as_deref().and_then(|domain| {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok())?;
        by_host(host, domain)
    });
    match target {
        Some((port, box_id)) => {
            let rest = req.uri().path().trim_start_matches('/').to_string();
            serve(&state, &box_id, port, &rest, "", req).await
        }
        None => next.run(req).await,
    }
}

/// Serves `rest` of `port` of box `box_id`, mounted at `base` (a path prefix, or "" at the
/// root of a host of its own).
async fn serve(state: &Shared, box_id: &str, port: u16, rest: &str, base: &str, req: Request) -> Response {
    if rest == LOGIN {
        return login(state, box_id, port, base, req.uri());
    }
    let Some(token) = token(req.headers(), port) else {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", format!("a service token is required ({TOKEN_HEADER} header, a bearer token, or the login URL's cookie)"));
    };
    match state.service_tokens.check(&token, box_id, port) {
        Ok(()) => {}
        Err(Refusal::Invalid) => return error(StatusCode::UNAUTHORIZED, "Unauthorized", "the service token is not valid for this URL".into()),
        Err(Refusal::Expired) => return error(StatusCode::UNAUTHORIZED, "TokenExpired", "the service token has expired: ask for a new service URL".into()),
    }
    match forward(state, box_id, port, rest, base, req).await {
        Ok(r) => r,
        Err(ApiError::BadRequest { kind: "NotReady", message }) => error(StatusCode::SERVICE_UNAVAILABLE, "NotReady", message),
        Err(e) => e.into_response(),
    }
}

/// `.ember-login?token=T[&redirect=/path]`: sets the port's cookie and sends the browser on.
fn login(state: &Shared, box_id: &str, port: u16, base: &str, uri: &Uri) -> Response {
    let query: HashMap<String, String> = uri.query().map(url_pairs).unwrap_or_default();
    let Some(token) = query.get("token") else {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", "the login URL needs its token".into());
    };
    if let Err(why) = state.service_tokens.check(token, box_id, port) {
        let kind = if why == Refusal::Expired { "TokenExpired" } else { "Unauthorized" };
        return error(StatusCode::UNAUTHORIZED, kind, "the login URL's token is not valid (or has expired)".into());
    }
    let to = query.get("redirect").filter(|r| r.starts_with('/') && !r.starts_with("//")).map_or("/", String::as_str);
    let cookie = format!("{}={token}; Path={base}/; HttpOnly; SameSite=Lax", cookie_name(port));
    let mut r = StatusCode::SEE_OTHER.into_response();
    let headers = r.headers_mut();
    if let (Ok(c), Ok(l)) = (HeaderValue::from_str(&cookie), HeaderValue::from_str(&format!("{base}{to}"))) {
        headers.insert(header::SET_COOKIE, c);
        headers.insert(header::LOCATION, l);
    }
    r
}

/// `a=b&c=d`, percent-decoded enough for tokens and paths.
fn url_pairs(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%2f", "/")))
        .collect()
}

/// Headers that are the connection's, not the message's (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

async fn forward(state: &Shared, box_id: &str, port: u16, rest: &str, base: &str, mut req: Request) -> Result<Response, ApiError> {
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let guest = dial(state, box_id, port, Via::ServiceUrl).await?;
    let internal = |e: hyper::Error| ApiError::BadGateway(format!("port {port} of the sandbox: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(guest)).await.map_err(internal)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("service connection: {e}");
        }
    });

    let (mut parts, body) = req.into_parts();
    let path = match parts.uri.query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    parts.uri = path.parse().map_err(|_| ApiError::invalid("path", "not a usable path"))?;
    let host = parts.headers.get(header::HOST).cloned();
    let headers = &mut parts.headers;
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(TOKEN_HEADER);
    if headers.get(header::AUTHORIZATION).and_then(|a| a.to_str().ok()).is_some_and(|a| a.starts_with("Bearer ") && a.contains('.')) {
        headers.remove(header::AUTHORIZATION);
    }
    strip_cookie(headers, &cookie_name(port));
    if let Some(u) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
    if let Some(ip) = peer.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok()) {
        headers.append(HeaderName::from_static("x-forwarded-for"), ip);
    }
    if let Some(host) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("http"));
    match HeaderValue::from_str(base) {
        Ok(p) if !base.is_empty() => {
            headers.insert(HeaderName::from_static("x-forwarded-prefix"), p);
        }
        _ => {}
    }
    let mut response = sender.send_request(axum::http::Request::from_parts(parts, body)).await.map_err(internal)?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let service = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(client), Ok(service)) = (client.await, service.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(service)).await;
                }
            });
        }
    }
    Ok(response.map(Body::new))
}

/// Takes the proxy's own cookie out of the request's Cookie headers.
fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|c| c.split(';'))
        .map(str::trim)
        .filter(|pair| pair.split_once('=').is_none_or(|(k, _)| k != name) && !pair.is_empty())
        .map(String::from)
        .collect();
    headers.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            headers.insert(header::COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_names_a_port_and_box_only_right_under_the_domain() {
        let id = "0b6f1c9e-5c1a-4c1e-9c1e-0b6f1c9e5c1a";
        assert_eq!(by_host(&format!("8000-{id}.svc.test"), "svc.test"), Some((8000, id.into())));
        assert_eq!(by_host(&format!("8000-{id}.SVC.test:8080"), "svc.test"), Some((8000, id.into())));
        assert_eq!(by_host("8000-host-abc.localhost:8080", "localhost"), Some((8000, "host-abc".into())));
        for other in [
            format!("8000-{id}.other.test"),
            format!("8000-{id}.a.svc.test"),
            format!("x-{id}.svc.test"),
            format!("0-{id}.svc.test"),
            format!("70000-{id}.svc.test"),
            "8000-.svc.test".into(),
            "svc.test".into(),
            format!("8000-{id}svc.test"),
        ] {
            assert_eq!(by_host(&other, "svc.test"), None, "{other}");
        }
    }
}
