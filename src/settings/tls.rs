//! TLS settings: the gRPC listener's (`GRPC_SERVER_*`, `GRPC_CLIENT_*`) and Redis's
//! (`REDIS_TLS_*`), with the reference's names and defaults. Every path defaults to "" (unset),
//! as in the reference, so an empty variable in a manifest means unset too.

use std::path::{Path, PathBuf};

use clap::{builder::BoolishValueParser, ArgAction, Args};

use crate::{
    store::RedisTls,
    tls::{self, ServerTlsFiles, TlsError},
};

/// `GRPC_SERVER_USE_TLS` and the files it uses.
#[derive(Debug, Clone, Args)]
pub struct GrpcTlsArgs {
    /// Serve gRPC over TLS with GRPC_SERVER_TLS_CERT and GRPC_SERVER_TLS_KEY.
    #[arg(long, env = "GRPC_SERVER_USE_TLS", default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub grpc_server_use_tls: bool,
    /// Certificate chain (PEM), read again when it changes.
    #[arg(long, env = "GRPC_SERVER_TLS_CERT", default_value = "")]
    pub grpc_server_tls_cert: String,
    /// Private key (PEM), read again when it changes.
    #[arg(long, env = "GRPC_SERVER_TLS_KEY", default_value = "")]
    pub grpc_server_tls_key: String,
    /// CA certificates (PEM): when set, clients must present a certificate they issued (mTLS).
    #[arg(long, env = "GRPC_CLIENT_TLS_CACERT", default_value = "")]
    pub grpc_client_tls_cacert: String,
    /// Envoy Gateway's name for GRPC_CLIENT_TLS_CACERT.
    #[arg(long, env = "GRPC_SERVER_TLS_CA_CERT", default_value = "")]
    pub grpc_server_tls_ca_cert: String,
    /// With mTLS: the DNS name or IP address client certificates must carry.
    #[arg(long, env = "GRPC_CLIENT_TLS_SAN", default_value = "")]
    pub grpc_client_tls_san: String,
}

fn path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl GrpcTlsArgs {
    /// The files to serve TLS with, or `None` for plaintext. Logs the settings that have no
    /// effect, as the reference silently ignores them.
    pub fn server_files(&self) -> Result<Option<ServerTlsFiles>, TlsError> {
        let ca = match (
            path(&self.grpc_client_tls_cacert),
            path(&self.grpc_server_tls_ca_cert),
        ) {
            (Some(a), Some(b)) if a != b => return Err(TlsError::CaConflict(a, b)),
            (a, b) => a.or(b),
        };
        if !self.grpc_server_use_tls {
            if !self.grpc_server_tls_cert.is_empty() || ca.is_some() {
                tracing::warn!("gRPC TLS files are set but GRPC_SERVER_USE_TLS is false: serving gRPC in plaintext");
            }
            return Ok(None);
        }
        let cert =
            path(&self.grpc_server_tls_cert).ok_or(TlsError::Missing("GRPC_SERVER_TLS_CERT"))?;
        let key =
            path(&self.grpc_server_tls_key).ok_or(TlsError::Missing("GRPC_SERVER_TLS_KEY"))?;
        let mut client_san = tls::parse_san(&self.grpc_client_tls_san)?;
        if client_san.is_some() && ca.is_none() {
            // The reference checks the SAN only of certificates it asked for, which it does
            // only with a client CA.
            tracing::warn!("GRPC_CLIENT_TLS_SAN has no effect without GRPC_CLIENT_TLS_CACERT: client certificates are not asked for");
            client_san = None;
        }
        Ok(Some(ServerTlsFiles {
            cert,
            key,
            client_ca: ca,
            client_san,
        }))
    }
}

/// `REDIS_TLS_*`: for every Redis connection that uses TLS (`REDIS_TLS`,
/// `REDIS_PERSECOND_TLS`, or a `rediss://` URL), as in the reference.
#[derive(Debug, Clone, Args)]
pub struct RedisTlsArgs {
    /// CA certificates (PEM) to verify Redis's certificate with, instead of the public roots.
    #[arg(long, env = "REDIS_TLS_CACERT", default_value = "")]
    pub redis_tls_cacert: String,
    /// Client certificate (PEM), for a Redis that requires one (`tls-auth-clients`).
    #[arg(long, env = "REDIS_TLS_CLIENT_CERT", default_value = "")]
    pub redis_tls_client_cert: String,
    /// Its private key (PEM).
    #[arg(long, env = "REDIS_TLS_CLIENT_KEY", default_value = "")]
    pub redis_tls_client_key: String,
    /// Verify Redis's certificate chain but not that it names the host connected to.
    #[arg(long, env = "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION", default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub redis_tls_skip_hostname_verification: bool,
}

impl RedisTlsArgs {
    /// Whether any of these settings is given.
    pub fn is_set(&self) -> bool {
        !(self.redis_tls_cacert.is_empty()
            && self.redis_tls_client_cert.is_empty()
            && self.redis_tls_client_key.is_empty())
            || self.redis_tls_skip_hostname_verification
    }

