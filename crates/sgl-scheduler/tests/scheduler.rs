//! Queue, batching and cancellation behaviour of the scheduler, with a recording executor so the
//! tests can see exactly which batches were formed.

// Integration tests are compiled without cfg(test), so the workspace ban on unwrap needs lifting here.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sgl_core::{
    FrameRule, GenerationOutput, GenerationRequest, GuidanceMode, ImageInput, OutputKind, OutputMetadata, PerfMetrics,
    PipelineInfo, PipelineLimits, SamplingDefaults,
};
use sgl_scheduler::{
    BatchExecutor, BatchItem, BatchProgress, BatchingConfig, Engine, Event, ExecError, GenerationError, ItemOutcome,
    SubmitError,
};

fn info() -> PipelineInfo {
    PipelineInfo {
        model_path: "/tiny".into(),
        hf_id: None,
        pipeline_class: "FluxPipeline".into(),
        family: "flux1".into(),
        task: "text-to-image".into(),
        device: "cpu".into(),
        dit_precision: "fp32".into(),
        vae_precision: "fp32".into(),
        attention_backend: "torch_sdpa".into(),
        limits: PipelineLimits {
            size_multiple: 16,
            min_size: 16,
            max_pixels: 1 << 22,
            max_frames: 1,
            frame_rule: FrameRule::Single,
            max_sequence_length: 512,
        },
        defaults: SamplingDefaults {
            width: 32,
            height: 32,
            num_frames: 1,
            num_inference_steps: 4,
            guidance_scale: 3.5,
            true_cfg_scale: 1.0,
            max_sequence_length: 32,
            negative_prompt: None,
            flow_shift: None,
            fps: None,
            guidance_scale_2: None,
        },
        guidance: GuidanceMode::EmbeddedWithTrueCfg,
        supports_flow_shift: false,
        supports_guidance_scale_2: false,
        output: OutputKind::Image,
        image_input: ImageInput::None,
    }
}

/// Records every batch; fails batches containing a prompt with "fail"; runs "slow" prompts for
/// several steps so they can be cancelled mid-run.
#[derive(Clone, Default)]
struct Recorder {
    batches: Arc<Mutex<Vec<Vec<String>>>>,
}

impl BatchExecutor for Recorder {
    fn execute(&mut self, batch: &[BatchItem], progress: &BatchProgress) -> Result<Vec<ItemOutcome>, ExecError> {
        self.batches.lock().unwrap().push(batch.iter().map(|i| i.request.prompt.clone()).collect());
        if batch.iter().any(|i| i.request.prompt.contains("fail")) {
            return Err(ExecError::internal("boom"));
        }
        let steps = batch[0].request.num_inference_steps;
        let slow = batch.iter().any(|i| i.request.prompt.contains("slow"));
        let mut cancelled = Vec::new();
        for step in 1..=steps {
            if slow {
                std::thread::sleep(Duration::from_millis(50));
            }
            cancelled = progress.report(step, steps);
            if cancelled.len() == batch.len() {
                break;
            }
        }
        Ok(batch
            .iter()
            .enumerate()
            .map(|(index, item)| {
                if cancelled.contains(&index) {
                    ItemOutcome::Cancelled
                } else {
                    ItemOutcome::Completed(GenerationOutput {
                        outputs: vec![],
                        metadata: OutputMetadata {
                            seed: item.request.seed,
                            batch_size: batch.len() as u32,
                            perf: PerfMetrics {
                                total_duration_ms: 0.0,
                                steps: vec![],
                                denoise_steps_ms: vec![],
                                memory_checkpoints: vec![],
                                peak_memory_mb: 0.0,
                                profile_trace_dir: None,
                            },
                            notes: vec![],
                        },
                    })
                }
            })
            .collect())
    }
}

fn engine(config: BatchingConfig) -> (Engine, Recorder) {
    let recorder = Recorder::default();
    let for_worker = recorder.clone();
    let engine = Engine::start(config, move || Ok((for_worker, info()))).unwrap();
    (engine, recorder)
}

fn req(prompt: &str) -> GenerationRequest {
    GenerationRequest { prompt: prompt.into(), seed: Some(1), ..Default::default() }
}

fn batching(max_batch_size: u32, delay_ms: u64) -> BatchingConfig {
    BatchingConfig { max_queue_size: 64, max_batch_size, batch_delay: Duration::from_millis(delay_ms) }
}

#[test]
fn compatible_requests_share_one_batch() {
    let (engine, recorder) = engine(batching(4, 500));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            engine
                .submit(&GenerationRequest { seed: Some(i), guidance_scale: Some(i as f64), ..req(&format!("p{i}")) })
                .unwrap()
        })
        .collect();
    for (i, handle) in handles.iter().enumerate() {
        let out = handle.wait().unwrap();
        assert_eq!(out.metadata.batch_size, 4);
        assert_eq!(out.metadata.seed, i as u64);
    }
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["p0", "p1", "p2", "p3"]]);
    assert_eq!(engine.stats().batch_sizes(), vec![(4, 1)]);
}

#[test]
fn a_full_batch_starts_without_waiting_for_the_delay() {
    let (engine, _) = engine(batching(2, 60_000));
    let start = Instant::now();
    let a = engine.submit(&req("a")).unwrap();
    let b = engine.submit(&req("b")).unwrap();
    a.wait().unwrap();
    b.wait().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn incompatible_requests_run_in_separate_batches_in_arrival_order() {
    let (engine, recorder) = engine(batching(8, 300));
    let a = engine.submit(&req("a")).unwrap();
    let b = engine.submit(&GenerationRequest { width: Some(64), ..req("b") }).unwrap();
    let c = engine.submit(&req("c")).unwrap();
    for h in [&a, &b, &c] {
        h.wait().unwrap();
    }
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["a", "c"], vec!["b"]]);
}

