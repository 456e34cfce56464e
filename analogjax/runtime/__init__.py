"""Running on real machines: joining a multi-host job (`distributed`), preemption (`preemption`), what a run logs and
shows (`metrics_log`: metrics.jsonl, TensorBoard, every command's progress display), summing a jitted reducer over
batches (`batch_sums`), report figures (`figures`), what a step costs (`flops`), and whether a run fits a TPU slice
before it is launched (`compile_check`); where files live: a local folder or a gs:// or s3:// bucket (`storage`)."""
