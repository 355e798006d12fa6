"""The parts of a Recorder, one job each: `guard` (Ctrl-C held while a state is recorded), `watch` (the
parameter set and skipped steps), `snapshot` (the copy of a state, on the CPU or the GPU), `writer`
(encoding into chunks, the flush clock, writes and fsync), `pacer` (says when recording slows training)."""
