//! A command's output as the data plane keeps it: [`OutputLog`], the chunks of stdout and
//! stderr in the order they came, each stream counted in bytes from 0 (the offsets the SDK
//! resumes from); and [`Utf8Splitter`], which turns a stream's bytes into the text frames the
//! WebSocket carries without moving those offsets.
//!
//! The log is bounded: it holds what no client has been sent yet (at most `capacity` bytes:
//! the command is held back past that, see `commands`) and, within the same bound, what was
//! sent, for a client that reconnects from an earlier offset. A reconnect from before what is
//! kept resumes from the oldest byte kept.

use std::collections::VecDeque;

use crate::backend::Stream;

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub stream: Stream,
    pub offset: u64,
    pub data: Vec<u8>,
}

pub struct OutputLog {
    chunks: VecDeque<Piece>,
    end: [u64; 2],
    acked: [u64; 2],
    buffered: usize,
    capacity: usize,
}

impl OutputLog {
    pub fn new(capacity: usize) -> OutputLog {
        OutputLog {
            chunks: VecDeque::new(),
            end: [0; 2],
            acked: [0; 2],
            buffered: 0,
            capacity,
        }
    }

    /// Bytes written that no client has been sent.
    pub fn unacked(&self) -> u64 {
        (self.end[0] - self.acked[0]) + (self.end[1] - self.acked[1])
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Each stream's length so far.
    pub fn end(&self) -> [u64; 2] {
        self.end
    }

    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let s = index(stream);
        self.chunks.push_back(Piece {
            stream,
            offset: self.end[s],
            data: data.to_vec(),
        });
        self.end[s] += data.len() as u64;
        self.buffered += data.len();
        // Sent output goes first; unsent output only past twice the bound, which the writer's
        // hold-back keeps from happening unless one stream's reader lags the other's for ever.
        while self.buffered > self.capacity {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let sent = front.offset + front.data.len() as u64 <= self.acked[index(front.stream)];
            if !sent && self.buffered <= 2 * self.capacity {
                break;
            }
            self.buffered -= front.data.len();
            self.chunks.pop_front();
        }
    }

    /// A client has `stream`'s bytes before `offset`.
    pub fn ack(&mut self, stream: Stream, offset: u64) {
        let s = index(stream);
        self.acked[s] = self.acked[s].max(offset.min(self.end[s]));
    }

    /// What follows `cursor` (each stream's next offset), in the order it came, at most about
    /// `max` bytes, consecutive pieces of one stream joined; `cursor` moves past it. A cursor
    /// before what is kept jumps to the oldest byte kept.
    pub fn read(&self, cursor: &mut [u64; 2], max: usize) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        let mut taken = 0;
        for chunk in &self.chunks {
            if taken >= max {
                break;
            }
            let s = index(chunk.stream);
            let chunk_end = chunk.offset + chunk.data.len() as u64;
            if chunk_end <= cursor[s] {
                continue;
            }
            let from = cursor[s].max(chunk.offset);
            let skip = (from - chunk.offset) as usize;
            let take = (chunk.data.len() - skip).min(max - taken);
            let data = &chunk.data[skip..skip + take];
            match out.last_mut() {
                Some(last)
                    if last.stream == chunk.stream
                        && last.offset + last.data.len() as u64 == from =>
                {
                    last.data.extend_from_slice(data)
                }
                _ => out.push(Piece {
                    stream: chunk.stream,
                    offset: from,
                    data: data.to_vec(),
                }),
            }
            cursor[s] = from + take as u64;
            taken += take;
        }
        out
    }
}

/// Turns one stream's bytes into UTF-8 text whose encoded length is exactly the bytes' (so
/// that the SDK's `offset + len(data.encode())` is the next byte's offset): a character split
/// between two reads waits for its end, and a byte that is not UTF-8 becomes `?`.
#[derive(Default)]
pub struct Utf8Splitter {
    pending: Vec<u8>,
    pending_offset: u64,
}

fn lossy_exact(bytes: &[u8], text: &mut String) {
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                return;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                let bad = e.error_len().unwrap_or(after.len());
                text.extend(std::iter::repeat_n('?', bad));
                rest = &after[bad..];
            }
        }
    }
}

