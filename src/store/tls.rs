//! TLS to Redis on our own connection (`pipe.rs`): the rustls client config for `REDIS_TLS` or
//! a `rediss://` URL with the `REDIS_TLS_*` files, made once at start-up and shared by every
//! connection.
//!
//! Redis's certificate is checked one of three ways, as redis-rs (which served these
//! connections before) and the reference do:
//! - by default, its chain against `REDIS_TLS_CACERT` (else the public webpki roots) and its
//!   name against the host connected to;
//! - with `REDIS_TLS_SKIP_HOSTNAME_VERIFICATION`, its chain but not its name (the reference's
//!   `VerifyPeerCertificate` with no `DNSName`);
//! - with `rediss://…/#insecure`, not at all. The handshake's signatures are still checked
//!   (the peer holds the key of the certificate it shows); redis-rs did not check them.

use std::sync::Arc;

use redis::{ErrorKind, RedisError};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::redis::RedisTls;

/// How a connection speaks TLS: the config, and the name sent (SNI) and checked.
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

impl Tls {
    /// TLS to `host` with `files`; `insecure` is the URL's `#insecure`.
    pub fn new(host: &str, files: &RedisTls, insecure: bool) -> Result<Self, RedisError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| {
            invalid(
                "the Redis host is neither a DNS name nor an IP address, as TLS needs",
                host.to_owned(),
            )
        })?;
        Ok(Self {
            config: client_config(files, insecure)?,
            name,
        })
    }
}

fn invalid(what: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, what, detail))
}

