//! SentencePiece `tokenizer.model` files turned into a `tokenizers` tokenizer. gazelle-v0.1
//! (Llama-2) ships only `tokenizer.model`, and the `tokenizers` crate reads only `tokenizer.json`.
//! This does what transformers' slow-to-fast conversion does for Llama/Mistral tokenizers
//! (`LlamaConverter`, legacy mode): a byte-fallback BPE over the model's pieces, with merges
//! derived from the vocabulary (every split of a piece into two pieces, ranked by the merged
//! piece's score, best first), the `▁` normalizer and decoder, and `<unk>`, `<s>`, `</s>` as
//! special tokens. `the_converted_model_equals_transformers_tokenizer_json` checks the result against
//! the tokenizer.json that transformers 4.38.2 wrote for Mistral's v1 model.
//!
//! The `.model` file is a protobuf `ModelProto`; the few fields needed are read by hand.

use std::collections::HashMap;

use serde_json::{json, Value};

/// Why a `tokenizer.model` could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum SentencePieceError {
    #[error("tokenizer.model is not a SentencePiece model: {0}")]
    Malformed(&'static str),
    #[error(
        "tokenizer.model is a SentencePiece {0} model; only BPE models (Llama, Mistral) convert"
    )]
    NotBpe(&'static str),
}

/// One field of a protobuf message.
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, SentencePieceError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or(SentencePieceError::Malformed("a varint runs past the end"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(SentencePieceError::Malformed("a varint is too long"))
}

/// The fields of one message, in order.
fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, SentencePieceError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (number, wire) = (key >> 3, key & 7);
        let short = SentencePieceError::Malformed("a field runs past the end");
        let field = match wire {
            0 => Field::Varint(varint(buf, &mut pos)?),
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|&p| p <= buf.len())
                    .ok_or(short)?;
                Field::Other
            }
            2 => {
                let n = varint(buf, &mut pos)? as usize;
                let end = pos
                    .checked_add(n)
                    .filter(|&e| e <= buf.len())
                    .ok_or(short)?;
                let bytes = &buf[pos..end];
                pos = end;
                Field::Bytes(bytes)
            }
            5 => {
                let b = buf.get(pos..pos + 4).ok_or(short)?;
                pos += 4;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => return Err(SentencePieceError::Malformed("an unknown wire type")),
        };
        out.push((number, field));
    }
    Ok(out)
}

/// One vocabulary entry: its text and its score (higher merges first).
struct Piece {
    text: String,
    score: f32,
}

/// The pieces of a BPE `tokenizer.model`, in id order.
fn bpe_pieces(model: &[u8]) -> Result<Vec<Piece>, SentencePieceError> {
    let mut pieces = Vec::new();
    // proto2 default of TrainerSpec.model_type: UNIGRAM.
    let mut model_type = 1;
    for (number, field) in fields(model)? {
        match (number, field) {
            (1, Field::Bytes(piece)) => {
                let (mut text, mut score) = (None, 0.0);
                for (n, f) in fields(piece)? {
                    match (n, f) {
                        (1, Field::Bytes(s)) => {
                            text = Some(
                                std::str::from_utf8(s)
                                    .map_err(|_| {
                                        SentencePieceError::Malformed("a piece is not UTF-8")
                                    })?
                                    .to_string(),
                            )
                        }
                        (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
                        _ => {}
                    }
                }
                let text = text.ok_or(SentencePieceError::Malformed("a piece has no text"))?;
                pieces.push(Piece { text, score });
            }
            (2, Field::Bytes(spec)) => {
                for (n, f) in fields(spec)? {
                    if let (3, Field::Varint(t)) = (n, f) {
                        model_type = t;
                    }
                }
            }
            _ => {}
        }
    }
    match model_type {
        2 => {}
        1 => return Err(SentencePieceError::NotBpe("unigram")),
        3 => return Err(SentencePieceError::NotBpe("word")),
        4 => return Err(SentencePieceError::NotBpe("char")),
        _ => return Err(SentencePieceError::NotBpe("unknown-type")),
    }
    if pieces.len() < 3 {
        return Err(SentencePieceError::Malformed("fewer than three pieces"));
    }
    Ok(pieces)
}

/// Merges implied by a vocabulary: each way to split a piece into two pieces, ranked by the
/// merged piece's score (best first; ties keep id order), then by the ids of its halves.
fn merges(pieces: &[Piece], ids: &HashMap<&str, usize>) -> Vec<String> {
    let mut out: Vec<(f32, String)> = Vec::new();
    for piece in pieces {
        let text = &piece.text;
        let mut local: Vec<(usize, usize, &str, &str)> = text
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| {
                let (l, r) = text.split_at(i);
                Some((*ids.get(l)?, *ids.get(r)?, l, r))
            })
            .collect();
        local.sort_unstable();
        out.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (piece.score, format!("{l} {r}"))),
        );
    }
    // Stable: equal scores stay in id order.
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    out.into_iter().map(|(_, m)| m).collect()
}

