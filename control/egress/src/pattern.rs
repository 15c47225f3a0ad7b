//! The patterns a `proxy_config` names destinations and paths with: host patterns for
//! `access_control` lists and rules' `match_hosts`, path patterns for `match_paths`.
//!
//! Host names compare case-insensitively and without a trailing dot. A glob's `*` matches any
//! run of characters, dots included, so `*.github.com` covers `api.github.com` and
//! `a.b.github.com` but not `github.com` itself (list both for both). A `~regex` must match
//! the whole name. IP and CIDR entries match destinations given as IP addresses, and a
//! deny-list's also match the addresses a name resolves to (see `policy`).
//!
//! ember adds one form to the SDK's: an entry other than a regex may end in `:PORT`
//! (`db.example.com:5432`, `*.example.com:443`, `10.0.0.0/8:22`, `[2001:db8::1]:443`), and then
//! matches that port only; without one it matches every port.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

/// A destination as the sandbox named it: a host name, or an IP address (IPv4-mapped IPv6
/// addresses read as IPv4, so that `::ffff:127.0.0.1` is loopback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    name: String,
    ip: Option<IpAddr>,
}

impl Host {
    /// `None` for what is not a host name or an IP address (brackets around IPv6 allowed).
    pub fn parse(text: &str) -> Option<Host> {
        let bare = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            return Some(Host {
                name: ip.to_string(),
                ip: Some(ip),
            });
        }
        let name = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        valid.then_some(Host { name, ip: None })
    }

    /// Lowercase, no trailing dot; an IP address in its canonical text.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }
}

/// One entry of an access list or of a rule's `match_hosts`.
#[derive(Debug, Clone)]
pub struct HostPattern {
    entry: String,
    kind: HostKind,
    port: Option<u16>,
}

#[derive(Debug, Clone)]
enum HostKind {
    Exact(String),
    Glob(Regex),
    Regex(Regex),
    Ip(IpAddr),
    Cidr(IpNet),
}

/// Bounds what compiling one user-given regex may cost.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl HostPattern {
    /// The error says what is wrong with `entry`; the caller says where it was.
    pub fn parse(entry: &str) -> Result<HostPattern, String> {
        if let Some(pattern) = entry.strip_prefix('~') {
            return Ok(HostPattern {
                entry: entry.to_string(),
                kind: HostKind::Regex(whole_name_regex(pattern)?),
                port: None,
            });
        }
        let (text, port) = split_port(entry)?;
        let kind = if let Ok(ip) = text.parse::<IpAddr>() {
            HostKind::Ip(ip.to_canonical())
        } else if let Ok(net) = text.parse::<IpNet>() {
            HostKind::Cidr(net)
        } else if text.contains('*') {
            let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
            if !name.bytes().all(|b| is_name_byte(b) || b == b'*') {
                return Err(not_a_pattern());
            }
            let pattern = name
                .split('*')
                .map(regex::escape)
                .collect::<Vec<_>>()
                .join(".*");
            HostKind::Glob(whole_name_regex(&pattern)?)
        } else {
            match Host::parse(text) {
                Some(host) => HostKind::Exact(host.name),
                None => return Err(not_a_pattern()),
            }
        };
        Ok(HostPattern {
            entry: entry.to_string(),
            kind,
            port,
        })
    }

    /// The entry as the config wrote it, for audit lines and messages.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    pub fn matches(&self, host: &Host, port: u16) -> bool {
        match &self.kind {
            HostKind::Exact(name) => *name == host.name && self.port_matches(port),
            HostKind::Glob(regex) | HostKind::Regex(regex) => {
                regex.is_match(&host.name) && self.port_matches(port)
            }
            HostKind::Ip(_) | HostKind::Cidr(_) => {
                host.ip.is_some_and(|ip| self.matches_address(ip, port))
            }
        }
    }

    /// Only IP and CIDR entries match an address; names say nothing about one.
    pub fn matches_address(&self, ip: IpAddr, port: u16) -> bool {
        let ip = ip.to_canonical();
        let address = match &self.kind {
            HostKind::Ip(entry) => *entry == ip,
            HostKind::Cidr(net) => net.contains(&ip),
            _ => false,
        };
        address && self.port_matches(port)
    }

    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// `entry` without its `:PORT`, and the port. A bare IPv6 address or block (colons, no
