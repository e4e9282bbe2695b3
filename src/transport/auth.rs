//! Who may use the server: the API key and the short-lived, single-use call tokens minted from it
//! (what a browser page puts in the websocket URL, since it cannot set headers), the admin token
//! that opens the call registry, the Origin allow-list for browsers, and the per-call token that
//! ties a Twilio media stream to the webhook request that announced it.
//!
//! Secrets come from the environment and are compared in constant time. Tokens are
//! `kind.expiry.nonce.signature`, HMAC-SHA256 under a key derived from a secret, so instances
//! that share the secrets accept each other's tokens; each is good once per instance.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Who may use the server. Secrets come from the environment variables named here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The variable holding the API key. When it is set, `/conversation` needs the key as an
    /// `Authorization: Bearer` header, or a call token from `POST /auth/token` in `?token=`.
    pub api_key_env: String,
    /// The variable holding the admin token. `/calls` and `/calls/{id}/history` are off unless
    /// it is set, and then need it as an `Authorization: Bearer` header.
    pub admin_token_env: String,
    /// Seconds a call token stays valid; each is good for one call.
    pub token_ttl_s: u64,
    /// Browser origins (`https://app.example.com`) that may open `/conversation` besides the
    /// server's own; `"*"` allows any. Requests without an Origin header (non-browser clients)
    /// are not affected.
    pub allowed_origins: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_key_env: "GAZELLE_API_KEY".into(),
            admin_token_env: "GAZELLE_ADMIN_TOKEN".into(),
            token_ttl_s: 60,
            allowed_origins: Vec::new(),
        }
    }
}

/// A secret from the environment; never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The value of `var`, if set and not empty.
    pub(crate) fn from_env(var: &str) -> Option<Self> {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
    }

    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    fn matches(&self, given: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), given.as_bytes())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error(
        "this server needs credentials: send Authorization: Bearer <API key>, or a call token \
         from POST /auth/token as ?token="
    )]
    Missing,
    #[error("the API key or token was refused")]
    Refused,
    #[error("the call token has expired; fetch a new one from POST /auth/token")]
    Expired,
    #[error(
        "the stream token has expired: Twilio must open the media stream within auth.token_ttl_s \
         of the voice webhook's answer; the caller should call again"
    )]
    StreamExpired,
    #[error(
        "the API key may not travel in the URL, where proxies, browser history and Referer \
         headers keep it: send it as Authorization: Bearer <API key>, or put a call token from \
         POST /auth/token in ?token="
    )]
    KeyInUrl,
    #[error("this endpoint needs the admin token: send Authorization: Bearer <admin token>")]
    AdminMissing,
    #[error("the call token was already used; fetch a new one for every call")]
    Reused,
    #[error("origin {0} may not open calls here; add it to auth.allowed_origins")]
    Origin(String),
    #[error(
        "origin {0} may not open calls here: a page served under a name (not an address) must \
         be listed in auth.allowed_origins, so that another site's name pointed at this server \
         (DNS rebinding) cannot use it"
    )]
    OriginName(String),
    #[error("{0} is off; set the {1} environment variable to enable it")]
    Off(&'static str, String),
    #[error(
        "the Twilio entry points are closed: an API key is set, so Twilio requests must be \
         signed; set the Twilio auth token in {0}"
    )]
    TwilioUnsigned(String),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = match self {
            AuthError::Missing
            | AuthError::Refused
            | AuthError::Expired
            | AuthError::StreamExpired
            | AuthError::KeyInUrl
            | AuthError::AdminMissing
            | AuthError::Reused => StatusCode::UNAUTHORIZED,
            AuthError::Origin(_) | AuthError::OriginName(_) | AuthError::TwilioUnsigned(_) => {
                StatusCode::FORBIDDEN
            }
            AuthError::Off(..) => StatusCode::NOT_FOUND,
        };
        let mut r = (status, self.to_string()).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        }
        r
    }
}

/// Signs and checks tokens of one kind.
struct Signer {
    key: [u8; 32],
}