impl Utf8Splitter {
    /// The text of `data`, which starts at `offset`, with the offset of its first byte.
    pub fn feed(&mut self, offset: u64, data: &[u8], out: &mut Vec<(u64, String)>) {
        if !self.pending.is_empty() && self.pending_offset + self.pending.len() as u64 != offset {
            self.flush(out);
        }
        let start = if self.pending.is_empty() {
            offset
        } else {
            self.pending_offset
        };
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        // A truncated character at the end (at most 3 bytes of a valid start) waits.
        let keep = match std::str::from_utf8(&buf) {
            Err(e) if e.error_len().is_none() => buf.len() - e.valid_up_to(),
            _ => 0,
        };
        let (now, later) = buf.split_at(buf.len() - keep);
        if !now.is_empty() {
            let mut text = String::with_capacity(now.len());
            lossy_exact(now, &mut text);
            out.push((start, text));
        }
        self.pending = later.to_vec();
        self.pending_offset = start + now.len() as u64;
    }

    /// What waits for a character's end that will not come (the stream ended, or jumped).
    pub fn flush(&mut self, out: &mut Vec<(u64, String)>) {
        if !self.pending.is_empty() {
            let mut text = String::new();
            lossy_exact(&self.pending, &mut text);
            out.push((self.pending_offset, text));
            self.pending_offset += self.pending.len() as u64;
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stream::{Stderr, Stdout};

    #[test]
    fn reads_follow_arrival_order_and_resume_from_each_streams_offset() {
        let mut log = OutputLog::new(1 << 20);
        log.push(Stdout, b"ab");
        log.push(Stderr, b"E1");
        log.push(Stdout, b"cd");
        log.push(Stdout, b"ef");
        let mut cursor = [0; 2];
        let all = log.read(&mut cursor, 1 << 20);
        let shown: Vec<(Stream, u64, &[u8])> = all
            .iter()
            .map(|p| (p.stream, p.offset, p.data.as_slice()))
            .collect();
        assert_eq!(
            shown,
            [
                (Stdout, 0, &b"ab"[..]),
                (Stderr, 0, b"E1"),
                (Stdout, 2, b"cdef")
            ]
        );
        assert_eq!(cursor, [6, 2]);
        let mut resumed = [3, 1];
        let rest = log.read(&mut resumed, 1 << 20);
        assert_eq!(
            rest,
            [
                Piece {
                    stream: Stderr,
                    offset: 1,
                    data: b"1".to_vec()
                },
                Piece {
                    stream: Stdout,
                    offset: 3,
                    data: b"def".to_vec()
                }
            ]
        );
        let mut small = [0; 2];
        assert_eq!(
            log.read(&mut small, 3)
                .iter()
                .map(|p| p.data.len())
                .sum::<usize>(),
            3
        );
        assert_eq!(small, [2, 1]);
    }

    #[test]
    fn the_log_keeps_unsent_output_and_drops_the_oldest_sent() {
        let mut log = OutputLog::new(4);
        log.push(Stdout, b"abc");
        log.push(Stdout, b"def");
        assert_eq!(
            log.unacked(),
            6,
            "unsent output is kept past the bound (the writer holds back)"
        );
        let mut cursor = [0; 2];
        assert_eq!(log.read(&mut cursor, 100).len(), 1);
        log.ack(Stdout, 6);
        assert_eq!(log.unacked(), 0);
        log.push(Stdout, b"g");
        let mut from_start = [0; 2];
        let kept = log.read(&mut from_start, 100);
        assert_eq!(
            kept,
            [Piece {
                stream: Stdout,
                offset: 3,
                data: b"defg".to_vec()
            }],
            "resumes from the oldest kept"
        );
        log.ack(Stdout, 1000);
        assert_eq!(log.unacked(), 0, "an ack past the end counts up to the end");
    }

    #[test]
    fn text_frames_keep_byte_offsets_exact() {
        let mut s = Utf8Splitter::default();
        let mut out = Vec::new();
        let euro = "€".as_bytes(); // three bytes
        s.feed(0, &[b'a', euro[0]], &mut out);
        s.feed(2, &euro[1..], &mut out);
        s.feed(4, &[0xff, b'b'], &mut out);
        s.feed(6, &euro[..2], &mut out);
        s.flush(&mut out);
        assert_eq!(
            out,
            [
                (0, "a".to_string()),
                (1, "€".to_string()),
                (4, "?b".to_string()),
                (6, "??".to_string())
            ]
        );
        let mut jumped = Vec::new();
        let mut s = Utf8Splitter::default();
        s.feed(0, &euro[..1], &mut jumped);
        s.feed(10, b"x", &mut jumped);
        assert_eq!(
            jumped,
            [(0, "?".to_string()), (10, "x".to_string())],
            "a jump flushes what waited"
        );
    }
}
