//! Mutual TLS over real QUIC on loopback: who is let in, who is refused, and what identity
//! each side reads back.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::AlertDescription;
use tempfile::TempDir;
use time::OffsetDateTime;
use xmirror_proto::{ErrorCode, Name, PeerIdentity, Role};
use xmirror_tls::pki::{load_ca_for, CertificateAuthority, IssueOptions, PkiError, Validity};
use xmirror_tls::{
    peer_identity, ExpectedServer, IdentityError, NodeTls, ALPN_CLIENT, ALPN_MIRROR,
};

fn name(value: &str) -> Name {
    Name::new(value).unwrap()
}

fn identity(cluster: &str, role: Role, node: &str) -> PeerIdentity {
    PeerIdentity {
        cluster_id: name(cluster),
        role,
        name: name(node),
    }
}

/// A certs directory with a CA for `cluster`.
fn pki(cluster: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    CertificateAuthority::generate(&name(cluster), Validity::days_from_now(30).unwrap())
        .unwrap()
        .write(dir.path(), false)
        .unwrap();
    dir
}

fn issue_with(dir: &Path, who: &PeerIdentity, validity: Validity) {
    let ca = load_ca_for(dir, &who.cluster_id).unwrap();
    let options = IssueOptions {
        validity,
        extra_dns_names: vec![],
    };
    ca.issue(who, &options)
        .unwrap()
        .write(dir, &who.name, true)
        .unwrap();
}

fn issue(dir: &Path, who: &PeerIdentity) {
    issue_with(dir, who, Validity::days_from_now(1).unwrap());
}

/// Why a handshake was refused: the TLS alert the refusing side sent, or (on the server)
/// a certificate that verified but carries no usable identity.
#[derive(Debug)]
enum Refused {
    Tls(quinn::ConnectionError),
    Identity(IdentityError),
}

impl Refused {
    fn alert(&self) -> Option<AlertDescription> {
        match self {
            Refused::Tls(error) => alert_of(error),
            Refused::Identity(_) => None,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Tls(error) => write!(f, "{error}"),
            Refused::Identity(error) => write!(f, "{error}"),
        }
    }
}

/// The TLS alert behind a failed QUIC handshake (QUIC carries alert n as the crypto error
/// 0x100 + n), as rustls types it.
fn alert_of(error: &quinn::ConnectionError) -> Option<AlertDescription> {
    let code = match error {
        quinn::ConnectionError::TransportError(transport) => u64::from(transport.code),
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        _ => return None,
    };
    let alert = code.checked_sub(0x100).filter(|alert| *alert < 0x100)?;
    Some(AlertDescription::from(alert as u8))
}

/// A server on 127.0.0.1 that reports the outcome of the first handshake.
struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

impl Server {
    fn start(tls: &NodeTls) -> Server {
        let config = tls.server_config(&[ALPN_MIRROR, ALPN_CLIENT]).unwrap();
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        Server { endpoint, addr }
    }

    /// The first incoming handshake's outcome: the peer's identity and ALPN, or the error.
    async fn accept(&self) -> Result<(PeerIdentity, Vec<u8>, quinn::Connection), Refused> {
        let incoming = self.endpoint.accept().await.expect("endpoint open");
        let connection = incoming.await.map_err(Refused::Tls)?;
        let alpn = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .unwrap_or_default();
        let who = peer_identity(&connection).map_err(Refused::Identity)?;
        Ok((who, alpn, connection))
    }
}

/// Dials `addr` with `config`; Ok once both sides would consider the handshake done.
async fn dial(
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(addr, "src.source.east.xmirror")
        .expect("a loopback address can be dialled");
    connecting.await
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("handshake finished in time")
}

