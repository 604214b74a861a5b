//! TLS on the gRPC listener (`GRPC_SERVER_USE_TLS`), optionally with client certificates
//! (mTLS: `GRPC_CLIENT_TLS_CACERT`, `GRPC_CLIENT_TLS_SAN`), and the certificate files read
//! again when they change.
//!
//! Why the whole rustls `ServerConfig` is swapped (through an `ArcSwap`) rather than only the
//! certificate through a `ResolvesServerCert`: the client CA rotates too (cert-manager renews
//! the CA bundle beside the certificate), and the verifier is part of the config. Each new
//! connection takes the config in force when it is accepted; connections already open keep
//! theirs, so a rotation drops nothing. A new file that does not load (half-written, a key not
//! matching its certificate) is logged once and the last good config stays in force.
//!
//! - [`accept`]: the handshake of each accepted connection, off the accept loop;
//! - [`watch`]: when to read the files again (file events, symlink swaps, a periodic check).

pub mod accept;
mod watch;

#[cfg(test)]
pub(crate) mod test_ca;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

pub use watch::FALLBACK_INTERVAL;

/// Which files make the gRPC listener's TLS config (the reference's `GRPC_SERVER_TLS_*` and
/// `GRPC_CLIENT_TLS_*` settings, validated).
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// `GRPC_SERVER_TLS_CERT`: the certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// `GRPC_SERVER_TLS_KEY`: its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `GRPC_CLIENT_TLS_CACERT` (or Envoy Gateway's `GRPC_SERVER_TLS_CA_CERT`): when set, every
    /// client must present a certificate issued by one of these CAs.
    pub client_ca: Option<PathBuf>,
    /// `GRPC_CLIENT_TLS_SAN`: the name (DNS name or IP address) the client certificate must
    /// carry, checked as the reference's Go `x509.VerifyOptions{DNSName}` does.
    pub client_san: Option<ServerName<'static>>,
}

/// Why the TLS files cannot be used. At start-up ratelimitd does not start; on a reload the
/// last good config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting}: cannot read {}: {error}", path.display())]
    Read {
        setting: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{setting}: {}: {problem}", path.display())]
    Invalid {
        setting: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("GRPC_SERVER_TLS_KEY: the key in {} does not go with the certificate in {} (GRPC_SERVER_TLS_CERT): {error}", key.display(), cert.display())]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        error: rustls::Error,
    },
    #[error("{0} is set but {1} is not; set both or neither")]
    Half(&'static str, &'static str),
    #[error("GRPC_SERVER_USE_TLS is true but {0} is not set")]
    Missing(&'static str),
    #[error("GRPC_CLIENT_TLS_CACERT ({}) and GRPC_SERVER_TLS_CA_CERT ({}) name different files; set only one of them", .0.display(), .1.display())]
    CaConflict(PathBuf, PathBuf),
    #[error("GRPC_CLIENT_TLS_SAN '{0}' is neither a DNS name nor an IP address")]
    BadSan(String),
}

/// The process's one crypto provider (ring), installed on first use; an error only means
/// one is already installed.
pub fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The contents the config was built from, compared to decide whether a file changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// What [`ServerTls::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The files hold what the config in force (or the last failed attempt) was built from.
    Unchanged,
    /// New contents loaded; new connections use them.
    Reloaded,
    /// New contents that do not load; the last good config stays in force.
    Rejected,
    /// A file cannot be read (e.g. mid-swap); nothing changes, the next check tries again.
    Unreadable,
}

/// The gRPC listener's TLS config in force, and how to read it again.
pub struct ServerTls {
    files: ServerTlsFiles,
    current: ArcSwap<ServerConfig>,
    /// The contents in force and those of the last rejected attempt, so a bad file is logged
    /// once and not at every check. A std Mutex: held while comparing, never across an await.
    seen: Mutex<Seen>,
}

struct Seen {
    in_force: Contents,
    rejected: Option<Contents>,
}

