use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use super::disk::RECORD_FILE;
use super::*;

const TTL: Duration = Duration::from_secs(60);

/// A valid job id (`video_` + creation millis + a random part) numbered `n`, in creation order.
fn id(n: u32) -> String {
    format!("video_{n:012x}00000000000000000000000000000000")
}

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
            prompt: "a paper boat".into(),
            seed: 1,
            error: None,
        },
        request: GenerationRequest { prompt: "a paper boat".into(), ..Default::default() },
    }
}

fn open(dir: &Path) -> (Arc<JobStore>, Vec<String>) {
    open_capped(dir, DEFAULT_MAX_FINISHED)
}

fn open_capped(dir: &Path, max_finished: usize) -> (Arc<JobStore>, Vec<String>) {
    let (store, queued) = JobStore::open(dir.to_path_buf(), TTL, max_finished).unwrap();
    (Arc::new(store), queued)
}

/// Every file and folder under `dir` with what a write would change (size, mtime, inode).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, i64, i64, u64)> {
    let mut seen = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        seen.insert(path.clone(), (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()));
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    seen
}

/// The job's record as stored on disk.
fn stored(dir: &Path, id: &str) -> Vec<u8> {
    std::fs::read(dir.join(id).join(RECORD_FILE)).unwrap()
}

#[tokio::test]
async fn a_restart_keeps_finished_jobs_requeues_queued_ones_and_fails_running_ones() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (store, _) = open(tmp.path());
        for (n, status) in [(1, VideoStatus::Queued), (2, VideoStatus::Queued), (3, VideoStatus::Queued)] {
            store.insert(record(&id(n), status)).await.unwrap();
        }
        store.insert(record(&id(4), VideoStatus::Queued)).await.unwrap();
        store.mark_started(&id(2));
        store.mark_started(&id(4));
        assert!(matches!(store.complete(&id(1), b"mp4".to_vec()).await, Completion::Completed));
        // Job 4's video was written but the process died before its record said so.
        std::fs::write(store.video_path(&id(4)), b"mp4").unwrap();
        store.close().await;
    }
    let (store, queued) = open(tmp.path());
    assert_eq!(queued, vec![id(3)]);
    assert_eq!(store.get(&id(1)).unwrap().status, VideoStatus::Completed);
    let failed = store.get(&id(2)).unwrap();
    assert_eq!(failed.status, VideoStatus::Failed);
    assert!(failed.expires_at.is_some() && failed.completed_at.is_some());
    assert_eq!(failed.error.unwrap().code, "server_restarted");
    let adopted = store.get(&id(4)).unwrap();
    assert_eq!((adopted.status, adopted.progress), (VideoStatus::Completed, 100));
    assert!(adopted.expires_at.is_some());
    // The prompt came back from the request, where it is stored once.
    assert_eq!(store.get(&id(3)).unwrap().prompt, "a paper boat");
}

#[tokio::test]
async fn each_job_is_one_compact_record_with_its_prompt_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    for n in 1..=3 {
        store.insert(record(&id(n), VideoStatus::Queued)).await.unwrap();
    }
    let bytes = stored(tmp.path(), &id(2));
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert_eq!(text.matches("a paper boat").count(), 1, "{text}");
    assert!(!text.contains('\n'), "pretty-printed: {text}");
    // A change to one job rewrites that job's record only.
    let before = snapshot(tmp.path());
    store.finish(&id(2), Outcome::Cancelled).await.unwrap();
    let after = snapshot(tmp.path());
    let changed: Vec<_> = after.keys().filter(|path| before.get(*path) != after.get(*path)).collect();
    assert_eq!(
        changed,
        [&tmp.path().join(id(2)), &tmp.path().join(id(2)).join(RECORD_FILE)],
        "a change must touch its own job's folder only"
    );
}

#[tokio::test]
async fn a_request_that_changes_nothing_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    store.insert(record(&id(1), VideoStatus::Queued)).await.unwrap();
    store.finish(&id(1), Outcome::Cancelled).await.unwrap();
    let before = snapshot(tmp.path());
    assert!(store.remove(&id(9)).await.is_none());
    assert!(matches!(store.cancel(&id(9)).await, Err(NotFinished::NotFound)));
    assert!(matches!(store.cancel(&id(1)).await, Err(NotFinished::AlreadyFinished(_))));
    store.mark_started(&id(1));
    store.set_progress(&id(1), 50);
    assert_eq!(store.purge_expired().await, 0);
    store.close().await;
    assert_eq!(snapshot(tmp.path()), before);
}

