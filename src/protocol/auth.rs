//! Authentication of the hub (PROTOCOL §1.2): Standard Webhooks signatures and bearer tokens.
//!
//! Everything here is pure: the caller passes the request headers, the raw body and the current time,
//! and gets back `Ok(())` or an [`AuthError`] whose [`code`](AuthError::code) goes into the
//! problem+json answer. Nothing here does I/O, and no error message ever contains a secret, a token
//! or a signature.
//!
//! Key formats accepted:
//! - HMAC secrets: `whsec_<base64 key>`, as the hub shows them. The bare base64 key (without the
//!   prefix) is accepted too, because the reference Standard Webhooks libraries accept it.
//! - Ed25519 public keys: `whpk_<base64 32-byte key>`, or the bare base64 key.
//!
//! Base64 is the standard alphabet; padding may be omitted. Surrounding whitespace (such as the
//! newline at the end of a secret file) is ignored.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use http::HeaderMap;
use http::StatusCode;
use ring::{digest, hmac, signature};
use subtle::ConstantTimeEq;

/// The tolerance the protocol names as the default: timestamps further than this from the agent's
/// clock are refused.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// At most this many recognised signature entries of one request are checked. Hubs list one
/// signature per active secret or key (two during a rotation), so this refuses no real delivery,
/// and it bounds the work an unauthenticated client can cause with a long header: each `v1a`
/// entry costs one Ed25519 verification per configured public key, while the `v1` entries share
/// one HMAC of the body per configured secret, however many are listed.
pub const MAX_SIGNATURES_CHECKED: usize = 64;

const HMAC_PREFIX: &str = "whsec_";
const ED25519_PUBLIC_PREFIX: &str = "whpk_";
const ED25519_SECRET_PREFIX: &str = "whsk_";

const HMAC_TAG_LEN: usize = 32;
const ED25519_PUBLIC_KEY_LEN: usize = 32;
const ED25519_SIGNATURE_LEN: usize = 64;

/// Standard base64 that accepts both padded and unpadded input.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The three Standard Webhooks headers, each with its Svix alias.
const ID_HEADERS: [&str; 2] = ["webhook-id", "svix-id"];
const TIMESTAMP_HEADERS: [&str; 2] = ["webhook-timestamp", "svix-timestamp"];
const SIGNATURE_HEADERS: [&str; 2] = ["webhook-signature", "svix-signature"];

/// A secret, key or token in the configuration has the wrong format.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An HMAC secret could not be decoded. `position` counts from 1 in the configured list.
    #[error(
        "webhook secret {position} {problem}; expected `whsec_` followed by the base64 key, exactly as the hub shows it"
    )]
    HmacSecret {
        position: usize,
        problem: &'static str,
    },
    /// An Ed25519 public key could not be decoded. `position` counts from 1 in the configured list.
    #[error(
        "ed25519 public key {position} {problem}; expected `whpk_` followed by the base64 of the hub's 32-byte public key"
    )]
    Ed25519PublicKey {
        position: usize,
        problem: &'static str,
    },
    /// Neither an HMAC secret nor an Ed25519 public key was given, so nothing could ever verify.
    #[error(
        "no webhook secret or ed25519 public key configured; configure at least one to check signatures"
    )]
    NoKeys,
    /// The bearer token is empty or contains characters that cannot appear in an HTTP header token.
    #[error(
        "bearer token {problem}; expected the token alone (visible ASCII, no spaces), without the `Bearer ` scheme"
    )]
    BearerToken { problem: &'static str },
}

/// Why a delivery was not authenticated. Every variant is answered with 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing webhook-id header (or its alias svix-id); the hub must send Standard Webhooks headers"
    )]
    MissingIdHeader,
    #[error(
        "missing webhook-timestamp header (or its alias svix-timestamp); the hub must send Standard Webhooks headers"
    )]
    MissingTimestampHeader,
    #[error(
        "missing webhook-signature header (or its alias svix-signature); the hub must sign deliveries with the shared secret"
    )]
    MissingSignatureHeader,
    #[error("webhook-timestamp is not a whole number of seconds since the unix epoch")]
    InvalidTimestamp,
    /// `skew_secs` is the agent's clock minus the timestamp: positive when the timestamp is in the past.
    #[error("{}", tolerance_message(*skew_secs, *tolerance_secs))]
    TimestampOutOfTolerance { skew_secs: i64, tolerance_secs: u64 },
    /// `listed` is the number of `v1`/`v1a` entries that were checked.
    #[error("{}", signature_message(*listed))]
    InvalidSignature { listed: usize },
    /// None of the first `checked` entries verifies and more are listed after them.
    #[error(
        "none of the first {checked} signatures in webhook-signature verifies and the agent checks no more than {checked}; \
         list the signature made with the current secret among the first {checked}"
    )]
    TooManySignatures { checked: usize },
    #[error("missing authorization header; send `Authorization: Bearer <token>`")]
    MissingBearerToken,
    #[error(
        "authorization header does not use the bearer scheme; send `Authorization: Bearer <token>`"
    )]
    NotBearerScheme,
    #[error("bearer token does not match the configured token; check the token the hub sends")]
    InvalidBearerToken,
}

impl AuthError {
    /// A stable, machine-readable code for the problem+json answer.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingIdHeader => "missing_id_header",
            AuthError::MissingTimestampHeader => "missing_timestamp_header",
            AuthError::MissingSignatureHeader => "missing_signature_header",
            AuthError::InvalidTimestamp => "invalid_timestamp",
            AuthError::TimestampOutOfTolerance { .. } => "timestamp_out_of_tolerance",
            AuthError::InvalidSignature { .. } => "invalid_signature",
            AuthError::TooManySignatures { .. } => "too_many_signatures",
            AuthError::MissingBearerToken | AuthError::NotBearerScheme => "missing_bearer_token",
            AuthError::InvalidBearerToken => "invalid_bearer_token",
        }
    }

    /// The HTTP status to answer with: always 401 (PROTOCOL §1.4).
    pub fn status(&self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }
}

fn tolerance_message(skew_secs: i64, tolerance_secs: u64) -> String {
    let direction = if skew_secs >= 0 {
        "in the past"
    } else {
        "in the future"
    };
    format!(
        "webhook-timestamp is {} s {direction}, more than the {tolerance_secs} s tolerance; \
         check the clocks of the hub and the agent (NTP), or a delivery was replayed",
        skew_secs.unsigned_abs()
    )
}