impl ServerTls {
    /// Reads and checks the files; the error names the setting and the file.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let contents = read(&files)?;
        let config = build(&files, &contents)?;
        Ok(Self {
            files,
            current: ArcSwap::from(config),
            seen: Mutex::new(Seen {
                in_force: contents,
                rejected: None,
            }),
        })
    }

    /// The config for a connection accepted now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// The files, for the watcher.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Reads the files again and, when they changed and load, puts them in force. Blocking
    /// (file reads); logs the outcome.
    pub fn check(&self) -> CheckOutcome {
        let contents = match read(&self.files) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "TLS files not readable right now; keeping the certificate in force");
                return CheckOutcome::Unreadable;
            }
        };
        let mut seen = match self.seen.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if seen.in_force == contents || seen.rejected.as_ref() == Some(&contents) {
            return CheckOutcome::Unchanged;
        }
        match build(&self.files, &contents) {
            Ok(config) => {
                self.current.store(config);
                seen.in_force = contents;
                seen.rejected = None;
                tracing::info!(cert = %self.files.cert.display(), "gRPC TLS certificate files reloaded; new connections use them");
                CheckOutcome::Reloaded
            }
            Err(e) => {
                seen.rejected = Some(contents);
                tracing::error!(error = %e, "new gRPC TLS files do not load; keeping the last good ones");
                CheckOutcome::Rejected
            }
        }
    }

    /// Checks the files after changes (see [`watch`]) until the task is aborted.
    pub fn spawn_watch(
        self: &Arc<Self>,
        debounce: std::time::Duration,
        fallback: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(watch::run(Arc::clone(self), debounce, fallback, true))
    }
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        setting,
        path: path.to_owned(),
        error,
    })
}

fn read(files: &ServerTlsFiles) -> Result<Contents, TlsError> {
    Ok(Contents {
        cert: read_file("GRPC_SERVER_TLS_CERT", &files.cert)?,
        key: read_file("GRPC_SERVER_TLS_KEY", &files.key)?,
        client_ca: files
            .client_ca
            .as_deref()
            .map(|p| read_file("GRPC_CLIENT_TLS_CACERT", p))
            .transpose()?,
    })
}

/// Certificates in a PEM file; at least one.
pub fn parse_certs(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |problem: String| TlsError::Invalid {
        setting,
        path: path.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "no certificate (BEGIN CERTIFICATE) in the file".into(),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn parse_key(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Invalid {
        setting,
        path: path.to_owned(),
        problem: format!("no usable private key: {e}"),
    })
}

fn build(files: &ServerTlsFiles, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certs = parse_certs("GRPC_SERVER_TLS_CERT", &files.cert, &contents.cert)?;
    let key = parse_key("GRPC_SERVER_TLS_KEY", &files.key, &contents.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            setting: "GRPC_SERVER_TLS_CERT",
            path: files.cert.clone(),
            problem: e.to_string(),
        })?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let verifier = client_verifier(path, pem, files.client_san.clone(), provider)?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
                error,
            },
            other => TlsError::Invalid {
                setting: "GRPC_SERVER_TLS_KEY",
                path: files.key.clone(),
                problem: other.to_string(),
            },
        })?;
    // gRPC is HTTP/2 only; clients that negotiate ALPN (Envoy, grpc-go) require it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Requires a client certificate issued by a CA in `pem`, carrying `san` when set.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    san: Option<ServerName<'static>>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    const SETTING: &str = "GRPC_CLIENT_TLS_CACERT";
    let invalid = |problem: String| TlsError::Invalid {
        setting: SETTING,
        path: path.to_owned(),
        problem,
    };
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(SETTING, path, pem)? {
        roots
            .add(cert)
            .map_err(|e| invalid(format!("not a usable CA certificate: {e}")))?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(match san {
        Some(san) => Arc::new(SanVerifier { inner, san }),
        None => inner,
    })
}

/// `GRPC_CLIENT_TLS_SAN`: the chain check of `inner`, then the name check the reference
/// makes (Go's `VerifyHostname`: DNS SANs with wildcards, or IP SANs; never the CN).
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    san: ServerName<'static>,
}

impl ClientCertVerifier for SanVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.san)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `GRPC_CLIENT_TLS_SAN` as a name to check; empty is unset.
pub fn parse_san(san: &str) -> Result<Option<ServerName<'static>>, TlsError> {
    if san.is_empty() {
        return Ok(None);
    }
    ServerName::try_from(san.to_owned())
        .map(Some)
        .map_err(|_| TlsError::BadSan(san.to_owned()))
}

#[cfg(test)]
mod tests;
