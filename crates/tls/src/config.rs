//! rustls and quinn configurations for mutual TLS between xmirror nodes.
//!
//! Both directions authenticate by SPIFFE ID: the server requires a client certificate
//! that chains to the trust bundle and carries a valid SPIFFE ID, and the client checks
//! that the server's certificate chains to the bundle and names the expected cluster and
//! role. DNS names are not used for authorisation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName};
use webpki::KeyUsage;
use xmirror_proto::{ErrorCode, Name, PeerIdentity, Role};

use crate::identity::{identity_from_certificate, IdentityError};
use crate::inspect::CertificateSummary;
use crate::trust::{TrustBundle, TrustError};

/// ALPN of the mirror protocol.
pub const ALPN_MIRROR: &[u8] = b"xmirror-mirror/1";
/// ALPN of the client protocol.
pub const ALPN_CLIENT: &[u8] = b"xmirror-client/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot access {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No `ca*.crt` file in the certs directory: nothing to trust.
    #[error("no CA certificate (ca*.crt) in {0}")]
    NoTrustedCa(PathBuf),
    /// The node's own certificate has no usable SPIFFE ID.
    #[error("this node's certificate {path}: {source}")]
    OwnIdentity {
        /// The certificate file.
        path: PathBuf,
        /// Why its identity does not parse.
        #[source]
        source: IdentityError,
    },
    /// The node's own certificate is outside its validity period: no peer accepts it.
    #[error(
        "the certificate of {identity} {}",
        if *.expired {
            format!("expired at {not_after}: no node accepts it; issue a new one (xmirror certs issue --force)")
        } else {
            format!("is not valid before {not_before}: check this machine's clock, or wait")
        }
    )]
    OwnCertificateNotValid {
        /// Whose certificate.
        identity: PeerIdentity,
        /// Its first valid instant (RFC 3339).
        not_before: String,
        /// Its last valid instant (RFC 3339).
        not_after: String,
        /// Expired (else not valid yet).
        expired: bool,
    },
    /// rustls refused the configuration (for example a key that does not match).
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
    /// A trusted CA could not be used.
    #[error("trust bundle")]
    Trust(#[from] TrustError),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS configuration refused")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Which servers a client accepts. Clones share the last refusal
/// ([`ExpectedServer::take_refusal`]), so that a client can say in its own words why a
/// handshake failed instead of showing rustls's wrapping of it.
#[derive(Clone, Debug)]
pub struct ExpectedServer {
    /// The server must belong to this cluster, when set.
    pub cluster: Option<Name>,
    /// The server's role must be one of these.
    pub roles: Vec<Role>,
    refused: Arc<std::sync::Mutex<Option<UnexpectedServer>>>,
}

impl ExpectedServer {
    /// A source of `cluster`, as a mirror expects.
    pub fn source_of(cluster: Name) -> ExpectedServer {
        ExpectedServer {
            cluster: Some(cluster),
            roles: vec![Role::Source],
            refused: Arc::default(),
        }
    }

    /// A source or mirror (observer) node of `cluster`, as a client expects: by default its
    /// own cluster's, so that a client never writes to or reads from another cluster's
    /// node by mistake.
    pub fn node_of(cluster: Name) -> ExpectedServer {
        ExpectedServer {
            cluster: Some(cluster),
            roles: vec![Role::Source, Role::Observer],
            refused: Arc::default(),
        }
    }

    /// The TLS server name to dial with. Authorisation uses the SPIFFE ID, so this only
    /// needs to be a valid name; it is the default DNS SAN when the cluster is known.
    pub fn server_name(&self) -> String {
        match &self.cluster {
            Some(cluster) => format!("source.{cluster}.xmirror").to_ascii_lowercase(),
            None => "node.xmirror".to_owned(),
        }
    }

    fn check(&self, identity: &PeerIdentity) -> Result<(), UnexpectedServer> {
        let cluster_ok = self
            .cluster
            .as_ref()
            .is_none_or(|cluster| *cluster == identity.cluster_id);
        if cluster_ok && self.roles.contains(&identity.role) {
            return Ok(());
        }
        let refusal = UnexpectedServer {
            found: identity.clone(),
            cluster: self.cluster.clone(),
            roles: self.roles.clone(),
        };
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(refusal.clone());
        Err(refusal)
    }

    /// The server this client last refused for its identity, taken (once).
    pub fn take_refusal(&self) -> Option<UnexpectedServer> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// A server whose certificate is valid but names the wrong cluster or role. The message
/// starts with the matching error code, which is what operators search for, and says what
/// the server is (a mirror, a source of another cluster).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {}", self.code(), self.explain())]
pub struct UnexpectedServer {
    /// Who the server is.
    pub found: PeerIdentity,
    /// The cluster it should have belonged to, when the client said.
    pub cluster: Option<Name>,
    /// The roles it could have had.
    pub roles: Vec<Role>,
}

impl UnexpectedServer {
    /// `CLUSTER_ID_MISMATCH` when the cluster is wrong, else `ROLE_MISMATCH`.
    pub fn code(&self) -> ErrorCode {
        if self.cluster_ok() {
            ErrorCode::RoleMismatch
        } else {
            ErrorCode::ClusterIdMismatch
        }
    }

    fn cluster_ok(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|cluster| *cluster == self.found.cluster_id)
    }

    fn explain(&self) -> String {
        let found = &self.found;
        let roles: Vec<&str> = self.roles.iter().map(|role| role.as_str()).collect();
        let wanted = roles.join(" or ");
        if !self.cluster_ok() {
            let cluster = self.cluster.as_ref().map_or("", Name::as_str);
            return format!(
                "the server is {found}, of cluster {}, not {cluster}: check the cluster named \
                 (--source-cluster) or the address dialled",
                found.cluster_id
            );
        }
        if found.role == Role::Observer && !self.roles.contains(&Role::Observer) {
            return format!(
                "the server is {found}, a mirror, not a {wanted}: mirrors serve no mirrors; \
                 point it at the source"
            );
        }
        format!(
            "the server is {found}, a {}, not a {wanted}",
            found.role.as_str()
        )
    }
}

/// A refusal carried through rustls, which shows its cause with `Debug`: this type's
/// `Debug` is the readable sentence, so operators see it in connection errors.
struct Refusal<E>(E);

impl<E: fmt::Display> fmt::Debug for Refusal<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Display> fmt::Display for Refusal<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Refusal<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A refusal of a peer's certificate, for rustls (`certificate_unknown` to the peer).
pub(crate) fn certificate_refusal<E>(error: E) -> CertificateError
where
    E: std::error::Error + Send + Sync + 'static,
{
    CertificateError::Other(rustls::OtherError(Arc::new(Refusal(error))))
}

fn certificate_error<E>(error: E) -> rustls::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    rustls::Error::InvalidCertificate(certificate_refusal(error))
}

