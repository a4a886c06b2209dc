//! xmirror's cluster PKI and mutual-TLS QUIC configuration.
//!
//! - [`pki`] makes a cluster CA and node certificates whose identity is a SPIFFE ID,
//!   `spiffe://<cluster>/<role>/<name>`, in a URI SAN (what `xmirror certs` writes).
//! - [`config`] builds quinn server and client configs on rustls with the ring provider
//!   only: TLS 1.3, client certificates always required, trust from every `ca*.crt` in the
//!   certs directory, and verifiers that refuse a peer without a valid SPIFFE ID.
//! - [`trust`] binds every trusted CA to the one cluster it vouches for and verifies
//!   chains against it.
//! - [`inspect`] summarises a certificate for operators (`xmirror certs show`, expiry).
//! - [`identity`] reads the verified peer's [`PeerIdentity`](xmirror_proto::PeerIdentity)
//!   back from a connection: the role that counts is the certificate's.
//!
//! Any CA that issues certificates following the SPIFFE scheme (SPIRE, step-ca,
//! cert-manager) works the same: xmirror authorises by the SPIFFE ID, never by DNS names.

pub mod config;
pub mod identity;
pub mod inspect;
pub mod pki;
pub mod trust;

pub use config::{ExpectedServer, NodeTls, TlsError, UnexpectedServer, ALPN_CLIENT, ALPN_MIRROR};
pub use identity::{identity_from_certificate, peer_identity, IdentityError};
pub use pki::{CertificateAuthority, IssueOptions, NodeCertificate, PkiError, Validity};
pub use trust::{TrustBundle, TrustError, VerifyError};
