//! The throughput benchmark (`throughput.rs`, same rows, same baseline) with mimalloc as the
//! global allocator of the whole binary, baseline included: what a service that sets
//! `#[global_allocator]` gets. Most of sourceflow's cost on glibc is malloc and the arena
//! lock that threads contend for when a message allocated on one worker is freed on the other.
//!
//! ```text
//! cargo bench -p sourceflow --bench throughput_mimalloc
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "throughput.rs"]
mod throughput;

fn main() {
    throughput::main()
}
