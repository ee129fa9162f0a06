//! TLS for [`RedisStore`](super::RedisStore): `rediss://` URLs, a custom CA and
//! client certificates (mTLS), with the cargo feature `tls`.
//!
//! redis-rs does the TLS itself, over rustls (pure Rust: no OpenSSL to build or
//! link) with the `ring` provider. Without a custom CA the server certificate is
//! checked against Mozilla's root certificates compiled into the binary
//! (webpki-roots): the same on every host and container (no CA bundle needed in
//! the image), updated with the crate rather than by the OS. A custom CA
//! *replaces* those roots for the servers the cache opens.
//!
//! The one [`client`] built here serves both the pooled connections and the
//! wake-up subscription, so both go over TLS with the same certificates.
//!
//! Without the feature, a `rediss://` URL (or a TLS option) is refused by
//! [`client`] with [`Error::InvalidConfig`] naming the feature, instead of
//! redis-rs's error at the first connection.

use std::fmt;
use std::path::PathBuf;

use redis::{Client, IntoConnectionInfo, RedisError};

use crate::error::{Error, Result};

/// PEM bytes given directly, or a file to read them from at `build()`.
#[derive(Clone)]
pub(crate) enum Pem {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl Pem {
    fn read(&self, what: &str) -> Result<Vec<u8>> {
        match self {
            Pem::Bytes(bytes) => Ok(bytes.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|e| {
                Error::InvalidConfig(format!("cannot read the {what} {}: {e}", path.display()))
            }),
        }
    }
}

/// The TLS settings the builder applies to every server it opens (lock masters
/// and the value server). Empty: the default roots, no client certificate.
#[derive(Clone, Default)]
pub(crate) struct TlsOptions {
    /// PEM certificates of the CA(s) to trust instead of the built-in roots.
    pub root_ca: Option<Pem>,
    /// PEM client certificate chain and private key, for servers that require
    /// client authentication (`tls-auth-clients yes`).
    pub client_cert: Option<(Pem, Pem)>,
}

impl fmt::Debug for TlsOptions {
    // Certificates are not secret, but keys are: only say what is set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |on: bool| if on { "set" } else { "none" };
        f.debug_struct("TlsOptions")
            .field("root_ca", &set(self.root_ca.is_some()))
            .field("client_cert", &set(self.client_cert.is_some()))
            .finish()
    }
}

impl TlsOptions {
    /// True when neither a CA nor a client certificate is set.
    pub fn is_empty(&self) -> bool {
        self.root_ca.is_none() && self.client_cert.is_none()
    }

    /// The same options with every file read, so that each server opened
    /// afterwards does not read them again (and an unreadable file fails once,
    /// at `build()`).
    pub fn resolve(&self) -> Result<TlsOptions> {
        Ok(TlsOptions {
            root_ca: match &self.root_ca {
                Some(pem) => Some(Pem::Bytes(pem.read("TLS root CA")?)),
                None => None,
            },
            client_cert: match &self.client_cert {
                Some((cert, key)) => Some((
                    Pem::Bytes(cert.read("TLS client certificate")?),
                    Pem::Bytes(key.read("TLS client key")?),
                )),
                None => None,
            },
        })
    }
}

/// The message of the error for TLS without the feature.
const FEATURE_NEEDED: &str = "TLS needs the `tls` feature of locked-cache: \
     locked-cache = { ..., features = [\"tls\"] }";

/// Whether `url` asks for TLS (`rediss://`, or redis-rs's `valkeys://`).
pub(crate) fn is_tls_url(url: &str) -> bool {
    let Some((scheme, _)) = url.trim_start().split_once("://") else {
        return false;
    };
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

/// A redis-rs client for `url` with `tls` applied. `server` is the URL with
/// its password redacted, for error messages. Errors are
/// [`Error::InvalidConfig`]: a malformed URL, unreadable or malformed PEM, TLS
/// options on a plain `redis://` URL, or TLS without the `tls` feature.
pub(crate) fn client(url: &str, server: &str, tls: &TlsOptions) -> Result<Client> {
    let tls_url = is_tls_url(url);
    if !cfg!(feature = "tls") && (tls_url || !tls.is_empty()) {
        return Err(Error::InvalidConfig(format!("{server}: {FEATURE_NEEDED}")));
    }
    if !tls.is_empty() && !tls_url {
        // Silently connecting in clear text when certificates were given
        // would be worse than failing.
        return Err(Error::InvalidConfig(format!(
            "{server}: TLS certificates are set but the URL is not rediss://"
        )));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| Error::InvalidConfig(format!("redis url {server}: {e}")))?
        .set_tcp_settings(tcp_settings());
    client_for(info, server, tls)
}

/// A redis-rs client for `info` (parsed from a URL that [`client`] checked)
/// with `tls` applied: also how a connection with rotated credentials is
/// opened (`auth.rs`).
pub(crate) fn client_for(
    info: redis::ConnectionInfo,
    server: &str,
    tls: &TlsOptions,
) -> Result<Client> {
    let invalid = |e: RedisError| Error::InvalidConfig(format!("redis url {server}: {e}"));
    #[cfg(not(feature = "tls"))]
    let _ = tls;
    #[cfg(feature = "tls")]
    if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
        install_crypto_provider();
        if !tls.is_empty() {
            let certificates = redis::TlsCertificates {
                client_tls: match &tls.client_cert {
                    Some((cert, key)) => Some(redis::ClientTlsConfig {
                        client_cert: cert.read("TLS client certificate")?,
                        client_key: key.read("TLS client key")?,
                    }),
                    None => None,
                },
                root_cert: tls
                    .root_ca
                    .as_ref()
                    .map(|ca| ca.read("TLS root CA"))
                    .transpose()?,
            };
            return Client::build_with_tls(info, certificates).map_err(invalid);
        }
    }
    Client::open(info).map_err(invalid)
}

