//! One thread owns the evidence log and commits in groups: every record handed over while the previous
//! `fdatasync` ran goes to disk with the next single write and flush. Each caller still gets its answer only once
//! its records are durable, so no delivery is acknowledged without its evidence, but concurrent deliveries share
//! the cost of a disk flush instead of queueing for one each.

use std::thread;

use securemail_api::sidecar_status::PrunedEvidenceFile;
use tokio::sync::{mpsc, oneshot};

use super::{Attempt, EvidenceStore, HeadsHandle, PruneRequest};
use crate::error::{Error, Result};
use crate::relay::Relayed;

/// Work for the writer thread: records with the channel each caller waits on, or a pruning pass.
enum Request {
    Append(Vec<Attempt>, oneshot::Sender<Relayed<Result<(), String>>>),
    Prune(PruneRequest, oneshot::Sender<Result<Vec<PrunedEvidenceFile>, String>>),
}

/// A handle to the writer thread; clones share it. The thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct EvidenceWriter {
    requests: mpsc::UnboundedSender<Request>,
    heads: HeadsHandle,
}

impl EvidenceWriter {
    /// Starts the writer thread for `store`.
    pub fn spawn(store: EvidenceStore) -> Result<Self> {
        let (requests, receiver) = mpsc::unbounded_channel();
        let heads = store.heads();
        thread::Builder::new()
            .name("evidence-writer".to_owned())
            .spawn(move || commit_in_groups(store, receiver))
            .map_err(|source| Error::EvidenceWriter(source.to_string()))?;
        Ok(Self { requests, heads })
    }

    /// The chain heads of the evidence directory, kept current by this writer.
    pub fn heads(&self) -> HeadsHandle {
        self.heads.clone()
    }

    /// Appends `attempts` (in order, contiguous in the chain) and returns once they are on disk.
    pub async fn append(&self, attempts: Vec<Attempt>) -> Result<()> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(Request::Append(attempts, done))
            .map_err(|_| Error::EvidenceWriter("the writer thread has stopped".to_owned()))?;
        match answer.await {
            // Dropping the answer passes it on to the rest of the group.
            Ok(answer) => answer.answer().map_err(Error::EvidenceWriter),
            Err(_) => Err(Error::EvidenceWriter(
                "the writer thread stopped before answering".to_owned(),
            )),
        }
    }

    /// Runs a pruning pass between two appends (see [`EvidenceStore::prune`]) and returns the files pruned.
    pub async fn prune(&self, request: PruneRequest) -> Result<Vec<PrunedEvidenceFile>> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(Request::Prune(request, done))
            .map_err(|_| Error::EvidenceWriter("the writer thread has stopped".to_owned()))?;
        match answer.await {
            Ok(answer) => answer.map_err(Error::EvidenceWriter),
            Err(_) => Err(Error::EvidenceWriter(
                "the writer thread stopped before answering".to_owned(),
            )),
        }
    }
}

fn commit_in_groups(mut store: EvidenceStore, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut next = requests.blocking_recv();
    while let Some(request) = next.take() {
        let (attempts, done) = match request {
            Request::Prune(prune, done) => {
                let _ = done.send(store.prune(&prune).map_err(|err| err.to_string()));
                next = requests.blocking_recv();
                continue;
            }
            Request::Append(attempts, done) => (attempts, done),
        };
        let mut group = vec![(attempts, done)];
        // A pruning pass waiting behind the group runs after it.
        while let Ok(request) = requests.try_recv() {
            match request {
                Request::Append(attempts, done) => group.push((attempts, done)),
                prune @ Request::Prune(..) => {
                    next = Some(prune);
                    break;
                }
            }
        }
        let attempts: Vec<Attempt> = group
            .iter()
            .flat_map(|(attempts, _)| attempts.iter().cloned())
            .collect();
        let result = store.append_all(&attempts).map(drop).map_err(|err| err.to_string());
        // A caller that stopped waiting loses nothing: its records are written either way.
        Relayed::answer_all(group.into_iter().map(|(_, done)| done), result);
        if next.is_none() {
            next = requests.blocking_recv();
        }
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
        let store = EvidenceStore::open(dir.path(), "2026-11-26T00:00:00Z".parse().unwrap()).unwrap();
        let path = store.current_path().to_path_buf();
        let writer = EvidenceWriter::spawn(store).unwrap();
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

    fn attempt_at(n: usize, time: &str) -> Attempt {
        Attempt {
            time: time.parse().unwrap(),
            ..attempt(n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pruning_pass_runs_between_appends_and_its_record_joins_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let writer =
            EvidenceWriter::spawn(EvidenceStore::open(dir.path(), "2026-01-01T00:00:00Z".parse().unwrap()).unwrap())
                .unwrap();
        writer
            .append(vec![attempt_at(0, "2026-01-02T00:00:00Z")])
            .await
            .unwrap();
        writer
            .append(vec![attempt_at(1, "2026-02-02T00:00:00Z")])
            .await
            .unwrap();
        let request = PruneRequest {
            now: "2026-02-20T00:00:00Z".parse().unwrap(),
            retention_days: 7,
            tenant: "clinic/lakeside".parse().unwrap(),
        };
        let (pruned, appended) = tokio::join!(
            writer.prune(request),
            writer.append(vec![attempt_at(2, "2026-02-20T00:00:01Z")])
        );
        appended.unwrap();
        let pruned = pruned.unwrap();
        assert_eq!(pruned.len(), 1);
        assert_eq!(pruned[0].file, "evidence-20260101T000000.000000000Z.jsonl");

        let heads = writer.heads().snapshot();
        assert_eq!(heads.pruned, pruned);
        assert_eq!(heads.files.len(), 1);
        let path = dir.path().join(&heads.files[0].file);
        let text = std::fs::read_to_string(&path).unwrap();
        let summary = verify(text.as_bytes()).unwrap();
        assert_eq!((summary.records, heads.files[0].records), (3, 3));
        assert_eq!(summary.last_hash.to_string(), heads.files[0].last_hash);
        assert_eq!(text.lines().filter(|line| line.contains("\"pruned\"")).count(), 1);
    }
}
