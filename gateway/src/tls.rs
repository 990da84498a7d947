//! Server certificates for TLS listeners.
//!
//! With `tls.cert`/`tls.key` in the config, those files are used. Without them, the gateway
//! makes its own small PKI on first start — a CA and a server certificate for `localhost`,
//! `127.0.0.1` and `::1`, signed by it — in `data_dir/tls/`, and reuses it on later starts, so
//! clients can trust `data_dir/tls/ca.pem` once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Where a generated PKI lives under the data directory.
pub fn generated_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// Builds the TLS server config from the `[tls]` section: the default certificate (from
/// files, or generated), certificates chosen by SNI, and optional client certificates.
pub fn server_config(
    section: &crate::config::TlsSection,
    data_dir: &Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (cert_path, key_path) = match (&section.cert, &section.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => ensure_generated(&generated_dir(data_dir))?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let load = |cert: &Path, key: &Path| -> anyhow::Result<Arc<CertifiedKey>> {
        let certs = read_certs(cert)?;
        let key = read_key(key)?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .with_context(|| format!("loading private key {}", key_path_display(cert)))?;
        Ok(Arc::new(CertifiedKey::new(certs, signing)))
    };
    let mut resolver = SniResolver {
        default: load(&cert_path, &key_path)
            .with_context(|| format!("using certificate {}", cert_path.display()))?,
        by_name: std::collections::HashMap::new(),
    };
    for c in &section.certificates {
        let key = load(&c.cert, &c.key)
            .with_context(|| format!("tls.certificates for {}", c.server_name))?;
        resolver
            .by_name
            .insert(c.server_name.to_ascii_lowercase(), key);
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?;
    let builder = match &section.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("client CA {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if section.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .with_context(|| format!("client CA {}", ca.display()))?,
            )
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    if section.session_tickets {
        // A fleet reconnecting after a blip resumes instead of paying a full handshake each
        // (the server's signature and, with mTLS, the client chain's verification): the
        // resumed session carries the client certificate it was made with.
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().context("making the TLS ticket key")?;
    }
    Ok(Arc::new(config))
}

fn key_path_display(cert: &Path) -> String {
    format!("for {}", cert.display())
}

/// Picks a certificate by the server name the client asked for.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: std::collections::HashMap<String, Arc<CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let named = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()));
        Some(named.unwrap_or(&self.default).clone())
    }
}

/// The subject common name of a verified client certificate.
pub fn client_common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading private key {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing private key {}", path.display()))?
        .ok_or_else(|| anyhow!("no private key in {}", path.display()))
}

/// Generates `ca.pem`, `cert.pem` and `key.pem` in `dir` unless they exist.
fn ensure_generated(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Magnetar local CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;

    let key = rcgen::KeyPair::generate().context("generating the server key")?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .context("server certificate parameters")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "magnetar");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("signing the server certificate")?;

    std::fs::write(dir.join("ca.pem"), ca.pem()).context("writing ca.pem")?;
    std::fs::write(&key_path, key.serialize_pem()).context("writing key.pem")?;
    std::fs::write(&cert_path, cert.pem() + &ca.pem()).context("writing cert.pem")?;
    tracing::info!(dir = %dir.display(), "generated a TLS certificate; clients can trust ca.pem");
    Ok((cert_path, key_path))
}
