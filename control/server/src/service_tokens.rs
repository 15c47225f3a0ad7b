//! The tokens of service URLs: each grants HTTP access to one port of one box until it
//! expires or is revoked (tokens as `grants` makes them). They live in the server's memory
//! only: a restarted server, a deleted box, or a revocation ends them, and a box forked or
//! restored from another is a box of its own, with none of its parent's.

use crate::clock::now_ms;
use crate::grants::{Grants, Refusal};

/// The longest a token may live (the SDK's own bound).
pub const MAX_TTL_SECONDS: u64 = 86_400;

#[derive(Debug, Clone)]
struct Grant {
    box_id: String,
    port: u16,
    expires_ms: u64,
}

#[derive(Default)]
pub struct ServiceTokens {
    grants: Grants<Grant>,
}

impl ServiceTokens {
    /// A new token for `port` of box `box_id`, valid for `ttl_seconds`; returns it and its
    /// expiry (ms since the epoch). Expired grants are dropped on the way.
    pub fn mint(&self, box_id: &str, port: u16, ttl_seconds: u64) -> (String, u64) {
        let now = now_ms();
        let expires_ms = now + ttl_seconds.min(MAX_TTL_SECONDS) * 1000;
        self.grants.retain(|g| g.expires_ms > now);
        (self.grants.mint(Grant { box_id: box_id.into(), port, expires_ms }), expires_ms)
    }

    /// Whether `token` opens `port` of box `box_id` now.
    pub fn check(&self, token: &str, box_id: &str, port: u16) -> Result<(), Refusal> {
        let grant = self.grants.check(token).ok_or(Refusal::Invalid)?;
        if grant.box_id != box_id || grant.port != port {
            return Err(Refusal::Invalid);
        }
        if now_ms() >= grant.expires_ms {
            return Err(Refusal::Expired);
        }
        Ok(())
    }

    /// Ends every token of box `box_id` (of its `port` only, if given); returns how many.
    pub fn revoke(&self, box_id: &str, port: Option<u16>) -> usize {
        self.grants.retain(|g| g.box_id != box_id || port.is_some_and(|p| p != g.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_own_box_and_port_only_until_revoked() {
        let tokens = ServiceTokens::default();
        let (t, _) = tokens.mint("box-a", 8000, 60);
        assert_eq!(tokens.check(&t, "box-a", 8000), Ok(()));
        assert_eq!(tokens.check(&t, "box-a", 8001), Err(Refusal::Invalid));
        assert_eq!(tokens.check(&t, "box-b", 8000), Err(Refusal::Invalid));
        let (id, secret) = t.split_once('.').unwrap();
        let mut wrong = secret.to_string().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        let wrong = format!("{id}.{}", String::from_utf8(wrong).unwrap());
        assert_eq!(tokens.check(&wrong, "box-a", 8000), Err(Refusal::Invalid));
        assert_eq!(tokens.check("garbage", "box-a", 8000), Err(Refusal::Invalid));
        let (other, _) = tokens.mint("box-a", 9000, 60);
        assert_eq!(tokens.revoke("box-a", Some(8000)), 1);
        assert_eq!(tokens.check(&t, "box-a", 8000), Err(Refusal::Invalid));
        assert_eq!(tokens.check(&other, "box-a", 9000), Ok(()));
    }

    #[test]
    fn an_expired_token_is_told_apart() {
        let tokens = ServiceTokens::default();
        let (t, _) = tokens.mint("box-a", 8000, 0);
        assert_eq!(tokens.check(&t, "box-a", 8000), Err(Refusal::Expired));
    }
}
