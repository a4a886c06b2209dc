//! The authorization matrix end to end: every identity (the node's own cluster and foreign
//! trusted clusters, each role; certificates from `xmirror certs` and from openssl, RSA and
//! P-384, with and without EKU, through intermediates, from a CA that declares no trust
//! domain and is assigned one by its file name) times every operation, on a real source and
//! a real mirror; and the forgery chains, refused at the TLS handshake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use xmirror_client::{Client, Error as ClientError, Identity};
use xmirror_e2e::{World, CLUSTER};
use xmirror_net::{client_endpoint, FramedReader, TransportLimits};
use xmirror_proto::codec::encode_frame;
use xmirror_proto::message::{Hello, HelloAck};
use xmirror_proto::PROTOCOL_VERSION;
use xmirror_proto::{ChainHash, ErrorCode, Lsn, Message, Name, Role, SUPPORTED_VERSIONS};
use xmirror_tls::pki::issue_cluster;
use xmirror_tls::{ExpectedServer, NodeTls, ALPN_MIRROR};

fn name(value: &str) -> Name {
    Name::new(value).unwrap()
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (the CI installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[derive(Clone, Copy)]
enum Key {
    Rsa2048,
    P384,
}

fn new_key(dir: &Path, file: &str, key: Key) {
    let algorithm: &[&str] = match key {
        Key::Rsa2048 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        Key::P384 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    };
    let mut args = vec!["genpkey"];
    args.extend_from_slice(algorithm);
    args.extend_from_slice(&["-out", file]);
    openssl(dir, &args);
}

/// Signs `{stem}.crt` for the key `{stem}.key` with `extensions`, by `issuer` (a stem whose
/// .crt/.key exist) or self-signed.
fn sign(dir: &Path, stem: &str, issuer: Option<&str>, extensions: &str) {
    let (csr, crt, ext) = (
        format!("{stem}.csr"),
        format!("{stem}.crt"),
        format!("{stem}.ext"),
    );
    std::fs::write(dir.join(&ext), extensions).unwrap();
    let key = format!("{stem}.key");
    let subject = format!("/CN={stem}");
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr],
    );
    let mut args = vec![
        "x509", "-req", "-in", &csr, "-days", "2", "-out", &crt, "-extfile", &ext,
    ];
    let (issuer_crt, issuer_key);
    match issuer {
        Some(issuer) => {
            issuer_crt = format!("{issuer}.crt");
            issuer_key = format!("{issuer}.key");
            args.extend_from_slice(&["-CA", &issuer_crt, "-CAkey", &issuer_key, "-CAcreateserial"]);
        }
        None => args.extend_from_slice(&["-signkey", &key]),
    }
    openssl(dir, &args);
}

const CA_EXTENSIONS: &str =
    "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n";

fn leaf_extensions(spiffe_id: &str, eku: bool) -> String {
    let mut extensions = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nsubjectAltName=URI:{spiffe_id}\n"
    );
    if eku {
        extensions.push_str("extendedKeyUsage=clientAuth,serverAuth\n");
    }
    extensions
}

/// A certs directory for `who` that presents `leaf` (with `chain` after it), trusts its own
/// `root` as `ca.crt`, and the east servers' CA.
fn identity_dir(
    world: &World,
    who: &str,
    dir: &Path,
    leaf: &str,
    chain: &[&str],
    root: &str,
) -> PathBuf {
    let certs = world.path(&format!("certs-{who}"));
    std::fs::create_dir_all(&certs).unwrap();
    let mut pem = std::fs::read_to_string(dir.join(format!("{leaf}.crt"))).unwrap();
    for intermediate in chain {
        pem.push_str(&std::fs::read_to_string(dir.join(format!("{intermediate}.crt"))).unwrap());
    }
    std::fs::write(certs.join(format!("{who}.crt")), pem).unwrap();
    std::fs::copy(
        dir.join(format!("{leaf}.key")),
        certs.join(format!("{who}.key")),
    )
    .unwrap();
    std::fs::copy(dir.join(format!("{root}.crt")), certs.join("ca.crt")).unwrap();
    std::fs::copy(world.certs.join("ca.crt"), certs.join("ca-east.crt")).unwrap();
    certs
}

/// What an operation came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused(ErrorCode),
    /// The TLS handshake refused the certificate.
    Tls,
}

use Outcome::{Ok as Y, Refused as R, Tls};

const NA: ErrorCode = ErrorCode::NotAuthorized;
const RO: ErrorCode = ErrorCode::ReadOnly;
const OO: ErrorCode = ErrorCode::ObserverOnly;

