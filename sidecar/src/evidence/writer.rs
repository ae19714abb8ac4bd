//! One thread owns the evidence log and commits in groups: every record handed over while the previous
//! `fdatasync` ran goes to disk with the next single write and flush. Each caller still gets its answer only once
//! its records are durable, so no delivery is acknowledged without its evidence, but concurrent deliveries share
//! the cost of a disk flush instead of queueing for one each.

use std::thread;

use tokio::sync::{mpsc, oneshot};

use super::{Attempt, EvidenceLog};
use crate::error::{Error, Result};
use crate::relay::Relayed;

/// Records waiting for the writer, with the channel each caller waits on.
type Request = (Vec<Attempt>, oneshot::Sender<Relayed<Result<(), String>>>);

/// A handle to the writer thread; clones share it. The thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct EvidenceWriter {
    requests: mpsc::UnboundedSender<Request>,
}

impl EvidenceWriter {
    /// Starts the writer thread for `log`.
    pub fn spawn(log: EvidenceLog) -> Result<Self> {
        let (requests, receiver) = mpsc::unbounded_channel();
        thread::Builder::new()
            .name("evidence-writer".to_owned())
            .spawn(move || commit_in_groups(log, receiver))
            .map_err(|source| Error::EvidenceWriter(source.to_string()))?;
        Ok(Self { requests })
    }

    /// Appends `attempts` (in order, contiguous in the chain) and returns once they are on disk.
    pub async fn append(&self, attempts: Vec<Attempt>) -> Result<()> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send((attempts, done))
            .map_err(|_| Error::EvidenceWriter("the writer thread has stopped".to_owned()))?;
        match answer.await {
            // Dropping the answer passes it on to the rest of the group.
            Ok(answer) => answer.answer().map_err(Error::EvidenceWriter),
            Err(_) => Err(Error::EvidenceWriter(
                "the writer thread stopped before answering".to_owned(),
            )),
        }
    }
}

fn commit_in_groups(mut log: EvidenceLog, mut requests: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = requests.blocking_recv() {
        let mut group = vec![first];
        while let Ok(next) = requests.try_recv() {
            group.push(next);
        }
        let attempts: Vec<Attempt> = group
            .iter()
            .flat_map(|(attempts, _)| attempts.iter().cloned())
            .collect();
        let result = log.append_all(&attempts).map(drop).map_err(|err| err.to_string());
        // A caller that stopped waiting loses nothing: its records are written either way.
        Relayed::answer_all(group.into_iter().map(|(_, done)| done), result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::verify;

    fn attempt(n: usize) -> Attempt {
        serde_json::from_value(serde_json::json!({
            "time": "2026-11-26T00:00:00Z",
            "tenant": "clinic/lakeside",
            "messageIdSha256": crate::evidence::Sha256Hex::of(n.to_string().as_bytes()),
            "recipientDomain": "example.net",
            "recipientCount": 1,
            "mxHost": null,
            "mxIp": null,
            "sourceIp": "192.0.2.10",
            "policy": null,
            "tls": null,
            "smtpReply": null,
            "outcome": "deferred",
        }))
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_all_land_in_one_unbroken_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evidence.jsonl");
        let writer = EvidenceWriter::spawn(EvidenceLog::open(&path).unwrap()).unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.append(vec![attempt(2 * n), attempt(2 * n + 1)]).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let summary = verify(text.as_bytes()).unwrap();
        assert_eq!(summary.records, 128);
        // Each caller's two records are next to each other, in its order.
        let numbers: Vec<usize> = text
            .lines()
            .map(|line| {
                let hash = serde_json::from_str::<serde_json::Value>(line).unwrap()["messageIdSha256"].clone();
                (0..128)
                    .find(|n| {
                        serde_json::to_value(crate::evidence::Sha256Hex::of(n.to_string().as_bytes())).unwrap() == hash
                    })
                    .unwrap()
            })
            .collect();
        for pair in numbers.chunks(2) {
            assert_eq!(pair[0] % 2, 0);
            assert_eq!(pair[1], pair[0] + 1);
        }
    }
}
