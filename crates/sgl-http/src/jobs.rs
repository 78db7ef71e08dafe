//! The video job store: job records and their files under `<output dir>/videos/<id>/`, an index
//! written atomically (temporary file, then rename) on every state change, so that jobs survive a
//! restart. On start, completed jobs are served again, queued ones are submitted again, and ones
//! that were running are marked failed with `server_restarted`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sgl_core::GenerationRequest;
use sgl_scheduler::RequestHandle;

use crate::state::unix_now;
use crate::wire::{VideoError, VideoJob, VideoStatus};

const INDEX_FILE: &str = "index.json";
pub const VIDEO_FILE: &str = "video.mp4";

/// What is persisted per job: the public record plus what is needed to run it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: VideoJob,
    /// The request as submitted (seed fixed), re-submitted if the server restarts before it runs.
    pub request: GenerationRequest,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// Ids sort by creation time (they start with the creation time in hex).
    jobs: BTreeMap<String, JobRecord>,
}

pub struct JobStore {
    dir: PathBuf,
    ttl: Duration,
    index: Mutex<Index>,
    /// Submitted requests by job id, for cancellation.
    live: Mutex<HashMap<String, Arc<RequestHandle>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobStore {
    /// Opens (or creates) the store; returns it with the ids of queued jobs to submit again.
    pub fn open(dir: PathBuf, ttl: Duration) -> std::io::Result<(Self, Vec<String>)> {
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(INDEX_FILE);
        let mut index: Index = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                tracing::error!(path = %path.display(), error = %err, "unreadable job index; starting empty");
                Index::default()
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Index::default(),
            Err(err) => return Err(err),
        };
        let mut queued = Vec::new();
        let now = unix_now();
        for (id, record) in &mut index.jobs {
            match record.job.status {
                VideoStatus::InProgress => {
                    record.job.status = VideoStatus::Failed;
                    // Expires like every other finished job.
                    record.job.completed_at = Some(now);
                    record.job.expires_at = Some(now + ttl.as_secs());
                    record.job.error = Some(VideoError {
                        code: "server_restarted".into(),
                        message: "the server restarted while this job was running".into(),
                    });
                }
                VideoStatus::Queued => queued.push(id.clone()),
                _ => {}
            }
        }
        let store = Self { dir, ttl, index: Mutex::new(index), live: Mutex::new(HashMap::new()) };
        store.persist(&lock(&store.index))?;
        Ok((store, queued))
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn video_path(&self, id: &str) -> PathBuf {
        self.job_dir(id).join(VIDEO_FILE)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Writes the index to a temporary file and renames it over the old one.
    fn persist(&self, index: &Index) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{INDEX_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(index)?)?;
        std::fs::rename(&tmp, self.dir.join(INDEX_FILE))
    }

    fn persist_logged(&self, index: &Index) {
        if let Err(err) = self.persist(index) {
            tracing::error!(error = %err, "cannot write the job index");
        }
    }

    pub fn insert(&self, record: JobRecord) {
        let mut index = lock(&self.index);
        index.jobs.insert(record.job.id.clone(), record);
        self.persist_logged(&index);
    }

    pub fn get(&self, id: &str) -> Option<JobRecord> {
        lock(&self.index).jobs.get(id).cloned()
    }

    /// Applies `change` to a job; `persist` says whether the change must reach the disk (status
    /// changes do, progress ticks need not).
    pub fn update(&self, id: &str, persist: bool, change: impl FnOnce(&mut VideoJob)) -> Option<VideoJob> {
        let mut index = lock(&self.index);
        let job = &mut index.jobs.get_mut(id)?.job;
        change(job);
        let job = job.clone();
        if persist {
            self.persist_logged(&index);
        }
        Some(job)
    }

    /// Jobs in creation order (`asc`) or newest first, after the job `after`, at most `limit`.
    pub fn list(&self, after: Option<&str>, limit: usize, newest_first: bool) -> (Vec<VideoJob>, bool) {
        let index = lock(&self.index);
        let ordered: Vec<&JobRecord> =
            if newest_first { index.jobs.values().rev().collect() } else { index.jobs.values().collect() };
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

    pub fn live(&self, id: &str) -> Option<Arc<RequestHandle>> {
        lock(&self.live).get(id).cloned()
    }

    /// Removes a job's record and files (cancelling it first if it is running).
    pub async fn remove(&self, id: &str) -> Option<JobRecord> {
        if let Some(handle) = self.take_live(id) {
            handle.cancel();
        }
        let record = {
            let mut index = lock(&self.index);
            let record = index.jobs.remove(id);
            self.persist_logged(&index);
            record
        }?;
        remove_dir(&self.job_dir(id)).await;
        Some(record)
    }

    /// Deletes finished jobs whose `expires_at` has passed, with their files.
    pub async fn purge_expired(&self) -> usize {
        let now = unix_now();
        let expired: Vec<String> = lock(&self.index)
            .jobs
            .values()
            .filter(|r| r.job.expires_at.is_some_and(|at| at <= now))
            .map(|r| r.job.id.clone())
            .collect();
        for id in &expired {
            self.remove(id).await;
        }
        expired.len()
    }
}

async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!(dir = %dir.display(), error = %err, "cannot delete a job's files"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: VideoStatus) -> JobRecord {
        JobRecord {
            job: VideoJob {
                id: id.into(),
                object: "video".into(),
                model: "m".into(),
                status,
                progress: 0,
                created_at: 1,
                completed_at: None,
                expires_at: None,
                size: "32x32".into(),
                seconds: "1".into(),
                num_frames: 17,
                fps: 16,
                prompt: "p".into(),
                seed: 1,
                error: None,
            },
            request: GenerationRequest { prompt: "p".into(), ..Default::default() },
        }
    }

    #[test]
    fn a_restart_keeps_finished_jobs_requeues_queued_ones_and_fails_running_ones() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (store, _) = JobStore::open(tmp.path().to_path_buf(), Duration::from_secs(60)).unwrap();
            store.insert(record("video_1", VideoStatus::Completed));
            store.insert(record("video_2", VideoStatus::Queued));
            store.insert(record("video_3", VideoStatus::InProgress));
        }
        let (store, queued) = JobStore::open(tmp.path().to_path_buf(), Duration::from_secs(60)).unwrap();
        assert_eq!(queued, vec!["video_2".to_string()]);
        assert_eq!(store.get("video_1").unwrap().job.status, VideoStatus::Completed);
        let failed = store.get("video_3").unwrap().job;
        assert_eq!(failed.status, VideoStatus::Failed);
        assert!(failed.expires_at.is_some());
        assert_eq!(failed.error.unwrap().code, "server_restarted");
        assert!(!tmp.path().join("index.json.tmp").exists());
    }

    #[tokio::test]
    async fn listing_pages_and_expiry() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = JobStore::open(tmp.path().to_path_buf(), Duration::from_secs(60)).unwrap();
        for i in 1..=3 {
            store.insert(record(&format!("video_{i}"), VideoStatus::Completed));
        }
        let (page, more) = store.list(None, 2, false);
        assert_eq!(page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["video_1", "video_2"]);
        assert!(more);
        let (page, more) = store.list(Some("video_2"), 2, false);
        assert_eq!((page.len(), more), (1, false));
        let (page, _) = store.list(None, 1, true);
        assert_eq!(page[0].id, "video_3");
        std::fs::create_dir_all(store.job_dir("video_1")).unwrap();
        store.update("video_1", true, |job| job.expires_at = Some(1));
        assert_eq!(store.purge_expired().await, 1);
        assert!(store.get("video_1").is_none() && !store.job_dir("video_1").exists());
    }
}
