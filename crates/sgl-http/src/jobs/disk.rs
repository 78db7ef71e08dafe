//! The job store's files: one folder per job holding its record (`job.json`), its input image and,
//! once completed, its video, each written durably (`crate::durable`).

use std::fs;
use std::io;
use std::path::Path;

pub(crate) use crate::durable::{remove_file, sync_dir, tmp_path, write_atomic, TMP_SUFFIX};

use super::JobRecord;

/// A job's record, inside its folder.
pub(crate) const RECORD_FILE: &str = "job.json";
/// A completed job's video, inside its folder.
pub const VIDEO_FILE: &str = "video.mp4";
/// The record as stored: compact JSON, the prompt once (in the request; the job's copy is filled
/// in again when it is read).
pub(crate) fn encode(record: &JobRecord) -> serde_json::Result<Vec<u8>> {
    let mut stored = record.clone();
    stored.job.prompt = String::new();
    serde_json::to_vec(&stored)
}

pub(crate) fn decode(bytes: &[u8]) -> serde_json::Result<JobRecord> {
    let mut record: JobRecord = serde_json::from_slice(bytes)?;
    if record.job.prompt.is_empty() {
        record.job.prompt.clone_from(&record.request.prompt);
    }
    Ok(record)
}

/// Writes a job's record into its folder (created if needed); returns whether this was the job's
/// first record, in which case the caller must fsync the parent folder (the folder may be new, or
/// made without an fsync to hold an input image).
pub(crate) fn write_record(dir: &Path, id: &str, bytes: &[u8]) -> io::Result<bool> {
    let job_dir = dir.join(id);
    let record = job_dir.join(RECORD_FILE);
    let first = match fs::create_dir(&job_dir) {
        Ok(()) => true,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => !record.exists(),
        Err(err) => return Err(err),
    };
    write_atomic(&record, bytes)?;
    sync_dir(&job_dir)?;
    Ok(first)
}

/// Deletes a job's folder; returns whether there was one (the parent folder then needs an fsync).
pub(crate) fn remove_job_dir(dir: &Path, id: &str) -> io::Result<bool> {
    match fs::remove_dir_all(dir.join(id)) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// Job ids are `video_` and hex digits, the first 12 the creation time in milliseconds; anything
/// else in the store's folder is not a job and is left alone.
pub(crate) fn is_job_id(name: &str) -> bool {
    name.strip_prefix("video_").is_some_and(|hex| hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The creation time (Unix seconds) written into a job id.
pub(crate) fn created_at(id: &str) -> u64 {
    id.strip_prefix("video_")
        .and_then(|hex| hex.get(..12))
        .and_then(|millis| u64::from_str_radix(millis, 16).ok())
        .map_or(0, |millis| millis / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_recognised_and_carry_their_creation_time() {
        assert!(is_job_id("video_0190f2a1b2c3aabbccddeeff00112233aabbccddeeff0011"));
        assert!(!is_job_id("video_xyz"));
        assert!(!is_job_id("index.json"));
        assert!(!is_job_id("video_0190"));
        assert_eq!(created_at("video_0000000003e8ffff"), 1);
    }
}