/// brackets) has none.
fn split_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(not_a_pattern)?;
        return match after {
            "" => Ok((address, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((address, Some(parse_port(port)?))),
                None => Err(not_a_pattern()),
            },
        };
    }
    match entry.rsplit_once(':') {
        Some((text, port)) if !text.contains(':') => Ok((text, Some(parse_port(port)?))),
        _ => Ok((entry, None)),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?} is not a port"))
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

fn not_a_pattern() -> String {
    "not a host name, glob, IP address, CIDR block or ~regex".to_string()
}

fn whole_name_regex(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(true)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("not a valid regular expression: {e}"))
}

/// One entry of a rule's `match_paths`, in the SDK's forms: `/v1/runs` (exact), `/v1/*` or
/// `/v1/**` (prefix `/v1`, which also matches `/v10`), `*/runs` (suffix `runs`, which also
/// matches `/v1/xruns`), `*` (every path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl PathPattern {
    pub fn parse(entry: &str) -> Result<PathPattern, String> {
        if entry == "*" {
            return Ok(PathPattern::Any);
        }
        let prefix = entry
            .strip_suffix("/**")
            .or_else(|| entry.strip_suffix("/*"));
        let (pattern, rest) = match (prefix, entry.strip_prefix("*/")) {
            (Some(prefix), _) => (PathPattern::Prefix(prefix.to_string()), prefix),
            (None, Some(suffix)) => (PathPattern::Suffix(suffix.to_string()), suffix),
            (None, None) => (PathPattern::Exact(entry.to_string()), entry),
        };
        if rest.contains('*') {
            return Err("a wildcard in the middle of a path is not supported".to_string());
        }
        if matches!(pattern, PathPattern::Exact(_) | PathPattern::Prefix(_))
            && !entry.starts_with('/')
        {
            return Err("a path starts with /".to_string());
        }
        Ok(pattern)
    }

    /// `path` is a request's path without its query. A path that is not canonical matches
    /// no pattern, so that `/public/../admin` cannot borrow `/public/*`'s credential.
    pub fn matches(&self, path: &str) -> bool {
        if !is_canonical(path) {
            return false;
        }
        match self {
            PathPattern::Exact(exact) => path == exact,
            PathPattern::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathPattern::Suffix(suffix) => path.ends_with(suffix.as_str()),
            PathPattern::Any => true,
        }
    }
}

