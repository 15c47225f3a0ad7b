//! A sandbox's egress policy: its `proxy_config` compiled into a decision per destination.
//!
//! - No `proxy_config` at all ([`Policy::no_egress`]): nothing is allowed, the default of a
//!   sandbox.
//! - `access_control.allow_list`: only destinations an entry matches.
//! - `access_control.deny_list`: everything but what an entry matches.
//! - A `proxy_config` without `access_control` (or with neither list): everything. The SDK
//!   sends `{"rules": [...]}` alone for a sandbox that should reach the internet with
//!   credentials added for some hosts ("a host no rule covers is passed through"); rules never
//!   widen or narrow the lists, they only say which allowed hosts are intercepted.
//!
//! Whatever the lists say, internal destinations are refused: loopback, private, link-local
//! (cloud metadata at 169.254.169.254 included), carrier-grade NAT, unique-local,
//! unspecified, multicast and broadcast addresses, and `localhost`, both as the sandbox names
//! them and as a name resolves ([`Policy::check_address`]), unless the policy was compiled
//! with [`Options::allow_internal`], which only tests whose upstreams run on loopback set.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::ProxyConfig;
use crate::pattern::{Host, HostPattern};
use crate::rules::Rules;
use crate::secrets::{SecretError, SecretStore};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("rule {rule:?}: {problem}")]
    Rule { rule: String, problem: String },
    #[error("rule {rule:?}, header {header}: {source}")]
    Secret {
        rule: String,
        header: String,
        source: SecretError,
    },
    #[error("access_control.{list} entry {entry:?}: {problem}")]
    Entry {
        list: &'static str,
        entry: String,
        problem: String,
    },
    #[error("access_control has both an allow_list and a deny_list: give one")]
    BothLists,
    #[error("proxy_config callbacks are not supported by ember")]
    Callbacks,
}

/// How a policy is compiled, beyond its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Lets the sandbox reach internal addresses. For tests only, whose upstreams listen on
    /// the host's loopback; a real sandbox with it could reach the host's own services.
    pub allow_internal: bool,
}

#[derive(Debug)]
pub struct Policy {
    access: Access,
    rules: Rules,
    allow_internal: bool,
}

#[derive(Debug)]
enum Access {
    Nothing,
    Everything,
    Allow(Vec<HostPattern>),
    Deny(Vec<HostPattern>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { by: Grant },
    Deny { reason: Refusal },
}

/// What let a destination through, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The allow-list entry, as written, that matched.
    AllowList(String),
    /// A deny-list policy where no entry matched.
    NotDenied,
    /// A policy without access control.
    Open,
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The sandbox has no `proxy_config`.
    NoEgress,
    /// An allow-list policy where no entry matched.
    NotAllowed,
    /// The deny-list entry, as written, that matched.
    DenyList(String),
    /// An internal address or name.
    Internal,
    /// Not a host name or an IP address.
    BadName,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::AllowList(entry) => write!(f, "allow_list entry {entry}"),
            Grant::NotDenied => write!(f, "not in the deny_list"),
            Grant::Open => write!(f, "no access_control"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoEgress => write!(f, "no proxy_config"),
            Refusal::NotAllowed => write!(f, "not in the allow_list"),
            Refusal::DenyList(entry) => write!(f, "deny_list entry {entry}"),
            Refusal::Internal => write!(f, "internal address"),
            Refusal::BadName => write!(f, "not a host name"),
        }
    }
}

impl Policy {
    /// A sandbox without a `proxy_config`: no destination is allowed.
    pub fn no_egress() -> Policy {
        Policy {
            access: Access::Nothing,
            rules: Rules::default(),
            allow_internal: false,
        }
    }

