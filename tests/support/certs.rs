//! Certificates for the TLS tests, made in the test (rcgen): a CA, server certificates for
//! 127.0.0.1/localhost, client certificates with or without a given SAN, expired ones.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

/// A certificate and its key, in PEM.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pair {
    /// Writes `NAME.crt` and `NAME.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert).unwrap();
        std::fs::write(&key, &self.key).unwrap();
        (cert, key)
    }
}

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate (PEM).
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Writes the CA certificate to `dir/NAME`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).unwrap();
        p
    }

    fn leaf(
        &self,
        names: &[&str],
        serial: u64,
        eku: Vec<ExtendedKeyUsagePurpose>,
        expired: bool,
    ) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("serial {serial}"));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = eku;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, with this serial number.
    pub fn server(&self, serial: u64) -> Pair {
        self.server_for(&["127.0.0.1", "localhost"], serial)
    }

    /// A server certificate for `names`.
    pub fn server_for(&self, names: &[&str], serial: u64) -> Pair {
        self.leaf(
            names,
            serial,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            false,
        )
    }

    /// A client certificate carrying `names` as SANs (also usable as a server's, for Redis,
    /// which checks client certificates with OpenSSL's defaults).
    pub fn client(&self, names: &[&str]) -> Pair {
        self.leaf(
            names,
            1000,
            vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            false,
        )
    }

    /// A client certificate that expired in 2021.
    pub fn expired_client(&self, names: &[&str]) -> Pair {
        self.leaf(names, 1001, vec![ExtendedKeyUsagePurpose::ClientAuth], true)
    }
}

/// The serial numbers of the server certificates each connection of a [`tls_channel`] saw,
/// in the order they were made.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A gRPC channel to `addr` over TLS made here with rustls (trusting `ca_pem`, presenting
/// `identity` if given, ALPN h2), recording the serial number of the certificate each of its
/// connections was served: a test sees whether the channel reconnected and with which
/// certificate. Connects lazily, on the first call.
pub fn tls_channel(
    addr: &str,
    ca_pem: &str,
    identity: Option<&Pair>,
) -> (tonic::transport::Channel, Seen) {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        Some(p) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(p.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(p.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let seen = Seen::default();
    let (addr, record) = (addr.to_owned(), seen.clone());
    let channel = tonic::transport::Endpoint::from_static("http://tls.invalid")
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let (connector, addr, record) = (connector.clone(), addr.clone(), record.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                let (_, session) = tls.get_ref();
                assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
                if let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) {
                    record.lock().unwrap().push(serial_of(leaf));
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
    (channel, seen)
}

/// The serial number of a DER certificate (read from the DER by hand: no parser crate).
pub fn serial_of(der: &rustls::pki_types::CertificateDer<'_>) -> Vec<u8> {
    // TBSCertificate ::= SEQUENCE { [0] version, serialNumber INTEGER, ... }: walk the DER.
    let bytes = der.as_ref();
    let (_, cert) = read_tlv(bytes);
    let (_, tbs) = read_tlv(cert);
    let (version_len, _) = read_tlv_len(tbs);
    let rest = &tbs[version_len..];
    let (_, serial) = read_tlv(rest);
    let mut serial = serial.to_vec();
    while serial.len() > 1 && serial[0] == 0 {
        serial.remove(0);
    }
    serial
}

/// (total length, contents) of the DER TLV at the start of `b`.
fn read_tlv(b: &[u8]) -> (usize, &[u8]) {
    let (total, header) = read_tlv_len(b);
    (total, &b[header..total])
}

/// (total length, header length) of the DER TLV at the start of `b`.
fn read_tlv_len(b: &[u8]) -> (usize, usize) {
    let first = b[1] as usize;
    if first < 0x80 {
        (2 + first, 2)
    } else {
        let n = first & 0x7f;
        let len = b[2..2 + n]
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | *x as usize);
        (2 + n + len, 2 + n)
    }
}
