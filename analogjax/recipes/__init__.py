"""Recipes built on the library, outside its core: the demo (`demo`: a real teacher distilled on an embedded corpus,
end to end to a release bundle) and its sample continuations (`demo_samples`)."""
