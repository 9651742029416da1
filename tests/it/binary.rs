//! The real binary: `validate` exit codes, `serve` with a config on loopback.
