//! What the store finds on disk at start, and how it is made whole again before the server serves.
//!
//! Rules (each logged where it changes or drops something):
//! * a job folder with a readable record is loaded: a queued job is submitted again; a running one
//!   whose video was already written is completed, else `failed` with `server_restarted`; a
//!   completed one whose video is missing is `failed` with `video_missing`; a video left in the
//!   folder of a job that did not complete is deleted; a finished job without an expiry gets one;
//! * a job folder whose record cannot be read keeps its files until it expires: its record is moved
//!   aside (`job.json.unreadable`) and the job is listed as `failed` with `record_unreadable`;
//! * a job folder without a record is one no client was ever told about (a job is acknowledged only
//!   once its record is durable): it is deleted, unless the index of the old single-file format was
//!   unreadable, in which case the job may have been acknowledged and is listed as `failed` with
//!   `record_lost`;
//! * the old single-file index (`index.json`) is migrated into per-job records and then deleted;
//!   an unreadable one is moved aside (`index.json.unreadable-<unix time>`), never written over;
//! * temporary files left by an interrupted write are deleted.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use sgl_core::GenerationRequest;

use super::disk::{self, RECORD_FILE, TMP_SUFFIX, VIDEO_FILE};
use super::JobRecord;
use crate::state::unix_now;
use crate::wire::{VideoError, VideoJob, VideoStatus};

/// The index file of the old format (all jobs in one JSON file).
const LEGACY_INDEX: &str = "index.json";

pub(crate) struct Recovered {
    pub jobs: BTreeMap<String, JobRecord>,
    /// Jobs to submit again, in creation order.
    pub queued: Vec<String>,
}

enum Legacy {
    Absent,
    Readable(BTreeMap<String, JobRecord>),
    Unreadable,
}

#[derive(serde::Deserialize)]
struct LegacyIndex {
    jobs: BTreeMap<String, JobRecord>,
}

/// Loads the store in `dir` (created if missing), repairs it as the module says, and writes what it
/// changed before returning.
pub(crate) fn recover(dir: &Path, ttl: Duration) -> io::Result<Recovered> {
    fs::create_dir_all(dir)?;
    let now = unix_now();
    let legacy = read_legacy_index(dir, now)?;
    let (mut legacy_jobs, adopt_lost) = match legacy {
        Legacy::Absent => (BTreeMap::new(), false),
        Legacy::Readable(jobs) => (jobs, false),
        Legacy::Unreadable => (BTreeMap::new(), true),
    };
    let migrating = dir.join(LEGACY_INDEX).exists();

    let mut jobs = BTreeMap::new();
    let mut dirty = Vec::new();
    // Jobs known only by their folder: their files are kept as found until they expire.
    let mut adopted_ids = std::collections::BTreeSet::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.ends_with(TMP_SUFFIX) && entry.file_type()?.is_file() {
            disk::remove_file(&path)?;
            continue;
        }
        if !is_dir(&path) || !disk::is_job_id(&name) {
            continue;
        }
        remove_temporaries(&path)?;
        let record_path = path.join(RECORD_FILE);
        let record = match fs::read(&record_path) {
            Ok(bytes) => match disk::decode(&bytes) {
                Ok(record) if record.job.id == name => Some(record),
                Ok(record) => {
                    unreadable(&record_path, &format!("it names another job ({})", record.job.id))?;
                    dirty.push(name.clone());
                    adopted_ids.insert(name.clone());
                    Some(adopted(&name, "record_unreadable", now, ttl))
                }
                Err(err) => {
                    unreadable(&record_path, &err.to_string())?;
                    dirty.push(name.clone());
                    adopted_ids.insert(name.clone());
                    Some(adopted(&name, "record_unreadable", now, ttl))
                }
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                if let Some(record) = legacy_jobs.remove(&name) {
                    dirty.push(name.clone());
                    Some(record)
                } else if adopt_lost {
                    tracing::error!(job = %name, "a video job folder has no record and the old index was unreadable: listed as failed (record_lost) until it expires");
                    dirty.push(name.clone());
                    adopted_ids.insert(name.clone());
                    Some(adopted(&name, "record_lost", now, ttl))
                } else {
                    tracing::warn!(job = %name, dir = %path.display(), "deleting a video job folder without a record (the job was never acknowledged)");
                    fs::remove_dir_all(&path)?;
                    None
                }
            }
            Err(err) => return Err(err),
        };
        if let Some(record) = record {
            jobs.insert(name, record);
        }
    }
    // Jobs of the old index that had no folder (the old format made one only for an input image
    // or a video).
    for (id, record) in std::mem::take(&mut legacy_jobs) {
        if disk::is_job_id(&id) && !jobs.contains_key(&id) {
            dirty.push(id.clone());
            jobs.insert(id, record);
        }
    }

    let mut queued = Vec::new();
    for (id, record) in &mut jobs {
        let video = dir.join(id).join(VIDEO_FILE);
        if settle(&mut record.job, video.is_file(), now, ttl) {
            dirty.push(id.clone());
        }
        match record.job.status {
            VideoStatus::Queued => queued.push(id.clone()),
            VideoStatus::Completed => {}
            _ if adopted_ids.contains(id) => {}
            _ => disk::remove_file(&video)?,
        }
    }

    dirty.sort();
    dirty.dedup();
    for id in &dirty {
        if let Some(record) = jobs.get(id) {
            disk::write_record(dir, id, &disk::encode(record).map_err(io::Error::other)?)?;
        }
    }
    disk::sync_dir(dir)?;
    if migrating {
        // Every job of the old index now has its own durable record.
        fs::remove_file(dir.join(LEGACY_INDEX))?;
        disk::sync_dir(dir)?;
        tracing::info!(jobs = jobs.len(), "migrated the video job index to one record per job");
    }
    Ok(Recovered { jobs, queued })
}

