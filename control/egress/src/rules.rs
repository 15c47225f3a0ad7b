//! A config's header-injection rules, compiled: which destinations the proxy intercepts, and
//! what it does to each request it intercepts.
//!
//! A host that an enabled rule covers (by `match_hosts` and `match_port`) is intercepted. On
//! each request to it, the first rule in order whose paths and `match_headers` also match
//! adds its headers. Before that, whatever rule matched or none, the sandbox's own
//! credentials to the host are stripped: `Authorization`, `Cookie`, `Proxy-Authorization`,
//! and every header a rule covering the host would set, so that no value the sandbox sent
//! reaches a host ember holds credentials for.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION,
};

use crate::config::{HeaderKind, Rule};
use crate::pattern::{Host, HostPattern, PathPattern};
use crate::policy::PolicyError;
use crate::secrets::SecretStore;

/// The credential headers a sandbox's request to an intercepted host loses.
const STRIPPED: [HeaderName; 3] = [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION];

#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    name: String,
    hosts: Vec<HostPattern>,
    port: Option<u16>,
    /// Empty: every path.
    paths: Vec<PathPattern>,
    match_headers: Vec<(HeaderName, HeaderValue)>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Compiled {
    fn covers(&self, host: &Host, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.hosts.iter().any(|h| h.matches(host, port))
    }

    fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
            && self
                .match_headers
                .iter()
                .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
    }
}

impl Rules {
    /// Disabled rules are left out; secret references are resolved against `secrets` now.
    pub fn compile(rules: &[Rule], secrets: &SecretStore) -> Result<Rules, PolicyError> {
        let mut compiled = Vec::new();
        for rule in rules.iter().filter(|r| r.enabled != Some(false)) {
            compiled.push(compile_rule(rule, secrets)?);
        }
        Ok(Rules { rules: compiled })
    }

    /// Whether connections to `host:port` are intercepted.
    pub fn covers(&self, host: &Host, port: u16) -> bool {
        self.rules.iter().any(|r| r.covers(host, port))
    }

    /// Rewrites the headers of a request to `host:port` for `path` (no query) as the module
    /// says; returns the name of the rule whose headers were added, if one matched.
    pub fn apply(
        &self,
        host: &Host,
        port: u16,
        path: &str,
        headers: &mut HeaderMap,
    ) -> Option<&str> {
        // Matched on the headers as the sandbox sent them: `match_headers` may name one that
        // stripping removes.
        let matched = self
            .rules
            .iter()
            .find(|r| r.covers(host, port) && r.matches(path, headers));
        self.strip(host, port, headers);
        let rule = matched?;
        for (name, value) in &rule.headers {
            headers.append(name.clone(), value.clone());
        }
        Some(&rule.name)
    }

    /// Removes the sandbox's own credentials from a request to `host:port`, if a rule covers
    /// it; a request to any other host keeps them.
    pub fn strip(&self, host: &Host, port: u16, headers: &mut HeaderMap) {
        let covering: Vec<&Compiled> = self.rules.iter().filter(|r| r.covers(host, port)).collect();
        if covering.is_empty() {
            return;
        }
        let set_by_rules = covering
            .iter()
            .flat_map(|r| r.headers.iter().map(|(name, _)| name));
        for name in STRIPPED.iter().chain(set_by_rules) {
            headers.remove(name);
        }
    }
}