fn signature_message(listed: usize) -> String {
    if listed == 0 {
        "webhook-signature lists no `v1,` or `v1a,` signature the agent can check".to_owned()
    } else {
        format!(
            "none of the {listed} signatures in webhook-signature verifies with a configured key; \
             check that the agent has the hub's current secret and that nothing altered the body in transit"
        )
    }
}

/// Checks Standard Webhooks signatures with one or more HMAC secrets and Ed25519 public keys.
#[derive(Clone)]
pub struct WebhookVerifier {
    hmac_keys: Vec<hmac::Key>,
    ed25519_keys: Vec<signature::UnparsedPublicKey<Vec<u8>>>,
    tolerance: Duration,
}

impl fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key material is never printed, only how much of it there is.
        f.debug_struct("WebhookVerifier")
            .field("hmac_keys", &self.hmac_keys.len())
            .field("ed25519_keys", &self.ed25519_keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl WebhookVerifier {
    /// Builds a verifier from HMAC secrets (`whsec_<base64>`, or the bare base64 key) and Ed25519
    /// public keys (`whpk_<base64 of 32 bytes>`, or the bare base64 key). Several secrets support
    /// rotation: a delivery is authentic when any listed signature verifies with any key. At least
    /// one secret or key is required. `tolerance` is compared in whole seconds.
    pub fn new(
        hmac_secrets: &[String],
        ed25519_public_keys: &[String],
        tolerance: Duration,
    ) -> Result<Self, KeyError> {
        let hmac_keys = hmac_secrets
            .iter()
            .enumerate()
            .map(|(i, s)| hmac_key(s, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        let ed25519_keys = ed25519_public_keys
            .iter()
            .enumerate()
            .map(|(i, s)| ed25519_public_key(s, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        if hmac_keys.is_empty() && ed25519_keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        Ok(Self {
            hmac_keys,
            ed25519_keys,
            tolerance,
        })
    }

    /// The configured timestamp tolerance.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// Verifies the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers (the `svix-`
    /// names are accepted as aliases) against `body`, the exact bytes received.
    ///
    /// The timestamp is checked before any signature, and is accepted when it is at most the
    /// tolerance away from `now` in either direction (the boundary itself is accepted).
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), AuthError> {
        self.verify_delivery(headers, body, now).map(|_| ())
    }

    /// As [`WebhookVerifier::verify`], returning what the verified headers say about the
    /// delivery (for the journal's record of its receipt): never a signature or a key.
    pub fn verify_delivery(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, AuthError> {
        let id = first_present(headers, &ID_HEADERS).ok_or(AuthError::MissingIdHeader)?;
        let timestamp =
            first_present(headers, &TIMESTAMP_HEADERS).ok_or(AuthError::MissingTimestampHeader)?;
        let signatures = signature_values(headers).ok_or(AuthError::MissingSignatureHeader)?;

        let ts = parse_timestamp(timestamp).ok_or(AuthError::InvalidTimestamp)?;
        let skew = i128::from(unix_seconds(now)) - i128::from(ts);
        let tolerance_secs = self.tolerance.as_secs();
        if skew.unsigned_abs() > u128::from(tolerance_secs) {
            return Err(AuthError::TimestampOutOfTolerance {
                skew_secs: i64::try_from(skew).unwrap_or(if skew < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                }),
                tolerance_secs,
            });
        }

        let content = SignedContent {
            id,
            timestamp,
            body,
        };
        // Each key's expected HMAC is computed at most once however many `v1` entries are listed,
        // and the message for Ed25519 is assembled only when a `v1a` entry needs it.
        let mut hmac_tags: Option<Vec<hmac::Tag>> = None;
        let mut message: Option<Vec<u8>> = None;
        let mut listed = 0;
        for entry in signatures
            .iter()
            .flat_map(|value| value.split(|b| b.is_ascii_whitespace()))
            .filter_map(parse_entry)
        {
            if listed == MAX_SIGNATURES_CHECKED {
                return Err(AuthError::TooManySignatures { checked: listed });
            }
            listed += 1;
            let version = match entry {
                Entry::V1(_) => "v1",
                Entry::V1a(_) => "v1a",
            };
            let verified = match entry {
                Entry::V1(tag) => hmac_tags
                    .get_or_insert_with(|| self.hmac_keys.iter().map(|k| content.hmac(k)).collect())
                    .iter()
                    // Both sides are 32 bytes, so the comparison's time does not depend on
                    // where they differ.
                    .any(|expected| bool::from(expected.as_ref().ct_eq(&tag))),
                Entry::V1a(sig) => {
                    if self.ed25519_keys.is_empty() {
                        false
                    } else {
                        let msg = message.get_or_insert_with(|| content.to_vec());
                        self.ed25519_keys
                            .iter()
                            .any(|k| k.verify(msg, &sig).is_ok())
                    }
                }
            };
            if verified {
                return Ok(Verified {
                    id: String::from_utf8_lossy(id).into_owned(),
                    timestamp: ts,
                    versions: listed_versions(&signatures),
                    verified_by: version,
                    svix_names: headers.get(ID_HEADERS[0]).is_none_or(|v| v.is_empty()),
                });
            }
        }
        Err(AuthError::InvalidSignature { listed })
    }
}

/// What a verified Standard Webhooks delivery says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `webhook-id` header.
    pub id: String,
    /// The `webhook-timestamp` header, unix seconds.
    pub timestamp: i64,
    /// The versions of the signatures listed (`v1`, `v1a`, or others a newer hub sends), each
    /// once, in the order listed; at most 8.
    pub versions: Vec<String>,
    /// The version of the signature that verified: `v1` (HMAC-SHA256) or `v1a` (Ed25519).
    pub verified_by: &'static str,
    /// The headers were named `svix-*` rather than `webhook-*`.
    pub svix_names: bool,
}

/// The distinct versions (the text before the comma) of the listed signature entries: short
/// words of letters and digits only, each once, at most 8.
fn listed_versions(signatures: &[&[u8]]) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    let tokens = signatures
        .iter()
        .flat_map(|value| value.split(|b| b.is_ascii_whitespace()));
    for token in tokens {
        let Some(comma) = token.iter().position(|&b| b == b',') else {
            continue;
        };
        let version = &token[..comma];
        if version.is_empty()
            || version.len() > 16
            || !version.iter().all(u8::is_ascii_alphanumeric)
        {
            continue;
        }
        let version = String::from_utf8_lossy(version).into_owned();
        if !versions.contains(&version) {
            versions.push(version);
            if versions.len() == 8 {
                break;
            }
        }
    }
    versions
}

/// `{id}.{timestamp}.{body}`, over the header values exactly as received.
struct SignedContent<'a> {
    id: &'a [u8],
    timestamp: &'a [u8],
    body: &'a [u8],
}

impl SignedContent<'_> {
    fn hmac(&self, key: &hmac::Key) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(self.id);
        ctx.update(b".");
        ctx.update(self.timestamp);
        ctx.update(b".");
        ctx.update(self.body);
        ctx.sign()
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.id.len() + self.timestamp.len() + self.body.len() + 2);
        v.extend_from_slice(self.id);
        v.push(b'.');
        v.extend_from_slice(self.timestamp);
        v.push(b'.');
        v.extend_from_slice(self.body);
        v
    }
}

