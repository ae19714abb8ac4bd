//! The floor for converging N new tenants: generating N RSA-2048 DKIM keys on every core, nothing else.
//! `cargo run --release -p securemail-operator --example keygen_floor -- N` prints the seconds it took.

use std::time::Instant;

use securemail_api::tenant::DkimAlgorithm;
use securemail_operator::dkim_keys;

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args().nth(1).map_or(Ok(1000), |arg| arg.parse())?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|worker| {
                scope.spawn(move || {
                    (worker..count)
                        .step_by(cores)
                        .try_for_each(|_| dkim_keys::generate(DkimAlgorithm::RsaSha256, 2048).map(drop))
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| -> anyhow::Result<()> {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a key generation thread panicked"))??;
            Ok(())
        })
    })?;
    println!("{:.3}", started.elapsed().as_secs_f64());
    Ok(())
}
