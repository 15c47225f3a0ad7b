//! Who is asking: API keys, each a tenant's, read from the `--keys` file.
//!
//! The file has one key a line, `TENANT KEY [max_boxes=N]`; blank lines and lines starting
//! with `#` are skipped. A tenant may have several keys. Every request, the data plane's
//! included, carries its key in `X-Api-Key` (what the SDK sends); it is compared with every
//! key of the file in constant time (padded to a fixed length, nothing returned early), so
//! the time an answer takes says nothing about how close a guess was. Without a keys file the
//! server has one tenant, `default`, and asks for no key (it then listens on loopback only).

use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The header the SDK sends its key in.
pub const KEY_HEADER: &str = "x-api-key";

/// Keys longer than this are refused: every key is compared over this many bytes.
const MAX_KEY: usize = 256;

/// Tenant of the server without a keys file.
pub const OPEN_TENANT: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// How many sandboxes it may have at once.
    pub max_boxes: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    tenant: usize,
    padded: [u8; MAX_KEY],
    len: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenants {
    tenants: Vec<Tenant>,
    keys: Vec<Key>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("line {line}: expected `TENANT KEY [max_boxes=N]`")]
    Syntax { line: usize },
    #[error("line {line}: keys are 16 to {MAX_KEY} bytes")]
    KeyLength { line: usize },
    #[error("line {line}: the key is already another tenant's, or repeated")]
    Duplicate { line: usize },
    #[error("the keys file holds no key")]
    Empty,
}

fn pad(key: &[u8]) -> [u8; MAX_KEY] {
    let mut padded = [0u8; MAX_KEY];
    let n = key.len().min(MAX_KEY);
    padded[..n].copy_from_slice(&key[..n]);
    padded
}

impl Tenants {
    /// No keys: one tenant, which every request is.
    pub fn open() -> Tenants {
        Tenants::default()
    }

    pub fn parse(text: &str) -> Result<Tenants, KeysError> {
        let mut tenants = Tenants::default();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (name, key, options) = match fields.as_slice() {
                [name, key, options @ ..] if options.len() <= 1 => (*name, *key, options),
                _ => return Err(KeysError::Syntax { line: line_no }),
            };
            let max_boxes = match options.first() {
                None => None,
                Some(o) => match o.strip_prefix("max_boxes=").and_then(|n| n.parse().ok()) {
                    Some(n) => Some(n),
                    None => return Err(KeysError::Syntax { line: line_no }),
                },
            };
            if !(16..=MAX_KEY).contains(&key.len()) {
                return Err(KeysError::KeyLength { line: line_no });
            }
            if tenants
                .keys
                .iter()
                .any(|k| k.padded == pad(key.as_bytes()) && k.len == key.len() as u64)
            {
                return Err(KeysError::Duplicate { line: line_no });
            }
            let tenant = match tenants.tenants.iter().position(|t| t.name == name) {
                Some(t) => {
                    if max_boxes.is_some() {
                        tenants.tenants[t].max_boxes = max_boxes;
                    }
                    t
                }
                None => {
                    tenants.tenants.push(Tenant {
                        name: name.to_string(),
                        max_boxes,
                    });
                    tenants.tenants.len() - 1
                }
            };
            tenants.keys.push(Key {
                tenant,
                padded: pad(key.as_bytes()),
                len: key.len() as u64,
            });
        }
        if tenants.keys.is_empty() {
            return Err(KeysError::Empty);
        }
        Ok(tenants)
    }

    /// Whether requests need a key.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The tenant whose key `given` is (`None`: no header).
    pub fn authenticate(&self, given: Option<&[u8]>) -> Option<Tenant> {
        if !self.required() {
            return Some(Tenant {
                name: OPEN_TENANT.into(),
                max_boxes: None,
            });
        }
        let given = given?;
        let padded = pad(given);
        let fits = (given.len() as u64).ct_eq(&(given.len().min(MAX_KEY) as u64));
        let mut found = subtle::Choice::from(0);
        let mut tenant = 0u64;
        for key in &self.keys {
            let hit = key.padded.ct_eq(&padded) & key.len.ct_eq(&(given.len() as u64)) & fits;
            tenant.conditional_assign(&(key.tenant as u64), hit);
            found |= hit;
        }
        bool::from(found).then(|| self.tenants[tenant as usize].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "key-of-alice-0123456789";
    const B: &str = "key-of-bob-9876543210";

    #[test]
    fn keys_name_their_tenant_and_nothing_else_does() {
        let text = format!("# tenants\n\nalice {A} max_boxes=3\nbob   {B}\nalice {A}x\n");
        let t = Tenants::parse(&text).unwrap();
        assert!(t.required());
        let alice = Tenant {
            name: "alice".into(),
            max_boxes: Some(3),
        };
        assert_eq!(t.authenticate(Some(A.as_bytes())), Some(alice.clone()));
        assert_eq!(
            t.authenticate(Some(format!("{A}x").as_bytes())),
            Some(alice)
        );
        assert_eq!(t.authenticate(Some(B.as_bytes())).unwrap().name, "bob");
        for wrong in [&A[..A.len() - 1], "", "key-of-alice-0123456788"] {
            assert_eq!(t.authenticate(Some(wrong.as_bytes())), None, "{wrong:?}");
        }
        let long = format!("{A}{}", "\0".repeat(MAX_KEY));
        assert_eq!(
            t.authenticate(Some(long.as_bytes())),
            None,
            "a key padded past the compared length"
        );
        assert_eq!(t.authenticate(None), None);
    }

    #[test]
    fn bad_files_are_refused_naming_the_line() {
        assert_eq!(
            Tenants::parse("alice\n"),
            Err(KeysError::Syntax { line: 1 })
        );
        assert_eq!(
            Tenants::parse(&format!("\nalice {A} quota\n")),
            Err(KeysError::Syntax { line: 2 })
        );
        assert_eq!(
            Tenants::parse("alice short"),
            Err(KeysError::KeyLength { line: 1 })
        );
        assert_eq!(
            Tenants::parse(&format!("alice {A}\nbob {A}")),
            Err(KeysError::Duplicate { line: 2 })
        );
        assert_eq!(Tenants::parse("# none\n"), Err(KeysError::Empty));
    }

    #[test]
    fn without_keys_everyone_is_the_default_tenant() {
        let t = Tenants::open();
        assert!(!t.required());
        assert_eq!(t.authenticate(None).unwrap().name, OPEN_TENANT);
        assert_eq!(t.authenticate(Some(b"anything")).unwrap().name, OPEN_TENANT);
    }
}