#[tokio::test]
async fn a_cancel_before_the_completion_wins_and_the_video_is_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    store.insert(record(&id(1), VideoStatus::Queued)).await.unwrap();
    store.mark_started(&id(1));
    let cancelled = store.cancel(&id(1)).await.unwrap();
    assert_eq!(cancelled.status, VideoStatus::Cancelled);
    // The engine had finished the video when the cancel arrived.
    assert!(matches!(store.complete(&id(1), b"mp4".to_vec()).await, Completion::Superseded));
    assert_eq!(store.get(&id(1)).unwrap().status, VideoStatus::Cancelled);
    assert!(!store.video_path(&id(1)).exists(), "a cancelled job kept its video");
}

#[tokio::test]
async fn a_completed_job_cannot_turn_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    store.insert(record(&id(1), VideoStatus::Queued)).await.unwrap();
    store.mark_started(&id(1));
    assert!(matches!(store.complete(&id(1), b"mp4".to_vec()).await, Completion::Completed));
    match store.cancel(&id(1)).await {
        Err(NotFinished::AlreadyFinished(job)) => assert_eq!(job.status, VideoStatus::Completed),
        other => panic!("a completed job was cancelled: {other:?}"),
    }
    assert_eq!(store.get(&id(1)).unwrap().status, VideoStatus::Completed);
    assert_eq!(std::fs::read(store.video_path(&id(1))).unwrap(), b"mp4");
}

#[tokio::test]
async fn a_job_deleted_while_its_video_is_written_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    store.insert(record(&id(1), VideoStatus::Queued)).await.unwrap();
    store.insert(record(&id(2), VideoStatus::Queued)).await.unwrap();
    assert!(store.remove(&id(1)).await.is_some());
    assert!(matches!(store.complete(&id(1), b"mp4".to_vec()).await, Completion::Superseded));
    assert!(!store.job_dir(&id(1)).exists());
    // The record went between the write and the compare-and-set.
    std::fs::write(store.video_path(&id(2)), b"mp4").unwrap();
    assert!(store.remove(&id(2)).await.is_some());
    assert!(matches!(store.complete(&id(2), b"mp4".to_vec()).await, Completion::Superseded));
    assert!(!store.job_dir(&id(2)).exists());
}

#[tokio::test]
async fn every_way_a_job_ends_sets_its_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    let outcomes = [
        Outcome::Completed,
        Outcome::Cancelled,
        Outcome::Failed { code: "resubmit_failed".into(), message: "m".into() },
        Outcome::Failed { code: "storage_error".into(), message: "m".into() },
    ];
    for (n, outcome) in (1..).zip(outcomes) {
        store.insert(record(&id(n), VideoStatus::Queued)).await.unwrap();
        let job = store.finish(&id(n), outcome).await.unwrap();
        assert!(job.completed_at.is_some() && job.expires_at == Some(job.completed_at.unwrap() + 60), "{job:?}");
    }
    // A record an older version stored as failed without an expiry gets one at start.
    let mut old = record(&id(9), VideoStatus::Failed);
    old.job.error = Some(VideoError { code: "resubmit_failed".into(), message: "m".into() });
    std::fs::create_dir(tmp.path().join(id(9))).unwrap();
    std::fs::write(tmp.path().join(id(9)).join(RECORD_FILE), disk::encode(&old).unwrap()).unwrap();
    store.close().await;
    let (store, _) = open(tmp.path());
    assert!(store.get(&id(9)).unwrap().expires_at.is_some());
}

#[tokio::test]
async fn a_video_that_cannot_be_stored_fails_the_job_which_then_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    store.insert(record(&id(1), VideoStatus::Queued)).await.unwrap();
    store.mark_started(&id(1));
    // Where the video would go is taken by a folder: the write fails.
    std::fs::create_dir(store.video_path(&id(1))).unwrap();
    std::fs::create_dir(super::disk::tmp_path(&store.video_path(&id(1)))).unwrap();
    assert!(matches!(store.complete(&id(1), b"mp4".to_vec()).await, Completion::StorageFailed));
    let job = store.get(&id(1)).unwrap();
    assert_eq!((job.status, job.error.unwrap().code.as_str()), (VideoStatus::Failed, "storage_error"));
    assert!(job.expires_at.is_some() && job.completed_at.is_some());
}