    pub fn compile(
        config: &ProxyConfig,
        secrets: &SecretStore,
        options: Options,
    ) -> Result<Policy, PolicyError> {
        if config.callbacks.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(PolicyError::Callbacks);
        }
        let lists = config.access_control.as_ref();
        let access = match (
            lists.and_then(|a| a.allow_list.as_deref()),
            lists.and_then(|a| a.deny_list.as_deref()),
        ) {
            (Some(_), Some(_)) => return Err(PolicyError::BothLists),
            (Some(allow), None) => Access::Allow(compile_list("allow_list", allow)?),
            (None, Some(deny)) => Access::Deny(compile_list("deny_list", deny)?),
            (None, None) => Access::Everything,
        };
        Ok(Policy {
            access,
            rules: Rules::compile(config.rules.as_deref().unwrap_or_default(), secrets)?,
            allow_internal: options.allow_internal,
        })
    }

    /// Whether the sandbox may connect to `host:port`, `host` as it named it (a name, an IP
    /// address, an IPv6 address in brackets). The addresses a name resolves to are checked
    /// again by [`Policy::check_address`].
    pub fn decide(&self, host: &str, port: u16) -> Decision {
        let Some(host) = Host::parse(host) else {
            return Decision::Deny {
                reason: Refusal::BadName,
            };
        };
        if let Access::Nothing = self.access {
            return Decision::Deny {
                reason: Refusal::NoEgress,
            };
        }
        if !self.allow_internal && is_internal_host(&host) {
            return Decision::Deny {
                reason: Refusal::Internal,
            };
        }
        match &self.access {
            Access::Nothing => Decision::Deny {
                reason: Refusal::NoEgress,
            },
            Access::Everything => Decision::Allow { by: Grant::Open },
            Access::Allow(entries) => match entries.iter().find(|e| e.matches(&host, port)) {
                Some(e) => Decision::Allow {
                    by: Grant::AllowList(e.entry().to_string()),
                },
                None => Decision::Deny {
                    reason: Refusal::NotAllowed,
                },
            },
            Access::Deny(entries) => match entries.iter().find(|e| e.matches(&host, port)) {
                Some(e) => Decision::Deny {
                    reason: Refusal::DenyList(e.entry().to_string()),
                },
                None => Decision::Allow {
                    by: Grant::NotDenied,
                },
            },
        }
    }

    /// Whether the proxy may connect to `ip`, an address an allowed name resolved to: not an
    /// internal one, and none a deny-list's IP or CIDR entry covers (so that a name cannot
    /// reach what its address may not). An allow-list's IP entries admit only destinations
    /// the sandbox named by address: a name is admitted by its name.
    pub fn check_address(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        if !self.allow_internal && is_internal(ip) {
            return Err(Refusal::Internal);
        }
        if let Access::Deny(entries) = &self.access {
            if let Some(e) = entries.iter().find(|e| e.matches_address(ip, port)) {
                return Err(Refusal::DenyList(e.entry().to_string()));
            }
        }
        Ok(())
    }

    /// The header rules: which allowed destinations are intercepted, and how.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }
}

fn compile_list(list: &'static str, entries: &[String]) -> Result<Vec<HostPattern>, PolicyError> {
    entries
        .iter()
        .map(|entry| {
            HostPattern::parse(entry).map_err(|problem| PolicyError::Entry {
                list,
                entry: entry.clone(),
                problem,
            })
        })
        .collect()
}

fn is_internal_host(host: &Host) -> bool {
    match host.ip() {
        Some(ip) => is_internal(ip),
        None => host.name() == "localhost" || host.name().ends_with(".localhost"),
    }
}

