//! The output size of a request that gives none but carries input images, for pipelines that declare
//! an [`InputSizeRule`]:
//!
//! * `LastInputAspectAtArea`: the last input image's aspect ratio at that pixel area (diffusers'
//!   `calculate_dimensions(target_area, ratio)` of the Qwen-Image editing pipelines, to the bit: Python's
//!   `round` is round-half-to-even);
//! * `FirstInputWithinArea`: the first input image's own size, shrunk to at most that area at its aspect
//!   ratio, floored to the size multiple (diffusers' FLUX.2 pipelines: `_resize_to_target_area`, then
//!   `// 16 * 16`);
//! * `FirstInputNearestBucket`: of the pipeline's size buckets, the one whose height / width ratio is
//!   nearest the first input image's, from the side that keeps the output no more elongated than the image
//!   (diffusers' HunyuanVideo-1.5 image-to-video: `get_closest_ratio` over its `target_size` buckets).
//!
//! Either way a request served here gets the size the reference pipeline would pick for the same images.

use crate::{InputSizeRule, PipelineInfo, SizeBucket, ValidationError};

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

/// The bucket whose `ratio` (height / width) is nearest the image's, among those on the side of it the
/// reference keeps: ratios at or under the image's for an image at least as tall as wide, at or over it
/// otherwise. Ties go to the first bucket, as Python's `min` does. `None` only without such a bucket.
pub fn nearest_bucket(buckets: &[SizeBucket], (width, height): (u32, u32)) -> Option<(u32, u32)> {
    let aspect = f64::from(height) / f64::from(width);
    let kept = |diff: f64| if aspect >= 1.0 { diff <= 0.0 } else { diff >= 0.0 };
    buckets
        .iter()
        .filter(|bucket| kept(bucket.ratio - aspect))
        .min_by(|a, b| (a.ratio - aspect).abs().total_cmp(&(b.ratio - aspect).abs()))
        .map(|bucket| (bucket.width, bucket.height))
}

/// The output size a request that gives neither width nor height gets from its input images, where
/// the pipeline sizes outputs that way; `None` where the model's default size holds.
pub fn size_from_inputs(info: &PipelineInfo, image_paths: &[String]) -> Result<Option<(u32, u32)>, ValidationError> {
    let (Some(rule), Some(first), Some(last)) =
        (&info.defaults.size_from_inputs, image_paths.first(), image_paths.last())
    else {
        return Ok(None);
    };
    let multiple = info.limits.size_multiple;
    Ok(match rule {
        InputSizeRule::LastInputAspectAtArea { area } => {
            let (width, height) = image_dimensions(last)?;
            Some(size_for_area(*area, f64::from(width) / f64::from(height), multiple))
        }
        InputSizeRule::FirstInputWithinArea { max_area } => {
            Some(size_within_area(image_dimensions(first)?, *max_area, multiple))
        }
        InputSizeRule::FirstInputNearestBucket { buckets } => nearest_bucket(buckets, image_dimensions(first)?),
    })
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

    /// diffusers' HunyuanVideo-1.5 buckets for `target_size` 64 at patch 16 (16 patches), as
    /// `pipelines/hunyuan_video15.py` exports them: (width, height, round(height / width, 5)).
    fn hunyuan_buckets() -> Vec<SizeBucket> {
        [(32, 128), (32, 112), (32, 96), (32, 80), (48, 80), (48, 64), (64, 64), (64, 48), (80, 48), (80, 32), (96, 32)]
            .into_iter()
            .chain([(112, 32), (128, 32)])
            .map(|(width, height): (u32, u32)| {
                // Exact here: these ratios have at most 5 decimals or round away from a tie.
                let ratio = (f64::from(height) / f64::from(width) * 1e5).round() / 1e5;
                SizeBucket { width, height, ratio }
            })
            .collect()
    }

    #[test]
    fn the_nearest_bucket_is_taken_from_the_images_side() {
        // The sizes diffusers' `calculate_default_height_width(h, w, 64)` returns for these images.
        let buckets = hunyuan_buckets();
        // Landscape 100x60 (ratio 0.6): 48/80 = 0.6 exactly.
        assert_eq!(nearest_bucket(&buckets, (100, 60)), Some((80, 48)));
        // 16:9 (0.5625): at or over it, 0.6 is the nearest (0.4 under it is not on the kept side).
        assert_eq!(nearest_bucket(&buckets, (1280, 720)), Some((80, 48)));
        // Portrait 40x90 (2.25): at or under it, 80/48 = 1.66667 beats 1.33333 (and 2.5 is over it).
        assert_eq!(nearest_bucket(&buckets, (40, 90)), Some((48, 80)));
        assert_eq!(nearest_bucket(&buckets, (500, 500)), Some((64, 64)));
        // Beyond the buckets' 4:1 either way: the most elongated bucket.
        assert_eq!(nearest_bucket(&buckets, (10, 1000)), Some((32, 128)));
        assert_eq!(nearest_bucket(&buckets, (1000, 10)), Some((128, 32)));
        assert_eq!(nearest_bucket(&[], (10, 10)), None);
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
