//! Reading who a peer is from its certificate's SPIFFE ID.

use rustls::pki_types::CertificateDer;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use xmirror_proto::{Name, PeerIdentity, Role};

/// Why a certificate does not carry a usable identity.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    /// The connection has no verified peer certificate (not yet handshaken, or none sent).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("the peer certificate does not parse")]
    Unparseable(#[source] X509Error),
    /// The certificate has no `spiffe://` URI SAN.
    #[error("the certificate has no SPIFFE ID (a URI SAN spiffe://<cluster>/<role>/<name>)")]
    NoSpiffeId,
    /// The certificate has more than one SPIFFE ID; which one counts would be ambiguous.
    #[error("the certificate has {0} SPIFFE IDs; exactly one is allowed")]
    SeveralSpiffeIds(usize),
    /// The certificate names a cluster other than the one its chain's root CA certifies.
    #[error("the certificate names cluster {claimed}, but its CA certifies cluster {certified}")]
    ForeignCluster {
        /// The cluster in the certificate's SPIFFE ID.
        claimed: String,
        /// The trust domain of the CA that issued it.
        certified: String,
    },
    /// An intermediate on the path declares another trust domain than its anchor's.
    #[error("an intermediate CA declares trust domain {declared}, but its root certifies cluster {certified}")]
    ForeignIntermediate {
        /// The trust domain the intermediate declares.
        declared: String,
        /// The cluster of the anchor the chain ends in.
        certified: String,
    },
    /// An intermediate on the path may not sign certificates: no keyCertSign, or a
    /// workload's SPIFFE ID.
    #[error("the chain's issuer may not sign: {0}")]
    NotAnIssuer(String),
    /// The chain ends in an anchor the trust bundle does not know (a bug: webpki only
    /// builds paths to the bundle's anchors).
    #[error("the chain ends in an unknown trust anchor")]
    UnknownAnchor,
    /// The SPIFFE ID is not `spiffe://<cluster>/<role>/<name>` with valid parts.
    #[error("SPIFFE ID {uri:?} is not spiffe://<cluster>/<role>/<name>: {reason}")]
    BadSpiffeId {
        /// The URI found.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses `spiffe://<cluster>/<role>/<name>`.
pub fn parse_spiffe_id(uri: &str) -> Result<PeerIdentity, IdentityError> {
    let bad = |reason: String| IdentityError::BadSpiffeId {
        uri: uri.to_owned(),
        reason,
    };
    let path = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("not a spiffe:// URI".into()))?;
    let parts: Vec<&str> = path.split('/').collect();
    let [cluster, role, name] = parts.as_slice() else {
        return Err(bad(format!("expected 3 path parts, found {}", parts.len())));
    };
    Ok(PeerIdentity {
        cluster_id: Name::new(*cluster).map_err(|error| bad(format!("cluster: {error}")))?,
        role: role
            .parse::<Role>()
            .map_err(|error| bad(error.to_string()))?,
        name: Name::new(*name).map_err(|error| bad(format!("name: {error}")))?,
    })
}

/// A DER parse failure as the error it is (an incomplete input is an invalid one here:
/// the whole certificate is always given).
fn unparseable(error: x509_parser::nom::Err<X509Error>) -> IdentityError {
    IdentityError::Unparseable(match error {
        x509_parser::nom::Err::Error(error) | x509_parser::nom::Err::Failure(error) => error,
        x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
    })
}

/// The identity in a DER certificate.
pub fn identity_from_certificate(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, certificate) = X509Certificate::from_der(der).map_err(unparseable)?;
    let san = certificate
        .subject_alternative_name()
        .map_err(IdentityError::Unparseable)?;
    let spiffe_ids: Vec<&str> = san
        .iter()
        .flat_map(|extension| extension.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    match spiffe_ids.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => parse_spiffe_id(uri),
        several => Err(IdentityError::SeveralSpiffeIds(several.len())),
    }
}

/// The trust domain a CA certificate declares with a `spiffe://<cluster>` URI SAN (no path).
pub fn trust_domain_of(certificate: &X509Certificate<'_>) -> Option<String> {
    let san = certificate.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .filter(|domain| !domain.is_empty() && !domain.contains('/'))
            .map(str::to_owned),
        _ => None,
    })
}

/// The verified identity of the peer of an established QUIC connection.
pub fn peer_identity(connection: &quinn::Connection) -> Result<PeerIdentity, IdentityError> {
    let certificates = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let end_entity = certificates.first().ok_or(IdentityError::NoCertificate)?;
    identity_from_certificate(end_entity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_well_formed_spiffe_ids() {
        let identity = parse_spiffe_id("spiffe://east-1/observer/m1").unwrap();
        assert_eq!(identity.cluster_id.as_str(), "east-1");
        assert_eq!(identity.role, Role::Observer);
        assert_eq!(identity.name.as_str(), "m1");
        assert_eq!(identity.spiffe_uri(), "spiffe://east-1/observer/m1");
    }

    #[test]
    fn refuses_malformed_spiffe_ids() {
        for uri in [
            "https://east/observer/m1",
            "spiffe://east/observer",
            "spiffe://east/observer/m1/extra",
            "spiffe://east/admin/m1",
            "spiffe:///observer/m1",
            "spiffe://east/observer/../x",
            "spiffe://ea st/observer/m1",
        ] {
            assert!(
                matches!(parse_spiffe_id(uri), Err(IdentityError::BadSpiffeId { .. })),
                "{uri}"
            );
        }
    }
}