/// `TCP_NODELAY` on every connection: commands and pipelines go out at once
/// rather than waiting, under Nagle's algorithm, for the server to acknowledge
/// earlier ones (up to its delayed-ACK timeout, tens of milliseconds) while a
/// multiplexed connection has commands in flight.
pub(crate) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// rustls needs a process-wide crypto provider. With `ring` the only provider
/// compiled in, rustls picks it by itself; an application that also compiles
/// in `aws-lc-rs` (through another crate) would make that choice ambiguous
/// and rustls panic at the first handshake, so install `ring` as the default
/// when nobody has installed one. An application's own choice is kept.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err: another thread installed one meanwhile, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// True when `err` is a failed TLS handshake or a TLS alert from the server
/// (a certificate not trusted, a wrong host name, a client certificate refused
/// or missing). Always false without the `tls` feature.
pub(crate) fn is_tls_failure(err: &RedisError) -> bool {
    #[cfg(feature = "tls")]
    {
        use std::error::Error as _;
        use std::sync::Arc;
        type Inner = dyn std::error::Error + Send + Sync;
        // redis-rs keeps I/O and rustls errors as an Arc<dyn Error> source;
        // tokio-rustls reports handshake failures as I/O errors wrapping the
        // rustls::Error.
        let Some(inner) = err
            .source()
            .and_then(|s| s.downcast_ref::<Arc<Inner>>())
            .map(|arc| &**arc)
        else {
            return false;
        };
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        inner
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some())
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = err;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_urls_are_recognised() {
        assert!(is_tls_url("rediss://h:6380"));
        assert!(is_tls_url(" REDISS://user:pw@h"));
        assert!(is_tls_url("valkeys://h"));
        assert!(!is_tls_url("redis://h:6379"));
        assert!(!is_tls_url("rediss"));
    }

    #[test]
    fn certificates_on_a_plain_url_are_refused() {
        let tls = TlsOptions {
            root_ca: Some(Pem::Bytes(b"not used".to_vec())),
            client_cert: None,
        };
        let err = client("redis://127.0.0.1:1", "redis://127.0.0.1:1", &tls).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }

    #[test]
    fn debug_output_names_no_key_material() {
        let tls = TlsOptions {
            root_ca: None,
            client_cert: Some((
                Pem::Bytes(b"CERT".to_vec()),
                Pem::Bytes(b"SECRET KEY".to_vec()),
            )),
        };
        let debug = format!("{tls:?}");
        assert!(
            !debug.contains("SECRET") && debug.contains("set"),
            "{debug}"
        );
    }

    #[test]
    fn an_unreadable_pem_file_is_a_config_error() {
        let tls = TlsOptions {
            root_ca: Some(Pem::File("/nonexistent/ca.pem".into())),
            client_cert: None,
        };
        let err = tls.resolve().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(m) if m.contains("/nonexistent/ca.pem")),
            "{err}"
        );
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn rediss_without_the_feature_names_the_feature() {
        let err = client(
            "rediss://127.0.0.1:6380",
            "rediss://127.0.0.1:6380",
            &TlsOptions::default(),
        )
        .unwrap_err();
        let Error::InvalidConfig(message) = &err else {
            panic!("expected InvalidConfig, got {err:?}");
        };
        assert!(message.contains(r#"features = ["tls"]"#), "{message}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn malformed_pem_is_a_config_error() {
        let tls = TlsOptions {
            root_ca: Some(Pem::Bytes(
                b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_vec(),
            )),
            client_cert: None,
        };
        let err = client("rediss://127.0.0.1:6380", "rediss://127.0.0.1:6380", &tls).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    }
}
