"""Running on real machines: the compute dtype a machine runs fastest (`compute_dtype`: `model.dtype: auto`),
joining a multi-host job (`distributed`), preemption (`preemption`), what a run logs and
shows (`metrics_log`: metrics.jsonl, TensorBoard, every command's progress display), summing a jitted reducer over
batches (`batch_sums`), report figures (`figures`), what a step costs (`flops`), whether a run fits a TPU slice
before it is launched (`compile_check`), checksums that prove what is read back is what was written (`checksums`),
one writer per workdir (`workdir_lock`), the XLA settings and the host allocator analogjax's own processes start
with (`xla_flags`, `huge_pages`), and where files live: a local folder or a gs:// or s3:// bucket (`storage`)."""