/// The operations, in the table's column order.
const OPERATIONS: [&str; 6] = ["mirror hello", "put", "delete", "get", "status", "digest"];

async fn mirror_hello(tls: &NodeTls, addr: SocketAddr) -> Outcome {
    let expected = ExpectedServer::node_of(name(CLUSTER));
    let server_name = expected.server_name();
    let endpoint =
        client_endpoint(tls, ALPN_MIRROR, expected, &TransportLimits::default()).unwrap();
    let Ok(connection) = endpoint.connect(addr, &server_name).unwrap().await else {
        return Tls;
    };
    let identity = tls.identity();
    let hello = Message::Hello(Hello {
        versions: SUPPORTED_VERSIONS,
        source_cluster: name(CLUSTER),
        database: name("main"),
        mirror_name: identity.name.clone(),
        role: identity.role,
        database_id: None,
        epoch: xmirror_proto::Epoch::FIRST,
        epoch_id: xmirror_proto::EpochId::FIRST,
        applied_lsn: Lsn::ZERO,
        chain_hash: ChainHash::GENESIS,
        resume: None,
        on_divergence: xmirror_proto::DivergencePolicy::Halt,
        compression: Vec::new(),
    });
    let body = encode_frame(PROTOCOL_VERSION, &hello).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let outcome = async {
        let (mut send, recv) = connection.open_bi().await.ok()?;
        send.write_all(&frame).await.ok()?;
        let mut reader = FramedReader::new(recv, 16 << 20);
        match tokio::time::timeout(Duration::from_secs(20), reader.next()).await {
            Ok(Ok(Some(Message::HelloAck(HelloAck::Accepted(_))))) => Some(Y),
            Ok(Ok(Some(Message::HelloAck(HelloAck::Rejected(rejected))))) => Some(R(rejected.code)),
            _ => None,
        }
    }
    .await;
    let outcome = match outcome {
        Some(outcome) => outcome,
        None => {
            let reason = tokio::time::timeout(Duration::from_secs(10), connection.closed())
                .await
                .expect("the node answers or closes");
            match xmirror_net::refusal_of(&reason) {
                Some(refusal) => R(refusal.code),
                None if tls_refused(&reason) => Tls,
                None => panic!("{} closed without a code: {reason}", tls.identity()),
            }
        }
    };
    connection.close(0u32.into(), b"done");
    outcome
}

/// Whether the peer closed the connection with a TLS alert (QUIC's crypto error codes): a
/// client's certificate is verified after the client's side of the handshake is done.
fn tls_refused(reason: &quinn::ConnectionError) -> bool {
    matches!(reason, quinn::ConnectionError::ConnectionClosed(close)
        if (0x100..0x200).contains(&u64::from(close.error_code)))
}

fn client_outcome<T>(client: &Client, result: Result<T, ClientError>) -> Outcome {
    let refused_by_tls = || {
        client
            .close_reason()
            .is_some_and(|reason| tls_refused(&reason))
    };
    match result {
        Ok(_) => Y,
        Err(ClientError::Refused(refusal)) => R(refusal.code),
        Err(_) if refused_by_tls() => Tls,
        Err(other) => panic!("unexpected client error: {other:?}"),
    }
}

