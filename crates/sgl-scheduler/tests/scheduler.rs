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
    BatchExecutor, BatchItem, BatchProgress, BatchingConfig, Engine, Event, ExecError, ExecErrorKind, GenerationError,
    ItemOutcome, RequestBudget, SubmitError, SubmitOptions,
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
            max_side: 4096,
            max_pixels: 1 << 22,
            max_frames: 1,
            frame_rule: FrameRule::Single,
            max_sequence_length: 512,
            max_steps: 1000,
            token_size: 16,
            frames_per_latent: 1,
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
            size_from_inputs: None,
        },
        guidance: GuidanceMode::EmbeddedWithTrueCfg,
        supports_flow_shift: false,
        supports_guidance_scale_2: false,
        output: OutputKind::Image,
        image_input: ImageInput::None,
        max_input_images: 1,
        last_image_input: ImageInput::None,
        extra_batch_key_fields: vec![],
        max_batch_requests: None,
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
        if batch.iter().any(|i| i.request.prompt.contains("device")) {
            return Err(ExecError::new(ExecErrorKind::DeviceFailed, "CUDA error: an illegal memory access"));
        }
        if batch.iter().any(|i| i.request.prompt.contains("hang")) {
            // No progress for a while, as a stuck kernel or a long decode looks from outside.
            std::thread::sleep(Duration::from_millis(800));
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

    /// Records the command as a batch of its own (`["control:<command>"]`) and echoes it back.
    fn control(&mut self, command: &str) -> Result<String, ExecError> {
        self.batches.lock().unwrap().push(vec![format!("control:{command}")]);
        if command == "refuse" {
            return Err(ExecError::new(ExecErrorKind::InvalidInput { field: Some("x".into()) }, "no"));
        }
        Ok(format!("done {command}"))
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
    BatchingConfig {
        max_queue_size: 64,
        max_batch_size,
        batch_delay: Duration::from_millis(delay_ms),
        ..BatchingConfig::default()
    }
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
fn a_pipeline_that_runs_one_request_at_a_time_gets_batches_of_one_without_delay() {
    let recorder = Recorder::default();
    let for_worker = recorder.clone();
    let one_at_a_time = PipelineInfo { max_batch_requests: Some(1), ..info() };
    let engine = Engine::start(batching(8, 60_000), move || Ok((for_worker, one_at_a_time))).unwrap();
    let start = Instant::now();
    let handles: Vec<_> = ["a", "b", "c"].iter().map(|p| engine.submit(&req(p)).unwrap()).collect();
    for handle in &handles {
        assert_eq!(handle.wait().unwrap().metadata.batch_size, 1);
    }
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["a"], vec!["b"], vec!["c"]]);
    // A batch that is full at one request waits for no company (the delay is a minute).
    assert!(start.elapsed() < Duration::from_secs(10));
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
    let config = BatchingConfig { max_queue_size: 2, ..BatchingConfig::default() };
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

// --- admission by cost ---------------------------------------------------------------------------

#[test]
fn the_default_budget_is_ten_requests_at_the_model_defaults() {
    let (engine, recorder) = engine(batching(1, 0));
    // Defaults: 32x32 (2x2 tokens of 16 px), 4 steps, no CFG: 16 token-steps and 1024 pixels; the
    // budget is ten times both.
    assert_eq!(engine.budget(), RequestBudget { token_steps: 160, pixels: 10_240 });
    let ten = GenerationRequest { num_outputs_per_prompt: Some(10), ..req("ten") };
    engine.submit(&ten).unwrap().wait().unwrap();
    let costly = GenerationRequest { num_outputs_per_prompt: Some(10), num_inference_steps: Some(5), ..req("costly") };
    let err = engine.submit(&costly).unwrap_err();
    match &err {
        SubmitError::OverBudget { cost, budget } => assert_eq!((cost.token_steps(), budget.token_steps), (200, 160)),
        other => panic!("expected OverBudget, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("200 token-steps") && message.contains("160") && message.contains("--max-request-cost"));
    assert!(!message.contains("--max-request-pixels"), "{message}");
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["ten"]]);
}

#[test]
fn the_default_pixel_budget_refuses_many_large_outputs_in_few_steps() {
    let (engine, recorder) = engine(batching(1, 0));
    // 10 outputs of 64x64 in 1 step: 160 token-steps (within budget) but 40 960 pixels, 4 times
    // the default outputs' 10 240.
    let wide = GenerationRequest {
        num_outputs_per_prompt: Some(10),
        width: Some(64),
        height: Some(64),
        num_inference_steps: Some(1),
        ..req("wide")
    };
    let err = engine.submit(&wide).unwrap_err();
    assert!(matches!(&err, SubmitError::OverBudget { cost, .. } if cost.pixels() == 40_960), "{err:?}");
    assert_eq!(
        err.to_string(),
        "this request asks for 40960 output pixels (10 outputs × 64×64 pixels × 1 frames), over the budget of 10240 \
         output pixels per request (--max-request-pixels); ask for fewer outputs, steps, frames or pixels"
    );
    // Over both: the message names both limits.
    let both = GenerationRequest { num_inference_steps: Some(2), ..wide.clone() };
    let message = engine.submit(&both).unwrap_err().to_string();
    assert!(message.contains("320 token-steps") && message.contains("(--max-request-cost) and asks for"), "{message}");
    assert!(message.contains("40960 output pixels") && message.contains("--max-request-pixels"), "{message}");
    // At the budget exactly: admitted.
    let at_budget = GenerationRequest { num_outputs_per_prompt: Some(2), ..wide };
    engine.submit(&at_budget).unwrap().wait().unwrap();
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["wide"]]);
}