enum Entry {
    V1([u8; HMAC_TAG_LEN]),
    V1a([u8; ED25519_SIGNATURE_LEN]),
}

/// Parses one `version,base64` entry. Unknown versions, bad base64 and wrong lengths yield `None`:
/// they are skipped rather than refused, as Standard Webhooks requires.
fn parse_entry(token: &[u8]) -> Option<Entry> {
    let comma = token.iter().position(|&b| b == b',')?;
    let (version, rest) = token.split_at(comma);
    let encoded = rest.get(1..)?;
    // Longer than any valid signature: do not spend time decoding it.
    if encoded.is_empty() || encoded.len() > 128 {
        return None;
    }
    let decoded = LENIENT_BASE64.decode(encoded).ok()?;
    match version {
        b"v1" => decoded.try_into().ok().map(Entry::V1),
        b"v1a" => decoded.try_into().ok().map(Entry::V1a),
        _ => None,
    }
}

/// The first non-empty value among the header names, in order. An empty value counts as absent,
/// as in the reference libraries.
fn first_present<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a [u8]> {
    names.iter().find_map(|name| {
        let value = headers.get(*name)?.as_bytes().trim_ascii();
        (!value.is_empty()).then_some(value)
    })
}

/// Every value of the first signature header name that is present and non-empty. A hub sends one
/// header, but a proxy may split a long list over several lines; any of them may hold the match.
fn signature_values(headers: &HeaderMap) -> Option<Vec<&[u8]>> {
    SIGNATURE_HEADERS.iter().find_map(|name| {
        let values: Vec<&[u8]> = headers
            .get_all(*name)
            .iter()
            .map(|v| v.as_bytes().trim_ascii())
            .filter(|v| !v.is_empty())
            .collect();
        (!values.is_empty()).then_some(values)
    })
}

/// Unix seconds as ASCII digits only: no sign, no fraction, no spaces.
fn parse_timestamp(value: &[u8]) -> Option<i64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whole seconds since the unix epoch, rounded down (also for times before the epoch).
fn unix_seconds(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let secs = if d.subsec_nanos() > 0 {
                secs.saturating_add(1)
            } else {
                secs
            };
            -secs
        }
    }
}

/// Decodes an HMAC secret: `whsec_<base64>` or the bare base64 key.
fn hmac_key(secret: &str, position: usize) -> Result<hmac::Key, KeyError> {
    let err = |problem| KeyError::HmacSecret { position, problem };
    let secret = secret.trim();
    if secret.starts_with(ED25519_PUBLIC_PREFIX) {
        return Err(err(
            "is an ed25519 public key (`whpk_`); configure it as an ed25519 public key instead",
        ));
    }
    if secret.starts_with(ED25519_SECRET_PREFIX) {
        return Err(err(
            "is an ed25519 signing key (`whsk_`), which must stay with the hub",
        ));
    }
    let encoded = secret.strip_prefix(HMAC_PREFIX).unwrap_or(secret);
    if encoded.is_empty() {
        return Err(err("is empty"));
    }
    let key = LENIENT_BASE64
        .decode(encoded)
        .map_err(|_| err("is not valid base64"))?;
    if key.is_empty() {
        return Err(err("decodes to an empty key"));
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &key))
}

/// Decodes an Ed25519 public key: `whpk_<base64 of 32 bytes>` or the bare base64 key.
fn ed25519_public_key(
    key: &str,
    position: usize,
) -> Result<signature::UnparsedPublicKey<Vec<u8>>, KeyError> {
    let err = |problem| KeyError::Ed25519PublicKey { position, problem };
    let key = key.trim();
    if key.starts_with(HMAC_PREFIX) {
        return Err(err(
            "is an hmac secret (`whsec_`); configure it as a webhook secret instead",
        ));
    }
    if key.starts_with(ED25519_SECRET_PREFIX) {
        return Err(err(
            "is an ed25519 signing key (`whsk_`), which must stay with the hub; configure its public key",
        ));
    }
    let encoded = key.strip_prefix(ED25519_PUBLIC_PREFIX).unwrap_or(key);
    if encoded.is_empty() {
        return Err(err("is empty"));
    }
    let bytes = LENIENT_BASE64
        .decode(encoded)
        .map_err(|_| err("is not valid base64"))?;
    if bytes.len() != ED25519_PUBLIC_KEY_LEN {
        return Err(err("does not decode to 32 bytes"));
    }
    Ok(signature::UnparsedPublicKey::new(
        &signature::ED25519,
        bytes,
    ))
}

/// Signs outgoing requests with one HMAC secret: `ess-agent send` and the status reports to the hub.
#[derive(Clone)]
pub struct WebhookSigner {
    key: hmac::Key,
}

impl fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSigner { .. }")
    }
}

impl WebhookSigner {
    /// Builds a signer from `whsec_<base64>` (or the bare base64 key).
    pub fn new(secret: &str) -> Result<Self, KeyError> {
        Ok(Self {
            key: hmac_key(secret, 1)?,
        })
    }

