use sgl_core::{PipelineInfo, RequestCost};

use crate::{BatchingConfig, SubmitError};

/// Without `--max-request-cost` / `--max-request-pixels`, a request may cost as much as this many
/// requests at the model's own defaults: OpenAI's largest `n` at the default size and steps always
/// passes, and so does any mix of size, steps and frames of the same total; a request for 10 images
/// at 2048² and 1000 steps of FLUX.1 (~21 h on a CPU) does not, nor one for 10 images at 2048² in 1
/// step (little denoising, but 42 megapixels to decode, encode and send: minutes on a CPU and a
/// 64 MB answer).
pub const DEFAULT_BUDGET_IN_DEFAULT_REQUESTS: u64 = 10;

/// The most one request may ask for, checked when it is submitted. Each limit bounds a product
/// that no single field's limit bounds: token-steps the denoising, output pixels the decoding,
/// the encoding and the size of the answer (which grow with the outputs, not with the steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBudget {
    /// Most token-steps ([`RequestCost::token_steps`], `--max-request-cost`).
    pub token_steps: u64,
    /// Most output pixels ([`RequestCost::pixels`], `--max-request-pixels`).
    pub pixels: u64,
}

impl RequestBudget {
    /// The configured limits; each one not set is [`DEFAULT_BUDGET_IN_DEFAULT_REQUESTS`] requests
    /// at the model's defaults.
    pub fn new(config: &BatchingConfig, info: &PipelineInfo) -> Self {
        let unit = info.default_request_cost();
        Self {
            token_steps: config
                .max_request_cost
                .unwrap_or_else(|| unit.token_steps().saturating_mul(DEFAULT_BUDGET_IN_DEFAULT_REQUESTS)),
            pixels: config
                .max_request_pixels
                .unwrap_or_else(|| unit.pixels().saturating_mul(DEFAULT_BUDGET_IN_DEFAULT_REQUESTS)),
        }
    }

    /// Refuses a request over either limit (naming each one it is over).
    pub fn admit(&self, cost: RequestCost) -> Result<(), SubmitError> {
        if cost.token_steps() > self.token_steps || cost.pixels() > self.pixels {
            return Err(SubmitError::OverBudget { cost, budget: *self });
        }
        Ok(())
    }

    /// What `cost` is over, as the error message says it: each limit it passes, with its formula and
    /// the option that sets the limit.
    pub(crate) fn overruns(&self, cost: &RequestCost) -> String {
        let mut over = Vec::new();
        if cost.token_steps() > self.token_steps {
            over.push(format!(
                "costs {}, over the budget of {} token-steps per request (--max-request-cost)",
                cost.describe_token_steps(),
                self.token_steps
            ));
        }
        if cost.pixels() > self.pixels {
            over.push(format!(
                "asks for {}, over the budget of {} output pixels per request (--max-request-pixels)",
                cost.describe_pixels(),
                self.pixels
            ));
        }
        format!("this request {}", over.join(" and "))
    }
}
