//! The state file's layout: a fixed header, then the postcard-encoded [`SnapshotState`].
//!
//! ```text
//! offset  size  field
//!      0     8  magic "EMBERSNP"
//!      8     4  format version (little endian)
//!     12     8  body length in bytes (little endian)
//!     20     4  CRC-32 (IEEE) of the body (little endian)
//!     24     -  body: SnapshotState, postcard
//! ```
//!
//! The version is checked before the checksum, so a file from another ember version is named as
//! such rather than as corrupt. The version changes whenever the body's encoding does: postcard
//! is not self-describing, so there is no reading another version's body.

use std::path::Path;

use super::state::SnapshotState;
use super::SnapshotError;

pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// The state file format this ember writes and reads.
pub const FORMAT_VERSION: u32 = 4;
pub const HEADER_LEN: usize = 24;

pub fn encode(state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    let body = postcard::to_stdvec(state).map_err(SnapshotError::Encode)?;
    let mut file = Vec::with_capacity(HEADER_LEN + body.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(body.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    file.extend_from_slice(&body);
    Ok(file)
}

/// Decodes the bytes of the state file at `path` (the path only names it in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt { path: path.to_owned(), reason };
    if bytes.len() < HEADER_LEN {
        if !bytes.is_empty() && !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Err(SnapshotError::NotAStateFile(path.to_owned()));
        }
        return Err(SnapshotError::Truncated { path: path.to_owned(), len: bytes.len() as u64, expected: HEADER_LEN as u64 });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if header[..8] != MAGIC {
        return Err(SnapshotError::NotAStateFile(path.to_owned()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path: path.to_owned(), version });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    let expected = HEADER_LEN as u64 + len;
    if (bytes.len() as u64) < expected {
        return Err(SnapshotError::Truncated { path: path.to_owned(), len: bytes.len() as u64, expected });
    }
    if bytes.len() as u64 > expected {
        return Err(corrupt(format!("{} bytes follow the {len}-byte body", bytes.len() as u64 - expected)));
    }
    let crc = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (state, rest) = postcard::take_from_bytes::<SnapshotState>(body)
        .map_err(|e| corrupt(format!("the body does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} bytes after the state", rest.len())));
    }
    Ok(state)
}
