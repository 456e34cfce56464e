"""Recipes built on the library, outside its core: the demo (`demo`: a real teacher distilled on an embedded corpus,
end to end to a release bundle), its sample continuations (`demo_samples`) and its teachers (`demo_teacher`: their
names and where the real one comes from, light enough for `analogjax demo --help`)."""