#[tokio::test]
async fn every_role_is_accepted_and_read_back() {
    let certs = pki("east");
    let source = identity("east", Role::Source, "src");
    issue(certs.path(), &source);
    let server_tls = NodeTls::load(certs.path(), "src").unwrap();
    assert_eq!(server_tls.identity(), &source);
    let server = Server::start(&server_tls);

    for role in Role::ALL {
        let client = identity("east", role, &format!("{role}-1"));
        issue(certs.path(), &client);
        let tls = NodeTls::load(certs.path(), client.name.as_str()).unwrap();
        let alpn = if role == Role::Observer {
            ALPN_MIRROR
        } else {
            ALPN_CLIENT
        };
        let config = tls
            .client_config(alpn, ExpectedServer::source_of(name("east")))
            .unwrap();
        let (accepted, dialled) =
            within(async { tokio::join!(server.accept(), dial(config, server.addr)) }).await;
        let (seen, seen_alpn, _connection) = accepted.unwrap();
        let connection = dialled.unwrap();
        assert_eq!(
            seen, client,
            "the server reads the client's certificate identity"
        );
        assert_eq!(seen_alpn, alpn);
        assert_eq!(peer_identity(&connection).unwrap(), source);
    }
}

/// Runs a handshake of `client` against a fresh source of cluster east; returns the
/// server's and the client's outcome.
async fn handshake(
    server_certs: &Path,
    client: quinn::ClientConfig,
) -> (
    Result<PeerIdentity, Refused>,
    Result<(), quinn::ConnectionError>,
) {
    let server_tls = NodeTls::load(server_certs, "src").unwrap();
    let server = Server::start(&server_tls);
    let (accepted, dialled) =
        within(async { tokio::join!(server.accept(), dial(client, server.addr)) }).await;
    let client_outcome = match dialled {
        // TLS 1.3 clients finish before the server has judged their certificate: a refusal
        // then arrives as the connection closing.
        Ok(connection) => match within(async {
            tokio::time::timeout(Duration::from_millis(500), connection.closed()).await
        })
        .await
        {
            Ok(reason) => Err(reason),
            Err(_still_open) => Ok(()),
        },
        Err(error) => Err(error),
    };
    (accepted.map(|(who, _, _)| who), client_outcome)
}

fn source_pki() -> TempDir {
    let certs = pki("east");
    issue(certs.path(), &identity("east", Role::Source, "src"));
    certs
}

fn client_config(certs: &Path, node: &str) -> quinn::ClientConfig {
    NodeTls::load(certs, node)
        .unwrap()
        .client_config(ALPN_MIRROR, ExpectedServer::source_of(name("east")))
        .unwrap()
}

/// A certificate signed by the CA in `ca_dir` with a DNS SAN and, optionally, a URI SAN,
/// made with rcgen directly to bypass the checks of `CertificateAuthority::issue`.
fn sign_raw(ca_dir: &Path, dns: &str, uri: Option<&str>) -> (rcgen::Certificate, KeyPair) {
    let ca_cert = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec![dns.to_string()]).unwrap();
    if let Some(uri) = uri {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert, key)
}

/// A stock rustls client (DNS-name verification) trusting `ca_dir`'s CA, presenting
/// `identity` if given.
fn stock_client(
    ca_dir: &Path,
    identity: Option<(&rcgen::Certificate, &KeyPair)>,
) -> quinn::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_dir.join("ca.crt")).unwrap();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut tls = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN_MIRROR.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let certs = source_pki();
    // Same cluster name, different CA: the name proves nothing without the signature.
    let rogue = pki("east");
    issue(rogue.path(), &identity("east", Role::Observer, "m1"));
    // The rogue trusts the real CA, so only the server's check can refuse it.
    std::fs::copy(
        certs.path().join("ca.crt"),
        rogue.path().join("ca-real.crt"),
    )
    .unwrap();
    let (server, client) = handshake(certs.path(), client_config(rogue.path(), "m1")).await;
    let error = server.unwrap_err();
    assert!(
        matches!(
            error.alert(),
            Some(AlertDescription::UnknownCA | AlertDescription::DecryptError)
        ),
        "{error}"
    );
    assert!(client.is_err());
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let certs = source_pki();
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    issue_with(
        certs.path(),
        &identity("east", Role::Observer, "old"),
        expired,
    );
    let (server, client) = handshake(certs.path(), client_config(certs.path(), "old")).await;
    let error = server.unwrap_err();
    assert_eq!(
        error.alert(),
        Some(AlertDescription::CertificateExpired),
        "{error}"
    );
    assert!(client.is_err());
}

