//! Prompt text for Gazelle: the `tokenizers` tokenizer, the chat template from
//! `tokenizer_config.json` (rendered with minijinja the way transformers' `apply_chat_template`
//! renders it with jinja2), and incremental detokenization for streaming.

use std::path::Path;

use minijinja::{context, Environment, ErrorKind};
use serde_json::Value;
use tokenizers::Tokenizer;

/// The placeholder that marks where a clip's audio embeddings go.
pub(crate) const AUDIO_PLACEHOLDER: &str = "<|audio|>";

/// Used when a checkpoint ships no chat template: the Llama-2/Mistral `[INST]` format.
/// Like Mistral's, it rejects a system role, which [`SystemPromptMode::Auto`] then folds into the
/// first user turn.
const FALLBACK_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}\
{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}\
{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}\
{% else %}{{ raise_exception('the [INST] template has no ' + m['role'] + ' role') }}\
{% endif %}{% endfor %}";

/// Errors from tokenizer files, templates and tokenization.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tokenizer.json could not be loaded: {0}")]
    Tokenizer(String),
    #[error("tokenizer_config.json is not valid JSON: {0}")]
    Config(#[from] serde_json::Error),
    #[error("chat template failed to render: {0}")]
    Template(#[from] minijinja::Error),
    #[error("the tokenizer has no token `{0}`; is this a Gazelle tokenizer?")]
    MissingToken(String),
    #[error("{path}: {source}")]
    SentencePiece {
        path: String,
        source: super::sentencepiece::SentencePieceError,
    },
}

/// One chat message, as chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub(crate) fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The user message for a clip: `prompt` with `<|audio|>` where the audio goes, or the audio
/// first when `prompt` does not say.
pub(crate) fn user_content_with_audio(prompt: &str) -> String {
    if prompt.contains(AUDIO_PLACEHOLDER) {
        prompt.to_string()
    } else if prompt.trim().is_empty() {
        AUDIO_PLACEHOLDER.to_string()
    } else {
        format!("{AUDIO_PLACEHOLDER}\n{prompt}")
    }
}

/// What becomes of a call's system prompt. Gazelle's own template (Mistral's `[INST]`) rejects
/// a system role, and the model was not trained with one, so there is no reference behaviour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemPromptMode {
    /// The template's own system role where it has one; otherwise folded into the first user
    /// turn (`system\n\nuser`), as Mistral's later templates do.
    #[default]
    Auto,
    /// Always folded into the first user turn.
    Fold,
    /// Left out.
    Omit,
}

/// A SentencePiece `tokenizer.model` converted as transformers' Llama converter does, with the
/// added tokens (e.g. `<|audio|>`) and prefix-space setting of `tokenizer_config.json`.
fn sentencepiece_tokenizer(path: &Path, cfg: &Value) -> Result<Tokenizer, PromptError> {
    let model = std::fs::read(path).map_err(|source| PromptError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let add_prefix_space = cfg
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let mut added: Vec<(u32, String, bool)> = cfg
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(id, t)| {
                    let content = t.get("content")?.as_str()?.to_string();
                    let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
                    Some((id.parse().ok()?, content, special))
                })
                .collect()
        })
        .unwrap_or_default();
    added.sort();
    let json = super::sentencepiece::llama_tokenizer_json(&model, add_prefix_space, &added)
        .map_err(|source| PromptError::SentencePiece {
            path: path.display().to_string(),
            source,
        })?;
    tokenizer_from_json(&json)
}

fn tokenizer_from_json(json: &str) -> Result<Tokenizer, PromptError> {
    json.parse()
        .map_err(|e: tokenizers::Error| PromptError::Tokenizer(e.to_string()))
}

/// The conversation without its system message, whose text now opens the first user message.
fn fold_system(system: &str, rest: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut rest = rest.to_vec();
    if let Some(first) = rest.iter_mut().find(|m| m.role == "user") {
        first.content = format!("{system}\n\n{}", first.content);
    }
    rest
}