#[test]
fn an_explicit_budget_replaces_the_default() {
    let config = BatchingConfig { max_request_cost: Some(16_000), max_request_pixels: Some(4 << 20), ..batching(1, 0) };
    let (engine, _) = engine(config);
    assert_eq!(engine.budget(), RequestBudget { token_steps: 16_000, pixels: 4 << 20 });
    // 10 outputs of 1024x1024 (4096 tokens) for 1 step: 40 960 token-steps and 10 Mi pixels.
    let big = GenerationRequest {
        num_outputs_per_prompt: Some(10),
        width: Some(1024),
        height: Some(1024),
        num_inference_steps: Some(1),
        ..req("big")
    };
    assert!(matches!(engine.submit(&big), Err(SubmitError::OverBudget { .. })));
    // 3 are 12 288 token-steps and 3 Mi pixels: admitted; 4 are 16 384 token-steps (over) and 4 Mi
    // pixels (at the budget): refused for their cost only; 10 of 512x512 are 10 240 token-steps and
    // 2.5 Mi pixels: admitted.
    assert!(engine.submit(&GenerationRequest { num_outputs_per_prompt: Some(3), ..big.clone() }).is_ok());
    let err = engine.submit(&GenerationRequest { num_outputs_per_prompt: Some(4), ..big.clone() }).unwrap_err();
    assert!(err.to_string().contains("--max-request-cost") && !err.to_string().contains("--max-request-pixels"));
    let small = GenerationRequest { width: Some(512), height: Some(512), ..big };
    assert!(engine.submit(&small).is_ok());
}

#[test]
fn an_explicit_pixel_budget_replaces_the_default() {
    let (engine, _) = engine(BatchingConfig { max_request_pixels: Some(5_000), ..batching(1, 0) });
    assert_eq!(engine.budget(), RequestBudget { token_steps: 160, pixels: 5_000 });
    let one = GenerationRequest { width: Some(64), height: Some(64), num_inference_steps: Some(1), ..req("one") };
    assert!(engine.submit(&one).is_ok());
    let err = engine.submit(&GenerationRequest { num_outputs_per_prompt: Some(2), ..one }).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("8192 output pixels") && message.contains("budget of 5000 output pixels"), "{message}");
}

// --- deadlines ------------------------------------------------------------------------------------

