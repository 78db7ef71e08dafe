//! The output size of a request that gives none but carries input images, for pipelines that declare
//! `SamplingDefaults::size_from_input_area`: the last input image's aspect ratio at that pixel area.
//!
//! The arithmetic is diffusers' `calculate_dimensions(target_area, ratio)` of the image-editing
//! pipelines, to the bit (Python's `round` is round-half-to-even), so a request served here gets the
//! size the reference pipeline would pick for the same image.

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

/// The output size a request that gives neither width nor height gets from its input images, where
/// the pipeline sizes outputs that way; `None` where the model's default size holds.
pub fn size_from_inputs(info: &PipelineInfo, image_paths: &[String]) -> Result<Option<(u32, u32)>, ValidationError> {
    let (Some(area), Some(last)) = (info.defaults.size_from_input_area, image_paths.last()) else {
        return Ok(None);
    };
    let (width, height) = image_dimensions(last)?;
    Ok(Some(size_for_area(area, f64::from(width) / f64::from(height), info.limits.size_multiple)))
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
