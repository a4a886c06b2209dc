//! The embedded handle (`SourceNode`'s put, delete, batch, get and scan) means what the
//! client protocol means: a program writing in-process and a client reading over QUIC see
//! the same LSNs, values and scans, and the same writes are refused.

use xmirror_client::{Client, Identity, Scan, Write};
use xmirror_proto::{Lsn, Name, Role};
use xmirror_source::embedded::EmbeddedError;
use xmirror_source::service::BadWrite;
use xmirror_source::{SourceConfig, SourceNode};
use xmirror_tls::NodeTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_source_writes_and_reads_as_a_client_does() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let name = |value: &str| Name::new(value).unwrap();
    xmirror_tls::pki::issue_cluster(
        &certs,
        &name("east"),
        &[(Role::Source, name("src")), (Role::Client, name("app"))],
        30,
    )
    .unwrap();
    let config = SourceConfig::new(
        dir.path().join("source"),
        name("east"),
        "127.0.0.1:0".parse().unwrap(),
    );
    let source = SourceNode::start(config, &NodeTls::load(&certs, "src").unwrap())
        .await
        .unwrap();
    let client = Client::connect(
        &source.local_addr.to_string(),
        Identity::from_dir(&certs, "app").unwrap(),
    )
    .await
    .unwrap();

    assert_eq!(source.put("a", "1").await.unwrap(), Lsn(1));
    assert_eq!(client.put("b", "2").await.unwrap(), Lsn(2));
    let batch = source
        .batch(vec![
            Write::put("c", "3"),
            Write::delete("a"),
            Write::put("d", "4"),
        ])
        .await
        .unwrap();
    assert_eq!(batch, Lsn(3), "a batch takes one LSN");
    assert_eq!(source.delete("d").await.unwrap(), Lsn(4));

    // What one wrote, the other reads.
    assert_eq!(client.get("c").await.unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(source.get("b").await.unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(source.get("a").await.unwrap(), None);
    let (lsn, pairs) = source.scan("", None, None).await.unwrap();
    let scanned = client.scan_all(Scan::all()).await.unwrap();
    assert_eq!((lsn, &pairs), (scanned.lsn, &scanned.pairs));
    assert_eq!(
        pairs,
        vec![
            (b"b".to_vec(), b"2".to_vec()),
            (b"c".to_vec(), b"3".to_vec())
        ]
    );
    let (_, limited) = source
        .scan("b", Some(b"z".to_vec()), Some(1))
        .await
        .unwrap();
    assert_eq!(limited, vec![(b"b".to_vec(), b"2".to_vec())]);

    // Refused alike, and nothing written.
    assert!(matches!(
        source.put("", "x").await,
        Err(EmbeddedError::BadWrite(BadWrite::EmptyKey))
    ));
    assert!(matches!(
        source.batch(Vec::new()).await,
        Err(EmbeddedError::BadWrite(BadWrite::EmptyBatch))
    ));
    assert_eq!(
        client.put("", "x").await.unwrap_err().code(),
        Some(xmirror_proto::ErrorCode::InvalidRequest)
    );
    assert_eq!(client.digest().await.unwrap().0, Lsn(4));
    source.shutdown().await;
}
