"""The parts of a Recorder, one job each: `watch` (the parameter set and skipped steps), `snapshot` (the copy
of a state, on the CPU or the GPU), `writer` (encoding into chunks, the flush clock, writes and fsync),
`rates` (measures the recorder's rates and says, once, when recording slows training), `sharding` (which
bytes a rank records under DDP/FSDP2, and the collective start-up). Ctrl-C is held by `replay.interrupts`."""
