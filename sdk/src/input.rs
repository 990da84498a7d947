//! Framed input: the bytes a client sent, cut into frames by the protocol's framing
//! function, bounded, and steering the host's reading of the socket (backpressure).
//!
//! The host hands a plugin whatever one socket read returned: half a frame, or hundreds.
//! [`Input`] keeps the bytes not yet decoded; the machine takes frames out with
//! [`Input::next_frame`] and its framing function (mini-redis style: "incomplete" is not an
//! error, so a frame split anywhere is simply waited for), for as long as its protocol lets
//! it decode. After each event the machine calls [`Input::settle`], which
//!
//! - compacts: decoded bytes leave the buffer once they are half of it, so a machine that
//!   decodes a few frames per event out of a 256 KiB read does not move the rest forward
//!   each time (that made a read cost quadratic in its size);
//! - steers reading: while the machine is paused (its protocol window is full) with bytes
//!   left over, the host is told to stop reading the socket ([`Action::SetReading`]`(false)`),
//!   and to resume once the machine can decode again or has nothing left; the action is
//!   queued only when the state changes. The first settle says `true`, which tells the host
//!   that the plugin steers reading itself;
//! - bounds: more undecoded bytes than the limit is an [`InputError`] for the machine to end
//!   the connection with (the host may deliver one more read after `SetReading(false)`, so
//!   the limit should leave room for one read, 256 KiB, above the largest frame).
//!
//! The first buffer of an empty input is taken as is, without a copy.

use std::fmt;

use crate::machine::Action;
use crate::outbox::Outbox;

/// Why input was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// More undecoded bytes than the input's limit.
    TooLarge {
        /// Bytes held undecoded.
        unread: usize,
        /// The input's limit.
        limit: usize,
    },
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::TooLarge { unread, limit } => write!(
                f,
                "{unread} unprocessed bytes from the client exceed the limit of {limit}"
            ),
        }
    }
}

impl std::error::Error for InputError {}

/// The undecoded bytes of one connection: see the module docs.
///
/// ```
/// use magnetar_sdk::input::Input;
/// use magnetar_sdk::machine::Action;
/// use magnetar_sdk::outbox::Outbox;
///
/// /// Lines: a frame ends at `\n`.
/// fn line(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
///     Ok(buf.iter().position(|b| *b == b'\n').map(|i| (buf[..i].to_vec(), i + 1)))
/// }
///
/// let mut input = Input::new(1024);
/// let mut out = Outbox::new();
/// input.push(b"hel".to_vec());
/// assert_eq!(input.next_frame(line), Ok(None), "incomplete: wait");
/// input.push(b"lo\nwor".to_vec());
/// assert_eq!(input.next_frame(line), Ok(Some(b"hello".to_vec())));
/// assert_eq!(input.next_frame(line), Ok(None));
/// assert_eq!(input.pending(), b"wor");
/// assert_eq!(input.settle(false, &mut out), Ok(()));
/// assert!(matches!(&out.take()[..], [Action::SetReading(true)]));
/// ```
#[derive(Debug, Clone)]
pub struct Input {
    /// The bytes; the first `pos` of them are decoded already.
    buf: Vec<u8>,
    pos: usize,
    /// What the host was last told by `SetReading`.
    reading: bool,
    limit: usize,
}

impl Input {
    /// An empty input that holds at most `limit` undecoded bytes after each event.
    pub fn new(limit: usize) -> Self {
        Input {
            buf: Vec::new(),
            pos: 0,
            reading: false,
            limit,
        }
    }

    /// Appends bytes from the client. With nothing pending, `bytes` becomes the buffer: no
    /// copy.
    pub fn push(&mut self, bytes: Vec<u8>) {
        if self.pos >= self.buf.len() {
            self.buf = bytes;
            self.pos = 0;
        } else {
            self.buf.extend_from_slice(&bytes);
        }
    }

