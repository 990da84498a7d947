//! SASL for plugins: PLAIN (RFC 4616) and SCRAM-SHA-256 / SCRAM-SHA-512 (RFC 5802, 7677),
//! run by the host so that every protocol (Kafka SASL, AMQP, MQTT 5 AUTH) shares one
//! implementation and plugins never see a stored credential.
//!
//! SCRAM needs, per user and hash, a salt, an iteration count, a StoredKey and a ServerKey;
//! they are derived when the plain password is known (config `password`, or the admin API),
//! never from the argon2 hash. A user defined by `password_hash` alone cannot use SCRAM.
//! An unknown user gets a made-up salt and fails only at the proof, so SCRAM does not tell
//! which users exist. Channel binding (`-PLUS`, `p=` GS2 flag) is not offered. Usernames
//! are compared as sent after `=2C`/`=3D` unescaping (no SASLprep: ASCII names assumed).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256, Sha512};

/// SCRAM iteration count for new credentials (Kafka's minimum is 4096).
pub const ITERATIONS: u32 = 4096;

/// The mechanisms the host offers, best first.
pub const MECHANISMS: [&str; 3] = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];

/// A SCRAM hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    pub fn from_mechanism(m: &str) -> Option<ScramHash> {
        match m {
            "SCRAM-SHA-256" => Some(ScramHash::Sha256),
            "SCRAM-SHA-512" => Some(ScramHash::Sha512),
            _ => None,
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            // HMAC takes keys of any length: `new_from_slice` cannot fail here, and an empty
            // result would only make a proof comparison fail.
            ScramHash::Sha256 => <Hmac<Sha256> as Mac>::new_from_slice(key)
                .map(|m| m.chain_update(data).finalize().into_bytes().to_vec())
                .unwrap_or_default(),
            ScramHash::Sha512 => <Hmac<Sha512> as Mac>::new_from_slice(key)
                .map(|m| m.chain_update(data).finalize().into_bytes().to_vec())
                .unwrap_or_default(),
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
            ScramHash::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha256 => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out.to_vec()
            }
            ScramHash::Sha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

