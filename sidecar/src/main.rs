//! The securemail-sidecar binary.
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use securemail_sidecar::evidence;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The never-cleartext delivery agent beside Postfix in every SecureMail MTA pod"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Delivery evidence logs.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
}

#[derive(Subcommand, Debug)]
enum EvidenceCommand {
    /// Check that every record of FILE parses and the hash chain is intact; print the record count and the
    /// last hash (record it elsewhere to detect later changes to the end of the log).
    Verify { file: PathBuf },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Evidence {
            command: EvidenceCommand::Verify { file },
        } => {
            let reader = File::open(&file)
                .map(BufReader::new)
                .with_context(|| format!("cannot open evidence log {}", file.display()))?;
            // A broken chain is the command's answer, not a failure of the tool: no "Error:" prefix or backtrace.
            match evidence::verify(reader) {
                Ok(summary) => println!("ok: {summary}"),
                Err(err) => {
                    eprintln!("{}: {err}", file.display());
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