#[tokio::test]
async fn a_not_yet_valid_certificate_is_refused() {
    let certs = source_pki();
    let now = OffsetDateTime::now_utc();
    let future = Validity {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(10),
    };
    issue_with(
        certs.path(),
        &identity("east", Role::Observer, "early"),
        future,
    );
    let (server, _) = handshake(certs.path(), client_config(certs.path(), "early")).await;
    let error = server.unwrap_err();
    // TLS has one alert for both ends of the validity period.
    assert_eq!(
        error.alert(),
        Some(AlertDescription::CertificateExpired),
        "{error}"
    );
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let certs = source_pki();
    let config = stock_client(certs.path(), None);
    let (server, client) = handshake(certs.path(), config).await;
    let error = server.unwrap_err();
    assert_eq!(
        error.alert(),
        Some(AlertDescription::CertificateRequired),
        "{error}"
    );
    assert!(client.is_err());
}

#[tokio::test]
async fn a_certificate_without_a_spiffe_id_is_refused() {
    let certs = source_pki();
    // Signed by the right CA, but identified only by a DNS name.
    let (cert, key) = sign_raw(certs.path(), "anon.example", None);
    std::fs::write(certs.path().join("anon.crt"), cert.pem()).unwrap();
    std::fs::write(certs.path().join("anon.key"), key.serialize_pem()).unwrap();

    // Our own loader refuses to use it...
    let error = NodeTls::load(certs.path(), "anon").unwrap_err();
    assert!(error.to_string().contains("anon.crt"), "{error}");
    // ...and a peer presenting it is refused by the server.
    let dir = certs.path();
    let config = stock_client(dir, Some((&cert, &key)));
    // The stock client verifies DNS names; dial the source by its DNS SAN.
    let server_tls = NodeTls::load(dir, "src").unwrap();
    let server = Server::start(&server_tls);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(server.addr, "src.source.east.xmirror")
        .unwrap();
    let (accepted, _) = within(async { tokio::join!(server.accept(), connecting) }).await;
    let error = accepted.unwrap_err();
    // Refused by our own verifier, whose reason travels as text inside the alert.
    assert_eq!(
        error.alert(),
        Some(AlertDescription::CertificateUnknown),
        "{error}"
    );
    assert!(error.to_string().contains("SPIFFE"), "{error}");
}

#[tokio::test]
async fn a_ca_cannot_vouch_for_another_cluster() {
    let certs = source_pki();
    // Cluster west's CA is trusted (cross-cluster mirroring), but it signs a certificate
    // that claims to be an observer of cluster east.
    let west = pki("west");
    std::fs::copy(west.path().join("ca.crt"), certs.path().join("ca-west.crt")).unwrap();
    let (cert, key) = sign_raw(
        west.path(),
        "impostor.xmirror",
        Some("spiffe://east/observer/impostor"),
    );
    std::fs::write(west.path().join("impostor.crt"), cert.pem()).unwrap();
    std::fs::write(west.path().join("impostor.key"), key.serialize_pem()).unwrap();
    std::fs::copy(certs.path().join("ca.crt"), west.path().join("ca-east.crt")).unwrap();
    let (server, client) = handshake(certs.path(), client_config(west.path(), "impostor")).await;
    let error = server.unwrap_err();
    assert_eq!(
        error.alert(),
        Some(AlertDescription::CertificateUnknown),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("names cluster east, but its CA certifies cluster west"),
        "{error}"
    );
    assert!(client.is_err());
}