/// What the server keeps of a password for one SCRAM hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramCredential {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramCredential {
    /// Derives the credential of `password` with a fresh random salt.
    pub fn derive(hash: ScramHash, password: &[u8]) -> ScramCredential {
        let mut salt = vec![0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        Self::derive_with(hash, password, salt, ITERATIONS)
    }

    pub fn derive_with(
        hash: ScramHash,
        password: &[u8],
        salt: Vec<u8>,
        iterations: u32,
    ) -> ScramCredential {
        let salted = hash.salted_password(password, &salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        ScramCredential {
            stored_key: hash.hash(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
            salt,
            iterations,
        }
    }
}

/// Why a SASL exchange failed (logged; the client only learns that it failed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("mechanism {0:?} is not offered")]
    Mechanism(String),
    #[error("malformed SASL message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("authentication failed")]
    Failed,
}

/// Where a SCRAM exchange stands between the client's first and final messages.
#[derive(Debug, Clone)]
pub struct ScramPending {
    hash: ScramHash,
    user: String,
    /// `None` for an unknown user: the exchange goes on and fails at the proof.
    credential: Option<ScramCredential>,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramPending {
    pub fn user(&self) -> &str {
        &self.user
    }
}

fn attr(part: &str, name: char) -> Option<&str> {
    part.strip_prefix(name)?.strip_prefix('=')
}

fn unescape_user(s: &str) -> Result<String, SaslError> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(SaslError::Malformed("bad escape in username")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Handles a SCRAM client-first message; `lookup` gives the user's credential, if any.
/// Returns the server-first message and the state to finish with.
pub fn scram_first(
    hash: ScramHash,
    client_first: &[u8],
    lookup: impl FnOnce(&str) -> Option<ScramCredential>,
) -> Result<(Vec<u8>, ScramPending), SaslError> {
    let text = std::str::from_utf8(client_first).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    // gs2-header = gs2-cbind-flag "," [ authzid ] ","
    let mut parts = text.splitn(3, ',');
    let flag = parts.next().ok_or(SaslError::Malformed("no GS2 header"))?;
    let authzid = parts.next().ok_or(SaslError::Malformed("no GS2 header"))?;
    let bare = parts
        .next()
        .ok_or(SaslError::Malformed("no client-first-bare"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(SaslError::ChannelBinding),
        _ => return Err(SaslError::Malformed("bad GS2 flag")),
    }
    let mut fields = bare.split(',');
    let user = fields
        .next()
        .and_then(|f| attr(f, 'n'))
        .ok_or(SaslError::Malformed("no username"))?;
    let user = unescape_user(user)?;
    if !authzid.is_empty() && attr(authzid, 'a').map(unescape_user) != Some(Ok(user.clone())) {
        return Err(SaslError::Failed);
    }
    let client_nonce = fields
        .next()
        .and_then(|f| attr(f, 'r'))
        .filter(|n| !n.is_empty())
        .ok_or(SaslError::Malformed("no nonce"))?;
    let credential = lookup(&user);
    let (salt, iterations) = match &credential {
        Some(c) => (c.salt.clone(), c.iterations),
        None => (hash.hash(user.as_bytes())[..16].to_vec(), ITERATIONS),
    };
    let mut server_nonce = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut server_nonce);
    let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
    let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(&salt));
    let pending = ScramPending {
        hash,
        user,
        credential,
        gs2_header: format!("{flag},{authzid},"),
        client_first_bare: bare.to_string(),
        server_first: server_first.clone(),
        nonce,
    };
    Ok((server_first.into_bytes(), pending))
}

/// Checks the client-final message; returns the server-final message (`v=...`).
pub fn scram_final(pending: &ScramPending, client_final: &[u8]) -> Result<Vec<u8>, SaslError> {
    let text = std::str::from_utf8(client_final).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let (without_proof, proof) = text
        .rsplit_once(",p=")
        .ok_or(SaslError::Malformed("no proof"))?;
    let mut fields = without_proof.split(',');
    let cbind = fields
        .next()
        .and_then(|f| attr(f, 'c'))
        .ok_or(SaslError::Malformed("no channel binding"))?;
    if B64.decode(cbind).ok().as_deref() != Some(pending.gs2_header.as_bytes()) {
        return Err(SaslError::Failed);
    }
    let nonce = fields
        .next()
        .and_then(|f| attr(f, 'r'))
        .ok_or(SaslError::Malformed("no nonce"))?;
    if nonce != pending.nonce {
        return Err(SaslError::Failed);
    }
    let proof = B64
        .decode(proof)
        .map_err(|_| SaslError::Malformed("proof is not base64"))?;
    let cred = pending.credential.as_ref().ok_or(SaslError::Failed)?;
    let auth_message = format!(
        "{},{},{}",
        pending.client_first_bare, pending.server_first, without_proof
    );
    let h = pending.hash;
    let client_signature = h.hmac(&cred.stored_key, auth_message.as_bytes());
    if proof.len() != client_signature.len() {
        return Err(SaslError::Failed);
    }
    let client_key: Vec<u8> = proof
        .iter()
        .zip(&client_signature)
        .map(|(a, b)| a ^ b)
        .collect();
    if !crate::secret::constant_time_eq(&h.hash(&client_key), &cred.stored_key) {
        return Err(SaslError::Failed);
    }
    let server_signature = h.hmac(&cred.server_key, auth_message.as_bytes());
    Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
}

/// Parses a PLAIN message: `[authzid] NUL authcid NUL password`; returns (user, password).
pub fn parse_plain(msg: &[u8]) -> Result<(String, Vec<u8>), SaslError> {
    let mut parts = msg.splitn(3, |b| *b == 0);
    let authzid = parts.next().ok_or(SaslError::Malformed("PLAIN"))?;
    let user = parts.next().ok_or(SaslError::Malformed("PLAIN"))?;
    let password = parts.next().ok_or(SaslError::Malformed("PLAIN"))?;
    let user = String::from_utf8(user.to_vec()).map_err(|_| SaslError::Malformed("PLAIN"))?;
    if !authzid.is_empty() && authzid != user.as_bytes() {
        return Err(SaslError::Failed);
    }
    Ok((user, password.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: user "user", password "pencil".
    #[test]
    fn rfc7677_example() {
        let cred = ScramCredential::derive_with(
            ScramHash::Sha256,
            b"pencil",
            B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        );
        let (_first, mut pending) = scram_first(
            ScramHash::Sha256,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            |u| (u == "user").then(|| cred.clone()),
        )
        .unwrap();
        // Replay the RFC's server nonce.
        pending.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        pending.server_first = format!("r={},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", pending.nonce);
        let fin = scram_final(
            &pending,
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        )
        .unwrap();
        assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        let wrong = scram_final(
            &pending,
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        );
        assert_eq!(wrong, Err(SaslError::Failed));
    }

    #[test]
    fn unknown_users_and_bad_messages() {
        let (first, pending) =
            scram_first(ScramHash::Sha512, b"n,,n=ghost,r=abc", |_| None).unwrap();
        assert!(std::str::from_utf8(&first).unwrap().starts_with("r=abc"));
        assert_eq!(pending.user(), "ghost");
        let fin = format!("c=biws,r={},p=AAAA", pending.nonce);
        assert_eq!(
            scram_final(&pending, fin.as_bytes()),
            Err(SaslError::Failed)
        );
        assert_eq!(
            scram_first(ScramHash::Sha256, b"p=tls-unique,,n=u,r=x", |_| None).err(),
            Some(SaslError::ChannelBinding)
        );
        assert!(scram_first(ScramHash::Sha256, b"garbage", |_| None).is_err());
        assert_eq!(unescape_user("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert_eq!(
            parse_plain(b"\0alice\0secret").unwrap(),
            ("alice".into(), b"secret".to_vec())
        );
        assert!(parse_plain(b"bob\0alice\0secret").is_err());
    }
}
