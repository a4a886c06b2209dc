//! The `xmirror` command line (SPEC.md, "Command line"): parses arguments, runs one
//! command, and turns any failure into a one-line error and a non-zero exit.

mod certs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// xmirror keeps a read-only mirror of a database in another cluster, over QUIC with mutual TLS.
#[derive(Parser)]
#[command(name = "xmirror", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a cluster CA and node certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(command) => certs::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, with every cause: "cannot issue: ca.key: No such file or directory".
            eprintln!("xmirror: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