impl Signer {
    /// A key for `purpose`, derived from `secret`, or random (tokens then live and die with this
    /// process).
    fn new(secret: Option<&Secret>, purpose: &str) -> Self {
        let key = match secret {
            Some(s) => {
                let mut mac = HmacSha256::new_from_slice(s.0.as_bytes()).expect("any key length");
                mac.update(b"gazelle token key v1:");
                mac.update(purpose.as_bytes());
                mac.finalize().into_bytes().into()
            }
            None => rand::random(),
        };
        Signer { key }
    }

    fn mac(&self, payload: &str, bound_to: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        mac.update(payload.as_bytes());
        mac.update(b"\0");
        mac.update(bound_to.as_bytes());
        mac
    }

    fn mint(&self, kind: &str, expires: u64, bound_to: &str) -> String {
        let nonce = format!("{:032x}", rand::random::<u128>());
        let payload = format!("{kind}.{expires}.{nonce}");
        let sig = self.mac(&payload, bound_to).finalize().into_bytes();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
        format!("{payload}.{sig}")
    }

    /// The token's nonce and expiry, if it is of `kind`, bound to `bound_to`, and signed by us.
    fn open<'t>(&self, token: &'t str, kind: &str, bound_to: &str) -> Option<(&'t str, u64)> {
        let mut parts = token.splitn(4, '.');
        let (k, exp, nonce, sig) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if k != kind || nonce.len() != 32 {
            return None;
        }
        let expires: u64 = exp.parse().ok()?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .ok()?;
        let payload = &token[..k.len() + exp.len() + nonce.len() + 2];
        self.mac(payload, bound_to).verify_slice(&sig).ok()?;
        Some((nonce, expires))
    }
}

/// Nonces of tokens already used, until they expire. Only tokens with a valid signature get here,
/// and minting one needs a secret, so its size is bounded by the honest mint rate.
#[derive(Default)]
struct Spent {
    nonces: HashMap<String, u64>,
}

impl Spent {
    fn spend(&mut self, nonce: &str, expires: u64, now: u64) -> bool {
        if self.nonces.len() >= 1024 {
            self.nonces.retain(|_, &mut exp| exp >= now);
        }
        self.nonces.insert(nonce.to_string(), expires).is_none()
    }
}

/// The server's credentials and the rules that use them.
pub struct Auth {
    api_key: Option<Secret>,
    admin_token: Option<Secret>,
    admin_token_env: String,
    api_key_env: String,
    twilio_signed: bool,
    twilio_token_env: String,
    calls: Signer,
    streams: Signer,
    ttl: Duration,
    allowed_origins: Vec<String>,
    /// Locked only for one map operation.
    spent: Mutex<Spent>,
    /// Refused origins already logged (each once, up to [`ORIGINS_LOGGED`]).
    refused_origins: Mutex<std::collections::HashSet<String>>,
}

/// Distinct refused origins logged; past this a hostile client inventing origins fills no
/// memory and no log.
const ORIGINS_LOGGED: usize = 256;

/// What [`Auth::new`] needs: the secrets (already read from the environment) and the settings.
pub struct AuthSettings {
    pub api_key: Option<Secret>,
    pub admin_token: Option<Secret>,
    pub twilio_token: Option<Secret>,
    pub config: AuthConfig,
    pub twilio_token_env: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a `Host` value (with or without a port) is an IP address or `localhost`: names that no
/// other site can point at this server.
fn unspoofable_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(a, _)| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// The token of an `Authorization: Bearer …` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Auth {
    pub fn new(s: AuthSettings) -> Self {
        // Twilio stream tokens are keyed by the Twilio token when there is one (Twilio's webhook
        // and stream may reach different instances), else by the API key, else per process.
        let stream_secret = s.twilio_token.as_ref().or(s.api_key.as_ref());
        Auth {
            calls: Signer::new(s.api_key.as_ref(), "call"),
            streams: Signer::new(stream_secret, "twilio-stream"),
            twilio_signed: s.twilio_token.is_some(),
            api_key: s.api_key,
            admin_token: s.admin_token,
            admin_token_env: s.config.admin_token_env,
            api_key_env: s.config.api_key_env,
            twilio_token_env: s.twilio_token_env,
            ttl: Duration::from_secs(s.config.token_ttl_s),
            allowed_origins: s.config.allowed_origins,
            spent: Mutex::new(Spent::default()),
            refused_origins: Mutex::new(Default::default()),
        }
    }