/// A node's TLS material: its certificate chain and key, and the CAs it trusts.
pub struct NodeTls {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The trusted CAs, each bound to its cluster.
    trust: Arc<TrustBundle>,
    /// The trusted CA certificates themselves, for their expiry.
    ca_certificates: Vec<CertificateDer<'static>>,
    identity: PeerIdentity,
    provider: Arc<CryptoProvider>,
}

impl Clone for NodeTls {
    fn clone(&self) -> NodeTls {
        NodeTls {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            trust: self.trust.clone(),
            ca_certificates: self.ca_certificates.clone(),
            identity: self.identity.clone(),
            provider: self.provider.clone(),
        }
    }
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("identity", &self.identity)
            .field("trusted_cas", &self.trust.len())
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

impl NodeTls {
    /// Loads `DIR/NAME.crt` and `DIR/NAME.key`, and trusts every certificate in every
    /// `DIR/ca*.crt` (so a second CA can be added during a rotation), each for the cluster
    /// it declares or else the one its file names (see [`crate::trust`]).
    pub fn load(certs_dir: &Path, name: &str) -> Result<NodeTls, TlsError> {
        let cert_path = certs_dir.join(format!("{name}.crt"));
        let key_path = certs_dir.join(format!("{name}.key"));
        let cert_pem = std::fs::read(&cert_path).map_err(io_error(&cert_path))?;
        let key_pem = std::fs::read(&key_path).map_err(io_error(&key_path))?;

        let mut ca_files: Vec<PathBuf> = std::fs::read_dir(certs_dir)
            .map_err(io_error(certs_dir))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("ca") && name.ends_with(".crt"))
            })
            .collect();
        ca_files.sort();
        if ca_files.is_empty() {
            return Err(TlsError::NoTrustedCa(certs_dir.to_owned()));
        }
        let mut ca_pems = Vec::new();
        for path in &ca_files {
            ca_pems.push((path.clone(), std::fs::read(path).map_err(io_error(path))?));
        }
        NodeTls::from_pem(&cert_path, &cert_pem, &key_path, &key_pem, &ca_pems)
    }

    /// Builds from PEM bytes. The paths name the sources in errors, and a CA path's file
    /// name assigns a cluster to the CAs in it that declare none (see [`crate::trust`]).
    pub fn from_pem(
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
        ca_pems: &[(PathBuf, Vec<u8>)],
    ) -> Result<NodeTls, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::BadPem {
                path: cert_path.to_owned(),
                reason: error.to_string(),
            })?;
        let end_entity = chain.first().ok_or_else(|| TlsError::BadPem {
            path: cert_path.to_owned(),
            reason: "no certificate in the file".into(),
        })?;
        let identity =
            identity_from_certificate(end_entity).map_err(|source| TlsError::OwnIdentity {
                path: cert_path.to_owned(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| TlsError::BadPem {
            path: key_path.to_owned(),
            reason: error.to_string(),
        })?;

        let mut trust = TrustBundle::default();
        let mut ca_certificates = Vec::new();
        for (path, pem) in ca_pems {
            let mut found = 0;
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate.map_err(|error| TlsError::BadPem {
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
                trust.add(path, &certificate, &identity.cluster_id)?;
                ca_certificates.push(certificate);
                found += 1;
            }
            if found == 0 {
                return Err(TlsError::BadPem {
                    path: path.clone(),
                    reason: "no certificate in the file".into(),
                });
            }
        }
        Ok(NodeTls {
            chain,
            key,
            trust: Arc::new(trust),
            ca_certificates,
            identity,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// The node's own certificate and every trusted CA, summarised (for expiry metrics and
    /// warnings): `(true, summary)` for the node's own.
    pub fn certificates(&self) -> Vec<(bool, CertificateSummary)> {
        let own = self.chain.first().into_iter().map(|der| (true, der));
        let cas = self.ca_certificates.iter().map(|der| (false, der));
        own.chain(cas)
            .filter_map(|(own, der)| {
                CertificateSummary::of(der)
                    .ok()
                    .map(|summary| (own, summary))
            })
            .collect()
    }

    /// Refuses a certificate of this node's that is not valid at `now` (Unix seconds), so
    /// that the error names whose certificate and when, instead of a peer's TLS alert.
    pub fn check_validity(&self, now: i64) -> Result<(), TlsError> {
        let Some((_, own)) = self.certificates().into_iter().find(|(own, _)| *own) else {
            return Ok(());
        };
        if (own.not_before..=own.not_after).contains(&now) {
            return Ok(());
        }
        Err(TlsError::OwnCertificateNotValid {
            identity: self.identity.clone(),
            not_before: crate::inspect::rfc3339(own.not_before),
            not_after: crate::inspect::rfc3339(own.not_after),
            expired: now > own.not_after,
        })
    }

    /// Who this node's certificate says it is.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// A quinn server config offering `alpn_protocols`, requiring client certificates.
    pub fn server_config(&self, alpn_protocols: &[&[u8]]) -> Result<quinn::ServerConfig, TlsError> {
        let verifier = Arc::new(SpiffeClientVerifier {
            trust: self.trust.clone(),
            provider: self.provider.clone(),
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = alpn_protocols.iter().map(|alpn| alpn.to_vec()).collect();
        Ok(quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(tls)?,
        )))
    }

    /// A quinn client config for `alpn` that accepts only `expected` servers.
    pub fn client_config(
        &self,
        alpn: &[u8],
        expected: ExpectedServer,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            trust: self.trust.clone(),
            provider: self.provider.clone(),
            expected,
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls)?,
        )))
    }
}

/// Client verification: the chain must end in a trusted CA that vouches for the cluster
/// of the SPIFFE ID the certificate carries.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a node presents the one certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify(
                end_entity,
                intermediates,
                now,
                KeyUsage::client_auth(),
                &self.provider.signature_verification_algorithms,
            )
            .map_err(|error| error.into_rustls())?;
        Ok(ClientCertVerified::assertion())
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server verification by chain and SPIFFE ID instead of by DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
    expected: ExpectedServer,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let identity = self
            .trust
            .verify(
                end_entity,
                intermediates,
                now,
                KeyUsage::server_auth(),
                &self.provider.signature_verification_algorithms,
            )
            .map_err(|error| error.into_rustls())?;
        self.expected.check(&identity).map_err(certificate_error)?;
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
