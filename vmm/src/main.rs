//! The `prescient` binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use vmm::exit::code;
use vmm::rpc::ActionError;
use vmm::runtime::Runtime;
use vmm::vmm_config::{SpecFileError, VmConfig};

/// A KVM microVM monitor that sizes its VMs ahead of demand.
#[derive(Debug, Parser)]
#[command(
    name = "prescient",
    version = vmm::cli::VERSION_LINE,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// JSON VM spec to boot at once (Firecracker's config file format).
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,

    /// Serve Firecracker's REST API on this Unix socket. Without it, --config-file runs
    /// without an API and no arguments at all serve Firecracker's default socket
    /// (/run/firecracker.socket).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    api_sock: Option<PathBuf>,

    /// Run from the --config-file alone, without an API socket.
    #[arg(long, requires = "config_file")]
    no_api: bool,

    /// The microVM's id, reported by `GET /` (letters, digits and '-', at most 64).
    #[arg(long, default_value = "anonymous-instance")]
    id: String,

    /// Log verbosity on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn",
          value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,

    #[command(flatten)]
    logger: vmm::cli::LoggerArgs,

    /// Write Firecracker's metrics JSON lines to this file or FIFO from the start.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,

    /// Run without seccomp filters (debugging only: the VMM is then not contained).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,

    /// A compiled seccomp filter file in Firecracker's format (its seccompiler-bin output:
    /// one BPF program each for the vmm, api and vcpu threads), used instead of prescient's
    /// built-in boot filters.
    #[arg(long, value_name = "PATH")]
    seccomp_filter: Option<PathBuf>,

    /// Log the time from start to the guest's write of 123 to the boot timer device
    /// (Firecracker's: MMIO 0xc0000000, offset 0).
    #[arg(long)]
    boot_timer: bool,

    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = vmm::api::http::DEFAULT_MAX_BODY_BYTES)]
    http_api_max_payload_size: usize,

    /// Largest MMDS data store, in bytes (default: the API payload limit).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,

    /// A JSON file put into the MMDS data store at start.
    #[arg(long, value_name = "PATH")]
    metadata: Option<PathBuf>,

    #[command(flatten)]
    times: vmm::cli::ProcessTimes,

    /// Accepted for Firecracker compatibility: prescient has no PCI transport; its devices are
    /// virtio-mmio, announced on the kernel command line (a warning says so).
    #[arg(long)]
    enable_pci: bool,

    /// Print the snapshot state file format version this build writes and reads, then exit.
    #[arg(long)]
    snapshot_version: bool,

    /// Print the format version of this snapshot state file, then exit.
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<PathBuf>,

    /// The VM's cgroup directories (the jailer passes the ones it made): the predictor sets the
    /// CPU quota there, and the VMM tries to remove them when it exits.
    #[arg(long = "cgroup-dir", value_name = "DIR")]
    cgroup_dirs: Vec<PathBuf>,

    /// A workload profile (`prescient profile`) to size the VM from before boot.
    #[arg(long, value_name = "PATH", requires = "config_file")]
    profile: Option<PathBuf>,

    /// The model store the predictor of a profiled launch starts from and records into
    /// (default ~/.cache/prescient/models).
    #[arg(long, value_name = "DIR", requires = "profile")]
    model_store: Option<PathBuf>,

    /// Test hook: the first thread of this kind (vmm, api, vcpu) to install its seccomp filter
    /// makes a syscall outside it, which must kill the process with SIGSYS.
    #[arg(long, value_name = "KIND", hide = true)]
    seccomp_test_violation: Option<vmm::seccomp::ThreadKind>,

    /// Test hook: the first thread of this kind (vmm, api, vcpu) to reach a safe point under its
    /// seccomp filter panics there (the terminal must still be restored).
    #[arg(long, value_name = "KIND", hide = true)]
    test_panic: Option<vmm::seccomp::ThreadKind>,
}

/// Prints the one line that explains a failed run and gives its exit code.
fn fail(message: impl std::fmt::Display, exit_code: i32) -> ExitCode {
    eprintln!("prescient: {message}");
    ExitCode::from(exit_code as u8)
}

