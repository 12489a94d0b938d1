//! Empty library target so that the host toolchain can check this crate;
//! the program itself is the `profiler` binary built for `bpfel-unknown-none`.

#![no_std]
