"""One module per merging method; each declares its :class:`~model_merging_methods.registry.MergeMethod` and
registers it on import. The registry imports every module of this package, so adding a method is adding a module."""
