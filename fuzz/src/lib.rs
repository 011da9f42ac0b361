//! Helpers shared by the fuzz targets: cutting one fuzz input into the pieces a parser would get
//! from a socket (reads of varying size, or whole messages).

/// Reads the fuzz input front to back; every accessor returns a default once it runs out, so a
/// target never fails to consume its input.
pub struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    #[must_use]
    pub const fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((&first, rest)) => {
                self.rest = rest;
                first
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }

    /// Up to `len` bytes (fewer at the end of the input).
    pub fn take(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        taken
    }

    /// The next piece: a length byte, then that many bytes (0 means the rest of the input is one
    /// piece). `None` once the input is used up.
    pub fn piece(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        match self.byte() {
            0 => Some(self.take(self.rest.len())),
            len => Some(self.take(usize::from(len))),
        }
    }

    /// A piece with a two-byte length (frames longer than 255 bytes).
    pub fn long_piece(&mut self) -> Option<&'a [u8]> {
        if self.rest.len() < 2 {
            return None;
        }
        let len = usize::from(self.u16());
        Some(self.take(len))
    }

    #[must_use]
    pub const fn rest(&self) -> &'a [u8] {
        self.rest
    }
}
