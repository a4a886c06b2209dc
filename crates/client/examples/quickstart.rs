//! Write on a source, read your write on a mirror.
//!
//! ```text
//! cargo run -p xmirror-client --example quickstart -- SOURCE_ADDR MIRROR_ADDR CERTS_DIR NAME
//! ```
//!
//! `CERTS_DIR/NAME.crt` and `CERTS_DIR/NAME.key` are a `client` certificate of the source's
//! cluster (`xmirror certs issue --role client`); `CERTS_DIR/ca*.crt` are trusted.

use xmirror_client::{Client, Get, Identity, Scan, Write};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let [source_address, mirror_address, certs_dir, name] = std::env::args()
        .skip(1)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| "usage: quickstart SOURCE_ADDR MIRROR_ADDR CERTS_DIR NAME")?;

    let identity = Identity::from_dir(&certs_dir, &name)?;
    let source = Client::connect(&source_address, identity.clone()).await?;
    let mirror = Client::connect(&mirror_address, identity).await?;

    // Every write returns the LSN at which it is durable on the source.
    source.put("user:1", "ada").await?;
    let lsn = source
        .batch(vec![Write::put("user:2", "grace"), Write::delete("user:1")])
        .await?;
    println!("wrote a batch at LSN {lsn}");

    // The mirror answers once it has applied that LSN: no polling.
    let read = mirror.get_with("user:2", Get::new().min_lsn(lsn)).await?;
    let value = read.value.unwrap_or_default();
    println!(
        "read on the mirror: {} (at LSN {})",
        String::from_utf8_lossy(&value),
        read.lsn
    );

    // A scan reads one state: the batch is in it whole, or not at all.
    let users = mirror.scan_all(Scan::prefix("user:")).await?;
    for (key, value) in &users.pairs {
        println!(
            "{} = {}",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(value)
        );
    }
    println!("{} users at LSN {}", users.pairs.len(), users.lsn);
    Ok(())
}
