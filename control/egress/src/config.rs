//! A sandbox's `proxy_config`, as the LangSmith SDK sends it (`langsmith.types.ProxyConfig`;
//! `langsmith.sandbox.proxy_config()` builds one): header-injection `rules`, `access_control`
//! with an `allow_list` or a `deny_list`, and the deprecated, ignored `no_proxy`.
//!
//! Fields this crate does not know are ignored, because the SDK adds fields between releases
//! and a config written for a newer SDK should still load. A known field with a wrong value
//! (a header `type` that is none of the three, a port out of range) is an error that says
//! where. Known features ember does not implement (provider auth, rewrites, relays,
//! callbacks) are accepted here and refused by [`crate::policy::Policy::compile`], so that a
//! rule that would have guarded a credential never silently does nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole `proxy_config` of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct ProxyConfig {
    /// Evaluated in order; the first rule that matches a request wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_control: Option<AccessControl>,
    /// Deprecated by the SDK and ignored: egress is intercepted whatever the guest's proxy
    /// variables say, so there is nothing to bypass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Kept as given: ember does not call callbacks, and refuses a config that has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callbacks: Option<Vec<serde_json::Value>>,
}

/// Which destinations a sandbox may reach: at most one of the two lists (the SDK documents
/// them as alternatives). Entries are exact host names, globs (`*.github.com`), IP
/// addresses, CIDR blocks (`10.1.0.0/16`) or regular expressions written `~regex`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct AccessControl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_list: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_list: Option<Vec<String>>,
}

/// One rule. Without a `type` (or with an empty one) it is a header-injection rule: requests
/// to `match_hosts` (narrowed by `match_paths`, `match_headers`, `match_port`) get `headers`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Rule {
    pub name: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Absent means enabled, as in the SDK's helpers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_paths: Option<Vec<String>>,
    /// Each `"name: value"`, lowercase name, exact value; a request must carry all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_port: Option<u16>,
    /// ember adds headers only inside TLS, so every rule is `https` whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_scheme: Option<MatchScheme>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<Header>>,
    /// Variables for every command in the sandbox while the rule is enabled: the guest side
    /// sets them, the proxy has no use for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    // Features of the LangSmith proxy that ember does not have; kept so that compiling can
    // name them in its refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_id: Option<String>,
}

/// The only scheme the SDK lets a rule name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchScheme {
    Https,
}

/// A header a rule sets on matching requests.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Header {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: HeaderKind,
    /// Absent in configs LangSmith returns for opaque values (`is_set` says one exists);
    /// ember needs it present, see [`HeaderKind`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_set: Option<bool>,
}

/// How a header's `value` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderKind {
    /// The value itself, not secret.
    Plaintext,
    /// The value itself, a secret: never logged and never returned.
    Opaque,
    /// A template whose `{NAME}` references are replaced by secrets of the host's secret
    /// store (`{GITHUB_TOKEN}`, `Bearer {GITHUB_TOKEN}`).
    WorkspaceSecret,
}

/// Why a `proxy_config` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid proxy_config: {0}")]
pub struct ConfigError(#[from] serde_json::Error);

impl ProxyConfig {
    pub fn from_json(text: &str) -> Result<ProxyConfig, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }

    /// From the JSON value a server keeps for a box.
    pub fn from_value(value: serde_json::Value) -> Result<ProxyConfig, ConfigError> {
        Ok(serde_json::from_value(value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_sdk_sends() {
        // The shape of `proxy_config(rules=[...], access_control=...)` in langsmith 0.15.1.
        let config = ProxyConfig::from_json(
            r#"{
                "rules": [{
                    "name": "github",
                    "enabled": true,
                    "match_hosts": ["api.github.com", "*.githubusercontent.com"],
                    "match_paths": ["/repos/*"],
                    "headers": [
                        {"name": "Authorization", "type": "workspace_secret", "value": "Bearer {GH_TOKEN}"},
                        {"name": "X-Trace", "type": "plaintext", "value": "ember"}
                    ]
                }],
                "access_control": {"allow_list": ["*.github.com", "10.0.0.0/8", "~^pypi\\.(org|io)$"]}
            }"#,
        )
        .unwrap();
        let rules = config.rules.unwrap();
        assert_eq!(rules[0].name, "github");
        let headers = rules[0].headers.as_ref().unwrap();
        assert_eq!(headers[0].kind, HeaderKind::WorkspaceSecret);
        assert_eq!(headers[1].value.as_deref(), Some("ember"));
        assert_eq!(
            config.access_control.unwrap().allow_list.unwrap()[2],
            r"~^pypi\.(org|io)$"
        );
    }

    #[test]
    fn ignores_fields_it_does_not_know() {
        let config = ProxyConfig::from_json(
            r#"{"rules": [{"name": "r", "future_field": 1, "headers": []}],
                "access_control": {"deny_list": ["x"], "mode": "strict"}, "version": 2}"#,
        )
        .unwrap();
        assert_eq!(config.rules.unwrap()[0].name, "r");
    }

    #[test]
    fn refuses_a_wrong_value_and_says_which() {
        let err = ProxyConfig::from_json(
            r#"{"rules": [{"name": "r", "headers": [{"name": "A", "type": "secret", "value": "v"}]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown variant `secret`"), "{err}");
        assert!(err.contains("workspace_secret"), "{err}");

        let err = ProxyConfig::from_json(r#"{"rules": [{"name": "r", "match_port": 70000}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("70000"), "{err}");

        let err = ProxyConfig::from_json(r#"{"rules": [{"match_hosts": ["a"]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `name`"), "{err}");
    }

    #[test]
    fn nulls_read_as_absent() {
        let config = ProxyConfig::from_value(serde_json::json!({
            "rules": null, "access_control": {"allow_list": null, "deny_list": ["a"]}, "no_proxy": null
        }))
        .unwrap();
        assert_eq!(config.rules, None);
        assert_eq!(config.access_control.unwrap().allow_list, None);
    }
}
