//! Bearer tokens that each open one grant (a service URL's port, a download link's file). A
//! token is `ID.SECRET`: the id (public, a map key) finds its grant, and the secret (from the
//! OS's random source through uuid v4, 244 bits) is compared with the grant's in constant
//! time, so that timing tells nothing of it.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Why a token does not open what it was shown for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, a token of something else, or a wrong secret.
    Invalid,
    Expired,
}

/// A grant with its token's id and secret, as kept (and saved, where its kind outlives the
/// server: see `download_links`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held<G> {
    pub id: String,
    pub secret: String,
    #[serde(flatten)]
    pub grant: G,
}

pub struct Grants<G> {
    held: Mutex<HashMap<String, Held<G>>>,
}

impl<G> Default for Grants<G> {
    fn default() -> Self {
        Grants { held: Mutex::new(HashMap::new()) }
    }
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl<G: Clone> Grants<G> {
    /// Grants already made (a restarted server's).
    pub fn with(held: Vec<Held<G>>) -> Grants<G> {
        Grants { held: Mutex::new(held.into_iter().map(|h| (h.id.clone(), h)).collect()) }
    }

    /// A new token for `grant`.
    pub fn mint(&self, grant: G) -> String {
        let (id, secret) = (random_hex(), format!("{}{}", random_hex(), random_hex()));
        let token = format!("{id}.{secret}");
        self.held.lock().unwrap().insert(id.clone(), Held { id, secret, grant });
        token
    }

    /// The grant `token` opens, if its secret is right.
    pub fn check(&self, token: &str) -> Option<G> {
        let (id, secret) = token.split_once('.')?;
        let held = self.held.lock().unwrap().get(id).cloned()?;
        let right: bool = held.secret.as_bytes().ct_eq(secret.as_bytes()).into();
        right.then_some(held.grant)
    }

    /// Keeps only the grants `keep` holds of; returns how many went.
    pub fn retain(&self, mut keep: impl FnMut(&G) -> bool) -> usize {
        let mut held = self.held.lock().unwrap();
        let before = held.len();
        held.retain(|_, h| keep(&h.grant));
        before - held.len()
    }

    /// Every grant, with its token's id and secret.
    pub fn all(&self) -> Vec<Held<G>> {
        self.held.lock().unwrap().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_grant_only_with_its_own_secret() {
        let grants = Grants::default();
        let t = grants.mint("a");
        let u = grants.mint("b");
        assert_eq!((grants.check(&t), grants.check(&u)), (Some("a"), Some("b")));
        let (id, secret) = t.split_once('.').unwrap();
        let mut wrong = secret.to_string().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(grants.check(&format!("{id}.{}", String::from_utf8(wrong).unwrap())), None);
        assert_eq!(grants.check(&format!("{id}.")), None);
        assert_eq!(grants.check(id), None);
        assert_eq!(grants.retain(|g| *g != "a"), 1);
        assert_eq!(grants.check(&t), None);
        let again = Grants::with(grants.all());
        assert_eq!(again.check(&u), Some("b"), "a saved grant opens as before");
    }
}
