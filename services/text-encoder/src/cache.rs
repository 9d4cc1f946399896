//! The prompt-embedding cache: each prompt's embedding rows, kept after it is encoded so that a prompt sent
//! again (above all the negative prompt every CFG request sends) skips the text model.
//!
//! Keyed by the prompt and the sequence-length setting; the cache belongs to the loaded model (it lives in
//! [`crate::model::LoadedModel`], so it never outlives the weights whose output it holds). Bounded in bytes
//! (`--embedding-cache-mb`): the least recently used prompts go first; a prompt larger than the whole bound is
//! not kept. 0 turns the cache off.

use std::collections::HashMap;

use qwen_image_common::metric_names as m;

/// One prompt's encoding: the rows diffusers keeps for it (template prefix dropped, cut at
/// `max_sequence_length`), before the batch pads them to its longest prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRows {
    /// `[rows, hidden]`, row-major, in f32.
    pub values: Vec<f32>,
    pub rows: usize,
    /// Tokens after the template prefix, before truncation.
    pub token_count: usize,
    pub truncated: bool,
}

impl PromptRows {
    fn bytes(&self, key: &Key) -> usize {
        self.values.len() * std::mem::size_of::<f32>() + key.0.len() + std::mem::size_of::<Self>()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key(String, usize);

struct Entry {
    rows: PromptRows,
    bytes: usize,
    last_used: u64,
}

/// A byte-bounded LRU map from (prompt, max_sequence_length) to [`PromptRows`].
pub struct EmbeddingCache {
    capacity: usize,
    used: usize,
    clock: u64,
    entries: HashMap<Key, Entry>,
}

impl EmbeddingCache {
    /// A cache holding at most `capacity_bytes` (0 = off).
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity: capacity_bytes,
            used: 0,
            clock: 0,
            entries: HashMap::new(),
        }
    }

    /// The rows of `prompt` encoded with `max_sequence_length`, if kept; counts a hit or a miss.
    pub fn get(&mut self, prompt: &str, max_sequence_length: usize) -> Option<PromptRows> {
        self.clock += 1;
        let key = Key(prompt.to_owned(), max_sequence_length);
        let found = self.entries.get_mut(&key).map(|e| {
            e.last_used = self.clock;
            e.rows.clone()
        });
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!(m::EMBEDDING_CACHE_LOOKUPS_TOTAL, "service" => "text-encoder", "outcome" => outcome)
            .increment(1);
        found
    }

    /// Keeps `rows`, evicting the least recently used prompts to stay within the bound.
    pub fn insert(&mut self, prompt: &str, max_sequence_length: usize, rows: PromptRows) {
        let key = Key(prompt.to_owned(), max_sequence_length);
        let bytes = rows.bytes(&key);
        if bytes > self.capacity {
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.used -= old.bytes;
        }
        while self.used + bytes > self.capacity {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.used -= e.bytes;
                metrics::counter!(m::EMBEDDING_CACHE_EVICTIONS_TOTAL, "service" => "text-encoder")
                    .increment(1);
            }
        }
        self.clock += 1;
        self.used += bytes;
        self.entries.insert(
            key,
            Entry {
                rows,
                bytes,
                last_used: self.clock,
            },
        );
        self.publish();
    }

    /// Bytes held now (embedding values, keys and bookkeeping).
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn publish(&self) {
        metrics::gauge!(m::EMBEDDING_CACHE_BYTES, "service" => "text-encoder")
            .set(self.used as f64);
        metrics::gauge!(m::EMBEDDING_CACHE_ENTRIES, "service" => "text-encoder")
            .set(self.entries.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> PromptRows {
        PromptRows {
            values: vec![n as f32; n * 4],
            rows: n,
            token_count: n,
            truncated: false,
        }
    }

    #[test]
    fn hits_after_insert_and_keys_on_the_sequence_length() {
        let mut c = EmbeddingCache::new(1 << 20);
        assert_eq!(c.get("a cat", 512), None);
        c.insert("a cat", 512, rows(3));
        assert_eq!(c.get("a cat", 512), Some(rows(3)));
        assert_eq!(c.get("a cat", 256), None);
        assert_eq!(c.get("a dog", 512), None);
    }

    #[test]
    fn stays_within_its_bound_dropping_the_least_recently_used() {
        let one = rows(10).bytes(&Key("p0".into(), 512));
        let mut c = EmbeddingCache::new(3 * one);
        for i in 0..3 {
            c.insert(&format!("p{i}"), 512, rows(10));
        }
        assert_eq!(c.len(), 3);
        // p0 used again: p1 is now the oldest and goes first
        assert!(c.get("p0", 512).is_some());
        c.insert("p3", 512, rows(10));
        assert!(c.used_bytes() <= 3 * one);
        assert!(c.get("p1", 512).is_none());
        assert!(c.get("p0", 512).is_some() && c.get("p3", 512).is_some());
        // larger than the whole bound: not kept, nothing evicted
        c.insert("huge", 512, rows(1000));
        assert!(c.get("huge", 512).is_none());
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut c = EmbeddingCache::new(0);
        c.insert("a", 512, rows(1));
        assert!(c.is_empty() && c.get("a", 512).is_none());
    }
}