/// Tokenizer plus chat template.
#[derive(Debug, Clone)]
pub(crate) struct ChatPrompt {
    tokenizer: Tokenizer,
    template: String,
    bos_token: String,
    eos_token: String,
    eos_token_id: Option<u32>,
    system: SystemPromptMode,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read(path: &Path) -> Result<String, PromptError> {
    std::fs::read_to_string(path).map_err(|source| PromptError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl ChatPrompt {
    /// `tokenizer_config` supplies bos/eos and `chat_template`; a `chat_template.jinja` file
    /// (newer transformers) wins over both; with neither, the `[INST]` format is used.
    pub(crate) fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        chat_template_file: Option<&Path>,
    ) -> Result<Self, PromptError> {
        let cfg: Value = match tokenizer_config {
            Some(p) => serde_json::from_str(&read(p)?)?,
            None => Value::Null,
        };
        let tokenizer = if tokenizer_json.extension().is_some_and(|e| e == "model") {
            sentencepiece_tokenizer(tokenizer_json, &cfg)?
        } else {
            Tokenizer::from_file(tokenizer_json)
                .map_err(|e| PromptError::Tokenizer(e.to_string()))?
        };
        let template = match chat_template_file {
            Some(p) => read(p)?,
            None => match cfg.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .unwrap_or(FALLBACK_TEMPLATE)
                    .to_string(),
                _ => FALLBACK_TEMPLATE.to_string(),
            },
        };
        let bos_token = token_string(cfg.get("bos_token")).unwrap_or_else(|| "<s>".into());
        let eos_token = token_string(cfg.get("eos_token")).unwrap_or_else(|| "</s>".into());
        Ok(Self::assemble(tokenizer, template, bos_token, eos_token))
    }

    /// A word-level tokenizer over a whole vocabulary (`w3`, `w4`, … one word per id, plus
    /// `<unk>`, `<s>`, `</s>` and `<|audio|>` at `audio_id`) with the `[INST]` template: for
    /// benchmarks of random-weight models, which have no tokenizer. Every id decodes to a word,
    /// so every sampled token streams a piece.
    pub(crate) fn synthetic(vocab_size: usize, audio_id: u32) -> Result<Self, PromptError> {
        let mut vocab = serde_json::Map::new();
        for (i, w) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(w.to_string(), i.into());
        }
        for i in 3..vocab_size as u32 {
            if i != audio_id {
                vocab.insert(format!("w{i}"), i.into());
            }
        }
        vocab.insert(AUDIO_PLACEHOLDER.into(), audio_id.into());
        let special = |id, content| super::sentencepiece::added_token_json(id, content, true);
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [special(1, "<s>"), special(2, "</s>"), special(audio_id, AUDIO_PLACEHOLDER)],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        let tokenizer = tokenizer_from_json(&json.to_string())?;
        Ok(Self::assemble(
            tokenizer,
            FALLBACK_TEMPLATE.into(),
            "<s>".into(),
            "</s>".into(),
        ))
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: String,
        bos_token: String,
        eos_token: String,
    ) -> Self {
        let eos_token_id = tokenizer.token_to_id(&eos_token);
        Self {
            tokenizer,
            template,
            bos_token,
            eos_token,
            eos_token_id,
            system: SystemPromptMode::Auto,
        }
    }

    pub(crate) fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Checks that `<|audio|>` is a single token with the model's `audio_token_index`.
    pub(crate) fn check_audio_token(&self, audio_token_index: u32) -> Result<(), PromptError> {
        match self.tokenizer.token_to_id(AUDIO_PLACEHOLDER) {
            Some(id) if id == audio_token_index => Ok(()),
            _ => Err(PromptError::MissingToken(format!(
                "{AUDIO_PLACEHOLDER} with id {audio_token_index}"
            ))),
        }
    }

