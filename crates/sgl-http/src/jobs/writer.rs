//! The job store's writer: one thread that brings a job's files in line with its record in memory.
//!
//! Handlers and job tasks change records in memory (a short lock, no I/O) and name the job to this
//! thread; it writes the record as it is then (or deletes the folder of a job that is gone), so
//! the disk always converges to memory, whatever order changes came in. Names that arrive while it
//! writes are taken together: one fsync of the parent folder serves them all (group commit), and a
//! job named twice is written once. Tokio's workers never wait on the disk.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::disk;
use super::{lock, State};

/// Why a change could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write video job {id}: {message}")]
    Write { id: String, message: String },
    #[error("the video job store has stopped")]
    Stopped,
}

type Done = flume::Sender<Result<(), StoreError>>;

struct Message {
    id: String,
    /// Told once the job's files match its record (or the write failed).
    done: Option<Done>,
}

pub(crate) struct Writer {
    sender: Mutex<Option<flume::Sender<Message>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    pub(crate) fn start(dir: PathBuf, state: Arc<Mutex<State>>) -> std::io::Result<Self> {
        let (sender, receiver) = flume::unbounded();
        let thread =
            std::thread::Builder::new().name("sgl-job-writer".into()).spawn(move || run(&dir, &state, &receiver))?;
        Ok(Self { sender: Mutex::new(Some(sender)), thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, id: &str, done: Option<Done>) -> bool {
        let sender = lock(&self.sender).clone();
        sender.is_some_and(|sender| sender.send(Message { id: id.to_string(), done }).is_ok())
    }

    /// Has the job's files brought in line with its record, without waiting.
    pub(crate) fn enqueue(&self, id: &str) {
        if !self.send(id, None) {
            tracing::error!(job = id, "the video job store has stopped; a change to this job was not written");
        }
    }

    /// Has the job's files brought in line with its record and waits until they are durable.
    pub(crate) async fn sync(&self, id: &str) -> Result<(), StoreError> {
        let (done, written) = flume::bounded(1);
        if !self.send(id, Some(done)) {
            return Err(StoreError::Stopped);
        }
        written.recv_async().await.unwrap_or(Err(StoreError::Stopped))
    }

    /// Writes what is pending, then stops the thread (blocking).
    pub(crate) fn close(&self) {
        lock(&self.sender).take();
        if let Some(thread) = lock(&self.thread).take() {
            if thread.join().is_err() {
                tracing::error!("the video job store's writer panicked");
            }
        }
    }
}

fn run(dir: &std::path::Path, state: &Mutex<State>, receiver: &flume::Receiver<Message>) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        batch.extend(receiver.try_iter());
        let mut results: HashMap<&str, Result<(), StoreError>> = HashMap::new();
        let mut parent_changed = false;
        for message in &batch {
            if !results.contains_key(message.id.as_str()) {
                let result = write_one(dir, state, &message.id, &mut parent_changed);
                results.insert(message.id.as_str(), result);
            }
        }
        if parent_changed {
            if let Err(err) = disk::sync_dir(dir) {
                tracing::error!(dir = %dir.display(), error = %err, "cannot fsync the video job folder");
                let message = format!("cannot fsync {}: {err}", dir.display());
                for (id, result) in &mut results {
                    *result = Err(StoreError::Write { id: (*id).to_string(), message: message.clone() });
                }
            }
        }
        for message in &batch {
            if let Some(done) = &message.done {
                let result = results.get(message.id.as_str()).cloned().unwrap_or(Ok(()));
                // The waiter may have gone away (its client disconnected); the write stands.
                let _ = done.send(result);
            }
        }
    }
}

/// Writes one job's record as it is now, or deletes its folder if the job is gone.
fn write_one(
    dir: &std::path::Path,
    state: &Mutex<State>,
    id: &str,
    parent_changed: &mut bool,
) -> Result<(), StoreError> {
    let encoded = lock(state).jobs.get(id).map(disk::encode);
    let written = match encoded {
        Some(Ok(bytes)) => disk::write_record(dir, id, &bytes),
        Some(Err(err)) => Err(std::io::Error::other(err)),
        None => disk::remove_job_dir(dir, id),
    };
    match written {
        Ok(changed) => {
            *parent_changed |= changed;
            Ok(())
        }
        Err(err) => {
            tracing::error!(job = id, dir = %dir.display(), error = %err, "cannot write a video job to disk");
            Err(StoreError::Write { id: id.to_string(), message: err.to_string() })
        }
    }
}