/// Addresses that lead into the host, its network or nowhere, never to the internet.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        // Carrier-grade NAT, 100.64.0.0/10: some clouds' metadata services live there.
        || (a == 100 && (64..128).contains(&b))
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (first & 0xffc0) == 0xfe80 // link local, fe80::/10
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(config: serde_json::Value) -> Policy {
        compile(config, Options::default()).unwrap()
    }

    fn compile(config: serde_json::Value, options: Options) -> Result<Policy, PolicyError> {
        Policy::compile(
            &ProxyConfig::from_value(config).unwrap(),
            &SecretStore::default(),
            options,
        )
    }

    fn allowed(policy: &Policy, host: &str) -> bool {
        matches!(policy.decide(host, 443), Decision::Allow { .. })
    }

    #[test]
    fn an_allow_list_admits_only_what_it_matches_and_says_which_entry() {
        let p = policy(json!({"access_control": {"allow_list": [
            "pypi.org", "*.github.com", "~files\\.(pythonhosted|pypi)\\.org", "93.184.216.34", "198.51.100.0/24"
        ]}}));
        assert_eq!(
            p.decide("api.github.com", 443),
            Decision::Allow {
                by: Grant::AllowList("*.github.com".into())
            }
        );
        for host in [
            "pypi.org",
            "files.pythonhosted.org",
            "93.184.216.34",
            "198.51.100.7",
        ] {
            assert!(allowed(&p, host), "{host}");
        }
        for host in ["github.com", "example.com", "93.184.216.35", "198.51.101.1"] {
            assert_eq!(
                p.decide(host, 443),
                Decision::Deny {
                    reason: Refusal::NotAllowed
                },
                "{host}"
            );
        }
    }

    #[test]
    fn an_entry_with_a_port_admits_that_port_only() {
        let p = policy(json!({"access_control": {"allow_list": ["echo.example:7000"]}}));
        assert!(matches!(
            p.decide("echo.example", 7000),
            Decision::Allow { .. }
        ));
        assert_eq!(
            p.decide("echo.example", 7001),
            Decision::Deny {
                reason: Refusal::NotAllowed
            }
        );
    }

    #[test]
    fn an_empty_allow_list_admits_nothing() {
        assert!(!allowed(
            &policy(json!({"access_control": {"allow_list": []}})),
            "example.com"
        ));
    }

    #[test]
    fn a_deny_list_refuses_its_matches_and_admits_the_rest() {
        let p = policy(
            json!({"access_control": {"deny_list": ["*.evil.com", "~.*tracker.*", "203.0.113.0/24"]}}),
        );
        assert_eq!(
            p.decide("x.evil.com", 443),
            Decision::Deny {
                reason: Refusal::DenyList("*.evil.com".into())
            }
        );
        assert!(!allowed(&p, "adtracker.net"));
        assert!(!allowed(&p, "203.0.113.9"));
        assert_eq!(
            p.decide("example.com", 443),
            Decision::Allow {
                by: Grant::NotDenied
            }
        );
        assert_eq!(
            p.check_address("203.0.113.9".parse().unwrap(), 443),
            Err(Refusal::DenyList("203.0.113.0/24".into())),
            "a name resolving into a denied block is refused"
        );
        assert_eq!(
            p.check_address("198.51.100.1".parse().unwrap(), 443),
            Ok(())
        );
    }

    #[test]
    fn no_access_control_is_open_and_no_config_is_closed() {
        let p = policy(json!({"rules": [{"name": "r", "match_hosts": ["api.example.com"]}]}));
        assert_eq!(
            p.decide("anything.example", 443),
            Decision::Allow { by: Grant::Open }
        );
        assert!(p
            .rules()
            .covers(&Host::parse("api.example.com").unwrap(), 443));
        assert!(!p
            .rules()
            .covers(&Host::parse("anything.example").unwrap(), 443));
        assert_eq!(
            policy(json!({"access_control": {}})).decide("a.example", 80),
            Decision::Allow { by: Grant::Open }
        );
        assert_eq!(
            Policy::no_egress().decide("example.com", 443),
            Decision::Deny {
                reason: Refusal::NoEgress
            }
        );
    }

    #[test]
    fn rules_do_not_widen_an_allow_list() {
        let p = policy(json!({
            "rules": [{"name": "r", "match_hosts": ["api.example.com"]}],
            "access_control": {"allow_list": ["pypi.org"]}
        }));
        assert_eq!(
            p.decide("api.example.com", 443),
            Decision::Deny {
                reason: Refusal::NotAllowed
            }
        );
    }

    #[test]
    fn internal_destinations_are_refused_whatever_the_lists_say() {
        let p = policy(json!({"access_control": {"allow_list": ["*", "0.0.0.0/0", "::/0"]}}));
        for host in [
            "127.0.0.1",
            "127.9.9.9",
            "[::1]",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "0.0.0.0",
            "100.100.100.200",
            "localhost",
            "db.localhost",
        ] {
            assert_eq!(
                p.decide(host, 443),
                Decision::Deny {
                    reason: Refusal::Internal
                },
                "{host}"
            );
        }
        assert!(allowed(&p, "172.32.0.1"));
        assert!(allowed(&p, "8.8.8.8"));
        assert_eq!(
            p.check_address("127.0.0.1".parse().unwrap(), 443),
            Err(Refusal::Internal)
        );
        assert_eq!(
            p.check_address("::ffff:10.0.0.1".parse().unwrap(), 443),
            Err(Refusal::Internal)
        );
    }

    #[test]
    fn the_test_override_lets_loopback_through() {
        let p = compile(
            json!({"access_control": {"allow_list": ["localhost", "127.0.0.1"]}}),
            Options {
                allow_internal: true,
            },
        )
        .unwrap();
        assert!(allowed(&p, "localhost"));
        assert!(allowed(&p, "127.0.0.1"));
        assert_eq!(p.check_address("127.0.0.1".parse().unwrap(), 443), Ok(()));
    }

    #[test]
    fn a_bad_name_is_refused() {
        assert_eq!(
            policy(json!({})).decide("a b", 443),
            Decision::Deny {
                reason: Refusal::BadName
            }
        );
    }

    #[test]
    fn compile_errors_say_where() {
        let err = compile(
            json!({"access_control": {"allow_list": ["ok.com", "not ok"]}}),
            Options::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("access_control.allow_list entry \"not ok\": not a host name"),
            "{err}"
        );
        let err = compile(
            json!({"access_control": {"deny_list": ["~("]}}),
            Options::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("deny_list entry \"~(\": not a valid regular expression"),
            "{err}"
        );
        assert!(matches!(
            compile(
                json!({"access_control": {"allow_list": [], "deny_list": []}}),
                Options::default()
            ),
            Err(PolicyError::BothLists)
        ));
        assert!(matches!(
            compile(
                json!({"callbacks": [{"url": "https://x", "ttl_seconds": 60}]}),
                Options::default()
            ),
            Err(PolicyError::Callbacks)
        ));
    }
}
