//! Loading, reloading and the SAN check, on certificates made here (rcgen).

use std::path::Path;

use rcgen::ExtendedKeyUsagePurpose;

use super::{test_ca::Ca, *};

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn files(dir: &Path) -> ServerTlsFiles {
    ServerTlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        client_ca: None,
        client_san: None,
    }
}

#[test]
fn bad_files_name_the_setting_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let e = ServerTls::load(f.clone()).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!(
            "GRPC_SERVER_TLS_CERT: cannot read {}: ",
            f.cert.display()
        )),
        "{e}"
    );
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    write(dir.path(), "tls.crt", "not a certificate\n");
    write(dir.path(), "tls.key", &key);
    let e = ServerTls::load(f.clone()).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "GRPC_SERVER_TLS_CERT: {}: no certificate (BEGIN CERTIFICATE) in the file",
            f.cert.display()
        )
    );
    write(dir.path(), "tls.crt", &cert);
    write(dir.path(), "tls.key", "garbage");
    let e = ServerTls::load(f.clone()).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!(
            "GRPC_SERVER_TLS_KEY: {}: no usable private key",
            f.key.display()
        )),
        "{e}"
    );
    let (_, other_key, _) = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    write(dir.path(), "tls.key", &other_key);
    let e = ServerTls::load(f.clone()).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!(
            "GRPC_SERVER_TLS_KEY: the key in {} does not go with the certificate in {}",
            f.key.display(),
            f.cert.display()
        )),
        "{e}"
    );
    write(dir.path(), "tls.key", &key);
    let mut with_ca = f.clone();
    with_ca.client_ca = Some(write(dir.path(), "ca.crt", "nothing"));
    let e = ServerTls::load(with_ca).err().unwrap().to_string();
    assert!(e.starts_with("GRPC_CLIENT_TLS_CACERT: "), "{e}");
    let tls = ServerTls::load(f).unwrap();
    assert_eq!(tls.config().alpn_protocols, vec![b"h2".to_vec()]);
}

#[test]
fn a_check_loads_new_files_and_keeps_the_last_good_ones_on_a_bad_change() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert1, key1, _) = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    write(dir.path(), "tls.crt", &cert1);
    write(dir.path(), "tls.key", &key1);
    let tls = ServerTls::load(files(dir.path())).unwrap();
    let first = tls.config();
    assert_eq!(tls.check(), CheckOutcome::Unchanged);

    // Half a rotation: the new certificate with the old key.
    let (cert2, key2, _) = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    write(dir.path(), "tls.crt", &cert2);
    assert_eq!(tls.check(), CheckOutcome::Rejected);
    assert!(Arc::ptr_eq(&first, &tls.config()), "the old config stays");
    // Logged once: the same bad contents are not tried again.
    assert_eq!(tls.check(), CheckOutcome::Unchanged);

    write(dir.path(), "tls.key", &key2);
    assert_eq!(tls.check(), CheckOutcome::Reloaded);
    assert!(!Arc::ptr_eq(&first, &tls.config()));

    std::fs::remove_file(dir.path().join("tls.key")).unwrap();
    let second = tls.config();
    assert_eq!(tls.check(), CheckOutcome::Unreadable);
    assert!(Arc::ptr_eq(&second, &tls.config()));
}

#[test]
fn the_san_check_matches_dns_names_wildcards_and_ip_addresses_as_go_does() {
    let ca = Ca::new();
    let roots = {
        let mut r = RootCertStore::empty();
        for c in parse_certs("CA", Path::new("ca"), ca.pem.as_bytes()).unwrap() {
            r.add(c).unwrap();
        }
        Arc::new(r)
    };
    let verifier = |san: &str| SanVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .unwrap(),
        san: parse_san(san).unwrap().unwrap(),
    };
    let client = |names: &[&str]| ca.leaf(names, ExtendedKeyUsagePurpose::ClientAuth).2;
    let ok = |san: &str, names: &[&str]| {
        verifier(san)
            .verify_client_cert(&client(names), &[], UnixTime::now())
            .is_ok()
    };
    assert!(ok("envoy.example.com", &["envoy.example.com"]));
    assert!(ok("Envoy.Example.com", &["envoy.example.com"]));
    assert!(ok("envoy.example.com", &["*.example.com"]));
    assert!(!ok("a.envoy.example.com", &["*.example.com"]));
    assert!(!ok("other.example.org", &["envoy.example.com"]));
    assert!(ok("10.0.0.7", &["10.0.0.7"]));
    assert!(!ok("10.0.0.8", &["10.0.0.7"]));
    // No SAN at all: refused.
    assert!(!ok("envoy.example.com", &[]));
    // A certificate from another CA fails the chain check before the name.
    let other = Ca::new().leaf(&["envoy.example.com"], ExtendedKeyUsagePurpose::ClientAuth);
    assert!(verifier("envoy.example.com")
        .verify_client_cert(&other.2, &[], UnixTime::now())
        .is_err());
    assert!(matches!(parse_san("not a name!"), Err(TlsError::BadSan(_))));
    assert!(parse_san("").unwrap().is_none());
}