    /// Reads and checks the files now, so a bad one stops start-up naming the setting.
    pub fn load(&self) -> Result<RedisTls, TlsError> {
        let read = |setting: &'static str, path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::Read {
                setting,
                path: path.to_owned(),
                error,
            })
        };
        let root_cert = match path(&self.redis_tls_cacert) {
            Some(p) => {
                let pem = read("REDIS_TLS_CACERT", &p)?;
                tls::parse_certs("REDIS_TLS_CACERT", &p, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let client = match (
            path(&self.redis_tls_client_cert),
            path(&self.redis_tls_client_key),
        ) {
            (Some(cert), Some(key)) => {
                let cert_pem = read("REDIS_TLS_CLIENT_CERT", &cert)?;
                tls::parse_certs("REDIS_TLS_CLIENT_CERT", &cert, &cert_pem)?;
                let key_pem = read("REDIS_TLS_CLIENT_KEY", &key)?;
                tls::parse_key("REDIS_TLS_CLIENT_KEY", &key, &key_pem)?;
                Some((cert_pem, key_pem))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(TlsError::Half(
                    "REDIS_TLS_CLIENT_CERT",
                    "REDIS_TLS_CLIENT_KEY",
                ))
            }
            (None, Some(_)) => {
                return Err(TlsError::Half(
                    "REDIS_TLS_CLIENT_KEY",
                    "REDIS_TLS_CLIENT_CERT",
                ))
            }
        };
        Ok(RedisTls {
            root_cert,
            client,
            skip_hostname_verification: self.redis_tls_skip_hostname_verification,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Cli, Command, UNSUPPORTED_ENV};
    use clap::Parser;

    fn serve(extra: &[&str]) -> crate::settings::ServeArgs {
        let mut argv = vec!["ratelimitd", "serve", "--config", "x"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).into_command() {
            Ok(Command::Serve(args)) => *args,
            _ => panic!("serve expected"),
        }
    }

    #[test]
    fn grpc_tls_settings_resolve_as_the_reference_reads_them() {
        let files = |extra: &[&str]| serve(extra).grpc_tls.server_files();
        let tls = ["--grpc-server-use-tls", "true"];
        let with = |more: &[&'static str]| {
            let mut v = tls.to_vec();
            v.extend_from_slice(&["--grpc-server-tls-cert", "c.pem"]);
            v.extend_from_slice(&["--grpc-server-tls-key", "k.pem"]);
            v.extend_from_slice(more);
            files(&v)
        };
        if std::env::vars().all(|(k, _)| !k.starts_with("GRPC_")) {
            // Off by default, whatever files are named.
            assert!(files(&["--grpc-server-tls-cert", "c.pem"])
                .unwrap()
                .is_none());
            assert_eq!(
                files(&tls).unwrap_err().to_string(),
                "GRPC_SERVER_USE_TLS is true but GRPC_SERVER_TLS_CERT is not set"
            );
            let plain = with(&[]).unwrap().unwrap();
            assert_eq!(plain.cert, PathBuf::from("c.pem"));
            assert!(plain.client_ca.is_none());
            // Envoy Gateway's name for the client CA; the same file under both is fine.
            let alias = with(&["--grpc-server-tls-ca-cert", "ca.pem"])
                .unwrap()
                .unwrap();
            assert_eq!(alias.client_ca, Some(PathBuf::from("ca.pem")));
            let both = with(&[
                "--grpc-server-tls-ca-cert",
                "ca.pem",
                "--grpc-client-tls-cacert",
                "ca.pem",
            ]);
            assert!(both.unwrap().unwrap().client_ca.is_some());
            let conflict = with(&[
                "--grpc-server-tls-ca-cert",
                "a.pem",
                "--grpc-client-tls-cacert",
                "b.pem",
            ]);
            assert!(matches!(conflict, Err(TlsError::CaConflict(..))));
            // A SAN without a client CA is not checked (no certificate is asked for).
            let san = with(&["--grpc-client-tls-san", "envoy"]).unwrap().unwrap();
            assert!(san.client_san.is_none());
            let san = with(&[
                "--grpc-client-tls-san",
                "envoy",
                "--grpc-client-tls-cacert",
                "ca.pem",
            ]);
            assert!(san.unwrap().unwrap().client_san.is_some());
        }
        for acted_on in [
            "GRPC_SERVER_USE_TLS",
            "GRPC_SERVER_TLS_CERT",
            "GRPC_SERVER_TLS_KEY",
            "GRPC_CLIENT_TLS_CACERT",
            "GRPC_CLIENT_TLS_SAN",
            "REDIS_TLS_CACERT",
            "REDIS_TLS_CLIENT_CERT",
            "REDIS_TLS_CLIENT_KEY",
            "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
        ] {
            assert!(!UNSUPPORTED_ENV.contains(&acted_on), "{acted_on}");
        }
    }

    #[test]
    fn redis_tls_files_default_to_none() {
        if std::env::vars().all(|(k, _)| !k.starts_with("REDIS_TLS_")) {
            let args = serve(&[]).redis_tls_files;
            assert!(!args.is_set());
            assert!(!args.load().unwrap().is_set());
        }
    }
}