fn is_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

fn read_legacy_index(dir: &Path, now: u64) -> io::Result<Legacy> {
    let path = dir.join(LEGACY_INDEX);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Legacy::Absent),
        Err(err) => return Err(err),
    };
    match serde_json::from_slice::<LegacyIndex>(&bytes) {
        Ok(index) => Ok(Legacy::Readable(index.jobs)),
        Err(err) => {
            let aside = dir.join(format!("{LEGACY_INDEX}.unreadable-{now}"));
            fs::rename(&path, &aside)?;
            disk::sync_dir(dir)?;
            tracing::error!(
                index = %path.display(), moved_to = %aside.display(), error = %err,
                "the video job index is unreadable: moved aside; jobs are rebuilt from their folders"
            );
            Ok(Legacy::Unreadable)
        }
    }
}

/// Moves an unreadable record aside (kept for a person to look at, never written over).
fn unreadable(path: &Path, reason: &str) -> io::Result<()> {
    let aside = path.with_file_name(format!("{RECORD_FILE}.unreadable"));
    fs::rename(path, &aside)?;
    tracing::error!(
        record = %path.display(), moved_to = %aside.display(), reason,
        "a video job record is unreadable: the job is listed as failed (record_unreadable) until it expires"
    );
    Ok(())
}

/// Deletes files an interrupted write left in a job folder.
fn remove_temporaries(job_dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(job_dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX) && entry.file_type()?.is_file() {
            disk::remove_file(&entry.path())?;
        }
    }
    Ok(())
}

/// A job known only by its folder: failed with `code`, expiring like any finished job.
fn adopted(id: &str, code: &str, now: u64, ttl: Duration) -> JobRecord {
    let message = match code {
        "record_lost" => {
            "the job's record was lost (the old job index was unreadable); its files are kept until it expires"
        }
        _ => "the job's record could not be read after a restart; its files are kept until it expires",
    };
    JobRecord {
        job: VideoJob {
            id: id.to_string(),
            object: "video".into(),
            model: String::new(),
            status: VideoStatus::Failed,
            progress: 0,
            created_at: disk::created_at(id),
            completed_at: Some(now),
            expires_at: Some(now + ttl.as_secs()),
            size: String::new(),
            seconds: "0".into(),
            num_frames: 0,
            fps: 0,
            prompt: String::new(),
            seed: 0,
            error: Some(VideoError { code: code.into(), message: message.into() }),
        },
        request: GenerationRequest::default(),
    }
}

/// Brings a job found on disk to a state the server can serve; returns whether it changed.
fn settle(job: &mut VideoJob, has_video: bool, now: u64, ttl: Duration) -> bool {
    let before = (job.status, job.completed_at, job.expires_at, job.error.clone());
    match (job.status, has_video) {
        // The video was written (atomically) and the server stopped before the record said so:
        // no client was told otherwise (a cancel is acknowledged only once it is on disk).
        (VideoStatus::InProgress, true) => {
            job.status = VideoStatus::Completed;
            job.progress = 100;
        }
        (VideoStatus::InProgress, false) => {
            job.status = VideoStatus::Failed;
            job.error = Some(VideoError {
                code: "server_restarted".into(),
                message: "the server restarted while this job was running".into(),
            });
        }
        (VideoStatus::Completed, false) => {
            job.status = VideoStatus::Failed;
            job.error = Some(VideoError {
                code: "video_missing".into(),
                message: "the job's video file was missing after a restart".into(),
            });
        }
        _ => {}
    }
    if job.status != VideoStatus::Queued {
        // Every finished job expires, including those an older version stored without an expiry.
        job.completed_at.get_or_insert(now);
        job.expires_at.get_or_insert(now + ttl.as_secs());
    }
    before != (job.status, job.completed_at, job.expires_at, job.error.clone())
}
