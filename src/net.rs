//! What the clients of network services share: the speech-language model behind an
//! OpenAI-compatible API and the HTTP speech providers. Secrets read from the environment that
//! never print, the reqwest client with our connect timeout (rustls with ring), and errors and
//! server messages cut to one short line.

use std::time::Duration;

/// A secret read from the environment. Its `Debug` prints only the variable's name, so it can sit
/// in structs that get logged.
#[derive(Clone)]
pub struct ApiKey {
    env: String,
    value: String,
}

impl ApiKey {
    /// The key in the environment variable `env`; `None` if it is unset or empty.
    pub fn from_env(env: &str) -> Option<Self> {
        match std::env::var(env) {
            Ok(value) if !value.trim().is_empty() => Some(ApiKey {
                env: env.to_string(),
                value: value.trim().to_string(),
            }),
            _ => None,
        }
    }

    /// The environment variable it came from (safe to print).
    pub(crate) fn env(&self) -> &str {
        &self.env
    }

    /// The secret itself, for a request header and nothing else.
    pub(crate) fn expose(&self) -> &str {
        &self.value
    }

    /// `text` with every occurrence of the key masked, for server messages that echo requests.
    pub(crate) fn redact(&self, text: &str) -> String {
        if self.value.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.value, "***")
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey(${}: ***)", self.env)
    }
}

/// Installs rustls' ring provider once per process, before the first TLS client is built.
pub(crate) fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A reqwest client: `connect` bounds TCP and TLS setup, Nagle is off, and no proxy is looked
/// up from the environment.
pub(crate) fn client(connect: Duration) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
}

/// An error and its sources, joined by ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// At most 200 characters of a server's message, on one line.
pub(crate) fn short(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        s.push('…');
    }
    if s.is_empty() {
        s.push_str("no message");
    }
    s
}
