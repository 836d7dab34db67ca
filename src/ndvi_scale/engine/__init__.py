"""The read-and-composite engine: grid, asset specs, reader, I/O pool, per-chunk task and graph.

``grid`` (the output grid) -> ``sources`` (asset specs) -> ``graph`` (one task per period and chunk) -> ``task``
(reads through ``fetch``'s I/O pool and ``reader``, folds with :mod:`ndvi_scale.kernel`, reduces with
:mod:`ndvi_scale.reducers`; ``warm`` holds the first reads of the chunks about to start). ``handles`` and ``tiles``
are the process-wide caches the reader shares between tasks.
"""
