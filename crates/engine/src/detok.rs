//! Turning generated tokens into text as they arrive.
//!
//! Tokens carry bytes, and a multi-byte character can be split across two
//! tokens; `TextStream` only releases complete characters. It also holds
//! back any tail that could be the start of a stop string, so a stop string
//! is never printed, not even partly, and the text ends exactly before it.

/// Incremental, UTF-8-safe text with stop strings.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 sequence at the end.
    partial: Vec<u8>,
    /// Decoded text not yet released (it may begin a stop string).
    held: String,
    stopped: bool,
}

/// What pushing a token released.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Released {
    pub text: String,
    /// A stop string was found; nothing more will be released.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, ..Self::default() }
    }

    /// Adds the bytes of one token and returns the text that is now safe to show.
    pub fn push(&mut self, bytes: &[u8]) -> Released {
        if self.stopped {
            return Released { text: String::new(), stopped: true };
        }
        self.partial.extend_from_slice(bytes);
        self.decode_complete();
        self.release()
    }

    /// Ends the stream (end of generation or length limit): releases what is
    /// held, with any incomplete character as U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        if !self.partial.is_empty() {
            self.held.push_str(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
        // A stop string may still be completed by the lossy tail.
        let released = self.release();
        if released.stopped {
            return released.text;
        }
        self.stopped = true;
        released.text + &std::mem::take(&mut self.held)
    }

    fn decode_complete(&mut self) {
        loop {
            match std::str::from_utf8(&self.partial) {
                Ok(text) => {
                    self.held.push_str(text);
                    self.partial.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix up to `valid` is UTF-8 by definition.
                    self.held.push_str(std::str::from_utf8(&self.partial[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.partial.drain(..valid);
                            return;
                        }
                        // Invalid bytes: replace them and go on.
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.partial.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    fn release(&mut self) -> Released {
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.partial.clear();
            self.stopped = true;
            return Released { text, stopped: true };
        }
        // Keep the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| {
                (1..stop.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| self.held.is_char_boundary(self.held.len() - n) && stop.starts_with(&self.held[self.held.len() - n..]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released { text, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let r = s.push(p);
            out.push(r.text);
            stopped |= r.stopped;
        }
        let tail = s.finish();
        (out, tail, stopped)
    }

    #[test]
    fn split_characters_are_never_released_half() {
        let euro = "€".as_bytes(); // 3 bytes
        let (out, tail, _) = run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert_eq!(out, vec!["a", "", "", "€", "b"]);
        assert_eq!(tail, "");
        for piece in &out {
            assert!(!piece.contains('\u{FFFD}'));
        }
    }

    #[test]
    fn incomplete_tail_becomes_a_replacement() {
        let (out, tail, _) = run(&[], &[b"x", &"é".as_bytes()[..1]]);
        assert_eq!(out.concat() + &tail, "x\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_are_replaced() {
        let (out, _, _) = run(&[], &[b"a\xFFb"]);
        assert_eq!(out.concat(), "a\u{FFFD}b");
    }

    #[test]
    fn stop_string_cuts_exactly_and_is_not_printed() {
        let (out, tail, stopped) = run(&["\n\nUser:"], &[b"Hello", b" there", b"\n", b"\nUs", b"er:", b" more"]);
        assert!(stopped);
        assert_eq!(out.concat() + &tail, "Hello there");
        // The held-back "\n" was never released early.
        assert_eq!(out[2], "");
    }

    #[test]
    fn a_false_start_is_released() {
        let (out, tail, stopped) = run(&["STOP"], &[b"ST", b"OR", b"Y"]);
        assert!(!stopped);
        assert_eq!(out, vec!["", "STOR", "Y"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn earliest_stop_wins() {
        let (out, _, stopped) = run(&["b", "ab"], &[b"xxab"]);
        assert!(stopped);
        assert_eq!(out.concat(), "xx");
    }

    #[test]
    fn held_prefix_is_flushed_at_the_end() {
        let (out, tail, stopped) = run(&["END"], &[b"the E", b"N"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "the ");
        assert_eq!(tail, "EN");
    }

    #[test]
    fn stop_inside_a_multibyte_context() {
        let (out, tail, stopped) = run(&["ß!"], &["aß".as_bytes(), b"!z"]);
        assert!(stopped);
        assert_eq!(out.concat() + &tail, "a");
    }
}