fn deadline_error(result: Result<GenerationOutput, GenerationError>) -> Duration {
    match result {
        Err(GenerationError::DeadlineExceeded { timeout }) => timeout,
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
}

#[test]
fn a_running_request_past_its_deadline_stops_between_steps() {
    let (engine, _) = engine(batching(1, 0));
    let start = Instant::now();
    // 40 slow steps of 50 ms would take 2 s; the deadline stops it after ~0.3 s.
    let slow = GenerationRequest { num_inference_steps: Some(40), timeout_seconds: Some(0.3), ..req("slow") };
    let handle = engine.submit(&slow).unwrap();
    assert_eq!(deadline_error(handle.wait()), Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    // The engine is free again.
    engine.submit(&req("after")).unwrap().wait().unwrap();
}

#[test]
fn a_queued_request_past_its_deadline_is_answered_while_the_worker_is_busy() {
    let (engine, recorder) = engine(batching(1, 0));
    let running = engine.submit(&GenerationRequest { num_inference_steps: Some(40), ..req("slow") }).unwrap();
    while !matches!(running.events().recv().unwrap(), Event::Started { .. }) {}
    let start = Instant::now();
    let queued = engine.submit(&GenerationRequest { timeout_seconds: Some(0.2), ..req("never") }).unwrap();
    deadline_error(queued.wait());
    // Answered at its deadline, long before the 2 s running request ends.
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    assert_eq!(engine.queue().depth(), 0);
    running.wait().unwrap();
    assert!(recorder.batches.lock().unwrap().iter().all(|b| !b.contains(&"never".to_string())));
}

#[test]
fn the_engine_timeout_is_the_default_and_the_most_a_request_gets() {
    let config = BatchingConfig { request_timeout: Some(Duration::from_millis(200)), ..batching(1, 0) };
    let (engine, _) = engine(config);
    let slow = GenerationRequest { num_inference_steps: Some(40), ..req("slow") };
    assert_eq!(deadline_error(engine.submit(&slow).unwrap().wait()), Duration::from_millis(200));
    let longer = GenerationRequest { timeout_seconds: Some(60.0), ..slow.clone() };
    assert_eq!(deadline_error(engine.submit(&longer).unwrap().wait()), Duration::from_millis(200));
    let shorter = GenerationRequest { timeout_seconds: Some(0.1), ..slow };
    assert_eq!(deadline_error(engine.submit(&shorter).unwrap().wait()), Duration::from_millis(100));
}

#[test]
fn a_cancel_after_the_deadline_still_reports_the_deadline() {
    let (engine, _) = engine(batching(1, 0));
    let handle = engine
        .submit(&GenerationRequest { num_inference_steps: Some(40), timeout_seconds: Some(0.1), ..req("slow") })
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    handle.cancel();
    deadline_error(handle.wait());
}

// --- health signals -------------------------------------------------------------------------------

#[test]
fn a_batch_without_progress_reads_as_stalled_and_recovers() {
    let (engine, _) = engine(batching(1, 0));
    assert_eq!(engine.stats().stalled_for(), None);
    assert_eq!(engine.stats().since_last_success(), None);
    let handle = engine.submit(&GenerationRequest { num_inference_steps: Some(2), ..req("hang") }).unwrap();
    while !matches!(handle.events().recv().unwrap(), Event::Started { .. }) {}
    std::thread::sleep(Duration::from_millis(400));
    assert!(engine.stats().is_busy());
    assert!(engine.stats().stalled_for().unwrap() >= Duration::from_millis(300));
    handle.wait().unwrap();
    assert_eq!(engine.stats().stalled_for(), None);
    assert!(engine.stats().since_last_success().unwrap() < Duration::from_secs(5));
}

#[test]
fn steps_count_as_progress() {
    let (engine, _) = engine(batching(1, 0));
    let handle = engine.submit(&GenerationRequest { num_inference_steps: Some(30), ..req("slow") }).unwrap();
    for _ in 0..10 {
        while !matches!(handle.events().recv().unwrap(), Event::Progress { .. }) {}
        assert!(engine.stats().stalled_for().unwrap() < Duration::from_millis(200));
    }
    handle.cancel();
}

#[test]
fn a_device_failure_is_kept_for_health() {
    let (engine, _) = engine(batching(1, 0));
    assert_eq!(engine.stats().device_failure(), None);
    let err = engine.submit(&req("device")).unwrap().wait().unwrap_err();
    assert!(matches!(err, GenerationError::Execution(ref e) if e.kind == ExecErrorKind::DeviceFailed));
    assert!(engine.stats().device_failure().unwrap().contains("illegal memory access"));
}

#[test]
fn a_priority_probe_runs_next_even_with_a_full_queue() {
    let config = BatchingConfig { max_queue_size: 1, ..BatchingConfig::default() };
    let (engine, recorder) = engine(config);
    let running = engine.submit(&GenerationRequest { num_inference_steps: Some(10), ..req("slow") }).unwrap();
    while !matches!(running.events().recv().unwrap(), Event::Started { .. }) {}
    let queued = engine.submit(&req("queued")).unwrap();
    assert!(matches!(engine.submit(&req("refused")), Err(SubmitError::QueueFull { .. })));
    let probe = engine.submit_with(&req("probe"), SubmitOptions { priority: true, ..Default::default() }).unwrap();
    probe.wait().unwrap();
    queued.wait().unwrap();
    running.wait().unwrap();
    assert_eq!(recorder.batches.lock().unwrap().clone(), vec![vec!["slow"], vec!["probe"], vec!["queued"]]);
}

#[test]
fn commands_run_between_batches_ahead_of_queued_requests() {
    let (engine, recorder) = engine(batching(1, 0));
    let running = engine.submit(&req("slow first")).unwrap();
    // Wait until the slow request runs, then queue another request before the command.
    while recorder.batches.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let queued = engine.submit(&req("second")).unwrap();
    assert_eq!(engine.control("swap".into()).unwrap(), "done swap");
    running.wait().unwrap();
    queued.wait().unwrap();
    let order: Vec<String> = recorder.batches.lock().unwrap().iter().map(|batch| batch.join(",")).collect();
    assert_eq!(order, ["slow first", "control:swap", "second"]);
    // The executor's refusal reaches the caller with its field.
    let err = engine.control("refuse".into()).unwrap_err();
    assert_eq!(err.kind, ExecErrorKind::InvalidInput { field: Some("x".into()) });
    engine.shutdown();
    assert!(engine.control("late".into()).is_err());
}
