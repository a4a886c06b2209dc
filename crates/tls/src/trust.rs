//! The trust bundle: the CAs a node trusts, the one cluster each vouches for, and chain
//! verification that holds a certificate to the cluster of the anchor its chain ends in.
//!
//! A CA vouches for the trust domain it declares (a `spiffe://<cluster>` URI SAN) or, when
//! it declares none (as cert-manager and step-ca CAs usually do), for the cluster the
//! operator assigns by the file that holds it: `ca.crt` is the node's own cluster,
//! `ca-<cluster>.crt` that cluster. A CA is never "any cluster". A certificate is accepted
//! only for its anchor's cluster, and every intermediate on the path that declares a trust
//! domain must declare that one: a foreign CA cannot mint, directly or through an
//! intermediate, an identity of another cluster.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::CertificateError;
use webpki::{EndEntityCert, KeyUsage, VerifiedPath};
use x509_parser::prelude::{FromDer, X509Certificate};
use xmirror_proto::{Name, PeerIdentity};

use crate::config::certificate_refusal;
use crate::identity::{identity_from_certificate, trust_domain_of, IdentityError};

/// Why a trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A CA file holds a certificate webpki cannot use as a trust anchor.
    #[error("{path}: not a usable CA certificate")]
    BadAnchor {
        /// The CA file.
        path: PathBuf,
        /// Why webpki refused it.
        #[source]
        source: webpki::Error,
    },
    /// A CA that declares no trust domain, in a file whose name assigns none.
    #[error(
        "{path}: a CA that declares no trust domain must be in ca.crt (this node's cluster) or \
         ca-<cluster>.crt (the cluster it vouches for)"
    )]
    Unassigned {
        /// The CA file.
        path: PathBuf,
    },
}

/// Why a peer's certificate is refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The chain does not verify (unknown issuer, expired, bad signature, wrong key usage...).
    #[error("certificate chain")]
    Chain(#[source] webpki::Error),
    /// The chain verifies, but the identity it carries is not one its anchor vouches for.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl VerifyError {
    /// The rustls error a verifier returns, so that the peer gets the matching TLS alert.
    pub fn into_rustls(self) -> rustls::Error {
        let certificate = match self {
            VerifyError::Chain(error) => match error {
                webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
                webpki::Error::CertExpired { .. } | webpki::Error::InvalidCertValidity => {
                    CertificateError::Expired
                }
                webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
                webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
                webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
                webpki::Error::CertRevoked => CertificateError::Revoked,
                webpki::Error::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
                other => certificate_refusal(other),
            },
            VerifyError::Identity(error) => certificate_refusal(error),
        };
        rustls::Error::InvalidCertificate(certificate)
    }
}

/// Which cluster a CA file assigns to the CAs in it that declare none.
fn assigned_cluster(path: &Path, own_cluster: &Name) -> Option<Name> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".crt")?;
    if stem == "ca" {
        return Some(own_cluster.clone());
    }
    Name::new(stem.strip_prefix("ca-")?).ok()
}

/// The trusted CAs, each with the one cluster it vouches for.
#[derive(Debug, Default)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    clusters: Vec<Name>,
}

impl TrustBundle {
    /// Trusts the CA certificate `der`, read from `path`, for the cluster it declares or
    /// else the one `path` assigns (`own_cluster` for `ca.crt`).
    pub fn add(
        &mut self,
        path: &Path,
        der: &CertificateDer<'_>,
        own_cluster: &Name,
    ) -> Result<(), TrustError> {
        let anchor = webpki::anchor_from_trusted_cert(der)
            .map_err(|source| TrustError::BadAnchor {
                path: path.to_owned(),
                source,
            })?
            .to_owned();
        let declared = X509Certificate::from_der(der)
            .ok()
            .and_then(|(_, certificate)| trust_domain_of(&certificate))
            .and_then(|domain| Name::new(domain).ok());
        let cluster = declared
            .or_else(|| assigned_cluster(path, own_cluster))
            .ok_or_else(|| TrustError::Unassigned {
                path: path.to_owned(),
            })?;
        self.anchors.push(anchor);
        self.clusters.push(cluster);
        Ok(())
    }

