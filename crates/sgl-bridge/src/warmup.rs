//! `--warmup`: one short generation before the first request. With torch.compile the first forward
//! of a shape compiles (tens of seconds for a large DiT); doing it at load time keeps that out of the
//! first user's latency, and settles cuDNN's algorithm choices and the CUDA caching allocator.
//!
//! The warm-up request is a real request, resolved by the core like every other one: the model's
//! defaults (guidance, true CFG with its default negative prompt, frames) with few steps. So it runs
//! the branches a default request runs, by the one rule that decides them.

use std::path::{Path, PathBuf};

use sgl_core::{GenerationRequest, ImageInput, OutputFormat, PipelineInfo, ResolvedRequest, ValidationError};

/// Denoising steps of the warm-up run: enough to run every compiled graph (the step function is the
/// same each step).
pub const WARMUP_STEPS: u32 = 2;

/// The warm-up request at the model's defaults; `image` is its input image for models that need one.
pub fn warmup_request(info: &PipelineInfo, image: Option<&Path>) -> Result<ResolvedRequest, ValidationError> {
    let request = GenerationRequest {
        prompt: "warm-up".into(),
        num_inference_steps: Some(WARMUP_STEPS.min(info.limits.max_steps)),
        seed: Some(0),
        // Exact arrays: nothing is encoded that no one will read.
        output_format: Some(OutputFormat::Npy),
        image_path: image.map(|path| path.to_string_lossy().into_owned()),
        // A checkpoint that needs a last frame gets the same grey frame (the shapes are what warm up).
        last_image_path: image
            .filter(|_| info.last_image_input == ImageInput::Required)
            .map(|path| path.to_string_lossy().into_owned()),
        ..Default::default()
    };
    ResolvedRequest::resolve(&request, info)
}

