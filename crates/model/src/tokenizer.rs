//! The Qwen2 tokenizer (byte-level BPE) of a snapshot's `tokenizer/` folder.
//!
//! `tokenizer.json` is used when present. The released Qwen/Qwen-Image snapshot ships without it (reference
//! §3.1), so the tokenizer is otherwise rebuilt from `vocab.json` + `merges.txt` exactly like transformers'
//! `Qwen2Tokenizer` (reference §3.2/§3.3): NFC normaliser, the Qwen2 split regex (isolated) then ByteLevel
//! (no prefix space, no regex), BPE without unk/dropout, ByteLevel decoder, no post-processor. Added tokens
//! (`<|endoftext|>`, `<|im_start|>`, ...) come from `tokenizer_config.json` `added_tokens_decoder` and/or
//! `added_tokens.json`, with the ids those files give; they are never hard-coded.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Result;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::snapshot::{Snapshot, read_json};

/// Qwen2's pre-tokenizer split pattern (transformers `tokenization_qwen2.py` `PRETOKENIZE_REGEX`, reference
/// §3.2). `\p{N}` has no repetition: every digit is its own pre-token.
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pad token when `tokenizer_config.json` names none (Qwen2Tokenizer's default, reference §3.1).
const DEFAULT_PAD_TOKEN: &str = "<|endoftext|>";

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// One added token as declared by the tokenizer files.
#[derive(Debug, Clone, PartialEq)]
struct AddedSpec {
    content: String,
    special: bool,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

/// The Qwen2 tokenizer with its pad token.
#[derive(Clone)]
pub struct QwenTokenizer {
    inner: Tokenizer,
    pad_id: u32,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl QwenTokenizer {
    /// Loads the `tokenizer` component of a snapshot.
    pub fn from_snapshot(snapshot: &Snapshot) -> Result<Self> {
        Self::from_dir(&snapshot.component_dir("tokenizer")?)
    }

    /// Loads a tokenizer folder: `tokenizer.json` when present, otherwise `vocab.json` + `merges.txt` (+ the
    /// added tokens of `tokenizer_config.json` / `added_tokens.json`). Every declared added token is checked
    /// to have the id its file gives.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let added = read_added_tokens(dir)?;
        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| err(format!("cannot load {}: {e}", json.display())))?
        } else {
            build_from_vocab_merges(dir, &added)?
        };
        // We truncate and pad ourselves (diffusers' call arguments), whatever tokenizer.json says.
        inner
            .with_truncation(None)
            .map_err(|e| err(format!("{}: {e}", dir.display())))?;
        inner.with_padding(None);
        for (id, spec) in &added {
            match inner.token_to_id(&spec.content) {
                Some(got) if got == *id => {}
                got => {
                    return Err(err(format!(
                        "{}: added token `{}` should have id {id} (tokenizer_config.json / added_tokens.json) but the \
                         tokenizer gives {got:?}; added ids must follow vocab.json without gaps",
                        dir.display(),
                        spec.content
                    )));
                }
            }
        }
        let pad_token = pad_token_name(dir)?;
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            err(format!(
                "{}: the pad token `{pad_token}` is not in the vocabulary",
                dir.display()
            ))
        })?;
        Ok(Self { inner, pad_id })
    }

    /// Token ids of `text` as `tokenizer(text)["input_ids"]` gives them (added tokens typed in the text are
    /// matched, as with `split_special_tokens=False`; Qwen2 adds no BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| err(format!("tokenizer: cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids back to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| err(format!("tokenizer: cannot decode ids: {e}")))
    }

    /// Id of a token string, if in the vocabulary or the added tokens.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Id used for right padding (`pad_token` of `tokenizer_config.json`, `<|endoftext|>` by default).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Builds Qwen2Tokenizer from `vocab.json` + `merges.txt` (reference §3.3).