/// No `.` or `..` segment, no empty segment, no backslash, no percent-encoded slash,
/// backslash or dot: the forms by which two spellings name one resource.
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let lower = path.to_ascii_lowercase();
    let encoded = ["%2f", "%5c", "%2e"].iter().any(|e| lower.contains(e));
    // A trailing slash (an empty last segment) is canonical; an empty one elsewhere is not.
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    let segments_ok = segments
        .iter()
        .enumerate()
        .all(|(i, s)| *s != "." && *s != ".." && (i == last || !s.is_empty()));
    !encoded && !path.contains('\\') && segments_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> Host {
        Host::parse(text).unwrap()
    }

    fn matches(entry: &str, destination: &str) -> bool {
        HostPattern::parse(entry)
            .unwrap()
            .matches(&host(destination), 443)
    }

    #[test]
    fn exact_names_ignore_case_and_a_trailing_dot() {
        assert!(matches("pypi.org", "PyPI.org."));
        assert!(!matches("pypi.org", "files.pypi.org"));
        assert!(!matches("pypi.org", "pypi.org.evil.com"));
    }

    #[test]
    fn a_glob_covers_subdomains_at_any_depth_but_not_the_domain() {
        assert!(matches("*.github.com", "api.github.com"));
        assert!(matches("*.github.com", "a.b.github.com"));
        assert!(!matches("*.github.com", "github.com"));
        assert!(!matches("*.github.com", "evilgithub.com"));
        assert!(!matches("*.github.com", "api.github.com.evil.com"));
        assert!(matches("*", "anything.example"));
        assert!(matches("api-*.example.com", "api-eu.example.com"));
    }

    #[test]
    fn a_regex_must_match_the_whole_name() {
        assert!(matches(r"~pypi\.(org|io)", "pypi.org"));
        assert!(!matches(r"~pypi\.(org|io)", "pypi.org.evil.com"));
        assert!(!matches(r"~pypi\.(org|io)", "notpypi.org"));
        assert!(matches(r"~.*\.PYPI\.org", "files.pypi.org"));
    }

    #[test]
    fn ips_and_cidrs_match_addresses_only() {
        assert!(matches("93.184.216.34", "93.184.216.34"));
        assert!(!matches("93.184.216.34", "93.184.216.35"));
        assert!(matches("10.1.0.0/16", "10.1.200.3"));
        assert!(!matches("10.1.0.0/16", "10.2.0.1"));
        assert!(matches("2001:db8::/32", "[2001:db8::1]"));
        assert!(matches("127.0.0.0/8", "::ffff:127.0.0.1"));
        let cidr = HostPattern::parse("10.0.0.0/8").unwrap();
        assert!(!cidr.matches(&host("ten.example"), 443));
        assert!(cidr.matches_address("10.9.9.9".parse().unwrap(), 443));
        assert!(!HostPattern::parse("example.com")
            .unwrap()
            .matches_address("10.9.9.9".parse().unwrap(), 443));
    }

    #[test]
    fn an_entry_with_a_port_matches_that_port_only() {
        for (entry, destination) in [
            ("db.example.com:5432", "db.example.com"),
            ("*.example.com:5432", "db.example.com"),
            ("10.0.0.0/8:5432", "10.1.2.3"),
            ("192.0.2.1:5432", "192.0.2.1"),
            ("[2001:db8::1]:5432", "2001:db8::1"),
        ] {
            let pattern = HostPattern::parse(entry).unwrap();
            assert!(pattern.matches(&host(destination), 5432), "{entry}");
            assert!(!pattern.matches(&host(destination), 443), "{entry}");
        }
        assert!(HostPattern::parse("[2001:db8::1]")
            .unwrap()
            .matches(&host("2001:db8::1"), 1));
        assert!(HostPattern::parse("2001:db8::/32")
            .unwrap()
            .matches(&host("2001:db8::1"), 1));
        for bad in ["a.com:0", "a.com:http", "a.com:70000", "[::1]x"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_entry_that_is_nothing_says_so() {
        for bad in [
            "",
            "exa mple.com",
            "https//example.com",
            "a..b",
            "*.exa mple.com",
        ] {
            let err = HostPattern::parse(bad).unwrap_err();
            assert!(err.contains("not a host name"), "{bad}: {err}");
        }
        let err = HostPattern::parse("http://example.com").unwrap_err();
        assert!(err.contains("is not a port"), "{err}");
        let err = HostPattern::parse("~(unclosed").unwrap_err();
        assert!(err.contains("not a valid regular expression"), "{err}");
    }

    #[test]
    fn host_parse_refuses_what_is_not_a_name() {
        assert_eq!(Host::parse("Example.COM.").unwrap().name(), "example.com");
        assert_eq!(
            Host::parse("[::1]").unwrap().ip(),
            Some("::1".parse().unwrap())
        );
        for bad in ["", ".", "a b", "a/b", "a..b", "host:80"] {
            assert!(Host::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn path_patterns_in_the_sdk_forms() {
        let exact = PathPattern::parse("/v1/runs").unwrap();
        assert!(exact.matches("/v1/runs"));
        assert!(!exact.matches("/v1/runs/1"));

        let prefix = PathPattern::parse("/v1/*").unwrap();
        assert_eq!(prefix, PathPattern::parse("/v1/**").unwrap());
        assert!(prefix.matches("/v1/runs"));
        assert!(
            prefix.matches("/v10"),
            "the SDK documents /v1 matching /v10"
        );
        assert!(!prefix.matches("/v2/runs"));

        let suffix = PathPattern::parse("*/runs").unwrap();
        assert!(suffix.matches("/v1/runs"));
        assert!(suffix.matches("/v1/xruns"));
        assert!(!suffix.matches("/v1/runs/1"));

        assert!(PathPattern::parse("*").unwrap().matches("/anything/at/all"));
        assert!(PathPattern::parse("/").unwrap().matches("/"));
    }

    #[test]
    fn path_patterns_refuse_middle_wildcards_and_relative_paths() {
        assert!(PathPattern::parse("/v1/*/runs")
            .unwrap_err()
            .contains("middle"));
        assert!(PathPattern::parse("v1/runs")
            .unwrap_err()
            .contains("starts with /"));
    }

    #[test]
    fn a_path_that_is_not_canonical_matches_nothing() {
        let any = PathPattern::parse("/public/*").unwrap();
        assert!(any.matches("/public/x/"), "a trailing slash is canonical");
        for bad in [
            "/public/../admin",
            "/public/./x",
            "/public//x",
            "/public\\x",
            "/public/%2e%2e/admin",
            "/public/a%2Fb",
            "/public/a%5cb",
            "public/x",
        ] {
            assert!(!any.matches(bad), "{bad}");
            assert!(!PathPattern::Any.matches(bad), "{bad}");
        }
    }
}