/// The input image of a warm-up run (a flat grey frame of the default size), removed when dropped.
pub struct WarmupImage {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl WarmupImage {
    /// An image when the model requires one (image-to-video), else `None`.
    pub fn for_model(info: &PipelineInfo) -> std::io::Result<Option<Self>> {
        if info.image_input != ImageInput::Required {
            return Ok(None);
        }
        let dir = tempfile::Builder::new().prefix("sgl-warmup-").tempdir()?;
        let path = dir.path().join("warmup.png");
        std::fs::write(&path, grey_png(info.defaults.width, info.defaults.height))?;
        Ok(Some(Self { _dir: dir, path }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A flat grey 8-bit RGB PNG. Its pixel data goes into stored (uncompressed) deflate blocks, so no
/// compressor is needed: the file is read once, right away.
pub fn grey_png(width: u32, height: u32) -> Vec<u8> {
    let row = 3 * width as usize;
    let mut pixels = Vec::with_capacity((row + 1) * height as usize);
    for _ in 0..height {
        pixels.push(0); // filter type: none
        pixels.resize(pixels.len() + row, 128);
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if pixels.is_empty() { vec![&[]] } else { pixels.chunks(usize::from(u16::MAX)).collect() };
    for (index, block) in blocks.iter().enumerate() {
        let last = index + 1 == blocks.len();
        // A chunk of at most u16::MAX bytes: its length fits.
        let length = u16::try_from(block.len()).unwrap_or(u16::MAX);
        zlib.push(u8::from(last));
        zlib.extend(length.to_le_bytes());
        zlib.extend((!length).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    zlib.extend(adler32(&pixels).to_be_bytes());
    let mut header = Vec::with_capacity(13);
    header.extend(width.to_be_bytes());
    header.extend(height.to_be_bytes());
    header.extend([8, 2, 0, 0, 0]); // 8 bits per channel, RGB, deflate, no filter method, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", header.as_slice()), (b"IDAT", zlib.as_slice()), (b"IEND", &[])] {
        png.extend(u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
        png.extend(kind);
        png.extend_from_slice(data);
        png.extend(crc32(kind.iter().chain(data)).to_be_bytes());
    }
    png
}

fn crc32<'a>(bytes: impl Iterator<Item = &'a u8>) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { 0xEDB8_8320 ^ (crc >> 1) } else { crc >> 1 };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in bytes {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use sgl_core::{FrameRule, GuidanceMode, OutputKind, PipelineLimits, SamplingDefaults};

    use super::*;

    fn info(guidance: GuidanceMode, defaults: SamplingDefaults) -> PipelineInfo {
        PipelineInfo {
            model_path: "/m".into(),
            hf_id: None,
            pipeline_class: "TestPipeline".into(),
            family: "test".into(),
            task: "text-to-image".into(),
            device: "cpu".into(),
            dit_precision: "fp32".into(),
            vae_precision: "fp32".into(),
            attention_backend: "torch_sdpa".into(),
            limits: PipelineLimits {
                size_multiple: 16,
                min_size: 16,
                max_side: 4096,
                max_pixels: 4096 * 4096,
                max_frames: 1,
                frame_rule: FrameRule::Single,
                max_sequence_length: 512,
                max_steps: 1000,
                token_size: 16,
                frames_per_latent: 1,
            },
            defaults,
            guidance,
            supports_flow_shift: false,
            supports_guidance_scale_2: false,
            output: OutputKind::Image,
            image_input: ImageInput::None,
            max_input_images: 1,
            last_image_input: ImageInput::None,
            extra_batch_key_fields: Vec::new(),
            max_batch_requests: None,
        }
    }

    fn defaults(guidance_scale: f64, true_cfg_scale: f64, negative_prompt: Option<&str>) -> SamplingDefaults {
        SamplingDefaults {
            width: 64,
            height: 48,
            num_frames: 1,
            num_inference_steps: 28,
            guidance_scale,
            true_cfg_scale,
            max_sequence_length: 512,
            negative_prompt: negative_prompt.map(str::to_string),
            flow_shift: None,
            fps: None,
            guidance_scale_2: None,
            size_from_inputs: None,
        }
    }

    #[test]
    fn the_warm_up_runs_the_guidance_branches_of_a_default_request() {
        // FLUX.1-dev: embedded guidance, no true CFG by default.
        let flux = info(GuidanceMode::EmbeddedWithTrueCfg, defaults(3.5, 1.0, None));
        let request = warmup_request(&flux, None).unwrap();
        assert!(!request.cfg_enabled);
        assert_eq!((request.num_inference_steps, request.width, request.height), (WARMUP_STEPS, 64, 48));
        // Qwen-Image: true CFG on by default, against the default negative prompt " ".
        let qwen = info(GuidanceMode::TrueCfg, defaults(1.0, 4.0, Some(" ")));
        let request = warmup_request(&qwen, None).unwrap();
        assert!(request.cfg_enabled);
        assert_eq!(request.negative_prompt.as_deref(), Some(" "));
        // Wan: classifier-free guidance above 1.
        let wan = info(GuidanceMode::ClassifierFree, defaults(5.0, 1.0, None));
        assert!(warmup_request(&wan, None).unwrap().cfg_enabled);
    }

    #[test]
    fn image_models_get_a_grey_input_image_of_the_default_size() {
        let mut i2v = info(GuidanceMode::ClassifierFree, defaults(5.0, 1.0, None));
        assert!(warmup_request(&i2v, None).is_ok());
        i2v.image_input = ImageInput::Required;
        assert_eq!(warmup_request(&i2v, None).unwrap_err().field, "image");
        let image = WarmupImage::for_model(&i2v).unwrap().unwrap();
        let request = warmup_request(&i2v, Some(image.path())).unwrap();
        assert_eq!(request.image_path.as_deref(), image.path().to_str());
        let folder = image.path().parent().unwrap().to_path_buf();
        drop(image);
        assert!(!folder.exists());
    }

    /// The PNG's structure: chunk CRCs, the header, and stored blocks that inflate to grey rows.
    #[test]
    fn grey_png_is_a_valid_png() {
        let (width, height) = (40_000, 2); // rows longer than one stored block
        let png = grey_png(width, height);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let mut chunks = Vec::new();
        while at < png.len() {
            let length = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let (kind, data) = (&png[at + 4..at + 8], &png[at + 8..at + 8 + length]);
            let crc = u32::from_be_bytes(png[at + 8 + length..at + 12 + length].try_into().unwrap());
            assert_eq!(crc, crc32(kind.iter().chain(data)));
            chunks.push((kind.to_vec(), data.to_vec()));
            at += 12 + length;
        }
        let kinds: Vec<_> = chunks.iter().map(|(kind, _)| kind.as_slice()).collect();
        assert_eq!(kinds, [&b"IHDR"[..], b"IDAT", b"IEND"]);
        assert_eq!(&chunks[0].1[..8], [width.to_be_bytes(), height.to_be_bytes()].concat());
        let zlib = &chunks[1].1;
        let (mut at, mut pixels) = (2, Vec::new());
        loop {
            let last = zlib[at] == 1;
            let length = u16::from_le_bytes([zlib[at + 1], zlib[at + 2]]) as usize;
            pixels.extend_from_slice(&zlib[at + 5..at + 5 + length]);
            at += 5 + length;
            if last {
                break;
            }
        }
        assert_eq!(u32::from_be_bytes(zlib[at..at + 4].try_into().unwrap()), adler32(&pixels));
        let row = 1 + 3 * width as usize;
        assert_eq!(pixels.len(), row * height as usize);
        assert!(pixels.chunks(row).all(|line| line[0] == 0 && line[1..].iter().all(|&v| v == 128)));
        // Known check values of both sums.
        assert_eq!(crc32(b"123456789".iter()), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
