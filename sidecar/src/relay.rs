//! Answers from a writer thread to the group of tasks waiting on one of its writes. Waking a task from a thread
//! outside the async runtime costs a write to the runtime's event fd per task (and often a wake-up of the runtime
//! thread each); so the writer wakes only the group's first waiter, which passes the answer on from the runtime's
//! own thread, where waking a task is a push onto its run queue.

use tokio::sync::oneshot;

/// What one waiter receives: the answer, and the waiters it passes it on to when dropped.
#[derive(Debug)]
pub(crate) struct Relayed<T: Clone> {
    answer: T,
    rest: Vec<oneshot::Sender<Relayed<T>>>,
}

impl<T: Clone> Relayed<T> {
    /// Gives `answer` to every one of `waiters`; only the first is woken from this thread.
    pub(crate) fn answer_all(waiters: impl IntoIterator<Item = oneshot::Sender<Self>>, answer: T) {
        let mut waiters = waiters.into_iter();
        if let Some(first) = waiters.next() {
            // Refused (the first waiter gave up), the value is dropped here, which answers the rest.
            let _ = first.send(Self {
                answer,
                rest: waiters.collect(),
            });
        }
    }

    /// The answer; the rest of the group gets it once this is dropped.
    pub(crate) fn answer(&self) -> T {
        self.answer.clone()
    }
}

impl<T: Clone> Drop for Relayed<T> {
    fn drop(&mut self) {
        for waiter in self.rest.drain(..) {
            // A waiter that gave up needs no answer.
            let _ = waiter.send(Self {
                answer: self.answer.clone(),
                rest: Vec::new(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Waiter = oneshot::Sender<Relayed<u32>>;
    type Answer = oneshot::Receiver<Relayed<u32>>;

    fn waiters(count: usize) -> (Vec<Waiter>, Vec<Answer>) {
        (0..count).map(|_| oneshot::channel()).unzip()
    }

    #[tokio::test]
    async fn every_waiter_gets_the_answer_once_the_first_has_read_it() {
        let (senders, mut receivers) = waiters(4);
        Relayed::answer_all(senders, 7);
        let first = receivers.remove(0).await.unwrap();
        assert_eq!(first.answer(), 7);
        // The others hear nothing until the first waiter is done with its answer.
        assert!(receivers.iter_mut().all(|receiver| receiver.try_recv().is_err()));
        drop(first);
        for receiver in receivers {
            assert_eq!(receiver.await.unwrap().answer(), 7);
        }
    }

    #[tokio::test]
    async fn a_first_waiter_that_gave_up_does_not_hold_up_the_rest() {
        // Gave up before the answer came.
        let (senders, mut receivers) = waiters(3);
        drop(receivers.remove(0));
        Relayed::answer_all(senders, 1);
        for receiver in receivers {
            assert_eq!(receiver.await.unwrap().answer(), 1);
        }

        // Gave up with the answer already waiting in its channel, unread.
        let (senders, mut receivers) = waiters(3);
        Relayed::answer_all(senders, 2);
        drop(receivers.remove(0));
        for receiver in receivers {
            assert_eq!(receiver.await.unwrap().answer(), 2);
        }
    }
}
