//! Token ids for models with a tokenizer (`cllm train --tokenizer FILE`), and the cache of a
//! corpus's ids next to the run.
//!
//! Byte-level runs read their corpus as `&[u8]`: token `i` is byte `i`. A tokenized corpus is
//! `u16` ids when the vocabulary fits (GPT-2's 50257 does), else `u32`. The sampler, the
//! evaluation windows and the split are generic over [`Token`], so the byte-level path compiles
//! to what it was (one widening load per token) and a tokenized run costs nothing more.
//!
//! # The cache
//!
//! Tokenizing a large text takes a while, so a run writes the ids once, to `OUT/tokens.bin`:
//!
//! ```text
//! CLLMTOK\n                 8 bytes of magic
//! u64 LE                    length of the JSON header
//! JSON header               {"version", "tokenizer_sha256", "data_sha256", "data_bytes",
//!                            "tokens", "id_bytes", "ids_sha256"}
//! ids                       `tokens` little-endian ids of `id_bytes` (2 or 4) bytes each
//! ```
//!
//! A cache is used only when its header names this tokenizer's SHA-256 and these data's
//! SHA-256 and size, and its ids have their recorded SHA-256 and lie in the vocabulary;
//! anything else (another tokenizer, other data, a damaged file) is re-made, and that is said
//! on stderr: re-tokenizing is never silent.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::text::{read_regular_file, write_atomic, MAX_DATA_BYTES};
use super::{sha256_hex, Corpus};
use crate::error::Result;
use crate::tokenizer::Tokenizer;
use crate::{bail, err};

/// The cache's file name in a run directory.
pub const TOKEN_CACHE_FILE: &str = "tokens.bin";
const MAGIC: &[u8; 8] = b"CLLMTOK\n";
const CACHE_VERSION: u32 = 1;
const MAX_HEADER_BYTES: u64 = 1 << 16;

/// A token of a corpus: a byte (byte-level models) or a tokenizer's id.
pub trait Token: Copy + Send + Sync + 'static {
    /// The id the model embeds.
    fn id(self) -> u32;
}

impl Token for u8 {
    #[inline(always)]
    fn id(self) -> u32 {
        u32::from(self)
    }
}

impl Token for u16 {
    #[inline(always)]
    fn id(self) -> u32 {
        u32::from(self)
    }
}

impl Token for u32 {
    #[inline(always)]
    fn id(self) -> u32 {
        self
    }
}

/// A tokenized corpus's ids, in the narrowest type the vocabulary allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenIds {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

