#![no_std]
//! Library target so cargo can see the crate; the programs are in the binary.