fn client_config(files: &RedisTls, insecure: bool) -> Result<Arc<ClientConfig>, RedisError> {
    let provider = crate::tls::provider();
    let mut roots = RootCertStore::empty();
    match &files.root_cert {
        // Parsed once already (settings/tls.rs); a certificate webpki cannot take as a root
        // fails here, at start-up too, naming the setting.
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| invalid("REDIS_TLS_CACERT", e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid("REDIS_TLS_CACERT", e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| invalid("REDIS_TLS_CACERT", e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = if insecure {
        Arc::new(AnyCertificate(provider.clone()))
    } else if files.skip_hostname_verification {
        Arc::new(AnyName(chain))
    } else {
        chain
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS to Redis", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &files.client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("REDIS_TLS_CLIENT_CERT", e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| invalid("REDIS_TLS_CLIENT_KEY", e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("REDIS_TLS_CLIENT_CERT/KEY", e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `REDIS_TLS_SKIP_HOSTNAME_VERIFICATION`: the chain check of the inner verifier, whose only
/// accepted failure is a name that does not match.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `#insecure`: any certificate, but signatures made with its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    //! Each way of checking, against a rustls server in the test over an in-memory pipe, with
    //! certificates made here (rcgen). tests/tls.rs runs them against a real redis-server.
    use super::*;
    use crate::tls::test_ca::Ca;
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    use rustls::{server::WebPkiClientVerifier, ServerConfig};

    /// A server showing `leaf`; requiring a client certificate from `clients` when set.
    fn server(
        (cert, key, _): &(String, String, CertificateDer<'static>),
        clients: Option<&Ca>,
    ) -> Arc<ServerConfig> {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let builder = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
                    .unwrap();
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crate::tls::provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }

    fn files(
        ca: Option<&Ca>,
        client: Option<(String, String, CertificateDer<'static>)>,
        skip: bool,
    ) -> RedisTls {
        RedisTls {
            root_cert: ca.map(|ca| ca.pem.clone().into_bytes()),
            client: client.map(|(c, k, _)| (c.into_bytes(), k.into_bytes())),
            skip_hostname_verification: skip,
        }
    }

    /// Whether the client accepted the server, and the server the client.
    async fn handshake(
        server: Arc<ServerConfig>,
        host: &str,
        files: &RedisTls,
        insecure: bool,
    ) -> (bool, bool) {
        let tls = Tls::new(host, files, insecure).unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let accept = async move {
            let mut s = tokio_rustls::TlsAcceptor::from(server).accept(s).await?;
            // Reading the client's first bytes: under TLS 1.3 a refused client certificate
            // shows here, after the client's side of the handshake has finished.
            let mut byte = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut byte)
                .await
                .map(drop)
        };
        let connect = async move {
            let mut c = tokio_rustls::TlsConnector::from(tls.config)
                .connect(tls.name, c)
                .await?;
            tokio::io::AsyncWriteExt::write_all(&mut c, b"x").await?;
            tokio::io::AsyncWriteExt::flush(&mut c).await?;
            Ok::<_, std::io::Error>(c)
        };
        let (server, client) = tokio::join!(accept, connect);
        (client.is_ok(), server.is_ok())
    }

    /// What a handshake is expected to end in.
    #[derive(Debug, Clone, Copy)]
    enum Expect {
        Accepted,
        /// The client refuses the server's certificate.
        ClientRefuses,
        /// The server refuses the client's (or its absence).
        ServerRefuses,
    }
    use Expect::*;

    async fn expect(
        server: &Arc<ServerConfig>,
        host: &str,
        files: &RedisTls,
        insecure: bool,
        expected: Expect,
    ) {
        let (client, srv) = handshake(server.clone(), host, files, insecure).await;
        let ok = match expected {
            Accepted => client && srv,
            ClientRefuses => !client,
            ServerRefuses => !srv,
        };
        assert!(ok, "{host}, {files:?}, insecure {insecure}: client accepted {client}, server {srv}; expected {expected:?}");
    }

    #[tokio::test]
    async fn by_default_the_chain_and_the_name_are_checked() {
        let ca = Ca::new();
        let redis = server(&ca.leaf(&["redis.test", "127.0.0.1"], ServerAuth), None);
        let ok = files(Some(&ca), None, false);
        expect(&redis, "redis.test", &ok, false, Accepted).await;
        expect(&redis, "127.0.0.1", &ok, false, Accepted).await;
        // Another name, another address, another CA, the public roots: refused.
        expect(&redis, "other.test", &ok, false, ClientRefuses).await;
        expect(&redis, "127.0.0.2", &ok, false, ClientRefuses).await;
        let other = files(Some(&Ca::new()), None, false);
        expect(&redis, "redis.test", &other, false, ClientRefuses).await;
        let public = files(None, None, false);
        expect(&redis, "redis.test", &public, false, ClientRefuses).await;
    }

    #[tokio::test]
    async fn skipping_the_hostname_still_checks_the_chain() {
        let ca = Ca::new();
        let redis = server(&ca.leaf(&["redis.test"], ServerAuth), None);
        let skip = files(Some(&ca), None, true);
        expect(&redis, "other.test", &skip, false, Accepted).await;
        expect(&redis, "10.0.0.1", &skip, false, Accepted).await;
        let other = files(Some(&Ca::new()), None, true);
        expect(&redis, "redis.test", &other, false, ClientRefuses).await;
        let public = files(None, None, true);
        expect(&redis, "other.test", &public, false, ClientRefuses).await;
    }

    #[tokio::test]
    async fn insecure_accepts_any_certificate() {
        let redis = server(&Ca::new().leaf(&["redis.test"], ServerAuth), None);
        let anything = files(Some(&Ca::new()), None, false);
        expect(&redis, "other.test", &anything, true, Accepted).await;
        let public = files(None, None, false);
        expect(&redis, "redis.test", &public, true, Accepted).await;
    }

    #[tokio::test]
    async fn the_client_certificate_is_presented() {
        let ca = Ca::new();
        let clients = Ca::new();
        let redis = server(&ca.leaf(&["redis.test"], ServerAuth), Some(&clients));
        let client = clients.leaf(&["ratelimitd"], ClientAuth);
        let with = files(Some(&ca), Some(client), false);
        expect(&redis, "redis.test", &with, false, Accepted).await;
        // None, or one from another CA: the server refuses it.
        let without = files(Some(&ca), None, false);
        expect(&redis, "redis.test", &without, false, ServerRefuses).await;
        let stranger = Ca::new().leaf(&["ratelimitd"], ClientAuth);
        let stranger = files(Some(&ca), Some(stranger), false);
        expect(&redis, "redis.test", &stranger, false, ServerRefuses).await;
    }

    #[test]
    fn a_host_tls_cannot_name_is_a_settings_error() {
        let e = Tls::new("not a host!", &RedisTls::default(), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("neither a DNS name nor an IP address"),
            "{e}"
        );
        assert!(e.to_string().contains("not a host!"), "{e}");
    }
}