#[tokio::test]
async fn finished_jobs_beyond_the_cap_are_deleted_oldest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open_capped(tmp.path(), 2);
    for n in 1..=5 {
        store.insert(record(&id(n), VideoStatus::Queued)).await.unwrap();
    }
    for n in 1..=4 {
        store.finish(&id(n), Outcome::Cancelled).await.unwrap();
    }
    store.close().await;
    let (ids, _) = store.list(None, 100, false);
    let ids: Vec<String> = ids.into_iter().map(|job| job.id).collect();
    // Job 5 is unfinished: the cap is on finished jobs only.
    assert_eq!(ids, [id(3), id(4), id(5)]);
    assert!(!tmp.path().join(id(1)).exists() && !tmp.path().join(id(2)).exists());
    // A lower cap at the next start applies at once.
    let (store, _) = open_capped(tmp.path(), 1);
    assert!(store.get(&id(3)).is_none() && store.get(&id(4)).is_some() && !tmp.path().join(id(3)).exists());
}

#[tokio::test]
async fn listing_pages_and_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path());
    for n in 1..=3 {
        store.insert(record(&id(n), VideoStatus::Queued)).await.unwrap();
    }
    let (page, more) = store.list(None, 2, false);
    assert_eq!(page.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), [id(1), id(2)]);
    assert!(more);
    let (page, more) = store.list(Some(&id(2)), 2, false);
    assert_eq!((page.len(), more), (1, false));
    let (page, _) = store.list(None, 1, true);
    assert_eq!(page[0].id, id(3));
    let (store, _) = {
        drop(store);
        JobStore::open(tmp.path().to_path_buf(), Duration::ZERO, DEFAULT_MAX_FINISHED).unwrap()
    };
    store.finish(&id(1), Outcome::Cancelled).await.unwrap();
    assert_eq!(store.purge_expired().await, 1);
    assert!(store.get(&id(1)).is_none() && !store.job_dir(&id(1)).exists());
}

// --- what is found at start ------------------------------------------------------------------------

/// Writes an index of the old single-file format (pretty JSON) with `records`.
fn write_legacy_index(dir: &Path, records: &[JobRecord]) -> Vec<u8> {
    let jobs: BTreeMap<&str, &JobRecord> = records.iter().map(|r| (r.job.id.as_str(), r)).collect();
    let bytes = serde_json::to_vec_pretty(&serde_json::json!({ "jobs": jobs })).unwrap();
    std::fs::write(dir.join("index.json"), &bytes).unwrap();
    bytes
}

#[test]
fn an_index_of_the_old_format_is_migrated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut done = record(&id(1), VideoStatus::Completed);
    done.job.expires_at = Some(u64::MAX / 2);
    std::fs::create_dir(tmp.path().join(id(1))).unwrap();
    std::fs::write(tmp.path().join(id(1)).join(VIDEO_FILE), b"mp4").unwrap();
    write_legacy_index(tmp.path(), &[done, record(&id(2), VideoStatus::Queued)]);
    let (store, queued) = open(tmp.path());
    assert_eq!(queued, [id(2)]);
    assert_eq!(store.get(&id(1)).unwrap().status, VideoStatus::Completed);
    assert!(!tmp.path().join("index.json").exists());
    assert!(tmp.path().join(id(2)).join(RECORD_FILE).is_file());
    drop(store);
    let (store, queued) = open(tmp.path());
    assert_eq!((queued.len(), store.list(None, 100, false).0.len()), (1, 2));
}

#[test]
fn an_unreadable_index_is_moved_aside_and_the_jobs_are_rebuilt_from_their_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let records: Vec<JobRecord> = (1..=3).map(|n| record(&id(n), VideoStatus::Completed)).collect();
    for record in &records {
        std::fs::create_dir(tmp.path().join(&record.job.id)).unwrap();
        std::fs::write(tmp.path().join(&record.job.id).join(VIDEO_FILE), b"mp4").unwrap();
    }
    let index = write_legacy_index(tmp.path(), &records);
    // Truncated, as by a crash of the old format's unsynced write.
    std::fs::write(tmp.path().join("index.json"), &index[..index.len() / 2]).unwrap();

    let (store, _) = open(tmp.path());
    let (jobs, _) = store.list(None, 100, false);
    assert_eq!(jobs.len(), 3, "the jobs were dropped: {jobs:?}");
    for job in &jobs {
        assert_eq!((job.status, job.error.as_ref().unwrap().code.as_str()), (VideoStatus::Failed, "record_lost"));
        assert!(job.expires_at.is_some() && job.created_at == 0);
    }
    let aside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("index.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "the unreadable index was not kept aside");
    assert_eq!(std::fs::read(tmp.path().join(&aside[0])).unwrap(), &index[..index.len() / 2]);
    assert!(!tmp.path().join("index.json").exists());
    // The videos stay until the jobs expire (a person may still want them).
    assert!(records.iter().all(|r| tmp.path().join(&r.job.id).join(VIDEO_FILE).is_file()));
}

