//! The `cllm` binary: everything is in the library's [`cllm::cli`].

fn main() -> std::process::ExitCode {
    cllm::cli::main()
}
