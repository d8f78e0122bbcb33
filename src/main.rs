use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    buffergate::cli::main().await
}
