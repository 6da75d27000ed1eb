"""One module per merging method; each declares its :class:`~model_merging_methods.registry.MergeMethod` and
registers it on import (:data:`model_merging_methods.registry.METHOD_MODULES` lists them in order)."""