#[tokio::test]
async fn the_client_refuses_a_server_of_the_wrong_cluster_or_role() {
    let certs = pki("east");
    issue(certs.path(), &identity("east", Role::Observer, "m1"));
    // A server certified as an observer, not a source.
    issue(certs.path(), &identity("east", Role::Observer, "src"));
    let (_, client) = handshake(certs.path(), client_config(certs.path(), "m1")).await;
    let error = client.unwrap_err();
    assert_eq!(
        alert_of(&error),
        Some(AlertDescription::CertificateUnknown),
        "{error}"
    );
    assert!(
        error.to_string().contains(
            "ROLE_MISMATCH: the server is spiffe://east/observer/src, a mirror, not a source"
        ),
        "{error}"
    );

    // A real source, but the mirror expects cluster west.
    let certs = source_pki();
    issue(certs.path(), &identity("east", Role::Observer, "m1"));
    let expected = ExpectedServer::source_of(name("west"));
    let config = NodeTls::load(certs.path(), "m1")
        .unwrap()
        .client_config(ALPN_MIRROR, expected.clone())
        .unwrap();
    let (_, client) = handshake(certs.path(), config).await;
    let error = client.unwrap_err().to_string();
    assert!(error.contains("CLUSTER_ID_MISMATCH"), "{error}");
    assert!(error.contains("spiffe://east/source/src"), "{error}");
    // The client can tell in its own words what it refused, once.
    let refusal = expected.take_refusal().expect("the refusal is kept");
    assert_eq!(refusal.code(), ErrorCode::ClusterIdMismatch);
    assert_eq!(refusal.found.cluster_id, name("east"));
    assert!(expected.take_refusal().is_none());
}

#[tokio::test]
async fn a_second_ca_in_the_bundle_is_trusted_for_rotation() {
    let certs = source_pki();
    let other = pki("west");
    issue(other.path(), &identity("west", Role::Observer, "m1"));
    // The source trusts both clusters' CAs (ca.crt and ca-west.crt).
    std::fs::copy(
        other.path().join("ca.crt"),
        certs.path().join("ca-west.crt"),
    )
    .unwrap();
    std::fs::copy(
        certs.path().join("ca.crt"),
        other.path().join("ca-east.crt"),
    )
    .unwrap();
    let (server, client) = handshake(certs.path(), client_config(other.path(), "m1")).await;
    assert_eq!(server.unwrap(), identity("west", Role::Observer, "m1"));
    assert!(client.is_ok());
}

#[test]
fn keys_are_private_and_the_ca_is_not_overwritten() {
    let certs = pki("east");
    issue(certs.path(), &identity("east", Role::Client, "ops"));
    for file in ["ca.key", "ops.key"] {
        let mode = std::fs::metadata(certs.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let again =
        CertificateAuthority::generate(&name("east"), Validity::days_from_now(1).unwrap()).unwrap();
    assert!(matches!(
        again.write(certs.path(), false),
        Err(PkiError::CaExists(_))
    ));
    assert!(matches!(
        load_ca_for(certs.path(), &name("west")),
        Err(PkiError::ClusterMismatch { .. })
    ));
    assert!(matches!(
        Validity::days_from_now(0),
        Err(PkiError::EmptyValidity)
    ));
}

#[test]
fn openssl_verifies_what_certs_issue_writes() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        println!("skipped: openssl is not installed");
        return;
    }
    let certs = pki("east");
    for role in Role::ALL {
        let node = format!("n-{role}");
        issue(certs.path(), &identity("east", role, &node));
        let output = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(certs.path().join("ca.crt"))
            .arg(certs.path().join(format!("{node}.crt")))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl verify {role}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(certs.path().join(format!("{node}.crt")))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(&format!("URI:spiffe://east/{role}/{node}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("DNS:{node}.{role}.east.xmirror")),
            "{text}"
        );
        assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
        assert_eq!(
            text.contains("TLS Web Server Authentication"),
            role != Role::Client,
            "{text}"
        );
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }
}