#[test]
fn the_batch_budget_counts_images_not_requests() {
    let (engine, recorder) = engine(batching(4, 300));
    let three = GenerationRequest { num_outputs_per_prompt: Some(3), ..req("three") };
    let handles = [engine.submit(&three).unwrap(), engine.submit(&three).unwrap(), engine.submit(&req("one")).unwrap()];
    for h in &handles {
        h.wait().unwrap();
    }
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["three", "one"], vec!["three"]]);
}

#[test]
fn invalid_requests_are_rejected_at_submit() {
    let (engine, recorder) = engine(batching(1, 0));
    let err = engine.submit(&GenerationRequest { num_inference_steps: Some(0), ..req("a") }).unwrap_err();
    assert!(matches!(err, SubmitError::Invalid(ref v) if v.field == "num_inference_steps"), "{err:?}");
    assert!(recorder.batches.lock().unwrap().is_empty());
}

#[test]
fn a_full_queue_refuses_new_requests() {
    let config = BatchingConfig { max_queue_size: 2, max_batch_size: 1, batch_delay: Duration::ZERO };
    let (engine, _) = engine(config);
    // The first slow request occupies the worker; two more fill the queue.
    let running = engine.submit(&GenerationRequest { num_inference_steps: Some(20), ..req("slow") }).unwrap();
    while !matches!(running.events().recv().unwrap(), Event::Started { .. }) {}
    let queued = [engine.submit(&req("q1")).unwrap(), engine.submit(&req("q2")).unwrap()];
    assert_eq!(engine.submit(&req("q3")).unwrap_err(), SubmitError::QueueFull { capacity: 2 });
    assert_eq!(engine.queue().depth(), 2);
    running.cancel();
    for h in &queued {
        h.wait().unwrap();
    }
}

#[test]
fn a_failing_request_does_not_fail_its_batch_neighbours() {
    let (engine, recorder) = engine(batching(3, 500));
    let handles = [
        engine.submit(&req("ok1")).unwrap(),
        engine.submit(&req("fail")).unwrap(),
        engine.submit(&req("ok2")).unwrap(),
    ];
    assert!(handles[0].wait().is_ok());
    assert!(matches!(handles[1].wait(), Err(GenerationError::Execution(_))));
    assert!(handles[2].wait().is_ok());
    let batches = recorder.batches.lock().unwrap().clone();
    assert_eq!(batches, vec![vec!["ok1", "fail", "ok2"], vec!["ok1"], vec!["fail"], vec!["ok2"]]);
}

#[test]
fn a_cancelled_queued_request_never_runs() {
    let (engine, recorder) = engine(batching(1, 0));
    let running = engine.submit(&GenerationRequest { num_inference_steps: Some(10), ..req("slow") }).unwrap();
    let queued = engine.submit(&req("never")).unwrap();
    queued.cancel();
    assert_eq!(queued.wait(), Err(GenerationError::Cancelled));
    running.wait().unwrap();
    assert!(recorder.batches.lock().unwrap().iter().all(|b| !b.contains(&"never".to_string())));
}

#[test]
fn a_cancelled_running_request_stops_between_steps_and_spares_its_neighbour() {
    let (engine, _) = engine(batching(2, 500));
    let slow = GenerationRequest { num_inference_steps: Some(40), ..req("slow") };
    let victim = engine.submit(&slow).unwrap();
    let neighbour = engine.submit(&slow).unwrap();
    // Cancel after the first progress event: the request is running.
    loop {
        if let Event::Progress { .. } = victim.events().recv().unwrap() {
            break;
        }
    }
    victim.cancel();
    assert_eq!(victim.wait(), Err(GenerationError::Cancelled));
    assert!(neighbour.wait().is_ok());
}

#[test]
fn progress_events_arrive_in_order_before_the_result() {
    let (engine, _) = engine(batching(1, 0));
    let handle = engine.submit(&GenerationRequest { num_inference_steps: Some(3), ..req("a") }).unwrap();
    let mut seen = Vec::new();
    loop {
        match handle.events().recv().unwrap() {
            Event::Started { batch_size } => seen.push(format!("start{batch_size}")),
            Event::Progress { step, total } => seen.push(format!("{step}/{total}")),
            Event::Finished(result) => {
                assert!(result.is_ok());
                break;
            }
        }
    }
    assert_eq!(seen, ["start1", "1/3", "2/3", "3/3"]);
}

#[test]
fn shutdown_drains_the_queue_and_refuses_new_work() {
    let (engine, _) = engine(batching(1, 0));
    let handles: Vec<_> = (0..3).map(|i| engine.submit(&req(&format!("p{i}"))).unwrap()).collect();
    engine.shutdown();
    for h in &handles {
        assert!(h.wait().is_ok());
    }
    assert_eq!(engine.submit(&req("late")).unwrap_err(), SubmitError::ShuttingDown);
    assert!(!engine.is_alive());
}

#[test]
fn a_failed_load_is_reported_by_start() {
    let err = Engine::start::<Recorder, _>(BatchingConfig::default(), || {
        Err(ExecError::new(sgl_scheduler::ExecErrorKind::Load, "no such model"))
    })
    .unwrap_err();
    assert_eq!(err.message, "no such model");
}