    /// The `webhook-signature` value for this message: `v1,<base64 HMAC-SHA256>`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let timestamp = timestamp.to_string();
        let tag = SignedContent {
            id: msg_id.as_bytes(),
            timestamp: timestamp.as_bytes(),
            body,
        }
        .hmac(&self.key);
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    }

    /// The three headers to send: `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    pub fn headers(
        &self,
        msg_id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> [(&'static str, String); 3] {
        [
            ("webhook-id", msg_id.to_owned()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.sign(msg_id, timestamp, body)),
        ]
    }
}

/// Checks `Authorization: Bearer <token>` in constant time.
///
/// Only the SHA-256 digest of the token is kept, and the digests are compared, so neither the
/// token's content nor its length shows in the time a comparison takes.
#[derive(Clone)]
pub struct BearerToken {
    digest: [u8; 32],
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken { .. }")
    }
}

impl BearerToken {
    /// Accepts the token alone; surrounding whitespace (a trailing newline in a file) is ignored.
    /// The token must be visible ASCII without spaces, as it has to fit in an HTTP header.
    pub fn new(token: &str) -> Result<Self, KeyError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(KeyError::BearerToken {
                problem: "is empty",
            });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::BearerToken {
                problem: "contains spaces or characters other than visible ASCII",
            });
        }
        Ok(Self {
            digest: sha256(token.as_bytes()),
        })
    }

    /// Verifies the `Authorization` header. The scheme name is case-insensitive (RFC 9110 §11.1).
    pub fn verify(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::MissingBearerToken)?
            .as_bytes()
            .trim_ascii();
        let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
            Some(space) => value.split_at(space),
            None => (value, &b""[..]),
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return Err(AuthError::NotBearerScheme);
        }
        let presented = rest.trim_ascii_start();
        if presented.is_empty() {
            return Err(AuthError::MissingBearerToken);
        }
        if bool::from(sha256(presented).ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(AuthError::InvalidBearerToken)
        }
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use serde_json::Value;

    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/standard-webhooks-vectors.json"
    );

    fn vectors() -> Value {
        let text = std::fs::read_to_string(VECTORS)
            .expect("read tests/data/standard-webhooks-vectors.json");
        serde_json::from_str(&text).expect("vectors file is JSON")
    }

    fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
        v[key].as_str().expect("string field in vector")
    }

    fn at(secs: i64) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn webhook_headers(id: &str, ts: i64, sig: &str) -> HeaderMap {
        headers(&[
            ("webhook-id", id),
            ("webhook-timestamp", &ts.to_string()),
            ("webhook-signature", sig),
        ])
    }

    fn hmac_verifier(secrets: &[&str]) -> WebhookVerifier {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        WebhookVerifier::new(&secrets, &[], DEFAULT_TOLERANCE).unwrap()
    }

    /// The first HMAC vector, for tests that need one valid delivery.
    struct Fixture {
        secret: String,
        id: String,
        ts: i64,
        body: String,
        sig: String,
    }

    fn hmac_fixture() -> Fixture {
        let v = &vectors()["hmac_sha256_v1"][0];
        Fixture {
            secret: str_of(v, "secret").to_owned(),
            id: str_of(v, "id").to_owned(),
            ts: v["timestamp"].as_i64().unwrap(),
            body: str_of(v, "body").to_owned(),
            sig: str_of(v, "signature").to_owned(),
        }
    }

    /// The Ed25519 key pair of the shared vectors, to sign new messages in tests.
    fn ed25519_pair() -> (Ed25519KeyPair, String) {
        let v = &vectors()["ed25519_v1a"][0];
        let both = STANDARD
            .decode(str_of(v, "secret_key_base64_seed_then_public"))
            .unwrap();
        let (seed, public) = both.split_at(32);
        let pair = Ed25519KeyPair::from_seed_and_public_key(seed, public).unwrap();
        assert_eq!(pair.public_key().as_ref(), public);
        (pair, str_of(v, "public_key").to_owned())
    }

    fn sign_v1a(pair: &Ed25519KeyPair, id: &str, ts: i64, body: &[u8]) -> String {
        let mut msg = format!("{id}.{ts}.").into_bytes();
        msg.extend_from_slice(body);
        format!("v1a,{}", STANDARD.encode(pair.sign(&msg).as_ref()))
    }

    // --- known-answer vectors -------------------------------------------------------------

    #[test]
    fn every_hmac_vector_verifies_and_signs() {
        let vectors = vectors();
        let list = vectors["hmac_sha256_v1"].as_array().unwrap();
        assert!(!list.is_empty());
        for v in list {
            let (secret, id, body, sig) = (
                str_of(v, "secret"),
                str_of(v, "id"),
                str_of(v, "body"),
                str_of(v, "signature"),
            );
            let ts = v["timestamp"].as_i64().unwrap();
            let verifier = hmac_verifier(&[secret]);
            let h = webhook_headers(id, ts, sig);
            assert_eq!(verifier.verify(&h, body.as_bytes(), at(ts)), Ok(()), "{id}");
            let signer = WebhookSigner::new(secret).unwrap();
            assert_eq!(signer.sign(id, ts, body.as_bytes()), sig, "{id}");
        }
    }

    #[test]
    fn every_ed25519_vector_verifies() {
        let vectors = vectors();
        let list = vectors["ed25519_v1a"].as_array().unwrap();
        assert!(!list.is_empty());
        for v in list {
            let keys = vec![str_of(v, "public_key").to_owned()];
            let verifier = WebhookVerifier::new(&[], &keys, DEFAULT_TOLERANCE).unwrap();
            let ts = v["timestamp"].as_i64().unwrap();
            let id = str_of(v, "id");
            let body = str_of(v, "body");
            let h = webhook_headers(id, ts, str_of(v, "signature"));
            assert_eq!(verifier.verify(&h, body.as_bytes(), at(ts)), Ok(()));
            // The same signature over a different body must not verify.
            assert_eq!(
                verifier.verify(&h, b"{\"test\": 2432232315}", at(ts)),
                Err(AuthError::InvalidSignature { listed: 1 })
            );
        }
    }

    #[test]
    fn vector_key_pair_signs_what_the_vector_says() {
        let v = &vectors()["ed25519_v1a"][0];
        let (pair, _) = ed25519_pair();
        let ts = v["timestamp"].as_i64().unwrap();
        let sig = sign_v1a(&pair, str_of(v, "id"), ts, str_of(v, "body").as_bytes());
        assert_eq!(sig, str_of(v, "signature"));
    }

    // --- negative_cases of the vectors file ------------------------------------------------

    #[test]
    fn several_signatures_one_valid_verifies() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let wrong = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        for list in [
            format!("{wrong} {}", f.sig),
            format!("{} {wrong}", f.sig),
            format!(
                "{wrong}  {wrong} v1a,{} {}",
                STANDARD.encode([7u8; 64]),
                f.sig
            ),
        ] {
            let h = webhook_headers(&f.id, f.ts, &list);
            assert_eq!(
                verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
                Ok(()),
                "{list}"
            );
        }
    }

    #[test]
    fn several_signatures_none_valid_is_refused() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let other = WebhookSigner::new("whsec_dGhpcyBpcyBhIGRpZmZlcmVudCBzZWNyZXQ=").unwrap();
        let list = format!(
            "{} v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v1a,{}",
            other.sign(&f.id, f.ts, f.body.as_bytes()),
            STANDARD.encode([7u8; 64])
        );
        let h = webhook_headers(&f.id, f.ts, &list);
        let err = verifier
            .verify(&h, f.body.as_bytes(), at(f.ts))
            .unwrap_err();
        assert_eq!(err, AuthError::InvalidSignature { listed: 3 });
        assert_eq!(err.code(), "invalid_signature");
    }

    #[test]
    fn timestamp_tolerance_boundary_is_inclusive() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        let body = f.body.as_bytes();
        // The agent's clock 300 s after or before the timestamp: accepted.
        assert_eq!(verifier.verify(&h, body, at(f.ts + 300)), Ok(()));
        assert_eq!(verifier.verify(&h, body, at(f.ts - 300)), Ok(()));
        // A fraction of a second past the boundary still counts as 300 s: whole seconds are compared.
        let just_after = at(f.ts + 300) + Duration::from_millis(999);
        assert_eq!(verifier.verify(&h, body, just_after), Ok(()));
        // 301 s: refused, saying by how much and in which direction.
        let past = verifier.verify(&h, body, at(f.ts + 301)).unwrap_err();
        assert_eq!(
            past,
            AuthError::TimestampOutOfTolerance {
                skew_secs: 301,
                tolerance_secs: 300
            }
        );
        assert_eq!(past.code(), "timestamp_out_of_tolerance");
        assert!(past.to_string().contains("301 s in the past"), "{past}");
        assert!(past.to_string().contains("300 s tolerance"), "{past}");
        let future = verifier.verify(&h, body, at(f.ts - 301)).unwrap_err();
        assert_eq!(
            future,
            AuthError::TimestampOutOfTolerance {
                skew_secs: -301,
                tolerance_secs: 300
            }
        );
        assert!(
            future.to_string().contains("301 s in the future"),
            "{future}"
        );
    }

    #[test]
    fn timestamp_checked_for_ed25519_too() {
        let (pair, public) = ed25519_pair();
        let verifier = WebhookVerifier::new(&[], &[public], DEFAULT_TOLERANCE).unwrap();
        let ts = 1_700_000_000;
        let body = b"{\"a\":1}";
        let h = webhook_headers("msg_1", ts, &sign_v1a(&pair, "msg_1", ts, body));
        assert_eq!(verifier.verify(&h, body, at(ts + 300)), Ok(()));
        assert!(matches!(
            verifier.verify(&h, body, at(ts + 301)),
            Err(AuthError::TimestampOutOfTolerance { skew_secs: 301, .. })
        ));
        assert!(matches!(
            verifier.verify(&h, body, at(ts - 301)),
            Err(AuthError::TimestampOutOfTolerance {
                skew_secs: -301,
                ..
            })
        ));
    }

    #[test]
    fn configurable_tolerance() {
        let f = hmac_fixture();
        let verifier = WebhookVerifier::new(
            std::slice::from_ref(&f.secret),
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        assert_eq!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts + 10)),
            Ok(())
        );
        assert!(matches!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts + 11)),
            Err(AuthError::TimestampOutOfTolerance {
                skew_secs: 11,
                tolerance_secs: 10
            })
        ));
    }

    #[test]
    fn truncated_and_unknown_entries_are_ignored() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        for list in [
            format!("v1, {}", f.sig),
            format!("v9,xxx {}", f.sig),
            format!("v1 v1a, , ,,, v2,{} {}", &f.sig[3..], f.sig),
            format!("v1,not-base64!! {}", f.sig),
        ] {
            let h = webhook_headers(&f.id, f.ts, &list);
            assert_eq!(
                verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
                Ok(()),
                "{list}"
            );
        }
        // Only ignorable entries: no error about them, just nothing that verifies.
        for list in ["v1,", "v9,xxx", "v1, v9,xxx v1a,", "garbage"] {
            let h = webhook_headers(&f.id, f.ts, list);
            assert_eq!(
                verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
                Err(AuthError::InvalidSignature { listed: 0 }),
                "{list}"
            );
        }
    }

    #[test]
    fn one_byte_body_change_is_refused() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        let mut body = f.body.clone().into_bytes();
        let last = body.len() - 2;
        body[last] ^= 0x01;
        assert_eq!(
            verifier.verify(&h, &body, at(f.ts)),
            Err(AuthError::InvalidSignature { listed: 1 })
        );
        // An appended byte (a trailing newline) is a change too.
        let mut longer = f.body.clone().into_bytes();
        longer.push(b'\n');
        assert!(verifier.verify(&h, &longer, at(f.ts)).is_err());
    }

    #[test]
    fn reserialised_json_body_is_refused() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        let value: Value = serde_json::from_str(&f.body).unwrap();
        let reserialised = serde_json::to_vec(&value).unwrap();
        assert_ne!(reserialised, f.body.as_bytes());
        assert_eq!(
            verifier.verify(&h, &reserialised, at(f.ts)),
            Err(AuthError::InvalidSignature { listed: 1 })
        );
        let pretty = serde_json::to_vec_pretty(&value).unwrap();
        assert!(verifier.verify(&h, &pretty, at(f.ts)).is_err());
    }

    // --- rotation, aliases, headers -------------------------------------------------------

    #[test]
    fn rotation_second_secret_verifies() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&["whsec_bmV3IHNlY3JldCBhZnRlciByb3RhdGlvbg==", &f.secret]);
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));

        // And the other way round: the hub signs with the new secret only.
        let new = WebhookSigner::new("whsec_bmV3IHNlY3JldCBhZnRlciByb3RhdGlvbg==").unwrap();
        let h = webhook_headers(&f.id, f.ts, &new.sign(&f.id, f.ts, f.body.as_bytes()));
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));
    }

    #[test]
    fn hmac_and_ed25519_keys_together() {
        let f = hmac_fixture();
        let (pair, public) = ed25519_pair();
        let verifier = WebhookVerifier::new(
            std::slice::from_ref(&f.secret),
            &[public],
            DEFAULT_TOLERANCE,
        )
        .unwrap();
        let body = f.body.as_bytes();
        let v1a = sign_v1a(&pair, &f.id, f.ts, body);
        for list in [f.sig.clone(), v1a.clone(), format!("{v1a} {}", f.sig)] {
            let h = webhook_headers(&f.id, f.ts, &list);
            assert_eq!(verifier.verify(&h, body, at(f.ts)), Ok(()), "{list}");
        }
    }

    #[test]
    fn a_verified_delivery_tells_its_id_timestamp_and_the_versions_listed_but_no_signature() {
        let f = hmac_fixture();
        let (pair, public) = ed25519_pair();
        let verifier = WebhookVerifier::new(
            std::slice::from_ref(&f.secret),
            &[public],
            DEFAULT_TOLERANCE,
        )
        .unwrap();
        let body = f.body.as_bytes();
        let v1a = sign_v1a(&pair, &f.id, f.ts, body);
        // An unknown version first, a wrong v1a, then the right v1 and v1a.
        let list = format!("v9,abcd v1a,{} {} {v1a}", STANDARD.encode([0u8; 64]), f.sig);
        let h = webhook_headers(&f.id, f.ts, &list);
        let verified = verifier.verify_delivery(&h, body, at(f.ts)).unwrap();
        assert_eq!(verified.id, f.id);
        assert_eq!(verified.timestamp, f.ts);
        assert_eq!(verified.versions, ["v9", "v1a", "v1"]);
        assert_eq!(verified.verified_by, "v1");
        assert!(!verified.svix_names);
        let printed = format!("{verified:?}");
        assert!(
            !printed.contains(f.sig.split_once(',').unwrap().1),
            "{printed}"
        );
        let h = headers(&[
            ("svix-id", &f.id),
            ("svix-timestamp", &f.ts.to_string()),
            ("svix-signature", &v1a),
        ]);
        let verified = verifier.verify_delivery(&h, body, at(f.ts)).unwrap();
        assert_eq!((verified.verified_by, verified.svix_names), ("v1a", true));
        assert_eq!(verified.versions, ["v1a"]);
    }

    #[test]
    fn svix_aliases_are_accepted() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let ts = f.ts.to_string();
        let h = headers(&[
            ("svix-id", &f.id),
            ("svix-timestamp", &ts),
            ("svix-signature", &f.sig),
        ]);
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));
        // Mixed names work too: each header falls back to its alias on its own.
        let h = headers(&[
            ("webhook-id", &f.id),
            ("svix-timestamp", &ts),
            ("webhook-signature", &f.sig),
        ]);
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));
    }

    #[test]
    fn webhook_names_take_precedence_over_aliases() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let ts = f.ts.to_string();
        let h = headers(&[
            ("webhook-id", &f.id),
            ("svix-id", "msg_other"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &f.sig),
        ]);
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));
        let h = headers(&[
            ("webhook-id", "msg_other"),
            ("svix-id", &f.id),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &f.sig),
        ]);
        assert!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)).is_err());
    }

    #[test]
    fn signature_split_over_several_header_lines() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let ts = f.ts.to_string();
        let h = headers(&[
            ("webhook-id", &f.id),
            ("webhook-timestamp", &ts),
            (
                "webhook-signature",
                "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
            ("webhook-signature", &f.sig),
        ]);
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));
    }

    #[test]
    fn missing_each_header() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let ts = f.ts.to_string();
        let all = [
            ("webhook-id", f.id.as_str()),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", f.sig.as_str()),
        ];
        let expected = [
            (AuthError::MissingIdHeader, "missing_id_header"),
            (
                AuthError::MissingTimestampHeader,
                "missing_timestamp_header",
            ),
            (
                AuthError::MissingSignatureHeader,
                "missing_signature_header",
            ),
        ];
        for (skip, (err, code)) in expected.into_iter().enumerate() {
            let present: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            let got = verifier
                .verify(&headers(&present), f.body.as_bytes(), at(f.ts))
                .unwrap_err();
            assert_eq!(got, err);
            assert_eq!(got.code(), code);
            assert_eq!(got.status(), StatusCode::UNAUTHORIZED);
            assert!(got.to_string().contains(all[skip].0), "{got}");

            // An empty value counts as missing.
            let mut with_empty = present.clone();
            with_empty.push((all[skip].0, ""));
            let got = verifier
                .verify(&headers(&with_empty), f.body.as_bytes(), at(f.ts))
                .unwrap_err();
            assert_eq!(got.code(), code);
        }
        assert_eq!(
            verifier.verify(&HeaderMap::new(), b"", at(0)),
            Err(AuthError::MissingIdHeader)
        );
    }

    #[test]
    fn malformed_timestamps() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        for ts in [
            "abc",
            "-1614265330",
            "+1614265330",
            "1614265330.5",
            "1614265330 1",
            "99999999999999999999999",
            "0x60377",
        ] {
            let h = headers(&[
                ("webhook-id", &f.id),
                ("webhook-timestamp", ts),
                ("webhook-signature", &f.sig),
            ]);
            let err = verifier
                .verify(&h, f.body.as_bytes(), at(f.ts))
                .unwrap_err();
            assert_eq!(err, AuthError::InvalidTimestamp, "{ts}");
            assert_eq!(err.code(), "invalid_timestamp");
        }
        // Far away but well-formed: out of tolerance, without overflow.
        let h = webhook_headers(&f.id, i64::MAX, &f.sig);
        assert!(matches!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
            Err(AuthError::TimestampOutOfTolerance { .. })
        ));
        let h = webhook_headers(&f.id, 0, &f.sig);
        assert!(matches!(
            verifier.verify(
                &h,
                f.body.as_bytes(),
                SystemTime::UNIX_EPOCH - Duration::from_secs(u64::MAX / 4)
            ),
            Err(AuthError::TimestampOutOfTolerance { .. })
        ));
    }

    #[test]
    fn timestamp_is_part_of_the_signed_content() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        // Within tolerance, but not the timestamp that was signed.
        let h = webhook_headers(&f.id, f.ts + 1, &f.sig);
        assert!(matches!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
            Err(AuthError::InvalidSignature { .. })
        ));
        let h = webhook_headers("msg_other", f.ts, &f.sig);
        assert!(matches!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
            Err(AuthError::InvalidSignature { .. })
        ));
    }

    #[test]
    fn hmac_key_does_not_verify_v1a_and_vice_versa() {
        let f = hmac_fixture();
        let (pair, public) = ed25519_pair();
        let body = f.body.as_bytes();
        let v1a = sign_v1a(&pair, &f.id, f.ts, body);
        let hmac_only = hmac_verifier(&[&f.secret]);
        let h = webhook_headers(&f.id, f.ts, &v1a);
        assert_eq!(
            hmac_only.verify(&h, body, at(f.ts)),
            Err(AuthError::InvalidSignature { listed: 1 })
        );
        let ed_only = WebhookVerifier::new(&[], &[public], DEFAULT_TOLERANCE).unwrap();
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        assert_eq!(
            ed_only.verify(&h, body, at(f.ts)),
            Err(AuthError::InvalidSignature { listed: 1 })
        );
        // A v1 tag relabelled as v1a (and the reverse) is just a wrong-length entry.
        let relabelled = f.sig.replacen("v1,", "v1a,", 1);
        let h = webhook_headers(&f.id, f.ts, &relabelled);
        assert_eq!(
            hmac_only.verify(&h, body, at(f.ts)),
            Err(AuthError::InvalidSignature { listed: 0 })
        );
    }

    #[test]
    fn unpadded_signature_is_accepted() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let unpadded = f.sig.trim_end_matches('=');
        let h = webhook_headers(&f.id, f.ts, unpadded);
        assert_eq!(verifier.verify(&h, f.body.as_bytes(), at(f.ts)), Ok(()));
    }

    #[test]
    fn number_of_checked_entries_is_bounded() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let wrong = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        // Exactly as many as are checked, none valid: the ordinary refusal.
        let list = vec![wrong; MAX_SIGNATURES_CHECKED].join(" ");
        let h = webhook_headers(&f.id, f.ts, &list);
        assert_eq!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
            Err(AuthError::InvalidSignature {
                listed: MAX_SIGNATURES_CHECKED
            })
        );
        // More than are checked: the refusal says so.
        let list = vec![wrong; 100].join(" ");
        let h = webhook_headers(&f.id, f.ts, &list);
        let err = verifier
            .verify(&h, f.body.as_bytes(), at(f.ts))
            .unwrap_err();
        assert_eq!(
            err,
            AuthError::TooManySignatures {
                checked: MAX_SIGNATURES_CHECKED
            }
        );
        assert_eq!(err.code(), "too_many_signatures");
        assert!(
            err.to_string()
                .contains(&format!("first {MAX_SIGNATURES_CHECKED} signatures")),
            "{err}"
        );
    }

    #[test]
    fn a_valid_signature_anywhere_within_the_checked_entries_verifies() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let wrong = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        // The 17th entry, and the last one checked.
        for before in [16, MAX_SIGNATURES_CHECKED - 1] {
            let mut list = vec![wrong; before];
            list.push(&f.sig);
            let h = webhook_headers(&f.id, f.ts, &list.join(" "));
            assert_eq!(
                verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
                Ok(()),
                "valid signature after {before} others"
            );
        }
    }

    #[test]
    fn non_ascii_header_bytes_do_not_panic() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let mut h = HeaderMap::new();
        h.insert(
            "webhook-id",
            HeaderValue::from_bytes(b"msg_\xff\xfe").unwrap(),
        );
        h.insert(
            "webhook-timestamp",
            HeaderValue::from_bytes(b"16142\xe965330").unwrap(),
        );
        h.insert(
            "webhook-signature",
            HeaderValue::from_bytes(b"v1,\xff\xff v1a,\x80").unwrap(),
        );
        assert_eq!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
            Err(AuthError::InvalidTimestamp)
        );
        h.insert("webhook-timestamp", HeaderValue::from(f.ts));
        assert_eq!(
            verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
            Err(AuthError::InvalidSignature { listed: 0 })
        );
    }

    #[test]
    fn errors_never_contain_secrets_or_signatures() {
        let f = hmac_fixture();
        let verifier = hmac_verifier(&[&f.secret]);
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        let errors = [
            verifier.verify(&h, b"tampered", at(f.ts)).unwrap_err(),
            verifier
                .verify(&h, f.body.as_bytes(), at(f.ts + 1000))
                .unwrap_err(),
        ];
        let key_b64 = f.secret.trim_start_matches("whsec_");
        for e in errors {
            let text = format!("{e} {e:?}");
            assert!(!text.contains(key_b64), "{text}");
            assert!(!text.contains(&f.sig[3..]), "{text}");
        }
        let debug = format!("{verifier:?} {:?}", WebhookSigner::new(&f.secret).unwrap());
        assert!(!debug.contains(key_b64), "{debug}");
        let token = BearerToken::new("s3cr3t-t0ken").unwrap();
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }

    // --- key formats ----------------------------------------------------------------------

    #[test]
    fn secret_formats() {
        let f = hmac_fixture();
        let bare = f.secret.trim_start_matches("whsec_").to_owned();
        let h = webhook_headers(&f.id, f.ts, &f.sig);
        for secret in [
            f.secret.clone(),
            bare.clone(),
            format!("{}\n", f.secret),
            format!("  {bare}  "),
        ] {
            let verifier = hmac_verifier(&[&secret]);
            assert_eq!(
                verifier.verify(&h, f.body.as_bytes(), at(f.ts)),
                Ok(()),
                "{secret:?}"
            );
            assert_eq!(
                WebhookSigner::new(&secret)
                    .unwrap()
                    .sign(&f.id, f.ts, f.body.as_bytes()),
                f.sig
            );
        }
    }

    #[test]
    fn bad_secrets_are_refused_with_the_expected_format() {
        let cases = [
            ("", "is empty"),
            ("whsec_", "is empty"),
            ("whsec_not base64!", "not valid base64"),
            ("whsec_====", "not valid base64"),
            (
                "whpk_1SiA4o9hyqTCpIqC5V9HUakiiaeACeqfZTInDBbOir4=",
                "ed25519 public key",
            ),
            ("whsk_AAAA", "signing key"),
        ];
        for (secret, problem) in cases {
            let err = WebhookSigner::new(secret).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(problem), "{secret:?}: {text}");
            assert!(text.contains("whsec_"), "{text}");
            let err = WebhookVerifier::new(
                &[
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
                    secret.to_owned(),
                ],
                &[],
                DEFAULT_TOLERANCE,
            )
            .unwrap_err();
            assert!(
                matches!(err, KeyError::HmacSecret { position: 2, .. }),
                "{err:?}"
            );
            assert!(err.to_string().starts_with("webhook secret 2 "), "{err}");
        }
    }

    #[test]
    fn bad_public_keys_are_refused_with_the_expected_format() {
        let cases = [
            ("", "is empty"),
            ("whpk_", "is empty"),
            ("whpk_%%%", "not valid base64"),
            ("whpk_AAAA", "32 bytes"),
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "hmac secret"),
            ("whsk_AAAA", "signing key"),
        ];
        for (key, problem) in cases {
            let err = WebhookVerifier::new(&[], &[key.to_owned()], DEFAULT_TOLERANCE).unwrap_err();
            assert!(
                matches!(err, KeyError::Ed25519PublicKey { position: 1, .. }),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(problem), "{key:?}: {text}");
            assert!(text.contains("whpk_"), "{text}");
        }
        // The bare base64 key is accepted.
        let (_, public) = ed25519_pair();
        let bare = public.trim_start_matches("whpk_").to_owned();
        assert!(WebhookVerifier::new(&[], &[bare], DEFAULT_TOLERANCE).is_ok());
    }

    #[test]
    fn no_keys_is_an_error() {
        let err = WebhookVerifier::new(&[], &[], DEFAULT_TOLERANCE).unwrap_err();
        assert!(matches!(err, KeyError::NoKeys));
        assert!(err.to_string().contains("configure at least one"));
    }

    // --- signer ---------------------------------------------------------------------------

    #[test]
    fn signer_round_trip() {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let signer = WebhookSigner::new(secret).unwrap();
        let verifier = hmac_verifier(&[secret]);
        let body = br#"{"ack":"evt-1","partner":"p","status":"applied"}"#;
        let ts = 1_800_000_000;
        let pairs = signer.headers("msg_42", ts, body);
        assert_eq!(pairs[0], ("webhook-id", "msg_42".to_owned()));
        assert_eq!(pairs[1], ("webhook-timestamp", ts.to_string()));
        assert_eq!(pairs[2].0, "webhook-signature");
        assert!(pairs[2].1.starts_with("v1,"));
        assert_eq!(pairs[2].1, signer.sign("msg_42", ts, body));
        let mut h = HeaderMap::new();
        for (name, value) in &pairs {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        assert_eq!(verifier.verify(&h, body, at(ts)), Ok(()));
        assert!(verifier.verify(&h, b"{}", at(ts)).is_err());
    }

    // --- bearer token ---------------------------------------------------------------------

    fn auth(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_bytes(value).unwrap(),
        );
        h
    }

    #[test]
    fn bearer_token_accepted_with_any_scheme_case() {
        let token = BearerToken::new("tok_3f9a.b-c~d+e/f=\n").unwrap();
        for value in [
            "Bearer tok_3f9a.b-c~d+e/f=",
            "bearer tok_3f9a.b-c~d+e/f=",
            "BEARER tok_3f9a.b-c~d+e/f=",
            "bEaReR   tok_3f9a.b-c~d+e/f=",
        ] {
            assert_eq!(token.verify(&auth(value.as_bytes())), Ok(()), "{value}");
        }
    }

    #[test]
    fn bearer_token_wrong() {
        let token = BearerToken::new("correct-token").unwrap();
        for value in [
            "Bearer wrong-token",
            "Bearer correct-toke",
            "Bearer correct-token2",
            "Bearer correct-token extra",
            "Bearer CORRECT-TOKEN",
        ] {
            let err = token.verify(&auth(value.as_bytes())).unwrap_err();
            assert_eq!(err, AuthError::InvalidBearerToken, "{value}");
            assert_eq!(err.code(), "invalid_bearer_token");
            assert!(!err.to_string().contains("correct-token"));
        }
        let err = token.verify(&auth(b"Bearer \xffcorrect")).unwrap_err();
        assert_eq!(err, AuthError::InvalidBearerToken);
    }

    #[test]
    fn bearer_token_missing() {
        let token = BearerToken::new("correct-token").unwrap();
        let err = token.verify(&HeaderMap::new()).unwrap_err();
        assert_eq!(err, AuthError::MissingBearerToken);
        assert_eq!(err.code(), "missing_bearer_token");
        for value in ["Bearer", "Bearer   ", "bearer"] {
            assert_eq!(
                token.verify(&auth(value.as_bytes())),
                Err(AuthError::MissingBearerToken),
                "{value}"
            );
        }
        for value in ["Basic Y29ycmVjdC10b2tlbg==", "correct-token", "Bearertoken"] {
            let err = token.verify(&auth(value.as_bytes())).unwrap_err();
            assert_eq!(err, AuthError::NotBearerScheme, "{value}");
            assert_eq!(err.code(), "missing_bearer_token");
        }
    }

    #[test]
    fn bad_bearer_tokens_are_refused() {
        for (token, problem) in [
            ("", "is empty"),
            ("  \n", "is empty"),
            ("Bearer abc", "spaces"),
            ("tök", "visible ASCII"),
        ] {
            let err = BearerToken::new(token).unwrap_err();
            assert!(err.to_string().contains(problem), "{token:?}: {err}");
        }
    }
}