/// A borrowed corpus of some token type; [`with_tokens!`](crate::with_tokens) runs generic code on it.
#[derive(Clone, Copy, Debug)]
pub enum TokenSlice<'a> {
    Bytes(&'a [u8]),
    U16(&'a [u16]),
    U32(&'a [u32]),
}

/// `with_tokens!(slice, data => expr)`: `expr` with `data` bound to the slice's `&[T]`.
#[macro_export]
macro_rules! with_tokens {
    ($slice:expr, $data:ident => $body:expr) => {
        match $slice {
            $crate::data::tokens::TokenSlice::Bytes($data) => $body,
            $crate::data::tokens::TokenSlice::U16($data) => $body,
            $crate::data::tokens::TokenSlice::U32($data) => $body,
        }
    };
}

impl TokenSlice<'_> {
    pub fn len(&self) -> usize {
        crate::with_tokens!(*self, d => d.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` tokens (all of them when there are fewer).
    pub fn prefix(self, n: usize) -> Self {
        match self {
            TokenSlice::Bytes(d) => TokenSlice::Bytes(&d[..n.min(d.len())]),
            TokenSlice::U16(d) => TokenSlice::U16(&d[..n.min(d.len())]),
            TokenSlice::U32(d) => TokenSlice::U32(&d[..n.min(d.len())]),
        }
    }
}

impl TokenIds {
    /// `ids` of a vocabulary of `vocab` tokens, as `u16` when every id fits.
    pub fn new(ids: Vec<u32>, vocab: usize) -> TokenIds {
        if vocab <= 1 << 16 {
            TokenIds::U16(ids.into_iter().map(|i| i as u16).collect())
        } else {
            TokenIds::U32(ids)
        }
    }

    pub fn len(&self) -> usize {
        self.slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per id (2 or 4).
    pub fn id_bytes(&self) -> usize {
        match self {
            TokenIds::U16(_) => 2,
            TokenIds::U32(_) => 4,
        }
    }

    pub fn slice(&self) -> TokenSlice<'_> {
        match self {
            TokenIds::U16(v) => TokenSlice::U16(v),
            TokenIds::U32(v) => TokenSlice::U32(v),
        }
    }

    fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TokenIds::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TokenIds::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// The cache's JSON header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheHeader {
    version: u32,
    tokenizer_sha256: String,
    data_sha256: String,
    data_bytes: u64,
    tokens: u64,
    id_bytes: u32,
    ids_sha256: String,
}

/// A corpus run through a tokenizer.
#[derive(Debug)]
pub struct Tokenized {
    pub tokenizer: Tokenizer,
    pub ids: TokenIds,
    /// Bytes of text each id stands for (for bits per byte), indexed by id.
    pub byte_lens: Vec<u32>,
}

/// Where the ids of a [`Tokenized`] came from, for the one line a run prints about them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// Read from the cache.
    Reused,
    /// Tokenized now; no cache was there.
    Made,
    /// Tokenized now; the cache there did not match (the reason).
    Remade(String),
}

impl Tokenized {
    /// Tokenizes `corpus` (UTF-8 text) with `tokenizer`.
    pub fn new(tokenizer: Tokenizer, corpus: &Corpus) -> Result<Tokenized> {
        let text = std::str::from_utf8(&corpus.bytes).map_err(|e| {
            err!(
                "{}: not UTF-8 text (invalid byte at offset {}), which a tokenizer cannot read",
                corpus.name,
                e.valid_up_to()
            )
        })?;
        let ids = tokenizer.encode(text).map_err(|e| e.context(&corpus.name))?;
        let ids = TokenIds::new(ids, tokenizer.vocab_size());
        Ok(Self::with_ids(tokenizer, ids))
    }

    fn with_ids(tokenizer: Tokenizer, ids: TokenIds) -> Tokenized {
        let byte_lens = tokenizer.token_bytes().iter().map(|b| b.len() as u32).collect();
        Tokenized { tokenizer, ids, byte_lens }
    }

    /// The corpus's ids from the cache at `path` when it matches `tokenizer` and `corpus`, else
    /// tokenized now (the cache is written by [`Tokenized::write_cache`]).
    pub fn cached(tokenizer: Tokenizer, corpus: &Corpus, path: &Path) -> Result<(Tokenized, CacheUse)> {
        if !path.exists() {
            return Ok((Self::new(tokenizer, corpus)?, CacheUse::Made));
        }
        match read_cache(path, &tokenizer, corpus) {
            Ok(ids) => Ok((Self::with_ids(tokenizer, ids), CacheUse::Reused)),
            Err(why) => Ok((Self::new(tokenizer, corpus)?, CacheUse::Remade(why.0))),
        }
    }

    /// Writes the ids of `corpus` to `path` atomically.
    pub fn write_cache(&self, corpus: &Corpus, path: &Path) -> Result<()> {
        let payload = self.ids.to_le_bytes();
        let header = CacheHeader {
            version: CACHE_VERSION,
            tokenizer_sha256: self.tokenizer.sha256().to_string(),
            data_sha256: corpus.hash.clone(),
            data_bytes: corpus.len() as u64,
            tokens: self.ids.len() as u64,
            id_bytes: self.ids.id_bytes() as u32,
            ids_sha256: sha256_hex(&payload),
        };
        let json = serde_json::to_vec(&header)?;
        write_atomic(path, |w| {
            let io = |e: std::io::Error| err!("cannot write {}: {e}", path.display());
            w.write_all(MAGIC).map_err(io)?;
            w.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
            w.write_all(&json).map_err(io)?;
            w.write_all(&payload).map_err(io)
        })
    }

    /// Bytes of text the tokens `ids` stand for.
    pub fn bytes_of(&self, ids: TokenSlice<'_>) -> u64 {
        crate::with_tokens!(ids, d => d.iter().map(|&t| u64::from(self.byte_lens[t.id() as usize])).sum())
    }
}

/// The ids in the cache at `path`, or why they cannot be used.
fn read_cache(path: &Path, tokenizer: &Tokenizer, corpus: &Corpus) -> Result<TokenIds> {
    let bytes = read_regular_file(path, MAX_DATA_BYTES * 4 + MAX_HEADER_BYTES, "token cache")?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        bail!("{}: not a cllm token cache", path.display());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || 16 + header_len as usize > bytes.len() {
        bail!("{}: damaged header", path.display());
    }
    let (header, payload) = bytes[16..].split_at(header_len as usize);
    let h: CacheHeader =
        serde_json::from_slice(header).map_err(|e| err!("{}: damaged header ({e})", path.display()))?;
    let short = |s: &str| s.chars().take(12).collect::<String>();
    if h.version != CACHE_VERSION {
        bail!("{}: cache version {} (this cllm writes {CACHE_VERSION})", path.display(), h.version);
    }
    if h.tokenizer_sha256 != tokenizer.sha256() {
        bail!(
            "{} was made with tokenizer {}…, this run's is {}…",
            path.display(),
            short(&h.tokenizer_sha256),
            short(tokenizer.sha256())
        );
    }
    if h.data_sha256 != corpus.hash || h.data_bytes != corpus.len() as u64 {
        bail!(
            "{} was made from other data ({} bytes, sha256 {}…; these are {} bytes, sha256 {}…)",
            path.display(),
            h.data_bytes,
            short(&h.data_sha256),
            corpus.len(),
            short(&corpus.hash)
        );
    }
    let expected_width = if tokenizer.vocab_size() <= 1 << 16 { 2 } else { 4 };
    if h.id_bytes != expected_width || h.tokens.checked_mul(u64::from(h.id_bytes)) != Some(payload.len() as u64) {
        bail!(
            "{}: {} bytes of ids do not hold {} ids of {} bytes",
            path.display(),
            payload.len(),
            h.tokens,
            h.id_bytes
        );
    }
    if sha256_hex(payload) != h.ids_sha256 {
        bail!("{}: the ids are damaged (checksum mismatch)", path.display());
    }
    let ids: Vec<u32> = if h.id_bytes == 2 {
        payload.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect()
    } else {
        payload.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= tokenizer.vocab_size()) {
        bail!("{}: id {bad} is outside the tokenizer's vocabulary", path.display());
    }
    Ok(TokenIds::new(ids, tokenizer.vocab_size()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataFormat;

    const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";

    #[test]
    fn the_cache_is_reused_only_for_its_tokenizer_and_data_and_never_when_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_CACHE_FILE);
        let corpus = Corpus::from_bytes("t", TEXT.repeat(10).into_bytes(), DataFormat::Text);
        let tok = || Tokenizer::train_bpe(&TEXT.repeat(10), 280).unwrap();
        let (made, how) = Tokenized::cached(tok(), &corpus, &path).unwrap();
        assert_eq!(how, CacheUse::Made);
        assert_eq!(made.bytes_of(made.ids.slice()), corpus.len() as u64);
        made.write_cache(&corpus, &path).unwrap();
        let (again, how) = Tokenized::cached(tok(), &corpus, &path).unwrap();
        assert_eq!((how, &again.ids), (CacheUse::Reused, &made.ids));

        let other = Tokenizer::train_bpe(&TEXT.repeat(10), 270).unwrap();
        let (_, how) = Tokenized::cached(other, &corpus, &path).unwrap();
        assert!(matches!(&how, CacheUse::Remade(why) if why.contains("made with tokenizer")), "{how:?}");
        let changed = Corpus::from_bytes("t", TEXT.repeat(11).into_bytes(), DataFormat::Text);
        let (_, how) = Tokenized::cached(tok(), &changed, &path).unwrap();
        assert!(matches!(&how, CacheUse::Remade(why) if why.contains("other data")), "{how:?}");

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (fixed, how) = Tokenized::cached(tok(), &corpus, &path).unwrap();
        assert!(matches!(&how, CacheUse::Remade(why) if why.contains("damaged")), "{how:?}");
        assert_eq!(fixed.ids, made.ids);
        for cut in [0, 7, 20, bytes.len() - 3] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(matches!(Tokenized::cached(tok(), &corpus, &path).unwrap().1, CacheUse::Remade(_)));
        }
    }

    #[test]
    fn ids_are_u16_when_the_vocabulary_fits_and_non_utf8_text_is_an_error() {
        assert_eq!(TokenIds::new(vec![1, 65535], 65536), TokenIds::U16(vec![1, 65535]));
        assert_eq!(TokenIds::new(vec![1, 65536], 65537), TokenIds::U32(vec![1, 65536]));
        let corpus = Corpus::from_bytes("bin", vec![b'a', 0xff], DataFormat::Text);
        let e = Tokenized::new(Tokenizer::train_bpe(TEXT, 260).unwrap(), &corpus).unwrap_err();
        assert!(e.to_string().contains("bin: not UTF-8") && e.to_string().contains("offset 1"), "{e}");
    }
}