async fn operations(tls: &NodeTls, addr: SocketAddr) -> [Outcome; 6] {
    let hello = mirror_hello(tls, addr).await;
    let identity = Identity::from(tls.clone());
    let client = match Client::builder(identity)
        .node_cluster(name(CLUSTER))
        .connect_addr(addr)
        .await
    {
        Ok(client) => client,
        Err(_) => return [hello, Tls, Tls, Tls, Tls, Tls],
    };
    let key = format!("authz-{}", tls.identity().name);
    [
        hello,
        client_outcome(&client, client.put(key.as_bytes(), b"v").await),
        client_outcome(&client, client.delete(key.as_bytes()).await),
        client_outcome(&client, client.get(key.as_bytes()).await),
        client_outcome(&client, client.status().await),
        client_outcome(&client, client.digest().await),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_can_do_exactly_what_the_table_allows() {
    let world = World::new();
    let ossl = world.path("openssl");
    std::fs::create_dir_all(&ossl).unwrap();

    // Cluster west: its own xmirror CA; east trusts it as ca-west.crt.
    let west = world.path("certs-west");
    let west_nodes = [
        (Role::Client, name("wc")),
        (Role::Observer, name("wm")),
        (Role::Voter, name("wv")),
    ];
    issue_cluster(&west, &name("west"), &west_nodes, 1).unwrap();
    std::fs::copy(world.certs.join("ca.crt"), west.join("ca-east.crt")).unwrap();
    std::fs::copy(west.join("ca.crt"), world.certs.join("ca-west.crt")).unwrap();

    // Cluster north: an openssl RSA root that declares no trust domain, assigned to north
    // by east's operator (ca-north.crt), with a P-384 intermediate.
    new_key(&ossl, "north-root.key", Key::Rsa2048);
    sign(&ossl, "north-root", None, CA_EXTENSIONS);
    new_key(&ossl, "north-issuing.key", Key::P384);
    sign(&ossl, "north-issuing", Some("north-root"), CA_EXTENSIONS);
    std::fs::copy(
        ossl.join("north-root.crt"),
        world.certs.join("ca-north.crt"),
    )
    .unwrap();
    // A north observer through the intermediate, P-384, no EKU.
    new_key(&ossl, "n-observer.key", Key::P384);
    sign(
        &ossl,
        "n-observer",
        Some("north-issuing"),
        &leaf_extensions("spiffe://north/observer/nm", false),
    );
    let north_observer = identity_dir(
        &world,
        "nm",
        &ossl,
        "n-observer",
        &["north-issuing"],
        "north-root",
    );
    // A north client straight from the root, RSA-2048, with EKU.
    new_key(&ossl, "n-client.key", Key::Rsa2048);
    sign(
        &ossl,
        "n-client",
        Some("north-root"),
        &leaf_extensions("spiffe://north/client/nc", true),
    );
    let north_client = identity_dir(&world, "nc", &ossl, "n-client", &[], "north-root");

    // East's second CA, from openssl, declaring nothing: assigned to east as ca-east.crt.
    new_key(&ossl, "east-root.key", Key::P384);
    sign(&ossl, "east-root", None, CA_EXTENSIONS);
    new_key(&ossl, "east-issuing.key", Key::Rsa2048);
    sign(&ossl, "east-issuing", Some("east-root"), CA_EXTENSIONS);
    std::fs::copy(ossl.join("east-root.crt"), world.certs.join("ca-east.crt")).unwrap();
    new_key(&ossl, "e-client.key", Key::Rsa2048);
    sign(
        &ossl,
        "e-client",
        Some("east-issuing"),
        &leaf_extensions("spiffe://east/client/oc", true),
    );
    let east_openssl_client = identity_dir(
        &world,
        "oc",
        &ossl,
        "e-client",
        &["east-issuing"],
        "east-root",
    );

    // Forgeries. West's CA signs an intermediate that signs an east client.
    std::fs::copy(west.join("ca.crt"), ossl.join("west-root.crt")).unwrap();
    std::fs::copy(west.join("ca.key"), ossl.join("west-root.key")).unwrap();
    new_key(&ossl, "west-issuing.key", Key::P384);
    sign(&ossl, "west-issuing", Some("west-root"), CA_EXTENSIONS);
    new_key(&ossl, "forged2.key", Key::P384);
    sign(
        &ossl,
        "forged2",
        Some("west-issuing"),
        &leaf_extensions("spiffe://east/client/forged2", true),
    );
    let forged_east = identity_dir(
        &world,
        "forged2",
        &ossl,
        "forged2",
        &["west-issuing"],
        "west-root",
    );
    // The CA that declares nothing, vouching for a cluster nobody assigned it.
    new_key(&ossl, "any.key", Key::Rsa2048);
    sign(
        &ossl,
        "any",
        Some("north-root"),
        &leaf_extensions("spiffe://mars/client/any", true),
    );
    let forged_mars = identity_dir(&world, "any", &ossl, "any", &[], "north-root");
    // An intermediate under east's openssl root that may not sign certificates (CA:TRUE,
    // no keyCertSign), signing an east client.
    new_key(&ossl, "no-sign.key", Key::P384);
    sign(
        &ossl,
        "no-sign",
        Some("east-root"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature\n",
    );
    new_key(&ossl, "unsigned-client.key", Key::P384);
    sign(
        &ossl,
        "unsigned-client",
        Some("no-sign"),
        &leaf_extensions("spiffe://east/client/ns", true),
    );
    let by_non_signer = identity_dir(
        &world,
        "ns",
        &ossl,
        "unsigned-client",
        &["no-sign"],
        "east-root",
    );
    // A workload certificate that is also a CA (a SPIFFE ID with a path), minting clients.
    new_key(&ossl, "workload-ca.key", Key::P384);
    sign(
        &ossl,
        "workload-ca",
        Some("east-root"),
        &format!("{CA_EXTENSIONS}subjectAltName=URI:spiffe://east/observer/wca\n"),
    );
    new_key(&ossl, "minted.key", Key::P384);
    sign(
        &ossl,
        "minted",
        Some("workload-ca"),
        &leaf_extensions("spiffe://east/client/minted", true),
    );
    let by_workload = identity_dir(
        &world,
        "minted",
        &ossl,
        "minted",
        &["workload-ca"],
        "east-root",
    );

    // The nodes read their trust bundle at start: start them now.
    let source = world.start_source("source", &[]).await;
    let app = world.client(source.addr).await;
    app.write_keys(100, 10, "init-").await.unwrap();
    let mirror = world.start_mirror("m1", "m1", source.addr).await;
    let reader = world.client(mirror.addr).await;
    xmirror_e2e::assert_converged(&app, &reader).await;

    let load = |dir: &Path, who: &str| NodeTls::load(dir, who).unwrap();
    #[rustfmt::skip]
    let table: Vec<(&str, NodeTls, [Outcome; 6], [Outcome; 6])> = vec![
        // identity, certificate,                     on the source: hello, put, delete, get, status, digest;  on the mirror
        ("east client",          load(&world.certs, "app"),  [R(OO), Y, Y, Y, Y, Y],                 [R(NA), R(RO), R(RO), Y, Y, Y]),
        ("east observer",        load(&world.certs, "m2"),   [Y, R(RO), R(RO), Y, Y, Y],             [R(NA), R(RO), R(RO), Y, Y, Y]),
        ("east voter",           load(&world.certs, "v1"),   [R(OO), R(RO), R(RO), Y, Y, Y],         [R(NA), R(RO), R(RO), Y, Y, Y]),
        ("east source",          load(&world.certs, "src"),  [R(OO), R(RO), R(RO), Y, Y, Y],         [R(NA), R(RO), R(RO), Y, Y, Y]),
        ("east client, openssl", load(&east_openssl_client, "oc"), [R(OO), Y, Y, Y, Y, Y],           [R(NA), R(RO), R(RO), Y, Y, Y]),
        ("west client",          load(&west, "wc"),          [R(OO), R(NA), R(NA), R(NA), R(NA), R(NA)], [R(NA), R(NA), R(NA), R(NA), R(NA), R(NA)]),
        ("west observer",        load(&west, "wm"),          [Y, R(NA), R(NA), R(NA), R(NA), R(NA)],     [R(NA), R(NA), R(NA), R(NA), R(NA), R(NA)]),
        ("west voter",           load(&west, "wv"),          [R(OO), R(NA), R(NA), R(NA), R(NA), R(NA)], [R(NA), R(NA), R(NA), R(NA), R(NA), R(NA)]),
        ("north observer, openssl", load(&north_observer, "nm"), [Y, R(NA), R(NA), R(NA), R(NA), R(NA)], [R(NA), R(NA), R(NA), R(NA), R(NA), R(NA)]),
        ("north client, openssl",   load(&north_client, "nc"),   [R(OO), R(NA), R(NA), R(NA), R(NA), R(NA)], [R(NA), R(NA), R(NA), R(NA), R(NA), R(NA)]),
        ("east client forged by west", load(&forged_east, "forged2"), [Tls; 6],                        [Tls; 6]),
        ("mars client from a CA assigned north", load(&forged_mars, "any"), [Tls; 6],                 [Tls; 6]),
        ("east client by an intermediate without keyCertSign", load(&by_non_signer, "ns"), [Tls; 6],  [Tls; 6]),
        ("east client minted by a workload certificate", load(&by_workload, "minted"), [Tls; 6],      [Tls; 6]),
    ];
    let mut failures = Vec::new();
    for (who, tls, on_source, on_mirror) in &table {
        for (node, addr, expected) in [
            ("source", source.addr, on_source),
            ("mirror", mirror.addr, on_mirror),
        ] {
            let got = operations(tls, addr).await;
            for ((operation, expected), got) in OPERATIONS.iter().zip(expected).zip(got) {
                if *expected != got {
                    failures.push(format!(
                        "{who} on the {node}, {operation}: expected {expected:?}, got {got:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Refusals are logged with the peer's SPIFFE ID and address, in plain text (stderr
    // is a file here: no colour codes): a request refused, and a connection of an identity
    // that may make no client request at all (these at most once a second).
    let log = source.log_text();
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    assert!(
        log.lines().any(|line| line.contains("request refused")
            && line.contains("spiffe://east/observer/")
            && line.contains("127.0.0.1:")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("client connection refused")
                && (line.contains("spiffe://west/") || line.contains("spiffe://north/"))
                && line.contains("127.0.0.1:")),
        "{log}"
    );
}
