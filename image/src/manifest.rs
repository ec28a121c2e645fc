//! An image version's manifest: its size, chunk size, where each chunk's bytes are (a pack
//! object and an offset in it) and each chunk's SHA-256. Pure: encoding, decoding and
//! validation, no I/O. A manifest is the last object a push, clone or commit writes, so a
//! version exists exactly when its manifest does.

use sha2::Digest;

/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;
/// Largest manifest accepted (a 1 TiB image in 256 KiB chunks is ~4 M entries; the limit is
/// on the encoded bytes).
pub const MAX_MANIFEST_BYTES: usize = 512 << 20;
/// Smallest and largest chunk sizes.
pub const MIN_CHUNK: u32 = 4 << 10;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: u32 = 64 << 20;
/// Largest image size (1 PiB).
pub const MAX_SIZE: u64 = 1 << 50;
/// Longest image name.
pub const MAX_NAME: usize = 128;

/// A chunk's SHA-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sum(pub [u8; 32]);

impl Sum {
    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Sum {
        Sum(sha2::Sha256::digest(data).into())
    }
    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// Parses 64 hex digits.
    pub fn parse(s: &str) -> Option<Sum> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Sum(out))
    }
}

impl std::fmt::Debug for Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.hex())
    }
}

impl serde::Serialize for Sum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> serde::Deserialize<'de> for Sum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sum, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sum::parse(&s).ok_or_else(|| serde::de::Error::custom("a checksum is 64 hex digits"))
    }
}

/// Where one chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// Index into [`Manifest::packs`].
    pub pack: u32,
    /// Byte offset of the chunk in the pack (its length is the chunk's: the chunk size, or
    /// less for the last chunk).
    pub offset: u64,
    /// SHA-256 of the chunk's bytes.
    pub sum: Sum,
}

/// A named version of an image.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRef {
    /// Image name.
    pub name: String,
    /// Version (from 1).
    pub version: u32,
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// An image version's manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Image name.
    pub name: String,
    /// Version number (from 1).
    pub version: u32,
    /// Image size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// What this version was made from: the previous version of a commit, the origin of a
    /// clone; none for a push.
    pub parent: Option<VersionRef>,
    /// `push`, `clone` or `commit`.
    pub made_by: String,
    /// Seconds since the epoch when written.
    pub created_unix: u64,
    /// A random id of the write that made this manifest (read back to detect a lost race).
    pub writer: String,
    /// Pack object names (32 hex digits each) that chunks refer to.
    pub packs: Vec<String>,
    /// One entry per chunk; `null` is a chunk of zeros (nothing stored).
    pub chunks: Vec<Option<ChunkRef>>,
}

/// A manifest that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Too large to be a manifest.
    #[error("a manifest of {0} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not JSON of the right shape.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// Well-formed but inconsistent.
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

/// Whether `name` may name an image: 1–128 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Whether `name` may name a pack: 32 lower-case hex digits.
pub fn valid_pack_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Chunks of an image of `size` bytes in chunks of `chunk` bytes.
pub fn chunk_count(size: u64, chunk: u32) -> u64 {
    size.div_ceil(chunk as u64)
}

impl Manifest {
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether the image has no chunks (size 0).
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Byte offset of chunk `c` in the image.
    pub fn chunk_start(&self, c: usize) -> u64 {
        c as u64 * self.chunk_size as u64
    }

    /// Length of chunk `c` (the last may be short).
    pub fn chunk_len(&self, c: usize) -> u32 {
        (self.size - self.chunk_start(c)).min(self.chunk_size as u64) as u32
    }

    /// This version's reference.
    pub fn id(&self) -> VersionRef {
        VersionRef { name: self.name.clone(), version: self.version }
    }

    /// Bytes stored for chunks that are not zero.
    pub fn stored_bytes(&self) -> u64 {
        (0..self.len()).filter(|&c| self.chunks[c].is_some()).map(|c| self.chunk_len(c) as u64).sum()
    }

    /// Checks every rule a manifest must keep.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Invalid(s));
        if self.format != FORMAT {
            return bad(format!("format {} (this livemig reads format {FORMAT})", self.format));
        }
        if !valid_name(&self.name) {
            return bad(format!("image name {:?}", self.name));
        }
        if self.version == 0 {
            return bad("version 0 (versions count from 1)".into());
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) || !self.chunk_size.is_power_of_two() {
            return bad(format!("chunk size {} (a power of two from {MIN_CHUNK} to {MAX_CHUNK})", self.chunk_size));
        }
        if self.size > MAX_SIZE {
            return bad(format!("size {} over {MAX_SIZE}", self.size));
        }
        let want = chunk_count(self.size, self.chunk_size);
        if self.chunks.len() as u64 != want {
            return bad(format!("{} chunk entries for {want} chunks", self.chunks.len()));
        }
        if let Some(p) = &self.parent {
            if !valid_name(&p.name) || p.version == 0 {
                return bad(format!("parent {p}"));
            }
        }
        if self.packs.len() > self.chunks.len() {
            return bad(format!("{} packs for {} chunks", self.packs.len(), self.chunks.len()));
        }
        if let Some(p) = self.packs.iter().find(|p| !valid_pack_name(p)) {
            return bad(format!("pack name {p:?}"));
        }
        for (c, e) in self.chunks.iter().enumerate() {
            let Some(e) = e else { continue };
            if e.pack as usize >= self.packs.len() {
                return bad(format!("chunk {c} refers to pack {} of {}", e.pack, self.packs.len()));
            }
            if e.offset.checked_add(self.chunk_len(c) as u64).is_none_or(|end| end > MAX_SIZE) {
                return bad(format!("chunk {c} at pack offset {}", e.offset));
            }
        }
        Ok(())
    }

    /// Encodes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serialises")
    }

    /// Decodes and validates.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }
}

