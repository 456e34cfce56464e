"""Running on real machines: joining a multi-host job (`distributed`), preemption (`preemption`), what a run logs
(`metrics_log`), what a step costs (`flops`), and whether a run fits a TPU slice before it is launched
(`compile_check`)."""