    /// Whether calls need credentials.
    pub(crate) fn required(&self) -> bool {
        self.api_key.is_some()
    }

    pub(crate) fn token_ttl(&self) -> Duration {
        self.ttl
    }

    /// `POST /auth/token`: a call token for a holder of the API key.
    pub(crate) fn mint_call_token(&self, headers: &HeaderMap) -> Result<String, AuthError> {
        let Some(key) = &self.api_key else {
            return Err(AuthError::Off(
                "POST /auth/token (no API key is set, so calls need no token)",
                self.api_key_env.clone(),
            ));
        };
        match bearer(headers) {
            Some(given) if key.matches(given) => {}
            Some(_) => return Err(AuthError::Refused),
            None => return Err(AuthError::Missing),
        }
        Ok(self.calls.mint("c1", unix_now() + self.ttl.as_secs(), ""))
    }

    /// May this request open a call? The API key as a bearer header, or a call token (as a
    /// bearer header or `?token=`), which is spent. The key itself is refused in the URL.
    pub(crate) fn check_call(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), AuthError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let (given, in_url) = match bearer(headers) {
            Some(given) => (given, false),
            None => (query_token.ok_or(AuthError::Missing)?, true),
        };
        if key.matches(given) {
            return if in_url {
                Err(AuthError::KeyInUrl)
            } else {
                Ok(())
            };
        }
        self.spend(&self.calls, given, "c1", "")
    }

    fn spend(
        &self,
        signer: &Signer,
        token: &str,
        kind: &str,
        bound: &str,
    ) -> Result<(), AuthError> {
        let (nonce, expires) = signer.open(token, kind, bound).ok_or(AuthError::Refused)?;
        let now = unix_now();
        if expires < now {
            return Err(AuthError::Expired);
        }
        let fresh = self
            .spent
            .lock()
            .expect("spent lock")
            .spend(nonce, expires, now);
        if fresh {
            Ok(())
        } else {
            Err(AuthError::Reused)
        }
    }

    /// The admin endpoints (`/calls`): off without an admin token, else they need it.
    pub(crate) fn check_admin(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(token) = &self.admin_token else {
            return Err(AuthError::Off(
                "the call registry",
                self.admin_token_env.clone(),
            ));
        };
        match bearer(headers) {
            Some(given) if token.matches(given) => Ok(()),
            Some(_) => Err(AuthError::Refused),
            None => Err(AuthError::AdminMissing),
        }
    }

    /// Browsers send `Origin`; it must be an allowed one, or the server's own: the `Host` it was
    /// reached at, when that is an address or `localhost`. A name is not enough, since any site
    /// can point its own name at this server (DNS rebinding) and then send matching `Host` and
    /// `Origin`; a page served under a name must be listed in `auth.allowed_origins`.
    pub(crate) fn check_origin(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        let listed = self
            .allowed_origins
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin));
        if listed || (same && unspoofable_host(host)) {
            return Ok(());
        }
        let shown = crate::transport::guard::Untrusted(origin).to_string();
        let err = if same {
            AuthError::OriginName(shown.clone())
        } else {
            AuthError::Origin(shown.clone())
        };
        if self.first_refusal_of(origin) {
            // Once per origin: a developer whose app runs on another origin learns what to set.
            tracing::warn!(origin = %shown, "{err} (logged once per origin)");
        }
        Err(err)
    }

    /// Whether `origin` is refused for the first time (and one more may still be logged).
    fn first_refusal_of(&self, origin: &str) -> bool {
        let mut logged = self.refused_origins.lock().expect("origin log lock");
        if logged.len() >= ORIGINS_LOGGED || logged.contains(origin) {
            return false;
        }
        logged.insert(origin.to_string());
        if logged.len() == ORIGINS_LOGGED {
            tracing::warn!("{ORIGINS_LOGGED} refused origins logged; no more will be");
        }
        true
    }

    /// The Twilio entry points are open when Twilio signs its requests, or when the whole server
    /// is open; an API key without a Twilio token would leave them the only way in.
    pub(crate) fn check_twilio_open(&self) -> Result<(), AuthError> {
        if self.api_key.is_some() && !self.twilio_signed {
            return Err(AuthError::TwilioUnsigned(self.twilio_token_env.clone()));
        }
        Ok(())
    }

    /// The token `/twilio/voice` puts in its TwiML for the stream of call `call_sid`.
    pub(crate) fn mint_stream_token(&self, call_sid: &str) -> String {
        self.streams
            .mint("t1", unix_now() + self.ttl.as_secs(), call_sid)
    }

    /// Checks (and spends) the token a media stream's `start` carries for `call_sid`.
    pub(crate) fn check_stream_token(&self, token: &str, call_sid: &str) -> Result<(), AuthError> {
        match self.spend(&self.streams, token, "t1", call_sid) {
            Err(AuthError::Expired) => Err(AuthError::StreamExpired),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(api_key: Option<&str>, admin: Option<&str>, origins: &[&str]) -> Auth {
        Auth::new(AuthSettings {
            api_key: api_key.map(Secret::new),
            admin_token: admin.map(Secret::new),
            twilio_token: None,
            config: AuthConfig {
                allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
                ..Default::default()
            },
            twilio_token_env: "TWILIO_AUTH_TOKEN".into(),
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_open_server_needs_nothing_and_mints_nothing() {
        let a = auth(None, None, &[]);
        assert!(!a.required());
        a.check_call(&HeaderMap::new(), None).unwrap();
        assert!(matches!(
            a.mint_call_token(&HeaderMap::new()),
            Err(AuthError::Off(..))
        ));
        assert!(matches!(
            a.check_admin(&HeaderMap::new()),
            Err(AuthError::Off(..))
        ));
    }

    #[test]
    fn call_tokens_are_signed_single_use_and_need_the_key_to_mint() {
        let a = auth(Some("k3y"), None, &[]);
        assert_eq!(
            a.check_call(&HeaderMap::new(), None),
            Err(AuthError::Missing)
        );
        a.check_call(&headers(&[("authorization", "Bearer k3y")]), None)
            .unwrap();
        // The key itself never in the URL, where proxies and histories keep it.
        assert_eq!(
            a.check_call(&HeaderMap::new(), Some("k3y")),
            Err(AuthError::KeyInUrl)
        );
        assert_eq!(
            a.check_call(&headers(&[("authorization", "Bearer nope")]), None),
            Err(AuthError::Refused)
        );
        assert_eq!(
            a.mint_call_token(&headers(&[("authorization", "Bearer nope")])),
            Err(AuthError::Refused)
        );
        let t = a
            .mint_call_token(&headers(&[("authorization", "bearer k3y")]))
            .unwrap();
        a.check_call(&HeaderMap::new(), Some(&t)).unwrap();
        assert_eq!(
            a.check_call(&HeaderMap::new(), Some(&t)),
            Err(AuthError::Reused)
        );
        // A token of another instance's key, or a tampered one, is refused.
        let other = auth(Some("other"), None, &[]);
        let foreign = other
            .mint_call_token(&headers(&[("authorization", "Bearer other")]))
            .unwrap();
        assert_eq!(
            a.check_call(&HeaderMap::new(), Some(&foreign)),
            Err(AuthError::Refused)
        );
        let t2 = a
            .mint_call_token(&headers(&[("authorization", "Bearer k3y")]))
            .unwrap();
        let tampered = t2.replacen("c1.", "c1.9", 1);
        assert_eq!(
            a.check_call(&HeaderMap::new(), Some(&tampered)),
            Err(AuthError::Refused)
        );
        // Instances sharing the key accept each other's tokens.
        let twin = auth(Some("k3y"), None, &[]);
        twin.check_call(&HeaderMap::new(), Some(&t2)).unwrap();
    }

    #[test]
    fn expired_tokens_are_refused() {
        let a = auth(Some("k"), None, &[]);
        let old = a.calls.mint("c1", unix_now() - 1, "");
        assert_eq!(
            a.check_call(&HeaderMap::new(), Some(&old)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn stream_tokens_are_bound_to_their_call() {
        let a = auth(None, None, &[]);
        let t = a.mint_stream_token("CA1");
        assert_eq!(a.check_stream_token(&t, "CA2"), Err(AuthError::Refused));
        a.check_stream_token(&t, "CA1").unwrap();
        assert_eq!(a.check_stream_token(&t, "CA1"), Err(AuthError::Reused));
        // An expired stream token is told so, without the call tokens' advice.
        let old = a.streams.mint("t1", unix_now() - 1, "CA3");
        assert_eq!(
            a.check_stream_token(&old, "CA3"),
            Err(AuthError::StreamExpired)
        );
        assert!(!AuthError::StreamExpired.to_string().contains("/auth/token"));
        // A call token is not a stream token.
        let k = auth(Some("k"), None, &[]);
        let c = k
            .mint_call_token(&headers(&[("authorization", "Bearer k")]))
            .unwrap();
        assert_eq!(k.check_stream_token(&c, ""), Err(AuthError::Refused));
    }

    #[test]
    fn the_admin_token_opens_the_registry() {
        let a = auth(None, Some("adm"), &[]);
        a.check_admin(&headers(&[("authorization", "Bearer adm")]))
            .unwrap();
        assert_eq!(
            a.check_admin(&HeaderMap::new()),
            Err(AuthError::AdminMissing)
        );
        assert!(AuthError::AdminMissing.to_string().contains("admin token"));
        assert_eq!(
            a.check_admin(&headers(&[("authorization", "Bearer x")])),
            Err(AuthError::Refused)
        );
    }

    #[test]
    fn browsers_must_come_from_our_own_or_an_allowed_origin() {
        let a = auth(None, None, &["https://app.example.com"]);
        let at = |host: &str, origin: &str| headers(&[("origin", origin), ("host", host)]);
        let h = |origin: &str| at("voice.example.com", origin);
        a.check_origin(&HeaderMap::new()).unwrap();
        a.check_origin(&h("https://app.example.com")).unwrap();
        let e = a.check_origin(&h("https://evil.example")).unwrap_err();
        assert!(e.to_string().contains("auth.allowed_origins"), "{e}");
        auth(None, None, &["*"])
            .check_origin(&h("https://evil.example"))
            .unwrap();
        // Our own page, reached at an address or localhost.
        for host in ["127.0.0.1:3000", "localhost:3000", "[::1]:3000", "10.1.2.3"] {
            a.check_origin(&at(host, &format!("http://{host}")))
                .unwrap();
        }
        // Under a name, Host and Origin match for a DNS-rebinding page just as for ours: the
        // name must be listed.
        let e = a
            .check_origin(&at("evil.example:3000", "http://evil.example:3000"))
            .unwrap_err();
        assert!(matches!(e, AuthError::OriginName(_)), "{e}");
        assert!(e.to_string().contains("DNS rebinding"), "{e}");
        let listed = auth(None, None, &["https://voice.example.com"]);
        listed
            .check_origin(&h("https://voice.example.com"))
            .unwrap();
    }

    /// A refused origin is logged once, naming the setting; an attacker inventing origins
    /// stops being logged (and remembered) after `ORIGINS_LOGGED`.
    #[test]
    fn each_refused_origin_is_logged_once_up_to_a_bound() {
        let a = auth(None, None, &[]);
        let h = |origin: &str| headers(&[("origin", origin), ("host", "voice.example.com")]);
        assert!(a.check_origin(&h("http://localhost:5173")).is_err());
        assert!(!a.first_refusal_of("http://localhost:5173"), "logged once");
        assert!(a.first_refusal_of("http://localhost:3000"));
        for k in 0..2 * ORIGINS_LOGGED {
            let _ = a.check_origin(&h(&format!("https://{k}.evil.example")));
        }
        assert_eq!(a.refused_origins.lock().unwrap().len(), ORIGINS_LOGGED);
        assert!(!a.first_refusal_of("https://new.example"));
    }

    #[test]
    fn twilio_is_closed_when_a_key_is_set_but_twilio_cannot_sign() {
        auth(None, None, &[]).check_twilio_open().unwrap();
        assert!(auth(Some("k"), None, &[]).check_twilio_open().is_err());
    }
}
