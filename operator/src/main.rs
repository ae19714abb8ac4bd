//! The securemail-operator binary.
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Reconciles SecureMailTenant resources into dedicated outbound mail infrastructure"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the SecureMailTenant CRD (apply it with `kubectl apply --server-side -f -`).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", securemail_operator::crd::crd_yaml()?),
    }
    Ok(())
}
