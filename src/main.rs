use std::process::ExitCode;

// glibc's malloc showed as ~20% of the gateway's CPU under load, much of it arena lock waits
// between the runtime's worker threads; mimalloc's per-thread heaps remove both.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    buffergate::cli::main().await
}
