//! Subword tokenizers: a Hugging Face `tokenizer.json`, read, written and trained through the
//! `tokenizers` crate (the library behind transformers' fast tokenizers, so GPT-2's own
//! `tokenizer.json` works unchanged).
//!
//! [`Tokenizer::train_bpe`] trains GPT-2's kind of tokenizer: byte-level BPE (every byte of the
//! UTF-8 text maps to one of 256 base symbols, so no input is out of vocabulary), GPT-2's
//! pre-tokenizer split, no prefix space, so that decoding the ids of any text gives the text
//! back exactly. A tokenizer is identified by the SHA-256 of its JSON bytes.

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::config::MAX_VOCAB;
use crate::data::text::{read_regular_file, write_atomic};
use crate::error::Result;
use crate::{bail, err};

/// Largest `tokenizer.json` read (GPT-2's is 1.4 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
/// The byte-level base alphabet: a trained vocabulary is at least this large.
pub const BYTE_ALPHABET: usize = 256;
/// The end-of-text token a trained tokenizer reserves (GPT-2's spelling).
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The tokenizer's file name in a checkpoint directory (what `AutoTokenizer.from_pretrained`
/// reads).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded tokenizer and the SHA-256 of the JSON it came from.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    sha256: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).field("sha256", &self.sha256).finish()
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` (a regular file of at most [`MAX_TOKENIZER_BYTES`]).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = read_regular_file(path, MAX_TOKENIZER_BYTES, "tokenizer.json")?;
        Self::from_json(bytes).map_err(|e| e.context(path.display()))
    }

    /// Parses `tokenizer.json` bytes.
    pub fn from_json(bytes: Vec<u8>) -> Result<Self> {
        let json = String::from_utf8(bytes).map_err(|e| err!("not a tokenizer.json: not UTF-8 ({e})"))?;
        let inner = tokenizers::Tokenizer::from_str(&json).map_err(|e| err!("not a valid tokenizer.json: {e}"))?;
        let sha256 = crate::data::sha256_hex(json.as_bytes());
        let t = Tokenizer { inner, json, sha256 };
        if t.vocab_size() == 0 || t.vocab_size() > MAX_VOCAB {
            bail!("tokenizer vocabulary of {} tokens is outside 1..={MAX_VOCAB}", t.vocab_size());
        }
        Ok(t)
    }

    /// Trains a byte-level BPE of `vocab_size` tokens (the 256 byte symbols, [`END_OF_TEXT`],
    /// and merges learned from `text`).
    pub fn train_bpe(text: &str, vocab_size: usize) -> Result<Self> {
        check_vocab_size(vocab_size)?;
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .build();
        let byte_level = ByteLevel::new(false, true, true);
        let mut tokenizer = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(|e| err!("cannot build a BPE tokenizer: {e}"))?;
        tokenizer.train(&mut trainer, text.split_inclusive('\n')).map_err(|e| err!("BPE training failed: {e}"))?;
        let json = tokenizer.to_string(true).map_err(|e| err!("cannot serialize the tokenizer: {e}"))?;
        Self::from_json(json.into_bytes())
    }

    /// Writes the tokenizer's JSON to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, |w| {
            w.write_all(self.json.as_bytes()).map_err(|e| err!("cannot write {}: {e}", path.display()))
        })
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| err!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokens' strings (the tokenizer's own spelling: byte-level symbols for GPT-2 BPE).
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.inner.id_to_token(id).unwrap_or_default()).collect()
    }

    /// The text of `ids`; an id outside the vocabulary is an error naming it.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            bail!("token id {bad} is outside the vocabulary (0..{})", self.vocab_size());
        }
        self.inner.decode(ids, false).map_err(|e| err!("cannot decode: {e}"))
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// SHA-256 of the JSON bytes, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The JSON bytes.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The bytes each id stands for in the text, indexed by id. Exact for byte-level
    /// tokenizers (GPT-2's kind: each symbol of a token is one byte) and for added tokens
    /// (their content); for other decoders, the id decoded alone.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let added = self.inner.get_added_tokens_decoder();
        let byte_level = matches!(self.inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        let symbols = byte_symbols_inverse();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    return t.content.as_bytes().to_vec();
                }
                let token = self.inner.id_to_token(id).unwrap_or_default();
                let mapped: Option<Vec<u8>> =
                    if byte_level { token.chars().map(|c| symbols.get(&c).copied()).collect() } else { None };
                mapped.unwrap_or_else(|| self.inner.decode(&[id], false).unwrap_or_default().into_bytes())
            })
            .collect()
    }
}

/// GPT-2's byte-level alphabet: byte `b` is written as the character `byte_symbol(b)`. The
/// printable bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves; the other 68 are
/// numbered from U+0100 in byte order (so the space is `Ġ`, U+0120, and `\n` is `Ċ`).
pub fn byte_symbol(b: u8) -> char {
    let printable = |x: u8| matches!(x, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Character to byte, the inverse of [`byte_symbol`].
fn byte_symbols_inverse() -> std::collections::HashMap<char, u8> {
    (0..=255u8).map(|b| (byte_symbol(b), b)).collect()
}

/// A trainable vocabulary size: room for the byte alphabet and [`END_OF_TEXT`], at most
/// [`MAX_VOCAB`].
pub fn check_vocab_size(vocab_size: usize) -> Result<()> {
    let min = BYTE_ALPHABET + 1;
    if !(min..=MAX_VOCAB).contains(&vocab_size) {
        bail!("--vocab-size {vocab_size}: must be in {min}..={MAX_VOCAB} (256 byte symbols, {END_OF_TEXT}, merges)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";

    #[test]
    fn trained_bpe_round_trips_text_exactly_including_unseen_bytes() {
        let t = Tokenizer::train_bpe(&TEXT.repeat(20), 300).unwrap();
        assert!(t.vocab_size() > BYTE_ALPHABET && t.vocab_size() <= 300, "{}", t.vocab_size());
        for text in [TEXT, "  leading spaces, tabs\tand ünïcödé 字 🎭\r\n", "", "\n\n\n"] {
            let ids = t.encode(text).unwrap();
            assert_eq!(t.decode(&ids).unwrap(), text);
        }
        let ids = t.encode(TEXT).unwrap();
        assert!(ids.len() < TEXT.len(), "merges shorten the text: {} ids for {} bytes", ids.len(), TEXT.len());
    }

    #[test]
    fn byte_symbols_are_gpt2s_and_token_bytes_spell_the_text() {
        assert_eq!(byte_symbol(b' '), 'Ġ');
        assert_eq!(byte_symbol(b'\n'), 'Ċ');
        assert_eq!(byte_symbol(b'A'), 'A');
        assert_eq!(byte_symbol(0xad), '\u{143}');
        assert_eq!(byte_symbols_inverse().len(), 256);
        let t = Tokenizer::train_bpe(&TEXT.repeat(20), 300).unwrap();
        let table = t.token_bytes();
        assert_eq!(table.len(), t.vocab_size());
        let text = "Speak, speak ünïcödé 🎭\n";
        let spelled: Vec<u8> = t.encode(text).unwrap().iter().flat_map(|&id| table[id as usize].clone()).collect();
        assert_eq!(spelled, text.as_bytes());
        let eot = t.encode(END_OF_TEXT).unwrap();
        assert_eq!(table[eot[0] as usize], END_OF_TEXT.as_bytes());
    }

    #[test]
    fn saved_json_loads_back_with_the_same_hash_and_ids() {
        let t = Tokenizer::train_bpe(&TEXT.repeat(5), 280).unwrap();
        let back = Tokenizer::from_json(t.json().as_bytes().to_vec()).unwrap();
        assert_eq!(back.sha256(), t.sha256());
        assert_eq!(back.encode(TEXT).unwrap(), t.encode(TEXT).unwrap());
    }

    #[test]
    fn bad_vocab_sizes_and_ids_and_json_are_errors() {
        assert!(Tokenizer::train_bpe(TEXT, 100).unwrap_err().to_string().contains("--vocab-size"));
        assert!(Tokenizer::train_bpe(TEXT, MAX_VOCAB + 1).is_err());
        let t = Tokenizer::train_bpe(TEXT, 260).unwrap();
        assert!(t.decode(&[u32::MAX]).unwrap_err().to_string().contains("outside the vocabulary"));
        assert!(Tokenizer::from_json(b"{\"model\": 3}".to_vec()).is_err());
        assert!(Tokenizer::from_json(vec![0xff, 0xfe]).is_err());
    }
}