fn build_from_vocab_merges(dir: &Path, added: &BTreeMap<u32, AddedSpec>) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(err(format!(
                "{}: neither tokenizer.json nor {} found",
                dir.display(),
                f.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default()
            )));
        }
    }
    let path_str = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| err(format!("{}: path is not UTF-8", p.display())))
    };
    let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?)
        .build()
        .map_err(|e| {
            err(format!(
                "{}: cannot build BPE from vocab.json + merges.txt: {e}",
                dir.display()
            ))
        })?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| err(format!("tokenizer: Qwen2 split regex: {e}")))?;
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        // add_prefix_space=false, trim_offsets=true, use_regex=false (tokenization_qwen2.py)
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]);
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerWrapper::NFC(NFC)))
        .map_err(|e| err(format!("tokenizer: NFC normaliser: {e}")))?;
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    // In id order, one at a time: `tokenizers` gives a new token the next free id, so the ids match the
    // files exactly when they follow the vocabulary without gaps (checked by the caller).
    for spec in added.values() {
        let mut t =
            AddedToken::from(spec.content.clone(), spec.special).normalized(spec.normalized);
        t = t
            .lstrip(spec.lstrip)
            .rstrip(spec.rstrip)
            .single_word(spec.single_word);
        let res = if spec.special {
            tok.add_special_tokens([t])
        } else {
            tok.add_tokens([t])
        };
        res.map_err(|e| {
            err(format!(
                "{}: cannot add token `{}`: {e}",
                dir.display(),
                spec.content
            ))
        })?;
    }
    Ok(tok)
}

/// Added tokens by id, from `tokenizer_config.json` `added_tokens_decoder` and `added_tokens.json` (either may
/// be absent; when both name an id they must agree).
fn read_added_tokens(dir: &Path) -> Result<BTreeMap<u32, AddedSpec>> {
    let mut out: BTreeMap<u32, AddedSpec> = BTreeMap::new();
    let cfg_path = dir.join("tokenizer_config.json");
    if cfg_path.is_file() {
        let cfg: serde_json::Value = read_json(&cfg_path)?;
        if let Some(dec) = cfg.get("added_tokens_decoder").and_then(|v| v.as_object()) {
            for (id, v) in dec {
                let id: u32 = id.parse().map_err(|_| {
                    err(format!(
                        "{}: added_tokens_decoder key `{id}` is not an id",
                        cfg_path.display()
                    ))
                })?;
                let flag =
                    |k: &str, default: bool| v.get(k).and_then(|b| b.as_bool()).unwrap_or(default);
                let content = v.get("content").and_then(|c| c.as_str()).ok_or_else(|| {
                    err(format!(
                        "{}: added_tokens_decoder[{id}] has no `content`",
                        cfg_path.display()
                    ))
                })?;
                out.insert(
                    id,
                    AddedSpec {
                        content: content.to_string(),
                        special: flag("special", false),
                        normalized: flag("normalized", false),
                        lstrip: flag("lstrip", false),
                        rstrip: flag("rstrip", false),
                        single_word: flag("single_word", false),
                    },
                );
            }
        }
    }
    let at_path = dir.join("added_tokens.json");
    if at_path.is_file() {
        let at: BTreeMap<String, u32> = read_json(&at_path)?;
        for (content, id) in at {
            match out.get(&id) {
                Some(spec) if spec.content != content => {
                    return Err(err(format!(
                        "{}: id {id} is `{content}` but tokenizer_config.json says `{}`",
                        at_path.display(),
                        spec.content
                    )));
                }
                Some(_) => {}
                None => {
                    // Only listed in added_tokens.json: transformers adds it as a plain (non-special,
                    // non-normalised) token.
                    out.insert(
                        id,
                        AddedSpec {
                            content,
                            special: false,
                            normalized: false,
                            lstrip: false,
                            rstrip: false,
                            single_word: false,
                        },
                    );
                }
            }
        }
    }
    Ok(out)
}

/// `pad_token` of `tokenizer_config.json` (a string or `{content: ..}`), default `<|endoftext|>`.
fn pad_token_name(dir: &Path) -> Result<String> {
    let cfg_path = dir.join("tokenizer_config.json");
    if !cfg_path.is_file() {
        return Ok(DEFAULT_PAD_TOKEN.to_string());
    }
    let cfg: serde_json::Value = read_json(&cfg_path)?;
    let pad = match cfg.get("pad_token") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(DEFAULT_PAD_TOKEN)
            .to_string(),
        _ => DEFAULT_PAD_TOKEN.to_string(),
    };
    Ok(pad)
}
