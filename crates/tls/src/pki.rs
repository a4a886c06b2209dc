//! The cluster PKI: a CA per cluster and node certificates with SPIFFE IDs (rcgen).
//!
//! File layout in a certs directory (the contract in docs/OPERATIONS.md): `ca.crt` and `ca.key` from
//! `certs init`, `NAME.crt` and `NAME.key` from `certs issue`. Keys are written 0600.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use xmirror_proto::{Name, PeerIdentity, Role};

use crate::identity::trust_domain_of;

/// Why a certificate could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or the key.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `certs init` would overwrite an existing CA key, which would orphan every
    /// certificate it issued.
    #[error("{0} already exists; refusing to replace a CA (pass --force to do it anyway)")]
    CaExists(PathBuf),
    /// `certs issue` would overwrite a node's certificate or key.
    #[error("{0} already exists; refusing to replace it (pass --force to re-issue)")]
    CertificateExists(PathBuf),
    /// A PEM file does not hold what it should.
    #[error("{path}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA in the directory belongs to another cluster than the one asked for.
    #[error("the CA in {dir} is for cluster {ca_cluster:?}, not {requested:?}")]
    ClusterMismatch {
        /// The certs directory.
        dir: PathBuf,
        /// The CA's cluster.
        ca_cluster: String,
        /// The cluster asked for.
        requested: String,
    },
    /// The validity period is empty.
    #[error("validity must be at least one day")]
    EmptyValidity,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The first instant it is valid.
    pub not_before: OffsetDateTime,
    /// The last instant it is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// The default for node certificates: one year.
    pub const DEFAULT_DAYS: u32 = 365;
    /// The default for CAs: ten years, so that node certificates are rotated long before
    /// their CA must be.
    pub const DEFAULT_CA_DAYS: u32 = 3650;

    /// From an hour ago (tolerating clock skew between nodes) for `days` days.
    pub fn days_from_now(days: u32) -> Result<Validity, PkiError> {
        if days == 0 {
            return Err(PkiError::EmptyValidity);
        }
        let now = OffsetDateTime::now_utc();
        Ok(Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        })
    }
}

/// What a node certificate should say besides its identity.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    /// When it is valid.
    pub validity: Validity,
    /// Extra DNS SANs (for example the node's real host name), besides the default
    /// `<name>.<role>.<cluster>.xmirror`.
    pub extra_dns_names: Vec<String>,
}

/// A cluster's certificate authority.
pub struct CertificateAuthority {
    cluster_id: Name,
    cert_pem: String,
    key_pem: String,
}

/// A node's certificate and key, in PEM.
pub struct NodeCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