    /// The undecoded bytes.
    pub fn pending(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Whether no undecoded byte is left.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Takes the next frame: `decode` sees the undecoded bytes and answers `Ok(None)` while
    /// they hold no whole frame, or the frame and how many bytes it used (at most all of
    /// them; more is taken as all). An error leaves the bytes where they are.
    ///
    /// ```
    /// let mut input = magnetar_sdk::input::Input::new(64);
    /// input.push(vec![2, b'h', b'i', 9]);
    /// // A length-prefixed frame.
    /// let frame = |b: &[u8]| -> Result<_, ()> {
    ///     let Some((&n, rest)) = b.split_first() else { return Ok(None) };
    ///     Ok(rest.get(..usize::from(n)).map(|f| (f.to_vec(), 1 + usize::from(n))))
    /// };
    /// assert_eq!(input.next_frame(frame), Ok(Some(b"hi".to_vec())));
    /// assert_eq!(input.next_frame(frame), Ok(None));
    /// assert_eq!(input.pending(), &[9]);
    /// ```
    pub fn next_frame<T, E>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<Option<(T, usize)>, E>,
    ) -> Result<Option<T>, E> {
        let pending = self.pending();
        if pending.is_empty() {
            return Ok(None);
        }
        let available = pending.len();
        match decode(pending)? {
            Some((frame, used)) => {
                self.pos += used.min(available);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Ends an event's decoding: compacts, tells the host whether to read (only on a change,
    /// into `out`), and checks the bound. `paused`: the machine would decode no more frames
    /// now even if it had them.
    ///
    /// ```
    /// use magnetar_sdk::input::{Input, InputError};
    /// use magnetar_sdk::machine::Action;
    /// let mut out = magnetar_sdk::outbox::Outbox::new();
    /// let mut input = Input::new(4);
    /// input.push(b"abcdef".to_vec());
    /// // Nothing decoded, the machine could take more: the host keeps reading...
    /// let e = input.settle(false, &mut out);
    /// assert!(matches!(&out.take()[..], [Action::SetReading(true)]));
    /// // ...but too much is held: the machine ends the connection with this error.
    /// assert_eq!(e, Err(InputError::TooLarge { unread: 6, limit: 4 }));
    /// ```
    pub fn settle(&mut self, paused: bool, out: &mut Outbox) -> Result<(), InputError> {
        self.pos = self.pos.min(self.buf.len());
        if self.pos == self.buf.len() {
            // Fully decoded: the allocation goes too, an idle connection holds none.
            self.buf = Vec::new();
            self.pos = 0;
        } else if self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let unread = self.buf.len() - self.pos;
        let reading = unread == 0 || !paused;
        if reading != self.reading {
            self.reading = reading;
            out.push(Action::SetReading(reading));
        }
        if unread > self.limit {
            return Err(InputError::TooLarge {
                unread,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Whether the host was last told to read (`false` before the first settle).
    pub fn is_reading(&self) -> bool {
        self.reading
    }

    /// Forgets every byte and frees the buffer (the connection is closing).
    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test protocol: one length byte, then that many bytes; length 255 is malformed.
    fn frame(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
        let Some((&n, rest)) = buf.split_first() else {
            return Ok(None);
        };
        if n == 255 {
            return Err("malformed".into());
        }
        Ok(rest
            .get(..usize::from(n))
            .map(|f| (f.to_vec(), 1 + usize::from(n))))
    }

    fn encode(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.push(f.len() as u8);
            out.extend_from_slice(f);
        }
        out
    }

    fn drain(input: &mut Input) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while let Ok(Some(f)) = input.next_frame(frame) {
            frames.push(f);
        }
        frames
    }

    fn reading_changes(out: &mut Outbox) -> Vec<bool> {
        out.take()
            .into_iter()
            .filter_map(|a| match a {
                Action::SetReading(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_stream_split_at_every_byte_gives_the_same_frames() {
        let frames: [&[u8]; 4] = [b"first", b"", b"x", b"a longer fourth frame"];
        let stream = encode(&frames);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let mut input = Input::new(1024);
            let mut out = Outbox::new();
            let mut got = Vec::new();
            for part in [a, b] {
                input.push(part.to_vec());
                got.extend(drain(&mut input));
                assert_eq!(input.settle(false, &mut out), Ok(()));
            }
            assert_eq!(got, frames, "split at {cut}");
            assert!(input.is_empty());
        }
    }

    #[test]
    fn a_stream_fed_one_byte_at_a_time_gives_the_same_frames() {
        let frames: [&[u8]; 3] = [b"ab", b"cde", b"f"];
        let mut input = Input::new(1024);
        let mut out = Outbox::new();
        let mut got = Vec::new();
        for b in encode(&frames) {
            input.push(vec![b]);
            got.extend(drain(&mut input));
            assert_eq!(input.settle(false, &mut out), Ok(()));
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn the_first_buffer_is_taken_without_a_copy() {
        let mut input = Input::new(1024);
        let bytes = encode(&[b"abc"]);
        let address = bytes.as_ptr();
        input.push(bytes);
        assert_eq!(input.pending().as_ptr(), address);
    }

    #[test]
    fn a_malformed_frame_is_the_decoders_error_and_stays() {
        let mut input = Input::new(1024);
        input.push(vec![1, b'a', 255, 0]);
        assert_eq!(input.next_frame(frame), Ok(Some(b"a".to_vec())));
        assert_eq!(input.next_frame(frame), Err("malformed".to_string()));
        assert_eq!(input.pending(), &[255, 0]);
    }

    #[test]
    fn exceeding_the_bound_is_reported_and_the_bound_itself_is_not() {
        let mut out = Outbox::new();
        let mut input = Input::new(4);
        input.push(vec![9, 1, 2, 3]); // 4 bytes of an incomplete frame: at the bound
        assert_eq!(drain(&mut input), Vec::<Vec<u8>>::new());
        assert_eq!(input.settle(false, &mut out), Ok(()));
        input.push(vec![4]);
        assert_eq!(
            input.settle(false, &mut out),
            Err(InputError::TooLarge {
                unread: 5,
                limit: 4
            })
        );
        assert_eq!(
            InputError::TooLarge {
                unread: 5,
                limit: 4
            }
            .to_string(),
            "5 unprocessed bytes from the client exceed the limit of 4"
        );
    }

    #[test]
    fn backpressure_turns_reading_off_and_on_exactly_on_changes() {
        let mut out = Outbox::new();
        let mut input = Input::new(1024);
        // The first settle tells the host that the plugin steers reading.
        assert_eq!(input.settle(false, &mut out), Ok(()));
        assert_eq!(reading_changes(&mut out), [true]);
        assert!(input.is_reading());
        assert_eq!(input.settle(false, &mut out), Ok(()));
        assert_eq!(reading_changes(&mut out), [] as [bool; 0]);
        // Paused with nothing left: keep reading.
        assert_eq!(input.settle(true, &mut out), Ok(()));
        assert_eq!(reading_changes(&mut out), [] as [bool; 0]);
        // Paused with bytes left: stop, once.
        input.push(encode(&[b"a", b"b"]));
        assert_eq!(input.settle(true, &mut out), Ok(()));
        assert_eq!(input.settle(true, &mut out), Ok(()));
        assert_eq!(reading_changes(&mut out), [false]);
        assert!(!input.is_reading());
        // Unpaused, the frames are decoded: read again, once.
        assert_eq!(drain(&mut input).len(), 2);
        assert_eq!(input.settle(false, &mut out), Ok(()));
        assert_eq!(input.settle(false, &mut out), Ok(()));
        assert_eq!(reading_changes(&mut out), [true]);
        // Unpaused with an incomplete frame left: keep reading (more bytes complete it).
        input.push(vec![5, b'x']);
        assert_eq!(input.settle(false, &mut out), Ok(()));
        assert_eq!(reading_changes(&mut out), [] as [bool; 0]);
    }

    #[test]
    fn decoded_bytes_leave_once_they_are_half_the_buffer() {
        let mut out = Outbox::new();
        let mut input = Input::new(1024);
        input.push(encode(&[b"a", b"b", b"c", b"d"])); // 8 bytes
        assert_eq!(input.next_frame(frame), Ok(Some(b"a".to_vec())));
        assert_eq!(input.settle(true, &mut out), Ok(()));
        assert_eq!((input.pos, input.buf.len()), (2, 8), "a quarter: kept");
        assert_eq!(input.next_frame(frame), Ok(Some(b"b".to_vec())));
        assert_eq!(input.settle(true, &mut out), Ok(()));
        assert_eq!((input.pos, input.buf.len()), (0, 4), "half: compacted");
        assert_eq!(drain(&mut input).len(), 2);
        assert_eq!(input.settle(true, &mut out), Ok(()));
        assert_eq!(input.buf.capacity(), 0, "all decoded: freed");
    }

    #[test]
    fn clear_forgets_everything() {
        let mut input = Input::new(8);
        input.push(vec![3, 1]);
        input.clear();
        assert!(input.is_empty());
        assert_eq!(input.pending(), b"");
    }
}