#[test]
fn an_unreadable_record_is_moved_aside_and_the_job_expires_with_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join(id(1));
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join(RECORD_FILE), b"{\"job\": {\"id\"").unwrap();
    std::fs::write(folder.join("input.png"), b"png").unwrap();
    let (store, queued) = open(tmp.path());
    assert!(queued.is_empty());
    let job = store.get(&id(1)).unwrap();
    assert_eq!((job.status, job.error.unwrap().code.as_str()), (VideoStatus::Failed, "record_unreadable"));
    assert_eq!(std::fs::read(folder.join("job.json.unreadable")).unwrap(), b"{\"job\": {\"id\"");
    assert!(folder.join("input.png").is_file() && folder.join(RECORD_FILE).is_file());
}

#[test]
fn orphaned_folders_videos_and_temporary_files_are_removed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    // A folder no record points to (a crash between storing the input image and the record).
    std::fs::create_dir(tmp.path().join(id(1))).unwrap();
    std::fs::write(tmp.path().join(id(1)).join("input.png"), b"png").unwrap();
    // A cancelled job's video, and a record write cut short.
    let mut cancelled = record(&id(2), VideoStatus::Cancelled);
    cancelled.job.expires_at = Some(u64::MAX / 2);
    let folder = tmp.path().join(id(2));
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join(RECORD_FILE), disk::encode(&cancelled).unwrap()).unwrap();
    std::fs::write(folder.join(VIDEO_FILE), b"mp4").unwrap();
    std::fs::write(folder.join("job.json.tmp"), b"{").unwrap();
    // Not ours: left alone.
    std::fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
    std::fs::create_dir(tmp.path().join("keep")).unwrap();

    let (store, _) = open(tmp.path());
    assert!(!tmp.path().join(id(1)).exists());
    assert!(store.get(&id(1)).is_none());
    assert_eq!(store.get(&id(2)).unwrap().status, VideoStatus::Cancelled);
    assert!(!folder.join(VIDEO_FILE).exists() && !folder.join("job.json.tmp").exists());
    assert!(tmp.path().join("notes.txt").is_file() && tmp.path().join("keep").is_dir());
}

/// Create latency and disk per job as the store grows to `SGL_JOBS_BENCH_N` jobs (default 10 000),
/// each created, started and cancelled as a client would; and the time to open the store again.
/// `cargo test --release -p sgl-http jobs_store_bench -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it by name"]
async fn jobs_store_bench() {
    let total: u32 = std::env::var("SGL_JOBS_BENCH_N").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let tmp = tempfile::tempdir_in(std::env::var("SGL_JOBS_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let (store, _) = open_capped(tmp.path(), total as usize);
    let mut latencies = Vec::new();
    let mut report = Vec::new();
    let mut next_report = 100;
    for n in 1..=total {
        let mut job = record(&id(n), VideoStatus::Queued);
        job.request.prompt = format!("a paper boat on a pond, number {n}, {}", "in soft morning light ".repeat(4));
        job.job.prompt.clone_from(&job.request.prompt);
        let started = std::time::Instant::now();
        store.insert(job).await.unwrap();
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        store.mark_started(&id(n));
        store.cancel(&id(n)).await.unwrap();
        if n == next_report || n == total {
            let mut window = std::mem::take(&mut latencies);
            window.sort_by(f64::total_cmp);
            let (apparent, allocated) = disk_usage(tmp.path());
            report.push(format!(
                "| {n} | {:.2} | {:.2} | {:.0} | {:.0} |",
                window[window.len() / 2],
                window[window.len() * 99 / 100],
                apparent as f64 / f64::from(n),
                allocated as f64 / f64::from(n)
            ));
            next_report *= 10;
        }
    }
    store.close().await;
    let started = std::time::Instant::now();
    let (reopened, _) = open_capped(tmp.path(), total as usize);
    let reopen_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(reopened.list(None, 1, false).0.len(), 1);
    println!("| jobs | create p50 ms | create p99 ms | bytes/job (apparent) | bytes/job (allocated) |");
    println!("|---|---|---|---|---|");
    for line in report {
        println!("{line}");
    }
    println!("open with {total} jobs: {reopen_ms:.0} ms");
}

/// Bytes of files under `dir`, as their lengths and as blocks allocated (folders included).
fn disk_usage(dir: &Path) -> (u64, u64) {
    let (mut apparent, mut allocated) = (0, 0);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        allocated += meta.blocks() * 512;
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            apparent += meta.len();
        }
    }
    (apparent, allocated)
}