fn compile_rule(rule: &Rule, secrets: &SecretStore) -> Result<Compiled, PolicyError> {
    let problem = |problem: String| PolicyError::Rule {
        rule: rule.name.clone(),
        problem,
    };
    match rule.kind.as_deref() {
        None | Some("") => {}
        Some(other) => {
            return Err(problem(format!(
                "rules of type {other:?} are not supported by ember (only header injection rules)"
            )))
        }
    }
    let unsupported = [
        ("aws", rule.aws.is_some()),
        ("gcp", rule.gcp.is_some()),
        ("azure", rule.azure.is_some()),
        ("rewrite", rule.rewrite.is_some()),
        ("relay_id", rule.relay_id.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(problem(format!("{field} is not supported by ember")));
    }
    // A rule without hosts would send its credential everywhere; the SDK's own header rules
    // always name theirs.
    let hosts = rule.match_hosts.as_deref().unwrap_or_default();
    if hosts.is_empty() {
        return Err(problem(
            "match_hosts is empty: a header rule names its hosts".into(),
        ));
    }
    let hosts = hosts
        .iter()
        .map(|h| {
            HostPattern::parse(h).map_err(|e| problem(format!("match_hosts entry {h:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let paths = rule
        .match_paths
        .iter()
        .flatten()
        .map(|p| {
            PathPattern::parse(p).map_err(|e| problem(format!("match_paths entry {p:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let match_headers = rule
        .match_headers
        .iter()
        .flatten()
        .map(|m| {
            parse_match_header(m).map_err(|e| problem(format!("match_headers entry {m:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let mut headers = Vec::new();
    for header in rule.headers.iter().flatten() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| problem(format!("{:?} is not a header name", header.name)))?;
        let given = header
            .value
            .as_deref()
            .ok_or_else(|| problem(format!("header {} has no value", header.name)))?;
        let value = match header.kind {
            HeaderKind::Plaintext | HeaderKind::Opaque => given.to_string(),
            HeaderKind::WorkspaceSecret => {
                secrets
                    .resolve(given)
                    .map_err(|source| PolicyError::Secret {
                        rule: rule.name.clone(),
                        header: header.name.clone(),
                        source,
                    })?
            }
        };
        // The value itself stays out of the message: it may be a secret.
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            problem(format!(
                "the value of header {} is not a valid header value",
                header.name
            ))
        })?;
        value.set_sensitive(header.kind != HeaderKind::Plaintext);
        headers.push((name, value));
    }
    Ok(Compiled {
        name: rule.name.clone(),
        hosts,
        port: rule.match_port,
        paths,
        match_headers,
        headers,
    })
}

/// `"name: value"`: a lowercase name (as the SDK requires), the exact value after the colon
/// and its optional space.
fn parse_match_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text.split_once(':').ok_or("not written \"name: value\"")?;
    if name != name.to_ascii_lowercase() {
        return Err("the header name must be lowercase".into());
    }
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "not a header name")?;
    let value = value.strip_prefix(' ').unwrap_or(value);
    let value = HeaderValue::from_str(value).map_err(|_| "not a header value")?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;

    fn rules(json: serde_json::Value) -> Result<Rules, PolicyError> {
        let config = ProxyConfig::from_value(json!({ "rules": json })).unwrap();
        let secrets = SecretStore::from_vars("S_", [("S_TOKEN".to_string(), "tok".to_string())]);
        Rules::compile(&config.rules.unwrap(), &secrets)
    }

    use serde_json::json;

    fn host(name: &str) -> Host {
        Host::parse(name).unwrap()
    }

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_first_matching_rule_adds_its_headers_and_credentials_are_stripped() {
        let rules = rules(json!([
            {"name": "runs", "match_hosts": ["api.example.com"], "match_paths": ["/v1/*"],
             "headers": [{"name": "Authorization", "type": "workspace_secret", "value": "Bearer {TOKEN}"}]},
            {"name": "rest", "match_hosts": ["*.example.com"],
             "headers": [{"name": "X-Key", "type": "opaque", "value": "k"}]}
        ]))
        .unwrap();
        let api = host("api.example.com");
        assert!(rules.covers(&api, 443));
        assert!(!rules.covers(&host("example.org"), 443));

        let mut headers = request(&[
            ("authorization", "Bearer mine"),
            ("cookie", "c=1"),
            ("accept", "*/*"),
        ]);
        assert_eq!(
            rules.apply(&api, 443, "/v1/runs", &mut headers),
            Some("runs")
        );
        assert_eq!(headers["authorization"], "Bearer tok");
        assert!(headers["authorization"].is_sensitive());
        assert!(headers.get("cookie").is_none());
        assert_eq!(headers["accept"], "*/*");

        let mut headers = request(&[("authorization", "Bearer mine"), ("x-key", "mine")]);
        assert_eq!(rules.apply(&api, 443, "/v2/x", &mut headers), Some("rest"));
        assert!(
            headers.get("authorization").is_none(),
            "stripped though the rule setting it did not match"
        );
        assert_eq!(headers.get_all("x-key").iter().count(), 1);
        assert_eq!(headers["x-key"], "k");
    }

    #[test]
    fn match_headers_and_match_port_narrow_a_rule() {
        let rules = rules(json!([
            {"name": "b", "match_hosts": ["h.example"], "match_headers": ["authorization: Bearer account-b"],
             "headers": [{"name": "Authorization", "type": "plaintext", "value": "Bearer real-b"}]},
            {"name": "p", "match_hosts": ["h.example"], "match_port": 8443,
             "headers": [{"name": "X-Port", "type": "plaintext", "value": "8443"}]}
        ]))
        .unwrap();
        let h = host("h.example");
        let mut headers = request(&[("authorization", "Bearer account-b")]);
        assert_eq!(rules.apply(&h, 443, "/", &mut headers), Some("b"));
        assert_eq!(headers["authorization"], "Bearer real-b");

        let mut headers = request(&[("authorization", "Bearer account-c")]);
        assert_eq!(rules.apply(&h, 443, "/", &mut headers), None);
        assert!(headers.is_empty());

        let mut headers = HeaderMap::new();
        assert_eq!(rules.apply(&h, 8443, "/", &mut headers), Some("p"));
    }

    #[test]
    fn credentials_to_a_host_no_rule_covers_are_kept() {
        let rules = rules(json!([{"name": "r", "match_hosts": ["h.example"]}])).unwrap();
        let mut headers = request(&[("authorization", "Bearer mine")]);
        rules.strip(&host("other.example"), 443, &mut headers);
        assert_eq!(headers["authorization"], "Bearer mine");
        rules.strip(&host("h.example"), 443, &mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_disabled_rule_is_left_out() {
        let rules = rules(json!([{"name": "off", "enabled": false, "match_hosts": ["h.example"]}]))
            .unwrap();
        assert!(!rules.covers(&host("h.example"), 443));
    }

    #[test]
    fn compile_errors_name_the_rule_and_the_problem() {
        let cases = [
            (
                json!([{"name": "r", "headers": []}]),
                "rule \"r\": match_hosts is empty",
            ),
            (
                json!([{"name": "r", "type": "aws", "match_hosts": ["a"]}]),
                "type \"aws\" are not supported",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a"], "rewrite": {"port": 1}}]),
                "rewrite is not supported",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a b"]}]),
                "match_hosts entry \"a b\"",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a"], "match_paths": ["/a/*/b"]}]),
                "middle",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a"], "match_headers": ["Auth: x"]}]),
                "lowercase",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a"], "headers": [{"name": "A", "type": "opaque", "is_set": true}]}]),
                "header A has no value",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a"], "headers": [{"name": "A", "type": "opaque", "value": "x\ny"}]}]),
                "not a valid header value",
            ),
            (
                json!([{"name": "r", "match_hosts": ["a"],
                        "headers": [{"name": "A", "type": "workspace_secret", "value": "{NOPE}"}]}]),
                "rule \"r\", header A: secret NOPE is not in the host's secret store",
            ),
        ];
        for (json, expected) in cases {
            let err = rules(json.clone()).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
