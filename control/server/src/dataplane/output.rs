//! A command's output as the data plane keeps it: [`OutputLog`], the chunks of stdout and
//! stderr in the order they came, each stream counted in bytes from 0 (the offsets the SDK
//! resumes from); and [`Utf8Splitter`], which turns a stream's bytes into the text frames the
//! WebSocket carries without moving those offsets.
//!
//! The log is bounded: it holds what no client has been sent yet (at most `capacity` bytes in
//! memory; with a [`Spill`], older unsent output moves to disk, up to the spill's capacity; the
//! command is held back past both, see `commands`) and, within the same bound, what was sent,
//! for a client that reconnects from an earlier offset. A reconnect from before what is kept
//! resumes from the oldest byte kept.

use std::collections::VecDeque;

use super::spill::Spill;
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
    /// Older pieces, on disk: all before those in `chunks`.
    spill: Option<Spill>,
    /// Each stream's end in the spill (within one stream, what lies above its acknowledged
    /// offset in the spill is contiguous: only acknowledged pieces are dropped in between).
    spill_end: [u64; 2],
}

impl OutputLog {
    pub fn new(capacity: usize, spill: Option<Spill>) -> OutputLog {
        OutputLog {
            chunks: VecDeque::new(),
            end: [0; 2],
            acked: [0; 2],
            buffered: 0,
            capacity,
            spill,
            spill_end: [0; 2],
        }
    }

    /// Bytes written that no client has been sent.
    pub fn unacked(&self) -> u64 {
        (self.end[0] - self.acked[0]) + (self.end[1] - self.acked[1])
    }

    fn spill_unacked(&self) -> u64 {
        (0..2)
            .map(|s| self.spill_end[s].saturating_sub(self.acked[s]))
            .sum()
    }

    /// Whether the writer must wait for clients: as much unsent output in memory as the
    /// bound, and no room for that much more on disk.
    pub fn full(&self) -> bool {
        let in_memory = self.unacked() - self.spill_unacked();
        in_memory >= self.capacity as u64
            && self
                .spill
                .as_ref()
                .is_none_or(|s| !s.has_room(self.capacity as u64))
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
            let s = index(front.stream);
            let front_end = front.offset + front.data.len() as u64;
            if front_end > self.acked[s] {
                let spilled = match &mut self.spill {
                    Some(spill) if spill.has_room(front.data.len() as u64) => {
                        spill.put(front.stream, front.offset, &front.data).is_ok()
                    }
                    _ => false,
                };
                if spilled {
                    self.spill_end[s] = self.spill_end[s].max(front_end);
                } else if self.buffered <= 2 * self.capacity {
                    break;
                }
            }
            self.buffered -= front.data.len();
            self.chunks.pop_front();
        }
    }

    /// A client has `stream`'s bytes before `offset`.
    pub fn ack(&mut self, stream: Stream, offset: u64) {
        let s = index(stream);
        self.acked[s] = self.acked[s].max(offset.min(self.end[s]));
        // Clients have all the spill holds: its space is free again.
        if self.spill_unacked() == 0 {
            if let Some(spill) = &mut self.spill {
                spill.clear();
                self.spill_end = [0; 2];
            }
        }
    }

    /// What follows `cursor` (each stream's next offset), in the order it came, at most about
    /// `max` bytes, consecutive pieces of one stream joined; `cursor` moves past it. A cursor
    /// before what is kept jumps to the oldest byte kept.
    pub fn read(&self, cursor: &mut [u64; 2], max: usize) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        let mut taken = 0;
        let on_disk = self.spill.iter().flat_map(|spill| {
            spill
                .pieces()
                .map(move |p| (p.stream, p.offset, p.len as usize, Source::Disk(spill, *p)))
        });
        let in_memory = self.chunks.iter().map(|c| {
            (c.stream, c.offset, c.data.len(), Source::Memory(&c.data))
        });
        for (stream, offset, len, source) in on_disk.chain(in_memory) {
            if taken >= max {
                break;
            }
            let s = index(stream);
            if offset + len as u64 <= cursor[s] {
                continue;
            }
            let from = cursor[s].max(offset);
            let skip = (from - offset) as usize;
            let take = (len - skip).min(max - taken);
            let data = match source {
                Source::Memory(data) => data[skip..skip + take].to_vec(),
                Source::Disk(spill, piece) => match spill.read(&piece, skip as u64, take) {
                    Ok(data) => data,
                    // What cannot be read back is skipped, as output dropped past the bound is.
                    Err(e) => {
                        tracing::warn!("cannot read a command's spilled output back: {e}");
                        continue;
                    }
                },
            };
            match out.last_mut() {
                Some(last) if last.stream == stream && last.offset + last.data.len() as u64 == from => {
                    last.data.extend_from_slice(&data)
                }
                _ => out.push(Piece { stream, offset: from, data }),
            }
            cursor[s] = from + take as u64;
            taken += take;
        }
        out
    }
}

/// Where a piece's bytes are.
enum Source<'a> {
    Memory(&'a [u8]),
    Disk(&'a Spill, super::spill::Spilled),
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
        let mut log = OutputLog::new(1 << 20, None);
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
        let mut log = OutputLog::new(4, None);
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
    fn unsent_output_past_the_bound_goes_to_disk_and_comes_back_in_order() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-spill-").unwrap();
        let spill = Spill::create(dir.as_path(), 64).unwrap();
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0, "the spill file has no name");
        let mut log = OutputLog::new(4, Some(spill));
        for (i, piece) in [&b"aaaa"[..], b"bbbb", b"cccc", b"dddd"].iter().enumerate() {
            let stream = if i == 1 { Stderr } else { Stdout };
            log.push(stream, piece);
            assert!(!log.full(), "piece {i}: the disk has room");
        }
        assert_eq!(log.unacked(), 16, "nothing unsent is lost");
        let mut cursor = [0; 2];
        let all = log.read(&mut cursor, 100);
        let shown: Vec<(Stream, u64, &[u8])> = all.iter().map(|p| (p.stream, p.offset, p.data.as_slice())).collect();
        assert_eq!(
            shown,
            [(Stdout, 0, &b"aaaa"[..]), (Stderr, 0, b"bbbb"), (Stdout, 4, b"ccccdddd")],
            "read back from disk and memory in the order it came"
        );
        let mut partly = [2, 0];
        assert_eq!(log.read(&mut partly, 3)[0].data, b"aa", "a piece on disk read from within");
        // Filled up: the memory bound reached and no room on disk for that much more.
        for _ in 0..16 {
            log.push(Stdout, b"eeee");
        }
        assert!(log.full(), "the writer waits once both are full");
        log.ack(Stdout, log.end()[0]);
        log.ack(Stderr, 4);
        assert!(!log.full());
        assert_eq!(log.unacked(), 0);
        log.push(Stdout, b"ffff");
        log.push(Stdout, b"gggg");
        let mut next = cursor;
        next[0] = log.end()[0] - 8;
        let rest = log.read(&mut next, 100);
        assert_eq!(rest[0].data, b"ffffgggg", "the emptied spill is used again");
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