/// One `added_tokens` entry of a tokenizer.json, as transformers writes it.
pub(crate) fn added_token_json(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": !special, "special": special})
}

/// `tokenizer.json` for a Llama/Mistral SentencePiece model in legacy mode. `added` are extra
/// tokens (id, content, special), e.g. from `tokenizer_config.json`'s `added_tokens_decoder`.
pub(crate) fn llama_tokenizer_json(
    model: &[u8],
    add_prefix_space: bool,
    added: &[(u32, String, bool)],
) -> Result<String, SentencePieceError> {
    let mut pieces = bpe_pieces(model)?;
    // As transformers' converter: the first three are the specials, with score 0.
    for (i, name) in ["<unk>", "<s>", "</s>"].into_iter().enumerate() {
        pieces[i] = Piece {
            text: name.to_string(),
            score: 0.0,
        };
    }
    let ids: HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.text.as_str(), i))
        .collect();
    let merges = merges(&pieces, &ids);
    let vocab: serde_json::Map<String, Value> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.text.clone(), i.into()))
        .collect();
    let mut added_tokens = vec![
        added_token_json(0, "<unk>", true),
        added_token_json(1, "<s>", true),
        added_token_json(2, "</s>", true),
    ];
    for (id, content, special) in added {
        if *id > 2 {
            added_tokens.push(added_token_json(*id, content, *special));
        }
    }
    let mut normalizers = Vec::new();
    if add_prefix_space {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "vocab": vocab, "merges": merges,
        },
    });
    Ok(tokenizer.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gazelle/mistral-v1-tokenizer")
    }

    /// Mistral's v1 `tokenizer.model` converts to what transformers 4.38.2 wrote for it: the
    /// same vocabulary, the same 58,980 merges in the same order, the same normalizer and
    /// decoder, and so the same ids for every case in cases.json.
    #[test]
    fn the_converted_model_equals_transformers_tokenizer_json() {
        let model = std::fs::read(fixture().join("tokenizer.model")).unwrap();
        let added = [(32000, "<|audio|>".to_string(), true)];
        let ours: Value =
            serde_json::from_str(&llama_tokenizer_json(&model, true, &added).unwrap()).unwrap();
        let hf: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture().join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(ours["model"]["vocab"], hf["model"]["vocab"]);
        let (a, b) = (
            ours["model"]["merges"].as_array().unwrap(),
            hf["model"]["merges"].as_array().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            panic!("merge {i}: ours {} transformers {}", a[i], b[i]);
        }
        for key in ["normalizer", "pre_tokenizer", "decoder", "post_processor"] {
            assert_eq!(ours[key], hf[key], "{key}");
        }
        for key in ["fuse_unk", "byte_fallback", "unk_token"] {
            assert_eq!(ours["model"][key], hf["model"][key], "{key}");
        }
        let ids = |v: &Value| -> Vec<(u64, String)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["id"].as_u64().unwrap(),
                        t["content"].as_str().unwrap().into(),
                    )
                })
                .collect()
        };
        assert_eq!(ids(&ours["added_tokens"]), ids(&hf["added_tokens"]));
    }

    #[test]
    fn a_file_that_is_not_a_bpe_model_says_so() {
        let e = llama_tokenizer_json(b"not a model", true, &[]).unwrap_err();
        assert!(e.to_string().contains("not a SentencePiece model"), "{e}");
        // A one-piece model whose trainer spec says UNIGRAM (model_type 1).
        let unigram = [0x0a, 0x03, 0x0a, 0x01, b'a', 0x12, 0x02, 0x18, 0x01];
        let e = llama_tokenizer_json(&unigram, true, &[]).unwrap_err();
        assert!(e.to_string().contains("unigram"), "{e}");
    }
}
