//! `xmirror certs init`, `xmirror certs issue` and `xmirror certs show`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use xmirror_proto::{Name, PeerIdentity, Role};
use xmirror_tls::inspect::{rfc3339, CertificateSummary};
use xmirror_tls::pki::{load_ca_for, CertificateAuthority, IssueOptions, Validity};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA: writes DIR/ca.crt and DIR/ca.key (0600).
    Init(InitArgs),
    /// Issue a node certificate signed by DIR's CA: writes DIR/NAME.crt and DIR/NAME.key (0600).
    Issue(IssueArgs),
    /// Show what each certificate in a PEM file says: identity, issuer, validity, fingerprint.
    Show(ShowArgs),
}

#[derive(Args)]
pub struct ShowArgs {
    /// A PEM file (a node's NAME.crt, a ca*.crt, or any certificate).
    file: PathBuf,
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// The cluster this CA certifies nodes of.
    #[arg(long)]
    cluster_id: Name,
    /// How long the CA is valid, in days.
    #[arg(long, default_value_t = Validity::DEFAULT_CA_DAYS)]
    days: u32,
    /// Replace an existing CA. Every certificate the old one issued stops being trusted.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct IssueArgs {
    /// Directory holding the CA; the certificate is written here too.
    #[arg(long)]
    dir: PathBuf,
    /// The node's cluster (must be the CA's).
    #[arg(long)]
    cluster_id: Name,
    /// What the node may do: source, observer, voter or client.
    #[arg(long)]
    role: Role,
    /// The node's name within its cluster (also the file name).
    #[arg(long)]
    name: Name,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value_t = Validity::DEFAULT_DAYS)]
    days: u32,
    /// Extra DNS names for the certificate (repeatable), for tools that check host names.
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Replace an existing NAME.crt and NAME.key (re-issuing, for a rotation).
    #[arg(long)]
    force: bool,
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init(args) => init(args),
        CertsCommand::Issue(args) => issue(args),
        CertsCommand::Show(args) => show(args),
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let validity = Validity::days_from_now(args.days)?;
    let ca = CertificateAuthority::generate(&args.cluster_id, validity)
        .context("cannot create the CA")?;
    ca.write(&args.dir, args.force)
        .context("cannot write the CA")?;
    println!(
        "created CA for cluster {} in {} (ca.crt, ca.key), valid {} days",
        args.cluster_id,
        args.dir.display(),
        args.days
    );
    Ok(())
}

fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let ca = load_ca_for(&args.dir, &args.cluster_id).context("cannot load the CA")?;
    let identity = PeerIdentity {
        cluster_id: args.cluster_id,
        role: args.role,
        name: args.name,
    };
    let options = IssueOptions {
        validity: Validity::days_from_now(args.days)?,
        extra_dns_names: args.dns_names,
    };
    let certificate = ca
        .issue(&identity, &options)
        .with_context(|| format!("cannot issue a certificate for {identity}"))?;
    let (cert_path, key_path) = certificate
        .write(&args.dir, &identity.name, args.force)
        .context("cannot write the certificate")?;
    println!(
        "issued {identity}: {} and {}, valid {} days",
        cert_path.display(),
        key_path.display(),
        args.days
    );
    Ok(())
}

fn show(args: ShowArgs) -> anyhow::Result<()> {
    let summaries = CertificateSummary::read_pem_file(&args.file)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let count = summaries.len();
    for (index, summary) in summaries.iter().enumerate() {
        println!(
            "certificate {} of {count} in {}",
            index + 1,
            args.file.display()
        );
        let identity = match (&summary.spiffe_id, summary.is_ca, &summary.trust_domain) {
            (Some(id), _, _) => id.clone(),
            (None, true, Some(domain)) => format!("CA of cluster {domain} (spiffe://{domain})"),
            (None, true, None) => {
                "CA declaring no trust domain (trusted as ca.crt: this node's cluster; as ca-<cluster>.crt: that cluster)".to_owned()
            }
            (None, false, _) => "no SPIFFE ID (xmirror refuses it)".to_owned(),
        };
        println!("  identity:  {identity}");
        println!("  subject:   {}", summary.subject);
        println!("  issuer:    {}", summary.issuer);
        let left = summary.seconds_left(now);
        let state = if left < 0 {
            format!("EXPIRED {} days ago", -left / 86_400)
        } else if now < summary.not_before {
            "NOT YET VALID".to_owned()
        } else {
            format!("{} days left", left / 86_400)
        };
        println!(
            "  valid:     {} to {} ({state})",
            rfc3339(summary.not_before),
            rfc3339(summary.not_after)
        );
        println!("  sha256:    {}", summary.sha256);
    }
    Ok(())
}