/// Tools that run without a VM.
// Deferred: their arguments are defined only when one is invoked (or its help shown), so that
// starting a VM does not run the definitions of every tool's arguments. Start-up code runs
// 10-100x slower where the host is itself emulated (the nested KVM host of resources/nested).
#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum Command {
    /// The resource predictor's offline tools.
    Predictor {
        #[command(subcommand)]
        command: PredictorCommand,
    },
    /// Profile a workload: static analysis of its files and a short dry run in a locked-down
    /// probe VM; writes the behaviour profile `--profile` sizes a VM from.
    Profile(vmm::profile::probe::ProfileArgs),
    /// Traces: record a real program's resource use.
    Trace {
        #[command(subcommand)]
        command: TraceCommand,
    },
    /// Render a trace (e.g. one a VM recorded to its predictor trace_path) as used vs allocated
    /// vs forecast per resource over time (SVG).
    Report(predictor_tools::report::ReportArgs),
    /// Isolate one microVM (chroot, namespaces, cgroup, uid/gid) and run the VMM with the
    /// arguments after `--` (Firecracker's jailer).
    Jail(jailer::JailArgs),
    /// Supervise many microVMs on this host with one shared budget: launch them, watch them,
    /// and grant each its share of CPU, memory and bandwidth ahead of its forecast demand.
    Host(vmm::host::HostArgs),
    /// Snapshot files (Firecracker's snapshot-editor).
    #[command(name = "snapshot-editor")]
    SnapshotEditor {
        #[command(subcommand)]
        command: SnapshotEditorCommand,
    },
    /// Train the recurrent forecaster on recorded traces (needs the `torch` build feature).
    #[cfg(feature = "torch")]
    Train(predictor_tools::train::TrainArgs),
}

