//! The `xmirror` command line (every command is in docs/OPERATIONS.md): parses arguments, runs one
//! command, and turns any failure into a one-line error and a non-zero exit.

mod batch_file;
mod certs;
mod client;
mod demo;
mod logs;
mod node;
mod progress;
mod settings;
mod units;

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::logs::LogFormat;

/// xmirror keeps a read-only mirror of a database in another cluster, over QUIC with mutual TLS.
#[derive(Parser)]
#[command(name = "xmirror", version, about, long_about = None)]
struct Cli {
    /// How logs (on stderr) are written: `text` for people, `json` for log pipelines
    /// [default: text, or the node's config file's `log_format`]. The level comes from
    /// RUST_LOG (default: info for nodes, errors only for clients).
    #[arg(long, global = true, value_enum, env = "XMIRROR_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a cluster CA and node certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Run a source node: owns the database, serves clients and mirrors.
    Source(node::SourceArgs),
    /// Run an observer mirror of a source.
    Mirror(node::MirrorArgs),
    /// Write one key on a source (the value from standard input when not given).
    Put(client::PutArgs),
    /// Remove one key on a source.
    Delete(client::DeleteArgs),
    /// Apply the writes of a file atomically on a source.
    Batch(client::BatchArgs),
    /// Read one key from a source or a consistent mirror (exit 3 when it is absent).
    Get(client::GetArgs),
    /// Read the pairs of a key range or prefix, in key order, from one state.
    Scan(client::ScanArgs),
    /// Write N keys as fast as the node accepts them and print the rate.
    Load(client::LoadArgs),
    /// Show a node's status.
    Status(client::StatusArgs),
    /// Print the digest of a node's whole state and the LSN it was taken at.
    Digest(client::DigestArgs),
    /// List a source's slots, or drop one (releasing the WAL it holds).
    Slots(client::SlotsArgs),
    /// Fence a source: it refuses every write from now on, across restarts (its database
    /// goes on elsewhere).
    Fence(client::FenceArgs),
    /// Promote a mirror to a source: planned (fence its source, apply its last write, then
    /// promote), or --force at once when the source is gone.
    Promote(client::PromoteArgs),
    /// Run a source and a mirror on this machine, with no setup, and show them at work.
    Demo,
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; `xmirror man | man -l -`), or with --dir write it and one
    /// page per command (xmirror-source.1, ...) there.
    Man {
        /// Write every page into this directory instead.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

/// Every flag of the node and client commands may also come from an environment variable,
/// `XMIRROR_` and the flag's name in capitals with underscores (`--data-dir`:
/// `XMIRROR_DATA_DIR`); a flag given on the command line wins. Not for `certs` (run by
/// hand) nor `--print-config`.
fn with_environment(command: clap::Command) -> clap::Command {
    command.mut_subcommands(|subcommand| {
        if matches!(
            subcommand.get_name(),
            "certs" | "demo" | "completions" | "man"
        ) {
            return subcommand;
        }
        subcommand.mut_args(|arg| {
            let id = arg.get_id().as_str();
            if arg.is_positional() || matches!(id, "help" | "version" | "print_config") {
                return arg;
            }
            let variable = format!("XMIRROR_{}", id.to_uppercase());
            arg.env(variable)
        })
    })
}

/// Writes `bytes` to stdout; a closed pipe is an error, not a panic.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    let matches = with_environment(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let result = match cli.command {
        Command::Certs(command) => certs::run(command),
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a write error such as a closed pipe.
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut with_environment(Cli::command()),
                "xmirror",
                &mut script,
            );
            print_bytes(&script)
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            clap_mangen::Man::new(with_environment(Cli::command()))
                .render(&mut page)
                .map_err(anyhow::Error::from)
                .and_then(|()| print_bytes(&page))
        }
        Command::Man { dir: Some(dir) } => std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(with_environment(Cli::command()), &dir))
            .with_context(|| format!("cannot write the man pages to {}", dir.display())),
        command => {
            // A node sets up its logs once it has read its config file, which may say how.
            if !matches!(command, Command::Source(_) | Command::Mirror(_)) {
                let level = if matches!(command, Command::Demo) {
                    "warn"
                } else {
                    "error"
                };
                logs::init(cli.log_format.unwrap_or_default(), level);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("xmirror: error: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                match command {
                    Command::Source(args) => node::run_source(args, cli.log_format).await,
                    Command::Mirror(args) => node::run_mirror(args, cli.log_format).await,
                    Command::Put(args) => client::put(args).await,
                    Command::Delete(args) => client::delete(args).await,
                    Command::Batch(args) => client::batch(args).await,
                    Command::Get(args) => client::get(args).await,
                    Command::Scan(args) => client::scan(args).await,
                    Command::Load(args) => client::load(args).await,
                    Command::Status(args) => client::status(args).await,
                    Command::Digest(args) => client::digest(args).await,
                    Command::Slots(args) => client::slots(args).await,
                    Command::Fence(args) => client::fence(args).await,
                    Command::Promote(args) => client::promote(args).await,
                    Command::Demo => demo::run().await,
                    Command::Certs(_) | Command::Completions { .. } | Command::Man { .. } => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<client::KeyNotFound>() => {
            eprintln!("xmirror: key not found");
            ExitCode::from(3)
        }
        Err(error) => {
            // One line, with every cause: "cannot issue: ca.key: No such file or directory".
            let message = format!("{error:#}");
            let one_line: Vec<&str> = message
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect();
            eprintln!("xmirror: error: {}", one_line.join(" "));
            ExitCode::FAILURE
        }
    }
}
