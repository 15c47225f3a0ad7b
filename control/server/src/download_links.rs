//! Download links (the SDK's `generate_download_url`): each opens one file of one box, to
//! anyone holding its URL, with no API key (tokens as `grants` makes them). A link is pinned
//! to its box, its absolute path and the headers it serves the file with, none of which its
//! URL can change; it ends at its expiry if it has one, and in any case with its box (a
//! delete revokes it). Links outlive a restart of the server, as their boxes do: they are
//! kept in the registry (its file is the server's own, 0600), so that a link minted to never
//! expire does not end with the process.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::grants::{Grants, Held, Refusal};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub box_id: String,
    /// Absolute, resolved when the link was minted.
    pub path: String,
    pub content_type: Option<String>,
    /// `attachment` or `inline`.
    pub disposition: Option<String>,
    /// Ms since the epoch; none for a link that lasts as long as its box.
    pub expires_ms: Option<u64>,
}

#[derive(Default)]
pub struct DownloadLinks {
    grants: Grants<Link>,
    /// Counts mints and revocations, for the registry's saver.
    changes: AtomicU64,
}

impl DownloadLinks {
    /// The links a previous run of the server saved.
    pub fn with(held: Vec<Held<Link>>) -> DownloadLinks {
        DownloadLinks { grants: Grants::with(held), ..DownloadLinks::default() }
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// A new link's token. Expired links are dropped on the way.
    pub fn mint(&self, link: Link) -> String {
        let now = now_ms();
        self.grants.retain(|l| l.expires_ms.is_none_or(|e| e > now));
        let token = self.grants.mint(link);
        self.changes.fetch_add(1, Ordering::AcqRel);
        token
    }

    /// The link `token` opens now.
    pub fn check(&self, token: &str) -> Result<Link, Refusal> {
        let link = self.grants.check(token).ok_or(Refusal::Invalid)?;
        match link.expires_ms {
            Some(e) if now_ms() >= e => Err(Refusal::Expired),
            _ => Ok(link),
        }
    }

    /// Ends every link of box `box_id`; returns how many.
    pub fn revoke_box(&self, box_id: &str) -> usize {
        let gone = self.grants.retain(|l| l.box_id != box_id);
        if gone > 0 {
            self.changes.fetch_add(1, Ordering::AcqRel);
        }
        gone
    }

    /// Every link, with its token, for the registry.
    pub fn all(&self) -> Vec<Held<Link>> {
        self.grants.all()
    }
}

/// The last segment of a link's URL: the file's name, so that a client that saves what it
/// fetches under the URL's name (`curl -O`, `wget`, a browser) names it as the box does.
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("download")
}

/// `s` with every byte but RFC 3986's unreserved ones percent-encoded (a path segment, and
/// RFC 8187's `filename*`).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `Content-Disposition` value of `kind` (`attachment`, `inline`) for a file `name`: an
/// ASCII `filename` for old clients and the exact one in `filename*` (RFC 6266).
pub fn disposition(kind: &str, name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    format!("{kind}; filename=\"{plain}\"; filename*=UTF-8''{}", percent_encode(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(box_id: &str, expires_ms: Option<u64>) -> Link {
        Link { box_id: box_id.into(), path: "/a/b.txt".into(), content_type: None, disposition: None, expires_ms }
    }

    #[test]
    fn a_link_opens_until_it_expires_or_its_box_goes() {
        let links = DownloadLinks::default();
        let forever = links.mint(link("box-a", None));
        let later = links.mint(link("box-a", Some(now_ms() + 60_000)));
        let past = links.mint(link("box-b", Some(now_ms() - 1)));
        assert_eq!(links.check(&forever), Ok(link("box-a", None)));
        assert!(links.check(&later).is_ok());
        assert_eq!(links.check(&past), Err(Refusal::Expired));
        assert_eq!(links.check("nope.nope"), Err(Refusal::Invalid));
        let before = links.changes();
        assert_eq!(links.revoke_box("box-a"), 2);
        assert!(links.changes() > before, "a revocation is saved");
        assert_eq!(links.check(&forever), Err(Refusal::Invalid));
        links.mint(link("box-c", None));
        assert_eq!(links.check(&past), Err(Refusal::Invalid), "a mint drops the expired");
    }

    #[test]
    fn names_and_dispositions_are_safe_in_urls_and_headers() {
        assert_eq!(file_name("/srv/out/report.pdf"), "report.pdf");
        assert_eq!(file_name("/"), "download");
        assert_eq!(percent_encode("a b/ü.txt"), "a%20b%2F%C3%BC.txt");
        assert_eq!(
            disposition("attachment", "r\"é.txt"),
            "attachment; filename=\"r__.txt\"; filename*=UTF-8''r%22%C3%A9.txt"
        );
    }
}
