//! The `prescient` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::exit::code;
use vmm::rpc::ActionError;
use vmm::runtime::Runtime;
use vmm::vmm_config::{SpecFileError, VmConfig};

/// A KVM microVM monitor that sizes its VMs ahead of demand.
#[derive(Debug, Parser)]
#[command(name = "prescient", version, about)]
struct Cli {
    /// JSON VM spec to boot at once (Firecracker's config file format).
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,

    /// Serve Firecracker's REST API on this Unix socket (with or without --config-file).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// The microVM's id, reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,

    /// Log verbosity on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn",
          value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
}

/// Prints the one line that explains a failed run and gives its exit code.
fn fail(message: impl std::fmt::Display, exit_code: i32) -> ExitCode {
    eprintln!("prescient: {message}");
    ExitCode::from(exit_code as u8)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logger::init(&cli.log_level);

    if cli.config_file.is_none() && cli.api_sock.is_none() {
        return fail(
            "nothing to boot: pass --config-file PATH and/or --api-sock PATH (see --help)",
            code::BAD_CONFIG,
        );
    }
    let config = match &cli.config_file {
        Some(path) => match VmConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => return fail(e, code::BAD_CONFIG),
        },
        None => VmConfig::default(),
    };
    let mut runtime = match Runtime::new(cli.id, config) {
        Ok(r) => r,
        Err(e) => return fail(e, code::VMM_ERROR),
    };
    // Held until the end: dropping the server removes the socket file.
    let _api = match &cli.api_sock {
        Some(path) => match vmm::api::start(path) {
            Ok((server, requests, wake)) => {
                runtime.attach_api(requests, wake);
                Some(server)
            }
            Err(e) => return fail(e, code::VMM_ERROR),
        },
        None => None,
    };
    if let Some(spec_path) = &cli.config_file {
        match runtime.start() {
            Ok(()) => {}
            Err(ActionError::InvalidConfig(e)) => {
                // Point at the field in the file the user wrote.
                let text = std::fs::read_to_string(spec_path).unwrap_or_default();
                return fail(SpecFileError::at(spec_path, &text, e), code::BAD_CONFIG);
            }
            Err(e) => return fail(e, code::VMM_ERROR),
        }
    }
    let reason = runtime.run();
    let exit_code = reason.exit_code();
    if exit_code == code::OK {
        tracing::info!("microVM ended: {reason}");
        ExitCode::SUCCESS
    } else {
        fail(reason, exit_code)
    }
}
