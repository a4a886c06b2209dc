//! What a certificate says, for operators: `xmirror certs show` and the expiry metrics.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{identity_from_certificate, trust_domain_of};
use crate::pki::PkiError;

/// One certificate, summarised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The node's SPIFFE ID, if it carries one.
    pub spiffe_id: Option<String>,
    /// The trust domain a CA declares (`spiffe://<cluster>`), if any.
    pub trust_domain: Option<String>,
    /// Whether it is a CA.
    pub is_ca: bool,
    /// First valid instant, Unix seconds.
    pub not_before: i64,
    /// Last valid instant, Unix seconds.
    pub not_after: i64,
    /// SHA-256 of the DER, in hex.
    pub sha256: String,
}

impl CertificateSummary {
    /// Summarises a DER certificate.
    pub fn of(
        der: &[u8],
    ) -> Result<CertificateSummary, x509_parser::nom::Err<x509_parser::error::X509Error>> {
        let (_, certificate) = X509Certificate::from_der(der)?;
        let uris = certificate
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(uri.to_string()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let spiffe_id = identity_from_certificate(der)
            .ok()
            .map(|identity| identity.spiffe_uri())
            .or_else(|| {
                uris.iter()
                    .find(|uri| uri.starts_with("spiffe://"))
                    .cloned()
            });
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Ok(CertificateSummary {
            subject: certificate.subject().to_string(),
            issuer: certificate.issuer().to_string(),
            trust_domain: trust_domain_of(&certificate),
            spiffe_id: spiffe_id.filter(|_| !certificate.is_ca()),
            is_ca: certificate.is_ca(),
            not_before: certificate.validity().not_before.timestamp(),
            not_after: certificate.validity().not_after.timestamp(),
            sha256: digest
                .as_ref()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        })
    }

    /// Every certificate in the PEM file at `path`.
    pub fn read_pem_file(path: &Path) -> Result<Vec<CertificateSummary>, PkiError> {
        let pem = std::fs::read(path).map_err(|source| PkiError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bad = |reason: String| PkiError::BadPem {
            path: path.to_owned(),
            reason,
        };
        let mut summaries = Vec::new();
        for certificate in CertificateDer::pem_slice_iter(&pem) {
            let certificate = certificate.map_err(|error| bad(error.to_string()))?;
            summaries.push(
                CertificateSummary::of(&certificate)
                    .map_err(|error| bad(format!("not an X.509 certificate: {error}")))?,
            );
        }
        if summaries.is_empty() {
            return Err(bad("no certificate in the file".into()));
        }
        Ok(summaries)
    }

    /// Seconds from `now` (Unix seconds) until it expires; negative once expired.
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

/// A Unix time in RFC 3339 (`2027-11-22T08:00:00Z`).
pub fn rfc3339(unix_seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix_seconds} (Unix seconds)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, IssueOptions, Validity};
    use xmirror_proto::{Name, PeerIdentity, Role};

    #[test]
    fn summaries_say_who_what_and_until_when() {
        let cluster = Name::new("east").unwrap();
        let ca =
            CertificateAuthority::generate(&cluster, Validity::days_from_now(30).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write(dir.path(), false).unwrap();
        let who = PeerIdentity {
            cluster_id: cluster,
            role: Role::Observer,
            name: Name::new("m1").unwrap(),
        };
        let validity = Validity::days_from_now(10).unwrap();
        ca.issue(
            &who,
            &IssueOptions {
                validity,
                extra_dns_names: vec![],
            },
        )
        .unwrap()
        .write(dir.path(), &who.name, false)
        .unwrap();
        let node = &CertificateSummary::read_pem_file(&dir.path().join("m1.crt")).unwrap()[0];
        assert_eq!(node.spiffe_id.as_deref(), Some("spiffe://east/observer/m1"));
        assert!(!node.is_ca);
        assert_eq!(node.not_after, validity.not_after.unix_timestamp());
        assert_eq!(node.sha256.len(), 32 * 3 - 1);
        let root = &CertificateSummary::read_pem_file(&dir.path().join("ca.crt")).unwrap()[0];
        assert!(root.is_ca);
        assert_eq!(root.trust_domain.as_deref(), Some("east"));
        assert_eq!(root.spiffe_id, None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
