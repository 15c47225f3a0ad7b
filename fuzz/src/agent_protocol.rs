//! The agent protocol's decoder, both ways: the bytes as one payload (a request, a reply, the
//! leading id of an unknown variant), and as a stream of frames read in pieces of a size the
//! input picks. Whatever decodes encodes back to itself, and a frame's buffer never holds
//! much more than what has arrived.

use std::io::Read;

use agent_protocol::{decode, encode, leading_id, read_frame, FrameError, Reply, Request, FIRST_STEP, MAX_DISCARD};

/// A reader that hands over at most `step` bytes per read.
pub struct Trickle<'a> {
    pub data: &'a [u8],
    pub step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn round_trip<T>(payload: &[u8])
where
    T: for<'a> serde::Deserialize<'a> + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = decode::<T>(payload) {
        // A message too large for one frame cannot have come in one.
        let frame = encode(&msg).expect("a decoded message encodes");
        let back: T = decode(&frame[4..]).expect("an encoded message decodes");
        assert_eq!(back, msg, "a message changed through encode and decode");
    }
}

pub fn run(data: &[u8]) {
    round_trip::<Request>(data);
    round_trip::<Reply>(data);
    let _ = leading_id(data);
    let Some((&step, stream)) = data.split_first() else { return };
    let mut r = Trickle { data: stream, step: usize::from(step % 32) + 1 };
    let mut buf = Vec::new();
    loop {
        let before = r.data.len();
        let held = buf.capacity();
        let got = read_frame(&mut r, &mut buf);
        let arrived = before - r.data.len();
        assert!(
            buf.capacity() <= held.max(2 * arrived + FIRST_STEP),
            "{} bytes held for a frame of which {arrived} bytes arrived",
            buf.capacity()
        );
        match got {
            Ok(()) => {
                round_trip::<Request>(&buf);
                round_trip::<Reply>(&buf);
            }
            Err(FrameError::TooLarge(n)) if n <= MAX_DISCARD => {}
            Err(_) => break,
        }
    }
}
