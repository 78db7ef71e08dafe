//! The video job store. Each job is a folder `<output dir>/videos/<id>/` holding its record
//! (`job.json`: compact JSON, the prompt once), its input image and, once completed, its video.
//!
//! Records live in memory behind a short lock that no I/O is done under; every change that must
//! survive a restart is written by one writer thread (`writer.rs`), and a handler answers only once
//! the change is durable (file fsynced, renamed, folder fsynced). A change costs one small file,
//! whatever the number of jobs, and a request that changes nothing writes nothing.
//!
//! A job finishes (completed, failed or cancelled) through one compare-and-set, so of a cancel and a
//! completion racing each other exactly one wins, and the loser's effects are undone (a video
//! written for a job cancelled meanwhile is deleted). Every finished job expires `ttl` after it
//! finished; beyond `max_finished` finished jobs, those closest to expiring go first. What is found
//! on disk at start is repaired by `recovery.rs`.

mod disk;
mod recovery;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sgl_core::GenerationRequest;
use sgl_scheduler::RequestHandle;

pub use disk::VIDEO_FILE;
pub use writer::StoreError;

use crate::state::unix_now;
use crate::wire::{VideoError, VideoJob, VideoStatus};

/// The default cap on finished jobs kept (`--max-finished-jobs`).
pub const DEFAULT_MAX_FINISHED: usize = 10_000;

/// What is persisted per job: the public record plus what is needed to run it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: VideoJob,
    /// The request as submitted (seed fixed), re-submitted if the server restarts before it runs.
    pub request: GenerationRequest,
}

/// How a job ends.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed,
    Cancelled,
    Failed { code: String, message: String },
}

/// Why `finish` changed nothing.
#[derive(Debug, Clone)]
pub enum NotFinished {
    NotFound,
    /// It had already finished: the job as it is.
    AlreadyFinished(Box<VideoJob>),
}

/// What became of a video handed to `complete`.
#[derive(Debug)]
pub enum Completion {
    Completed,
    /// Cancelled or deleted first: the video was not kept.
    Superseded,
    /// The video could not be stored; the job failed with `storage_error`.
    StorageFailed,
}

pub(crate) fn is_finished(status: VideoStatus) -> bool {
    !matches!(status, VideoStatus::Queued | VideoStatus::InProgress)
}

/// The records in memory, shared with the writer thread.
#[derive(Default)]
pub(crate) struct State {
    jobs: BTreeMap<String, JobRecord>,
    /// Finished jobs as (expiry, id): expiry and the cap both take from the front.
    finished: BTreeSet<(u64, String)>,
}

impl State {
    fn new(jobs: BTreeMap<String, JobRecord>) -> Self {
        let finished = jobs
            .values()
            .filter(|r| is_finished(r.job.status))
            .map(|r| (r.job.expires_at.unwrap_or(0), r.job.id.clone()))
            .collect();
        Self { jobs, finished }
    }

    fn remove(&mut self, id: &str) -> Option<JobRecord> {
        let record = self.jobs.remove(id)?;
        if is_finished(record.job.status) {
            self.finished.remove(&(record.job.expires_at.unwrap_or(0), record.job.id.clone()));
        }
        Some(record)
    }

    /// The compare-and-set every end of a job goes through: only an unfinished job changes, and it
    /// gets its completion time and expiry with its final status.
    fn finish(&mut self, id: &str, outcome: &Outcome, ttl: Duration) -> Result<VideoJob, NotFinished> {
        let record = self.jobs.get_mut(id).ok_or(NotFinished::NotFound)?;
        let job = &mut record.job;
        if is_finished(job.status) {
            return Err(NotFinished::AlreadyFinished(Box::new(job.clone())));
        }
        let now = unix_now();
        match outcome {
            Outcome::Completed => {
                job.status = VideoStatus::Completed;
                job.progress = 100;
            }
            Outcome::Cancelled => job.status = VideoStatus::Cancelled,
            Outcome::Failed { code, message } => {
                job.status = VideoStatus::Failed;
                job.error = Some(VideoError { code: code.clone(), message: message.clone() });
            }
        }
        job.completed_at = Some(now);
        let expires_at = now.saturating_add(ttl.as_secs());
        job.expires_at = Some(expires_at);
        self.finished.insert((expires_at, id.to_string()));
        Ok(job.clone())
    }