    fn render_raw(&self, messages: &[ChatMessage], gen: bool) -> Result<String, minijinja::Error> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", &self.template)?;
        env.get_template("chat")?.render(context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => gen,
        })
    }

    /// Sets what becomes of a system prompt.
    pub(crate) fn set_system_mode(&mut self, mode: SystemPromptMode) {
        self.system = mode;
    }

    /// Renders a conversation. A leading system message goes as [`SystemPromptMode`] says; in
    /// `Auto`, templates that reject a system role (Mistral v0.1/v0.2) get the system text
    /// folded into the first user message instead.
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        gen: bool,
    ) -> Result<String, PromptError> {
        let system = messages.first().filter(|m| m.role == "system");
        match (system, self.system) {
            (None, _) => Ok(self.render_raw(messages, gen)?),
            (Some(_), SystemPromptMode::Omit) => Ok(self.render_raw(&messages[1..], gen)?),
            (Some(s), SystemPromptMode::Fold) => {
                Ok(self.render_raw(&fold_system(&s.content, &messages[1..]), gen)?)
            }
            (Some(s), SystemPromptMode::Auto) => match self.render_raw(messages, gen) {
                Ok(text) => Ok(text),
                Err(e) if messages[1..].iter().any(|m| m.role == "user") => {
                    tracing::trace!(error = %e, "the template rejects a system role: folding it");
                    Ok(self.render_raw(&fold_system(&s.content, &messages[1..]), gen)?)
                }
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Text -> ids, without adding special tokens (the template writes `<s>` itself).
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids -> text, skipping special tokens.
    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }
}

/// Turns a growing list of generated ids into text pieces. Decoding the whole reply each time
/// keeps Metaspace/byte-fallback spacing right; a piece that ends in an incomplete UTF-8
/// sequence (U+FFFD) is held back until the next token completes it.
#[derive(Debug, Default, Clone)]
pub(crate) struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds one id and returns the new text, possibly empty.
    pub(crate) fn push(&mut self, prompt: &ChatPrompt, id: u32) -> Result<String, PromptError> {
        self.ids.push(id);
        let text = prompt.decode(&self.ids)?;
        if text.ends_with('\u{fffd}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let piece = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real-vocabulary fixture, loaded from `file` (tokenizer.json or tokenizer.model).
    fn real_tokenizer(file: &str) -> ChatPrompt {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gazelle/mistral-v1-tokenizer");
        let p = ChatPrompt::from_files(
            &dir.join(file),
            Some(&dir.join("tokenizer_config.json")),
            None,
        )
        .unwrap();
        p.check_audio_token(32000).unwrap();
        p
    }

    /// transformers' renderings, ids and text for the fixture (`cases.json`).
    fn transformers_cases() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gazelle/mistral-v1-tokenizer/cases.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn case_ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    /// `case["text"]` encodes to transformers' ids and decodes to its text.
    fn assert_encodes_like_transformers(p: &ChatPrompt, case: &Value) {
        let text = case["text"].as_str().unwrap();
        let ours = p.encode(text).unwrap();
        assert_eq!(ours, case_ids(&case["ids"]), "{text:?}");
        assert_eq!(p.decode(&ours).unwrap(), case["decoded"].as_str().unwrap());
    }

    /// The real Mistral v1 vocabulary, rebuilt as Gazelle v0.2 ships it: our rendering, ids and
    /// decoded text equal transformers 4.38.2's, including the notebook's 22-id dairy prompt.
    #[test]
    fn the_real_vocabulary_matches_transformers() {
        let p = real_tokenizer("tokenizer.json");
        assert_eq!(p.eos_token_id(), Some(2));
        let cases = transformers_cases();
        let conversations = cases["conversations"].as_array().unwrap();
        assert_eq!(
            case_ids(&conversations[0]["ids"]).len(),
            22,
            "the dairy prompt"
        );
        for case in conversations {
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                })
                .collect();
            let text = p.render(&messages, false).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap());
            assert_encodes_like_transformers(&p, case);
        }
        for case in cases["texts"].as_array().unwrap() {
            assert_encodes_like_transformers(&p, case);
        }
        // The real template rejects a system role; the prompt folds it into the first user turn.
        let folded = p
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "<|audio|>"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(folded, "<s>[INST] Be brief.\n\n<|audio|> [/INST]");
        let mut omit = p.clone();
        omit.set_system_mode(SystemPromptMode::Omit);
        let text = omit
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "<|audio|>"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(text, "<s>[INST] <|audio|> [/INST]");
    }

    /// gazelle-v0.1 ships only `tokenizer.model`: loaded through the converter, Mistral's v1
    /// model gives transformers' ids for every case too.
    #[test]
    fn a_sentencepiece_model_loads_with_transformers_ids() {
        let p = real_tokenizer("tokenizer.model");
        let cases = transformers_cases();
        for key in ["conversations", "texts"] {
            for case in cases[key].as_array().unwrap() {
                assert_encodes_like_transformers(&p, case);
            }
        }
        let bad = std::env::temp_dir().join("gazelle-not-a-model.model");
        std::fs::write(&bad, b"nope").unwrap();
        let e = ChatPrompt::from_files(&bad, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gazelle-not-a-model.model") && e.contains("SentencePiece"),
            "{e}"
        );
    }

    #[test]
    fn the_synthetic_tokenizer_round_trips_every_id() {
        let p = ChatPrompt::synthetic(500, 420).unwrap();
        p.check_audio_token(420).unwrap();
        let text = p
            .render(&[ChatMessage::new("user", "<|audio|>\nhi")], true)
            .unwrap();
        let ids = p.encode(&text).unwrap();
        assert!(ids.contains(&420) && ids.contains(&1), "{ids:?}");
        let mut stream = TextStream::new();
        for id in [5, 77, 499] {
            assert!(
                !stream.push(&p, id).unwrap().is_empty(),
                "id {id} streams a piece"
            );
        }
    }
    use crate::model::gazelle::parity_tests::fixture_dir;

    fn load(variant: &str) -> ChatPrompt {
        let d = fixture_dir(variant);
        ChatPrompt::from_files(
            &d.join("tokenizer.json"),
            Some(&d.join("tokenizer_config.json")),
            None,
        )
        .unwrap()
    }

    #[test]
    fn template_and_tokenizer_match_transformers_prompt_ids() {
        for variant in ["mistral", "llama"] {
            let p = load(variant);
            let d = fixture_dir(variant);
            let clips: Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("clips.json")).unwrap())
                    .unwrap();
            let refs = candle_core::safetensors::load(
                d.join("reference.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            for c in ["c0", "c1"] {
                let msgs: Vec<ChatMessage> = clips[c]["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        ChatMessage::new(
                            m["role"].as_str().unwrap(),
                            m["content"].as_str().unwrap(),
                        )
                    })
                    .collect();
                let text = p.render(&msgs, true).unwrap();
                let ours = p.encode(&text).unwrap();
                let expected: Vec<u32> = refs[&format!("{c}.prompt_ids")]
                    .to_dtype(candle_core::DType::U32)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(ours, expected, "{variant} {c}: {text:?}");
            }
        }
    }

    #[test]
    fn system_role_folds_into_first_user_turn_when_template_rejects_it() {
        // The fallback template, like Mistral's, rejects a system role.
        let mut p = load("mistral");
        p.template = FALLBACK_TEMPLATE.into();
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            p.render(&msgs, true).unwrap(),
            "<s>[INST] Be brief.\n\nHi [/INST]"
        );
    }

    #[test]
    fn audio_placeholder_defaults_to_first() {
        assert_eq!(
            user_content_with_audio("What is this?"),
            "<|audio|>\nWhat is this?"
        );
        assert_eq!(
            user_content_with_audio("Hear <|audio|> now"),
            "Hear <|audio|> now"
        );
        assert_eq!(user_content_with_audio(""), "<|audio|>");
    }

    #[test]
    fn text_stream_pieces_concatenate_to_decode() {
        let p = load("mistral");
        let ids = p.encode("the quick brown fox jumps").unwrap();
        let mut s = TextStream::new();
        let text: String = ids.iter().map(|&i| s.push(&p, i).unwrap()).collect();
        assert_eq!(text, p.decode(&ids).unwrap());
    }
}