#[derive(Debug, Subcommand)]
enum SnapshotEditorCommand {
    /// Memory files.
    #[command(name = "edit-memory")]
    EditMemory {
        #[command(subcommand)]
        command: EditMemoryCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EditMemoryCommand {
    /// Merge a Diff snapshot's memory file onto its base memory file, which then holds the
    /// Diff snapshot's memory (load it with the Diff snapshot's state file).
    Rebase {
        /// The base memory file (a Full snapshot's, or one already rebased), changed in place.
        #[arg(long, value_name = "PATH")]
        memory_path: PathBuf,
        /// The Diff snapshot's memory file.
        #[arg(long, value_name = "PATH")]
        diff_path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PredictorCommand {
    /// Replay traces through every forecaster and policy, and compare them with baselines.
    Eval(predictor_tools::eval::EvalArgs),
}

#[derive(Debug, Subcommand)]
enum TraceCommand {
    /// Run a command and sample its process tree every window (CPU, memory, block I/O, and
    /// network where it can be attributed) into a trace file: `record --out t.jsonl -- CMD ARGS`.
    Record(predictor_tools::record::RecordArgs),
}

/// Runs a tool; its errors exit 1 with one line.
fn run_tool(command: Command) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let result = match command {
        Command::Predictor {
            command: PredictorCommand::Eval(args),
        } => predictor_tools::eval::run(&args, &mut out)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Command::Profile(args) => match vmm::profile::probe::run(&args) {
            Ok(p) => {
                let _ = writeln!(
                    out,
                    "profile {}: fingerprint {}, {} windows, {}",
                    args.out.display(),
                    p.fingerprint,
                    p.probe.windows,
                    p.probe.ended
                );
                Ok(())
            }
            Err(e) if e.is_bad_input() => return fail(e, code::BAD_CONFIG),
            Err(e) => Err(e.to_string()),
        },
        Command::Trace {
            command: TraceCommand::Record(args),
        } => predictor_tools::record::run(&args, &mut out)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Command::Report(args) => {
            predictor_tools::report::run(&args, &mut out).map_err(|e| e.to_string())
        }
        Command::SnapshotEditor {
            command:
                SnapshotEditorCommand::EditMemory {
                    command:
                        EditMemoryCommand::Rebase {
                            memory_path,
                            diff_path,
                        },
                },
        } => rebase_memory(&memory_path, &diff_path),
        Command::Host(args) => vmm::host::run(&args).map_err(|e| e.to_string()),
        Command::Jail(args) => return run_jail(args),
        #[cfg(feature = "torch")]
        Command::Train(args) => predictor_tools::train::run(&args, &mut out)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, code::VMM_ERROR),
    }
}

fn rebase_memory(base: &std::path::Path, diff: &std::path::Path) -> Result<(), String> {
    let open = |p: &std::path::Path, write: bool| {
        std::fs::File::options()
            .read(true)
            .write(write)
            .open(p)
            .map_err(|e| format!("cannot open {}: {e}", p.display()))
    };
    let copied = vmm::snapshot::memory::rebase(&open(base, true)?, &open(diff, false)?)
        .map_err(|e| format!("rebase {} onto {}: {e}", diff.display(), base.display()))?;
    println!(
        "{} MiB of {} merged into {}",
        copied >> 20,
        diff.display(),
        base.display()
    );
    Ok(())
}

/// glibc's allocator, set for a process that runs one microVM: one arena for every thread (the
/// vCPU and API threads allocate rarely, so a per-thread arena each only holds memory; measured
/// 8-10 KiB resident per thread), and what start-up freed handed back once the VM runs.
mod allocator {
    pub fn one_arena() {
        // SAFETY: mallopt only changes glibc's allocator tuning; called before any thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }

    /// Start-up (argument and spec parsing, kernel loading) leaves freed heap behind; give its
    /// whole pages back to the host.
    pub fn give_back_startup_heap() {
        // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
        unsafe { libc::malloc_trim(0) };
    }
}

// Firecracker's jailer as its own program: `prescient jail` with the flags Firecracker's
// `jailer` takes, run when this binary is installed (or linked) as `jailer`.
#[derive(Debug, Parser)]
#[command(
    name = "jailer",
    version = vmm::cli::VERSION_LINE,
    about = "Isolate one microVM (chroot, namespaces, cgroup, uid/gid) and run --exec-file \
             with the arguments after `--` (Firecracker's jailer; `prescient jail`)"
)]
struct JailerCli {
    #[command(flatten)]
    jail: jailer::JailArgs,
}

/// The name this binary was run by (the last component of argv[0]).
fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Jails the VMM as `args` say; returns only on failure.
fn run_jail(args: jailer::JailArgs) -> ExitCode {
    let spec = match args.validate() {
        Ok(s) => s,
        Err(e) => return fail(e, code::BAD_CONFIG),
    };
    match jailer::jail(&spec) {
        Ok(never) => match never {},
        Err(e) => fail(e, code::VMM_ERROR),
    }
}

fn main() -> ExitCode {
    allocator::one_arena();
    // Installed under Firecracker's names, the binary is a drop-in for each: `jailer` is the
    // jail, `firecracker` the VMM answering `--version` as Firecracker does.
    let name = program_name();
    if name == "jailer" {
        let cli = JailerCli::parse();
        vmm::logger::init("warn");
        if cli.jail.exec_file.is_none() {
            // Firecracker's jailer needs it too: run as `jailer`, this binary is not the VMM.
            return fail(
                "--exec-file is required when run as jailer (the VMM to run, e.g. prescient)",
                code::BAD_CONFIG,
            );
        }
        return run_jail(cli.jail);
    }
    let mut command = Cli::command();
    if name == "firecracker" {
        command = command
            .display_name("Firecracker")
            .version(vmm::cli::FIRECRACKER_VERSION_LINE);
    }
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    vmm::logger::init(&cli.log_level);
    if let Some(command) = cli.command {
        return run_tool(command);
    }
    // Firecracker answers these before anything else and starts no VM.
    if cli.snapshot_version {
        println!(
            "{}",
            vmm::snapshot::file::version_name(vmm::snapshot::file::FORMAT_VERSION)
        );
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.describe_snapshot {
        return match vmm::snapshot::describe(path) {
            Ok(version) => {
                println!("{version}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("--describe-snapshot: {e}"), code::BAD_CONFIG),
        };
    }
    if let Err(e) = vmm::cli::validate_instance_id(&cli.id) {
        return fail(e, code::BAD_CONFIG);
    }
    vmm::metrics::METRICS.set_instance_id(&cli.id);
    if let Err(e) = cli.logger.apply() {
        return fail(e, code::BAD_CONFIG);
    }
    if let Some(path) = &cli.metrics_path {
        let config = vmm::metrics::MetricsConfig::at(path.clone());
        if let Err(e) = vmm::metrics::METRICS.configure(&config) {
            return fail(format!("--metrics-path: {e}"), code::BAD_CONFIG);
        }
    }
    if cli.enable_pci {
        tracing::warn!("{}", vmm::cli::NO_PCI);
    }
    vmm::api::http::set_max_body_bytes(cli.http_api_max_payload_size);

    if !cli.no_seccomp {
        vmm::seccomp::enable();
    }
    if let Some(path) = &cli.seccomp_filter {
        if let Err(e) = vmm::seccomp::load_custom_filters(path) {
            return fail(
                format!("--seccomp-filter {}: {e}", path.display()),
                code::BAD_CONFIG,
            );
        }
    }
    if let Some(kind) = cli.seccomp_test_violation {
        vmm::seccomp::set_test_violation(kind);
    }
    if let Some(kind) = cli.test_panic {
        vmm::seccomp::set_test_panic(kind);
    }
    // Firecracker's default socket when nothing else says what to run.
    let api_sock = match (&cli.api_sock, &cli.config_file) {
        (Some(p), _) => Some(p.clone()),
        (None, None) => Some(PathBuf::from(vmm::cli::DEFAULT_API_SOCK)),
        (None, Some(_)) => None,
    };
    let mut config = match &cli.config_file {
        Some(path) => match VmConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => return fail(e, code::BAD_CONFIG),
        },
        None => VmConfig::default(),
    };
    // The file's logger and metrics sections, over the flags (Firecracker applies them when
    // it loads the file; Kata Containers points both at FIFOs it reads).
    if let Some(logger) = config.logger.take() {
        if let Err(e) = vmm::logger::configure(&logger) {
            return fail(format!("logger: {e}"), code::BAD_CONFIG);
        }
    }
    if let Some(metrics) = config.metrics.take() {
        if let Err(e) = vmm::metrics::METRICS.configure(&metrics) {
            return fail(format!("metrics: {e}"), code::BAD_CONFIG);
        }
    }
    let launch = match &cli.profile {
        Some(path) => {
            let store = cli
                .model_store
                .clone()
                .or_else(vmm::profile::store::ModelStore::default_root);
            match vmm::profile::launch::prepare(&mut config, path, store) {
                Ok(l) => l,
                Err(e) => return fail(e, code::BAD_CONFIG),
            }
        }
        None => vmm::profile::launch::Launch::default(),
    };
    // Restores the terminal and removes the API socket and the cgroup on every return from
    // here, and from the panic hook.
    let _cleanup = vmm::cleanup::Guard::new();
    let vm_cgroup = if cli.cgroup_dirs.is_empty() {
        None
    } else {
        match jailer::cgroup::Cgroup::open(cli.cgroup_dirs.clone()) {
            Ok(c) => {
                vmm::cleanup::register_cgroup(c.clone());
                Some(c)
            }
            Err(e) => return fail(format!("--cgroup-dir: {e}"), code::BAD_CONFIG),
        }
    };
    let mut runtime = match Runtime::new(cli.id, config) {
        Ok(r) => r,
        Err(e) => return fail(e, code::VMM_ERROR),
    };
    let mmds_limit = cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size);
    if let Err(e) = runtime.set_mmds(mmds_limit, cli.metadata.as_deref()) {
        return fail(e, code::BAD_CONFIG);
    }
    if cli.boot_timer {
        vmm::device_manager::boot_timer::enable();
    }
    if let Some(c) = vm_cgroup {
        runtime.set_vm_cgroup(c);
    }
    if let Some(w) = launch.warm {
        runtime.set_warm_start(w);
    }
    // Held until the end: dropping the server removes the socket file.
    let _api = match &api_sock {
        Some(path) => match vmm::api::start(path) {
            Ok((server, requests, wake)) => {
                vmm::cleanup::register_api_sock(path.clone());
                runtime.attach_api(requests, wake);
                cli.times.report();
                Some(server)
            }
            Err(e) => return fail(e, code::VMM_ERROR),
        },
        None => None,
    };
    if let Some(spec_path) = &cli.config_file {
        match runtime.start() {
            Ok(()) => {
                allocator::give_back_startup_heap();
                if let Some(stage) = launch.seccomp {
                    // The VMM thread installs it at its next safe point, in run().
                    match vmm::seccomp::request_stage(stage) {
                        Ok(()) => tracing::info!("profile: seccomp stage {stage} requested"),
                        Err(e) => tracing::warn!("profile: seccomp stage {stage}: {e}"),
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_is_well_formed_and_keeps_its_listed_description_once_its_arguments_are_defined() {
        Cli::command().debug_assert();
        let tools: Vec<(String, String)> = Cli::command()
            .get_subcommands()
            .map(|t| (t.get_name().to_string(), t.get_about().unwrap().to_string()))
            .collect();
        for name in ["jail", "host", "report", "snapshot-editor"] {
            assert!(tools.iter().any(|(n, _)| n == name), "{name}: {tools:?}");
        }
        for (name, listed) in tools {
            let help = Cli::command()
                .try_get_matches_from(["prescient", &name, "--help"])
                .unwrap_err()
                .to_string();
            assert_eq!(
                help.lines().next(),
                Some(listed.as_str()),
                "{name}:\n{help}"
            );
            assert!(help.contains("Usage: prescient "), "{name}:\n{help}");
        }
    }
}
