//! The trust-domain rule as a table: which chains a bundle accepts, for which identity, and
//! why it refuses the rest (forgeries through a foreign CA, an intermediate, or a CA that
//! declares no trust domain).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::ring::default_provider;
use rustls::pki_types::{CertificateDer, UnixTime};
use webpki::KeyUsage;
use xmirror_proto::Name;
use xmirror_tls::{IdentityError, TrustBundle, TrustError, VerifyError};

type Ca = CertifiedIssuer<'static, KeyPair>;

/// A CA named `common_name` that declares `domain` (none: declares no trust domain),
/// self-signed or signed by `parent`.
fn ca(common_name: &str, domain: Option<&str>, parent: Option<&Ca>) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    if let Some(domain) = domain {
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{domain}").try_into().unwrap(),
        )];
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    match parent {
        Some(parent) => CertifiedIssuer::signed_by(params, key, parent).unwrap(),
        None => CertifiedIssuer::self_signed(params, key).unwrap(),
    }
}

fn leaf(spiffe_id: &str, issuer: &Ca) -> CertificateDer<'static> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    params.signed_by(&key, issuer).unwrap().der().clone()
}

/// What a verification came to, for the table.
#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted(String),
    ForeignCluster,
    ForeignIntermediate,
    UnknownIssuer,
}

fn outcome(result: Result<xmirror_proto::PeerIdentity, VerifyError>) -> Outcome {
    match result {
        Ok(identity) => Outcome::Accepted(identity.spiffe_uri()),
        Err(VerifyError::Identity(IdentityError::ForeignCluster { .. })) => Outcome::ForeignCluster,
        Err(VerifyError::Identity(IdentityError::ForeignIntermediate { .. })) => {
            Outcome::ForeignIntermediate
        }
        Err(VerifyError::Chain(webpki::Error::UnknownIssuer)) => Outcome::UnknownIssuer,
        Err(other) => panic!("unexpected refusal: {other:?}"),
    }
}

#[test]
fn a_certificate_is_accepted_only_for_its_anchors_cluster() {
    let east_root = ca("east root", Some("east"), None);
    let west_root = ca("west root", Some("west"), None);
    let plain_root = ca("plain root", None, None);
    let west_plain_intermediate = ca("west issuing", None, Some(&west_root));
    let west_intermediate_claiming_east =
        ca("west issuing as east", Some("east"), Some(&west_root));
    let plain_intermediate = ca("plain issuing", None, Some(&plain_root));
    let untrusted_root = ca("mallory", Some("east"), None);

    let own = Name::new("east").unwrap();
    let mut bundle = TrustBundle::default();
    bundle
        .add(Path::new("ca.crt"), east_root.der(), &own)
        .unwrap();
    // A trusted foreign cluster, as cross-cluster mirroring needs.
    bundle
        .add(Path::new("ca-west.crt"), west_root.der(), &own)
        .unwrap();
    // A CA declaring nothing, assigned to cluster "north" by its file name.
    bundle
        .add(Path::new("ca-north.crt"), plain_root.der(), &own)
        .unwrap();

    let none: Vec<CertificateDer<'static>> = Vec::new();
    let cases: Vec<(
        &str,
        CertificateDer<'static>,
        Vec<CertificateDer<'static>>,
        Outcome,
    )> =
        vec![
        (
            "own cluster, direct",
            leaf("spiffe://east/client/app", &east_root),
            none.clone(),
            Outcome::Accepted("spiffe://east/client/app".into()),
        ),
        (
            "foreign trusted cluster, its own identity",
            leaf("spiffe://west/observer/wm1", &west_root),
            none.clone(),
            Outcome::Accepted("spiffe://west/observer/wm1".into()),
        ),
        (
            "west's CA minting an east client",
            leaf("spiffe://east/client/forged", &west_root),
            none.clone(),
            Outcome::ForeignCluster,
        ),
        (
            "west's CA minting an east identity through an intermediate declaring nothing",
            leaf("spiffe://east/client/forged2", &west_plain_intermediate),
            vec![west_plain_intermediate.der().clone()],
            Outcome::ForeignCluster,
        ),
        (
            "west's CA minting an east source through an intermediate declaring east",
            leaf("spiffe://east/source/forged3", &west_intermediate_claiming_east),
            vec![west_intermediate_claiming_east.der().clone()],
            Outcome::ForeignCluster,
        ),
        (
            "an intermediate declaring another domain than its root, even for the root's cluster",
            leaf("spiffe://west/observer/wm2", &west_intermediate_claiming_east),
            vec![west_intermediate_claiming_east.der().clone()],
            Outcome::ForeignIntermediate,
        ),
        (
            "west through its own intermediate",
            leaf("spiffe://west/observer/wm3", &west_plain_intermediate),
            vec![west_plain_intermediate.der().clone()],
            Outcome::Accepted("spiffe://west/observer/wm3".into()),
        ),
        (
            "a CA declaring nothing vouches for its assigned cluster",
            leaf("spiffe://north/observer/n1", &plain_intermediate),
            vec![plain_intermediate.der().clone()],
            Outcome::Accepted("spiffe://north/observer/n1".into()),
        ),
        (
            "a CA declaring nothing never vouches for any other cluster",
            leaf("spiffe://mars/client/any", &plain_root),
            none.clone(),
            Outcome::ForeignCluster,
        ),
        (
            "nor for the node's own",
            leaf("spiffe://east/client/any", &plain_intermediate),
            vec![plain_intermediate.der().clone()],
            Outcome::ForeignCluster,
        ),
        (
            "an untrusted root with the same trust domain",
            leaf("spiffe://east/client/mallory", &untrusted_root),
            none.clone(),
            Outcome::UnknownIssuer,
        ),
    ];
    let algorithms = default_provider().signature_verification_algorithms;
    for (case, end_entity, intermediates, expected) in cases {
        for usage in [KeyUsage::client_auth(), KeyUsage::server_auth()] {
            let result = bundle.verify(
                &end_entity,
                &intermediates,
                UnixTime::now(),
                usage,
                &algorithms,
            );
            assert_eq!(outcome(result), expected, "{case}");
        }
    }
}

#[test]
fn a_ca_declaring_nothing_must_be_assigned_a_cluster() {
    let plain_root = ca("plain root", None, None);
    let declared = ca("west root", Some("west"), None);
    let own = Name::new("east").unwrap();
    let mut bundle = TrustBundle::default();
    assert!(matches!(
        bundle.add(Path::new("/certs/ca2.crt"), plain_root.der(), &own),
        Err(TrustError::Unassigned { .. })
    ));
    // A CA that declares its domain needs no assignment: rotation files keep working.
    bundle
        .add(Path::new("/certs/ca-next.crt"), declared.der(), &own)
        .unwrap();
    // In ca.crt, a CA declaring nothing is the node's own cluster's.
    bundle
        .add(Path::new("/certs/ca.crt"), plain_root.der(), &own)
        .unwrap();
    let algorithms = default_provider().signature_verification_algorithms;
    let own_client = leaf("spiffe://east/client/app", &plain_root);
    let identity = bundle
        .verify(
            &own_client,
            &[],
            UnixTime::now(),
            KeyUsage::client_auth(),
            &algorithms,
        )
        .unwrap();
    assert_eq!(identity.spiffe_uri(), "spiffe://east/client/app");
    let west_observer = leaf("spiffe://west/observer/w", &declared);
    assert!(bundle
        .verify(
            &west_observer,
            &[],
            UnixTime::now(),
            KeyUsage::client_auth(),
            &algorithms
        )
        .is_ok());
}
