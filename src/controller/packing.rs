//! Compression of what the caches hold, against a dictionary of the same kind of object.
//!
//! The controller keeps one packed copy of every binding and of every managed Secret it
//! watches. Most of each is what every other one repeats: field names, label and annotation
//! keys, the ownerReference's kind and apiVersion, ARN and timestamp prefixes. LZ4 with a
//! dictionary (a sample object of that kind, packed the same way) leaves mostly what
//! differs: a binding's compact JSON of ~1.2 KiB packs to ~360 bytes. It lives in memory
//! only, so the dictionaries may change with any release; they are built from the same
//! types and renderers as the objects, and a drift only costs some compression.
//!
//! What is packed is written field by field with [`Writer`] (lengths as LEB128, strings
//! length-prefixed) and read back with [`Reader`].

/// A sample of what will be compressed, matched against by each compression.
pub(super) struct Dictionary(Box<[u8]>);

impl Dictionary {
    pub fn new(sample: Vec<u8>) -> Self {
        Dictionary(sample.into_boxed_slice())
    }

    /// `bytes` compressed (the uncompressed length first), in an allocation of its size.
    pub fn compress(&self, bytes: &[u8]) -> Box<[u8]> {
        lz4_flex::block::compress_prepend_size_with_dict(bytes, &self.0).into_boxed_slice()
    }

    /// What [`Dictionary::compress`] of this dictionary was given; an error for anything
    /// else it cannot read.
    pub fn decompress(&self, packed: &[u8]) -> Result<Vec<u8>, String> {
        lz4_flex::block::decompress_size_prepended_with_dict(packed, &self.0).map_err(|e| e.to_string())
    }
}

/// Tags of an optional map or list: absent, or present with `count` entries (`count + 1`).
const ABSENT: u32 = 0;

/// Lengths and counts as LEB128; strings and bytes length-prefixed.
#[derive(Default)]
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn len(&mut self, mut n: u32) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    pub(super) fn opt_len(&mut self, n: Option<usize>) {
        self.len(n.map_or(ABSENT, |n| u32::try_from(n).expect("count fits u32") + 1));
    }

    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.len(u32::try_from(b.len()).expect("far below 4 GiB"));
        self.0.extend_from_slice(b);
    }

    pub(super) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub(super) fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.0.push(1);
                self.str(s);
            }
            None => self.0.push(0),
        }
    }

    pub(super) fn opt_bool(&mut self, b: Option<bool>) {
        self.0.push(match b {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        });
    }
}

/// Reads what [`Writer`] wrote (only ever this process's own output, so it trusts it).
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().expect("packed intact");
        self.0 = rest;
        *first
    }

    pub(super) fn len(&mut self) -> u32 {
        let mut n = 0u32;
        let mut shift = 0;
        loop {
            let byte = self.byte();
            n |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return n;
            }
            shift += 7;
        }
    }

    pub(super) fn opt_len(&mut self) -> Option<usize> {
        match self.len() {
            ABSENT => None,
            n => Some(n as usize - 1),
        }
    }

    pub(super) fn bytes(&mut self) -> &'a [u8] {
        let n = self.len() as usize;
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }

    pub(super) fn str_ref(&mut self) -> &'a str {
        std::str::from_utf8(self.bytes()).expect("packed from a str")
    }

    pub(super) fn string(&mut self) -> String {
        self.str_ref().to_string()
    }

    pub(super) fn opt_str_ref(&mut self) -> Option<&'a str> {
        (self.byte() == 1).then(|| self.str_ref())
    }

    pub(super) fn opt_str(&mut self) -> Option<String> {
        self.opt_str_ref().map(str::to_string)
    }

    pub(super) fn opt_bool(&mut self) -> Option<bool> {
        match self.byte() {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_compressed_decompresses_with_the_same_dictionary_only() {
        let dictionary = Dictionary::new(b"{\"apiVersion\":\"kube-sts.io/v1alpha1\",\"kind\":\"x\"}".to_vec());
        for input in [
            &b""[..],
            b"{\"apiVersion\":\"kube-sts.io/v1alpha1\",\"kind\":\"AWSRoleBinding\"}",
            &[0u8, 255, 1, 254][..],
            &b"ab".repeat(40_000)[..],
        ] {
            let packed = dictionary.compress(input);
            assert_eq!(dictionary.decompress(&packed).unwrap(), input);
        }
        // The dictionary is used: another one reads other bytes from the same input (or fails).
        let text = b"{\"apiVersion\":\"kube-sts.io/v1alpha1\",\"kind\":\"AWSRoleBinding\"}";
        let other = Dictionary::new(b"something else entirely, of another length".to_vec());
        assert_ne!(
            other.decompress(&dictionary.compress(text)).ok().as_deref(),
            Some(&text[..])
        );
        // Damaged input is an error, not a panic.
        assert!(dictionary.decompress(&[200, 0, 0, 0, 0xff]).is_err());
    }
}