    /// How many CAs are trusted.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether no CA is trusted.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// The cluster `anchor` vouches for.
    fn cluster_of(&self, anchor: &TrustAnchor<'_>) -> Option<&Name> {
        self.anchors
            .iter()
            .position(|known| {
                known.subject == anchor.subject
                    && known.subject_public_key_info == anchor.subject_public_key_info
            })
            .map(|index| &self.clusters[index])
    }

    /// Verifies `end_entity` (with the `intermediates` the peer sent) for `usage`, and
    /// returns the identity it carries when its anchor vouches for that identity's cluster.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<PeerIdentity, VerifyError> {
        let identity = identity_from_certificate(end_entity)?;
        let certificate = EndEntityCert::try_from(end_entity).map_err(VerifyError::Chain)?;
        // webpki tries every path to an anchor; a path this rule refuses is remembered so
        // that, when no path passes, the peer hears why.
        let refusal = RefCell::new(None);
        let check = |path: &VerifiedPath<'_>| match self.check_path(path, &identity) {
            Ok(()) => Ok(()),
            Err(error) => {
                *refusal.borrow_mut() = Some(error);
                Err(webpki::Error::UnknownIssuer)
            }
        };
        match certificate.verify_for_usage(
            algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            Some(&check),
        ) {
            Ok(_) => Ok(identity),
            Err(error) => Err(match refusal.into_inner() {
                Some(refused) => VerifyError::Identity(refused),
                None => VerifyError::Chain(error),
            }),
        }
    }

    fn check_path(
        &self,
        path: &VerifiedPath<'_>,
        identity: &PeerIdentity,
    ) -> Result<(), IdentityError> {
        let certified = self
            .cluster_of(path.anchor())
            .ok_or(IdentityError::UnknownAnchor)?;
        if *certified != identity.cluster_id {
            return Err(IdentityError::ForeignCluster {
                claimed: identity.cluster_id.to_string(),
                certified: certified.to_string(),
            });
        }
        for intermediate in path.intermediate_certificates() {
            let der = intermediate.der();
            let parsed = X509Certificate::from_der(&der).ok();
            let Some((_, certificate)) = parsed.as_ref() else {
                return Err(IdentityError::NotAnIssuer(
                    "an intermediate does not parse".into(),
                ));
            };
            check_issuer(certificate)?;
            if let Some(declared) = trust_domain_of(certificate) {
                if declared != certified.as_str() {
                    return Err(IdentityError::ForeignIntermediate {
                        declared,
                        certified: certified.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What an intermediate must be to sign: a certificate for signing certificates
/// (keyUsage with keyCertSign), and no workload (a SPIFFE ID with a path names a workload,
/// which X509-SVID forbids to sign).
fn check_issuer(certificate: &X509Certificate<'_>) -> Result<(), IdentityError> {
    let subject = certificate.subject().to_string();
    let signs = certificate
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|usage| usage.value.key_cert_sign());
    if !signs {
        return Err(IdentityError::NotAnIssuer(format!(
            "intermediate {subject} has no keyUsage keyCertSign"
        )));
    }
    let workload = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(|name| {
                matches!(name, x509_parser::extensions::GeneralName::URI(uri)
                    if uri.strip_prefix("spiffe://").is_some_and(|rest| rest.contains('/')))
            })
        });
    if workload {
        return Err(IdentityError::NotAnIssuer(format!(
            "intermediate {subject} carries a workload's SPIFFE ID"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_assign_clusters() {
        let own = Name::new("east").unwrap();
        let cases = [
            ("/certs/ca.crt", Some("east")),
            ("/certs/ca-west.crt", Some("west")),
            ("ca-west-2.crt", Some("west-2")),
            ("/certs/ca-next.crt", Some("next")),
            ("/certs/ca2.crt", None),
            ("/certs/ca-.crt", None),
            ("/certs/ca-a b.crt", None),
            ("/certs/ca.pem", None),
        ];
        for (path, expected) in cases {
            assert_eq!(
                assigned_cluster(Path::new(path), &own),
                expected.map(|cluster| Name::new(cluster).unwrap()),
                "{path}"
            );
        }
    }
}
