//! Compression of what the caches hold, against a dictionary of the same kind of object.
//!
//! The controller keeps one packed copy of every binding and of every managed Secret it
//! watches. Most of each is what every other one repeats: field names, label and annotation
//! keys, the ownerReference's kind and apiVersion, ARN and timestamp prefixes. LZ4 with a
//! dictionary (a sample object of that kind, packed the same way) leaves mostly what
//! differs: a binding's compact JSON of ~1.2 KiB packs to ~360 bytes. It lives in memory
//! only, so the dictionaries may change with any release; they are built from the same
//! types and renderers as the objects, and a drift only costs some compression.

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