    /// Removes the finished jobs beyond `max` (those closest to expiring); returns their ids.
    fn evict_over(&mut self, max: usize) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.finished.len() > max {
            let Some((_, id)) = self.finished.pop_first() else { break };
            self.jobs.remove(&id);
            evicted.push(id);
        }
        evicted
    }

    /// Removes the finished jobs whose expiry is `now` or earlier; returns their ids.
    fn take_expired(&mut self, now: u64) -> Vec<String> {
        let mut expired = Vec::new();
        while self.finished.first().is_some_and(|(at, _)| *at <= now) {
            let Some((_, id)) = self.finished.pop_first() else { break };
            self.jobs.remove(&id);
            expired.push(id);
        }
        expired
    }
}

pub struct JobStore {
    dir: PathBuf,
    ttl: Duration,
    max_finished: usize,
    state: Arc<Mutex<State>>,
    /// Submitted requests by job id, for cancellation.
    live: Mutex<HashMap<String, Arc<RequestHandle>>>,
    writer: writer::Writer,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is a single insert/remove/assignment: a panic elsewhere
    // cannot leave them half-done, so a poisoned lock is still safe to use.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobStore {
    /// Opens (or creates) the store and repairs what it finds (see `recovery.rs`); returns it with
    /// the ids of queued jobs to submit again. Blocking: call it off the async workers.
    pub fn open(dir: PathBuf, ttl: Duration, max_finished: usize) -> std::io::Result<(Self, Vec<String>)> {
        let recovered = recovery::recover(&dir, ttl)?;
        let mut state = State::new(recovered.jobs);
        let max_finished = max_finished.max(1);
        let evicted = state.evict_over(max_finished);
        for id in &evicted {
            disk::remove_job_dir(&dir, id)?;
        }
        if !evicted.is_empty() {
            disk::sync_dir(&dir)?;
            tracing::info!(count = evicted.len(), max_finished, "deleted the finished video jobs beyond the cap");
        }
        let state = Arc::new(Mutex::new(state));
        let writer = writer::Writer::start(dir.clone(), Arc::clone(&state))?;
        let store = Self { dir, ttl, max_finished, state, live: Mutex::new(HashMap::new()), writer };
        Ok((store, recovered.queued))
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn video_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join(VIDEO_FILE)
    }

    /// Adds a job and waits until its record is durable; on error the job is not kept.
    pub async fn insert(&self, record: JobRecord) -> Result<(), StoreError> {
        let id = record.job.id.clone();
        lock(&self.state).jobs.insert(id.clone(), record);
        let written = self.writer.sync(&id).await;
        if written.is_err() && lock(&self.state).remove(&id).is_some() {
            // Whatever part of it reached the disk goes too.
            self.writer.enqueue(&id);
        }
        written
    }

    pub fn get(&self, id: &str) -> Option<VideoJob> {
        lock(&self.state).jobs.get(id).map(|r| r.job.clone())
    }

    /// The request a job was submitted with.
    pub fn request(&self, id: &str) -> Option<GenerationRequest> {
        lock(&self.state).jobs.get(id).map(|r| r.request.clone())
    }

    /// A queued job has started (written in the background: a restart fails it either way).
    pub fn mark_started(&self, id: &str) {
        let changed = lock(&self.state).jobs.get_mut(id).is_some_and(|r| {
            let queued = r.job.status == VideoStatus::Queued;
            if queued {
                r.job.status = VideoStatus::InProgress;
            }
            queued
        });
        if changed {
            self.writer.enqueue(id);
        }
    }

    /// Progress of a running job, in memory only (a restart fails a running job anyway).
    pub fn set_progress(&self, id: &str, percent: u32) {
        if let Some(record) = lock(&self.state).jobs.get_mut(id) {
            if record.job.status == VideoStatus::InProgress {
                record.job.progress = percent;
            }
        }
    }

    /// Ends an unfinished job (see `State::finish`) and waits until that is durable. Finished jobs
    /// beyond the cap are deleted in the background.
    pub async fn finish(&self, id: &str, outcome: Outcome) -> Result<VideoJob, NotFinished> {
        let (job, evicted) = {
            let mut state = lock(&self.state);
            let job = state.finish(id, &outcome, self.ttl)?;
            (job, state.evict_over(self.max_finished))
        };
        for evicted in &evicted {
            self.writer.enqueue(evicted);
        }
        // A failed write is logged by the writer; the job has ended all the same.
        let _ = self.writer.sync(id).await;
        Ok(job)
    }

