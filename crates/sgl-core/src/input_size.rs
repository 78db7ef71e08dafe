//! The output size of a request that gives none but carries input images, for pipelines that declare
//! one of two rules:
//!
//! * `SamplingDefaults::size_from_input_area`: the last input image's aspect ratio at that pixel area
//!   (diffusers' `calculate_dimensions(target_area, ratio)` of the Qwen-Image editing pipelines, to the
//!   bit: Python's `round` is round-half-to-even);
//! * `SamplingDefaults::size_from_first_input_max_area`: the first input image's own size, shrunk to at
//!   most that area at its aspect ratio, floored to the size multiple (diffusers' FLUX.2 pipelines:
//!   `_resize_to_target_area`, then `// 16 * 16`).
//!
//! Either way a request served here gets the size the reference pipeline would pick for the same images.

use crate::{PipelineInfo, ValidationError};

/// Width and height for `area` pixels at `ratio` (width / height): each side rounded to a multiple of
/// 32 as diffusers rounds it, then floored to the pipeline's `size_multiple`.
pub fn size_for_area(area: u64, ratio: f64, size_multiple: u32) -> (u32, u32) {
    let width = (area as f64 * ratio).sqrt();
    let height = width / ratio;
    // `round(x / 32) * 32` in Python: ties go to the even multiple.
    let round32 = |side: f64| (side / 32.0).round_ties_even() * 32.0;
    let multiple = size_multiple.max(1);
    // Saturating casts: a degenerate ratio gives 0 or u32::MAX, which the size checks then refuse.
    let floor = |side: f64| side as u32 / multiple * multiple;
    (floor(round32(width)), floor(round32(height)))
}

/// Width and height of an image file, read from its header (the pixels are not decoded).
pub fn image_dimensions(path: &str) -> Result<(u32, u32), ValidationError> {
    let size = imagesize::size(path)
        .map_err(|err| ValidationError::new("image", format!("cannot read the size of input image {path:?}: {err}")))?;
    match (u32::try_from(size.width), u32::try_from(size.height)) {
        (Ok(width), Ok(height)) if width > 0 && height > 0 => Ok((width, height)),
        _ => Err(ValidationError::new(
            "image",
            format!("input image {path:?} declares {}x{} pixels", size.width, size.height),
        )),
    }
}

/// An image's own size, scaled down to at most `max_area` pixels at its aspect ratio where it is larger
/// (each side times `sqrt(max_area / area)`, truncated, as diffusers' `int(side * scale)`), then each side
/// floored to `size_multiple`.
pub fn size_within_area((width, height): (u32, u32), max_area: u64, size_multiple: u32) -> (u32, u32) {
    let pixels = u64::from(width) * u64::from(height);
    let (width, height) = if pixels > max_area {
        let scale = (max_area as f64 / (f64::from(width) * f64::from(height))).sqrt();
        // Saturating casts of positive finite values: truncation, as Python's int().
        ((f64::from(width) * scale) as u32, (f64::from(height) * scale) as u32)
    } else {
        (width, height)
    };
    let multiple = size_multiple.max(1);
    (width / multiple * multiple, height / multiple * multiple)
}

/// The output size a request that gives neither width nor height gets from its input images, where
/// the pipeline sizes outputs that way; `None` where the model's default size holds.
pub fn size_from_inputs(info: &PipelineInfo, image_paths: &[String]) -> Result<Option<(u32, u32)>, ValidationError> {
    let defaults = &info.defaults;
    if let (Some(area), Some(last)) = (defaults.size_from_input_area, image_paths.last()) {
        let (width, height) = image_dimensions(last)?;
        return Ok(Some(size_for_area(area, f64::from(width) / f64::from(height), info.limits.size_multiple)));
    }
    if let (Some(max_area), Some(first)) = (defaults.size_from_first_input_max_area, image_paths.first()) {
        return Ok(Some(size_within_area(image_dimensions(first)?, max_area, info.limits.size_multiple)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEGAPIXEL: u64 = 1024 * 1024;

    #[test]
    fn sizes_follow_the_aspect_ratio_at_the_area() {
        // The values diffusers' calculate_dimensions(1024 * 1024, w / h) returns.
        assert_eq!(size_for_area(MEGAPIXEL, 1.0, 16), (1024, 1024));
        assert_eq!(size_for_area(MEGAPIXEL, 1536.0 / 1024.0, 16), (1248, 832));
        assert_eq!(size_for_area(MEGAPIXEL, 720.0 / 1280.0, 16), (768, 1376));
    }

    #[test]
    fn halves_round_to_even_as_python_does() {
        // 528 / 32 = 16.5 rounds to 16 (not 17); 560 / 32 = 17.5 rounds to 18.
        assert_eq!(size_for_area(528 * 528, 1.0, 16), (512, 512));
        assert_eq!(size_for_area(560 * 560, 1.0, 16), (576, 576));
    }

    #[test]
    fn sides_are_floored_to_the_size_multiple() {
        // 1248 is a multiple of 32 but not of 64.
        assert_eq!(size_for_area(MEGAPIXEL, 1.5, 64), (1216, 832));
    }

    #[test]
    fn first_input_sizes_are_shrunk_to_the_area_and_floored() {
        // What diffusers' Flux2Pipeline picks: the image's own size under 1 MP, floored to 16 ...
        assert_eq!(size_within_area((120, 80), MEGAPIXEL, 16), (112, 80));
        assert_eq!(size_within_area((1024, 1024), MEGAPIXEL, 16), (1024, 1024));
        // ... and above it, each side times sqrt(1 MP / area), truncated, then floored.
        // 1100 x 1000: scale 0.97635..., sides 1073.98 -> 1073 -> 1072 and 976.35 -> 976.
        assert_eq!(size_within_area((1100, 1000), MEGAPIXEL, 16), (1072, 976));
        // 4000 x 3000: scale 0.29560..., sides 1182.4 -> 1182 -> 1168 and 886.8 -> 886 -> 880.
        assert_eq!(size_within_area((4000, 3000), MEGAPIXEL, 16), (1168, 880));
    }

    #[test]
    fn dimensions_come_from_the_header() {
        let dir = std::env::temp_dir().join(format!("sgl-core-input-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("wide.png");
        let mut header = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        header.extend_from_slice(&1536u32.to_be_bytes());
        header.extend_from_slice(&1024u32.to_be_bytes());
        header.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        std::fs::write(&png, header).unwrap();
        assert_eq!(image_dimensions(png.to_str().unwrap()).unwrap(), (1536, 1024));
        let junk = dir.join("junk.png");
        std::fs::write(&junk, b"not an image").unwrap();
        assert_eq!(image_dimensions(junk.to_str().unwrap()).unwrap_err().field, "image");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