/// Consecutive runs of `chunks` (sorted, distinct), each at most `max` long: what one pack
/// write carries.
pub fn runs(chunks: &[usize], max: usize) -> Vec<std::ops::Range<usize>> {
    let max = max.max(1);
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &c in chunks {
        match out.last_mut() {
            Some(r) if r.end == c && r.len() < max => r.end = c + 1,
            _ => out.push(c..c + 1),
        }
    }
    out
}

/// Parses `NAME` or `NAME@VERSION`.
pub fn parse_ref(s: &str) -> Result<(String, Option<u32>), String> {
    let (name, ver) = match s.split_once('@') {
        Some((n, v)) => {
            let v: u32 = v.parse().map_err(|_| format!("{s:?}: the version after @ is a number from 1"))?;
            if v == 0 {
                return Err(format!("{s:?}: versions count from 1"));
            }
            (n, Some(v))
        }
        None => (s, None),
    };
    if !valid_name(name) {
        return Err(format!(
            "{name:?} is not an image name (1-{MAX_NAME} of letters, digits, '.', '_', '-'; not starting with '.' or '-')"
        ));
    }
    Ok((name.to_string(), ver))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            name: "debian".into(),
            version: 2,
            size: 3 * 4096 + 100,
            chunk_size: 4096,
            parent: Some(VersionRef { name: "debian".into(), version: 1 }),
            made_by: "commit".into(),
            created_unix: 1,
            writer: "w".into(),
            packs: vec!["0123456789abcdef0123456789abcdef".into()],
            chunks: vec![
                Some(ChunkRef { pack: 0, offset: 0, sum: Sum::of(b"a") }),
                None,
                Some(ChunkRef { pack: 0, offset: 4096, sum: Sum::of(b"b") }),
                None,
            ],
        }
    }

    #[test]
    fn a_manifest_round_trips_and_knows_its_chunk_lengths() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.chunk_len(0), 4096);
        assert_eq!(m.chunk_len(3), 100);
        assert_eq!(m.stored_bytes(), 8192);
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let mut m = sample();
        m.chunks.pop();
        assert!(matches!(Manifest::decode(&m.encode()), Err(ManifestError::Invalid(_))));
        let mut m = sample();
        m.chunks[2].as_mut().unwrap().pack = 1;
        assert!(matches!(Manifest::decode(&m.encode()), Err(ManifestError::Invalid(_))));
        let mut m = sample();
        m.chunk_size = 5000;
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample();
        m.packs[0] = "../../etc/passwd".into();
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample();
        m.name = "../x".into();
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample();
        m.chunks[0].as_mut().unwrap().offset = u64::MAX - 10;
        assert!(Manifest::decode(&m.encode()).is_err());
        assert!(matches!(Manifest::decode(b"{\"format\":1"), Err(ManifestError::Malformed(_))));
        let mut text = String::from_utf8(sample().encode()).unwrap();
        text = text.replacen("\"format\":1", "\"format\":1,\"extra\":0", 1);
        assert!(Manifest::decode(text.as_bytes()).is_err(), "unknown fields are refused");
    }

    #[test]
    fn consecutive_chunks_make_one_run_up_to_the_limit() {
        assert_eq!(runs(&[0, 1, 2, 5, 6, 9], 8), vec![0..3, 5..7, 9..10]);
        assert_eq!(runs(&[0, 1, 2, 3, 4], 2), vec![0..2, 2..4, 4..5]);
        assert!(runs(&[], 4).is_empty());
    }

    #[test]
    fn names_and_references_parse() {
        assert_eq!(parse_ref("debian-12@3").unwrap(), ("debian-12".into(), Some(3)));
        assert_eq!(parse_ref("a.b_c").unwrap(), ("a.b_c".into(), None));
        for bad in ["", "@1", "a@0", "a@x", ".hidden", "a/b", "-x", &"n".repeat(129)] {
            assert!(parse_ref(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Sum::parse(&Sum::of(b"x").hex()), Some(Sum::of(b"x")));
        assert_eq!(Sum::parse("zz"), None);
    }
}