    /// Cancels a queued or running job: the compare-and-set first, then the request is stopped (a
    /// running one between two denoising steps).
    pub async fn cancel(&self, id: &str) -> Result<VideoJob, NotFinished> {
        let job = self.finish(id, Outcome::Cancelled).await?;
        if let Some(handle) = self.take_live(id) {
            handle.cancel();
        }
        Ok(job)
    }

    /// Stores a job's video and completes it, unless a cancel or delete came first, in which case
    /// the video is deleted again. The video is in place before the job says `completed`, so a
    /// completed job always has its file; a crash in between leaves a running job with its video,
    /// which the next start completes.
    pub async fn complete(&self, id: &str, video: Vec<u8>) -> Completion {
        let path = self.video_path(id);
        let write_path = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            disk::write_atomic(&write_path, &video)?;
            disk::sync_dir(write_path.parent().unwrap_or(Path::new(".")))
        })
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err)));
        if let Err(err) = written {
            if self.get(id).is_none_or(|job| is_finished(job.status)) {
                // Deleted (its folder with it) or cancelled while the video was written.
                return self.superseded(id, &path, &NotFinished::NotFound).await;
            }
            tracing::error!(job = id, path = %path.display(), error = %err, "cannot store a video");
            let outcome =
                Outcome::Failed { code: "storage_error".into(), message: format!("cannot store the video: {err}") };
            return match self.finish(id, outcome).await {
                Ok(_) => Completion::StorageFailed,
                Err(not_finished) => self.superseded(id, &path, &not_finished).await,
            };
        }
        match self.finish(id, Outcome::Completed).await {
            Ok(_) => Completion::Completed,
            Err(not_finished) => self.superseded(id, &path, &not_finished).await,
        }
    }

    /// Undoes a video written for a job that was cancelled or deleted meanwhile.
    async fn superseded(&self, id: &str, path: &Path, not_finished: &NotFinished) -> Completion {
        let video = path.to_path_buf();
        let removed = tokio::task::spawn_blocking(move || {
            disk::remove_file(&disk::tmp_path(&video))?;
            disk::remove_file(&video)
        })
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err)));
        if let Err(err) = removed {
            tracing::warn!(job = id, path = %path.display(), error = %err, "cannot delete the video of a cancelled job");
        }
        if matches!(not_finished, NotFinished::NotFound) {
            // Deleted while the video was written: the folder may have outlived the deletion.
            let _ = self.writer.sync(id).await;
        }
        Completion::Superseded
    }

    /// Jobs in creation order (`asc`) or newest first, after the job `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize, newest_first: bool) -> (Vec<VideoJob>, bool) {
        let state = lock(&self.state);
        let ordered: Vec<&JobRecord> =
            if newest_first { state.jobs.values().rev().collect() } else { state.jobs.values().collect() };
        let start = after.and_then(|a| ordered.iter().position(|r| r.job.id == a)).map_or(0, |p| p + 1);
        let rest = &ordered[start.min(ordered.len())..];
        let page = rest.iter().take(limit).map(|r| r.job.clone()).collect();
        (page, rest.len() > limit)
    }

    pub fn set_live(&self, id: &str, handle: Arc<RequestHandle>) {
        lock(&self.live).insert(id.to_string(), handle);
    }

    pub fn take_live(&self, id: &str) -> Option<Arc<RequestHandle>> {
        lock(&self.live).remove(id)
    }

    /// Removes a job's record and files (cancelling it first if it is running); waits until they
    /// are gone from the disk. An unknown id changes and writes nothing.
    pub async fn remove(&self, id: &str) -> Option<VideoJob> {
        let record = lock(&self.state).remove(id)?;
        if let Some(handle) = self.take_live(id) {
            handle.cancel();
        }
        let _ = self.writer.sync(id).await;
        Some(record.job)
    }

    /// Deletes finished jobs whose expiry has passed, with their files.
    pub async fn purge_expired(&self) -> usize {
        let expired = lock(&self.state).take_expired(unix_now());
        for id in &expired {
            self.writer.enqueue(id);
        }
        if let Some(last) = expired.last() {
            // The writer works in order: once the last is gone, all are.
            let _ = self.writer.sync(last).await;
        }
        expired.len()
    }

    /// Writes what is pending and stops the writer (at shutdown, once no job task is left).
    pub async fn close(self: &Arc<Self>) {
        let store = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || store.writer.close()).await;
    }
}

#[cfg(test)]
mod tests;
