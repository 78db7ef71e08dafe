"""What the Rust engine calls: the pipeline executor and the pieces around it."""