/// The DNS SAN every node certificate carries, so that standard TLS tools can verify it.
pub fn default_dns_name(identity: &PeerIdentity) -> String {
    format!(
        "{}.{}.{}.xmirror",
        identity.name, identity.role, identity.cluster_id
    )
    .to_ascii_lowercase()
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` with `mode`, creating or replacing it.
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io_error = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_error)?;
    // `mode` applies only at creation: tighten a file that existed already.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error)?;
    file.write_all(contents.as_bytes()).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

impl CertificateAuthority {
    /// A new CA (ECDSA P-256) for `cluster_id`. Its URI SAN `spiffe://<cluster>` names the
    /// trust domain, so `issue` can check it signs for the right cluster.
    pub fn generate(
        cluster_id: &Name,
        validity: Validity,
    ) -> Result<CertificateAuthority, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("xmirror CA {cluster_id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "xmirror");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{cluster_id}").try_into()?)];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cluster_id: cluster_id.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<CertificateAuthority, PkiError> {
        let cert_path = dir.join("ca.crt");
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&dir.join("ca.key"))?;
        let cluster_id = ca_cluster(&cert_path, &cert_pem)?;
        Ok(CertificateAuthority {
            cluster_id,
            cert_pem,
            key_pem,
        })
    }

    /// The cluster this CA signs for.
    pub fn cluster_id(&self) -> &Name {
        &self.cluster_id
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, creating it. Refuses to
    /// replace an existing `ca.key` unless `replace` is set.
    pub fn write(&self, dir: &Path, replace: bool) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let key_path = dir.join("ca.key");
        if key_path.exists() && !replace {
            return Err(PkiError::CaExists(key_path));
        }
        write(&key_path, &self.key_pem, 0o600)?;
        write(&dir.join("ca.crt"), &self.cert_pem, 0o644)
    }

    /// Issues a certificate for `identity`, which must be of this CA's cluster.
    ///
    /// Extended key usage follows the role: a `client` only connects (clientAuth); every
    /// other role also serves (serverAuth and clientAuth): a source serves mirrors and
    /// clients, an observer serves its read-only client API, a voter serves its quorum.
    pub fn issue(
        &self,
        identity: &PeerIdentity,
        options: &IssueOptions,
    ) -> Result<NodeCertificate, PkiError> {
        if identity.cluster_id != self.cluster_id {
            return Err(PkiError::ClusterMismatch {
                dir: PathBuf::new(),
                ca_cluster: self.cluster_id.to_string(),
                requested: identity.cluster_id.to_string(),
            });
        }
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;

        let mut dns_names = vec![default_dns_name(identity)];
        dns_names.extend(options.extra_dns_names.iter().cloned());
        let mut params = CertificateParams::new(dns_names)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.spiffe_uri());
        params
            .subject_alt_names
            .push(SanType::URI(identity.spiffe_uri().try_into()?));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity.role {
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Source | Role::Observer | Role::Voter => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = options.validity.not_before;
        params.not_after = options.validity.not_after;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl NodeCertificate {
    /// Writes `NAME.crt` (0644) and `NAME.key` (0600) into `dir`. Existing ones are
    /// replaced only with `replace` (re-issuing is how node certificates are rotated, but
    /// never by accident).
    pub fn write(
        &self,
        dir: &Path,
        name: &Name,
        replace: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        if !replace {
            if let Some(existing) = [&cert_path, &key_path]
                .into_iter()
                .find(|path| path.exists())
            {
                return Err(PkiError::CertificateExists(existing.clone()));
            }
        }
        write(&key_path, &self.key_pem, 0o600)?;
        write(&cert_path, &self.cert_pem, 0o644)?;
        Ok((cert_path, key_path))
    }
}

/// The cluster named by a CA certificate's `spiffe://<cluster>` URI SAN.
fn ca_cluster(path: &Path, pem: &str) -> Result<Name, PkiError> {
    let bad = |reason: String| PkiError::BadPem {
        path: path.to_owned(),
        reason,
    };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|error| bad(format!("not a PEM certificate: {error}")))?;
    let (_, certificate) = X509Certificate::from_der(&parsed.contents)
        .map_err(|error| bad(format!("not an X.509 certificate: {error}")))?;
    let cluster = trust_domain_of(&certificate)
        .ok_or_else(|| bad("the CA has no spiffe://<cluster> URI SAN".into()))?;
    Name::new(cluster).map_err(|error| bad(format!("CA cluster id: {error}")))
}

/// Loads the CA in `dir` and checks it signs for `cluster_id`.
pub fn load_ca_for(dir: &Path, cluster_id: &Name) -> Result<CertificateAuthority, PkiError> {
    let ca = CertificateAuthority::load(dir)?;
    if ca.cluster_id() != cluster_id {
        return Err(PkiError::ClusterMismatch {
            dir: dir.to_owned(),
            ca_cluster: ca.cluster_id().to_string(),
            requested: cluster_id.to_string(),
        });
    }
    Ok(ca)
}

/// Writes a new CA for `cluster_id` into `dir` and issues `nodes` from it, every
/// certificate valid for `days` days: a whole throwaway cluster for demos, tests and
/// benchmarks.
pub fn issue_cluster(
    dir: &Path,
    cluster_id: &Name,
    nodes: &[(Role, Name)],
    days: u32,
) -> Result<CertificateAuthority, PkiError> {
    let ca = CertificateAuthority::generate(cluster_id, Validity::days_from_now(days)?)?;
    ca.write(dir, false)?;
    let options = IssueOptions {
        validity: Validity::days_from_now(days)?,
        extra_dns_names: vec![],
    };
    for (role, name) in nodes {
        let identity = PeerIdentity {
            cluster_id: cluster_id.clone(),
            role: *role,
            name: name.clone(),
        };
        ca.issue(&identity, &options)?.write(dir, name, false)?;
    }
    Ok(ca)
}
