//! The head of many sessions in one pass: every session's rows that wait
//! for logits at the same moment go through the output matrix together, as
//! nodes batch their sessions' steps. One decode row alone reads the whole
//! head (vocabulary × width) from memory for one token; sixteen rows read
//! it once for sixteen.

use std::sync::Arc;
use std::sync::mpsc;

use hotpot_engine::{ClientParts, ForwardError, HiddenStates};
use tokio::sync::oneshot;

use crate::chain::ChainError;

/// Most rows in one pass.
const MAX_ROWS: usize = 64;

type Reply = oneshot::Sender<Result<Vec<f32>, ForwardError>>;

/// A thread that computes logits for whoever asks, batching what waits.
#[derive(Debug)]
pub struct Heads {
    tx: mpsc::Sender<(HiddenStates, Reply)>,
}

impl Heads {
    /// Starts the thread for `client`'s head.
    pub fn start(client: Arc<ClientParts>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(HiddenStates, Reply)>();
        std::thread::Builder::new().name("hotpot-heads".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                let mut rows = batch[0].0.rows();
                while rows < MAX_ROWS {
                    match rx.try_recv() {
                        Ok(next) => {
                            rows += next.0.rows();
                            batch.push(next);
                        }
                        Err(_) => break,
                    }
                }
                run(&client, batch);
            }
        })?;
        Ok(Self { tx })
    }

    /// Logits for every row of `hidden` (`rows × vocab`, row-major).
    pub async fn logits(&self, hidden: HiddenStates) -> Result<Vec<f32>, ChainError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ChainError::Internal("the head thread stopped".into());
        self.tx.send((hidden, reply)).map_err(|_| stopped())?;
        Ok(answer.await.map_err(|_| stopped())??)
    }
}

/// One pass for the whole batch; when it fails (one session's rows are not
/// finite, say), each asker gets its own rows' answer instead.
fn run(client: &ClientParts, batch: Vec<(HiddenStates, Reply)>) {
    if batch.len() > 1 {
        let dim = batch[0].0.dim();
        let rows: usize = batch.iter().map(|(h, _)| h.rows()).sum();
        let joined = batch.iter().all(|(h, _)| h.dim() == dim).then(|| {
            let mut all = Vec::with_capacity(rows * dim);
            batch.iter().for_each(|(h, _)| all.extend_from_slice(h.as_slice()));
            HiddenStates::new(rows, dim, all)
        });
        if let Some(Ok(joined)) = joined
            && let Ok(logits) = client.logits(&joined)
        {
            let vocab = logits.len() / rows;
            let mut at = 0;
            for (hidden, reply) in batch {
                let n = hidden.rows() * vocab;
                let _ = reply.send(Ok(logits[at..at + n].to_vec()));
                at += n;
            }
            return;
        }
    }
    for (hidden, reply) in batch {
        let _ = reply.send(client.logits(&hidden));
    }
}
