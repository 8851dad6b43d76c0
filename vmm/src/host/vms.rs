//! The VMs the supervisor runs: one `prescient` process each, launched from a checked spec,
//! watched by its process and its API socket, and recorded on disk so that a restarted
//! supervisor finds them again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use predictor::resource::{PerResource, Resource};
use serde::{Deserialize, Serialize};

use super::spec::{budget_update, Class, LaunchSpec, Span};
use crate::api::client::{Client, ClientError, ClientResponse};
use crate::vmm_config::PredictorUpdate;

/// How long a new VMM has to serve its API.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stopped VMM has to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// VMs whose forecasts are read at once at most.
const READERS: usize = 8;

/// Errors of launching, watching and stopping VMs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the VMM of {id}: {source}")]
    Spawn { id: String, source: std::io::Error },
    #[error("the VMM of {id} ended before serving its API ({status}): {log}")]
    Died {
        id: String,
        status: String,
        log: String,
    },
    #[error("the VMM of {id} did not serve its API within {START_DEADLINE:?}")]
    Silent { id: String },
    #[error("API of {id}: {source}")]
    Api { id: String, source: ClientError },
    #[error("API of {id}: {method} {path} answered {status}: {body}")]
    Refused {
        id: String,
        method: &'static str,
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("API of {id}: GET /predictor is not the predictor's status: {why}")]
    Status { id: String, why: String },
}

/// What is kept on disk of a VM (`<state-dir>/<id>.vm.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub class: Class,
    pub pid: u32,
    /// The process's start time (clock ticks after boot, /proc/PID/stat): with the pid, the
    /// process itself, not a later one given the same pid.
    pub start_ticks: u64,
    pub api_sock: PathBuf,
    pub spans: PerResource<Span>,
    /// Where the VM came from: "config" or the warm pool's class.
    #[serde(default)]
    pub origin: String,
}

/// How a VM stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmState {
    Running,
    /// Restored from its warm pool's snapshot and paused, waiting to be handed out.
    Warm {
        pool: String,
    },
    /// Its process is gone; its grant went back to the pool.
    Exited {
        reason: String,
    },
}

/// A VM under the supervisor.
pub struct ManagedVm {
    pub record: VmRecord,
    pub state: VmState,
    /// What it may use now (the max of its predictor's budget).
    pub grant: PerResource<f64>,
    /// What it must hold now (the min of its predictor's budget): its floor, or more while the
    /// pool lends it slack.
    pub hold: PerResource<f64>,
    /// What its last forecast asked for (upper band), if it made one.
    pub want: PerResource<Option<f64>>,
    /// That forecast's expected value.
    pub point: PerResource<Option<f64>>,
    /// How much that upper band rose since the window before (0 when it fell).
    pub rise: PerResource<f64>,
    /// The predictor's window count when that upper band last rose by a step or more.
    pub rose_at: PerResource<Option<u64>>,
    /// The windows ahead the VM's predictor provisions for (its `horizon`).
    pub horizon: u64,
    /// The predictor's window count at the last read.
    pub windows: u64,
    /// Why the last read of its API failed, if it did.
    pub api_error: Option<String>,
    /// Handed out from a warm pool, no forecast read since.
    claimed: bool,
    /// Our child, when this supervisor launched it (reaped on exit).
    child: Option<Child>,
    client: Option<Client>,
    timeout: Duration,
}

/// A warm VM ready to be handed out, as the claim desk holds it: its API connection and its
/// record and description as they will be once it is handed out.
pub struct Ready {
    pub id: String,
    record: VmRecord,
    client: Client,
    described: serde_json::Value,
    /// The grant it was handed out with (its floors until a claim sets its start grant).
    start: PerResource<f64>,
}

/// Where a claim's time on the VM's API went.
pub struct Took {
    /// `PATCH /predictor`: its start grant.
    pub grant: Duration,
    /// `PATCH /vm`: resumed.
    pub resume: Duration,
    /// Its record rewritten.
    pub record: Duration,
}

impl Ready {
    pub fn spans(&self) -> &PerResource<Span> {
        &self.record.spans
    }

    /// What its start grant holds above its floors: what the claim took of the desk's
    /// allowance.
    pub fn lent(&self) -> PerResource<f64> {
        PerResource::from_fn(|r| self.start[r] - self.record.spans[r].floor)
    }

    /// Raises the VM's grant to `start` (held: its predictor's allocation moves there now, its
    /// CPU quota with it), then resumes it, and records it as handed out (a restarted
    /// supervisor adopts it rather than letting it go as a warm one). A VM that refuses the
    /// grant (its predictor disabled in its config) is resumed at its floors: [`Ready::lent`]
    /// says what it holds. Returns its description and how long each step took.
    pub fn resume(
        &mut self,
        files: &Files,
        start: PerResource<f64>,
    ) -> Result<(serde_json::Value, Took), VmError> {
        let floors = self.record.spans.map(|_, s| s.floor);
        self.start = start;
        let t0 = Instant::now();
        if start != floors {
            let update = PredictorUpdate {
                budget: Some(budget_update(&self.record.spans, &start, &start)),
                ..PredictorUpdate::default()
            };
            let body = serde_json::to_string(&update).expect("an update serialises");
            let patched = call(
                &mut self.client,
                &self.id,
                "PATCH",
                "/predictor",
                Some(&body),
            );
            match patched {
                Ok(_) => {}
                Err(e @ VmError::Refused { .. }) => {
                    tracing::warn!("host: warm VM {}: no start grant: {e}", self.id);
                    self.start = floors;
                }
                Err(e) => return Err(e),
            }
        }
        let grant = t0.elapsed();
        call(
            &mut self.client,
            &self.id,
            "PATCH",
            "/vm",
            Some(r#"{"state": "Resumed"}"#),
        )?;
        let resume = t0.elapsed() - grant;
        save_record(files, &self.record)?;
        let mut described = self.described.clone();
        described["grant"] = serde_json::to_value(self.start).expect("a grant serialises");
        described["hold"] = described["grant"].clone();
        Ok((
            described,
            Took {
                grant,
                resume,
                record: t0.elapsed() - grant - resume,
            },
        ))
    }
}

/// One request on a VM's API; an answer outside 2xx is refused.
fn call(
    client: &mut Client,
    id: &str,
    method: &'static str,
    path: &'static str,
    body: Option<&str>,
) -> Result<ClientResponse, VmError> {
    match client.request(method, path, body) {
        Ok(r) if (200..300).contains(&r.status) => Ok(r),
        Ok(r) => Err(VmError::Refused {
            id: id.to_string(),
            method,
            path,
            status: r.status,
            body: r.body,
        }),
        Err(source) => Err(VmError::Api {
            id: id.to_string(),
            source,
        }),
    }
}

/// `/proc/PID/stat`: state letter and start time.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from its end.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), VmError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| VmError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn save_record(files: &Files, record: &VmRecord) -> Result<(), VmError> {
    write_file(
        &files.record(&record.id),
        &serde_json::to_vec_pretty(record).expect("a record serialises"),
    )
}

/// The last lines of a VMM's log, for an error.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Where a VM's files are.
#[derive(Debug, Clone)]
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }
    pub fn record(&self, id: &str) -> PathBuf {
        self.path(id, "vm.json")
    }
    pub fn config(&self, id: &str) -> PathBuf {
        self.path(id, "config.json")
    }
    pub fn socket(&self, id: &str) -> PathBuf {
        self.path(id, "sock")
    }
    pub fn console(&self, id: &str) -> PathBuf {
        self.path(id, "console")
    }
    pub fn log(&self, id: &str) -> PathBuf {
        self.path(id, "log")
    }

    /// The records on disk.
    pub fn records(&self) -> Result<Vec<VmRecord>, VmError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| VmError::StateDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(".vm.json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => records.push(r),
                Err(e) => tracing::warn!("host: skipping {}: {e}", path.display()),
            }
        }
        records.sort_by(|a: &VmRecord, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// Removes every file of a VM.
    pub fn remove(&self, id: &str) {
        for ext in ["vm.json", "config.json", "sock"] {
            let _ = std::fs::remove_file(self.path(id, ext));
        }
    }
}

impl ManagedVm {
    /// Launches `spec` with `grant`, and waits until its API serves.
    pub fn launch(
        files: &Files,
        spec: &LaunchSpec,
        grant: PerResource<f64>,
        timeout: Duration,
    ) -> Result<Self, VmError> {
        let config_path = files.config(&spec.id);
        let config = spec.config_with_grant(&grant);
        let text = serde_json::to_vec_pretty(&config).expect("a config serialises");
        write_file(&config_path, &text)?;
        let vm = Self::spawn(files, spec, grant, Some(&config_path), "config", timeout)?;
        vm.save(files)?;
        Ok(vm)
    }

    /// Starts a VMM for `spec` from the snapshot `snapshot` (state and memory files), paused:
    /// a warm VM of `pool`.
    pub fn restore(
        files: &Files,
        spec: &LaunchSpec,
        grant: PerResource<f64>,
        snapshot: (&Path, &Path),
        pool: &str,
        timeout: Duration,
    ) -> Result<Self, VmError> {
        let mut vm = Self::spawn(files, spec, grant, None, &format!("warm:{pool}"), timeout)?;
        let load = serde_json::json!({
            "snapshot_path": snapshot.0,
            "mem_backend": {"backend_type": "File", "backend_path": snapshot.1},
            "resume_vm": false,
        });
        if let Err(e) = vm.request("PUT", "/snapshot/load", Some(&load.to_string())) {
            vm.kill();
            return Err(e);
        }
        vm.state = VmState::Warm { pool: pool.into() };
        vm.save(files)?;
        Ok(vm)
    }

    fn save(&self, files: &Files) -> Result<(), VmError> {
        save_record(files, &self.record)
    }

    /// Starts the VMM (with `config`, or empty for a restore) and waits until its API serves.
    fn spawn(
        files: &Files,
        spec: &LaunchSpec,
        grant: PerResource<f64>,
        config: Option<&Path>,
        origin: &str,
        timeout: Duration,
    ) -> Result<Self, VmError> {
        let id = spec.id.clone();
        let sock = match &spec.jailer {
            Some(j) => j.host_socket(&id),
            None => files.socket(&id),
        };
        let _ = std::fs::remove_file(&sock);
        let exe = std::env::current_exe().map_err(|source| VmError::Spawn {
            id: id.clone(),
            source,
        })?;
        let open = |p: PathBuf| {
            std::fs::File::create(&p).map_err(|source| VmError::Write { path: p, source })
        };
        let mut command = Command::new(exe);
        match &spec.jailer {
            // The jailer execs the VMM in place: the pid stays the VMM's. It opens the config
            // and the files it names before the chroot.
            Some(j) => {
                command
                    .args(["jail", "--id", &id])
                    .args(["--uid", &j.uid.to_string(), "--gid", &j.gid.to_string()])
                    .arg("--chroot-base-dir")
                    .arg(&j.chroot_base_dir)
                    .args(["--cgroup-version", &j.cgroup_version.to_string()])
                    .args(["--", "--api-sock", super::spec::JAILED_API_SOCK]);
            }
            None => {
                command.arg("--api-sock").arg(&sock);
            }
        }
        if let Some(config) = config {
            command.arg("--config-file").arg(config);
        }
        if spec.jailer.is_none() {
            // The jailer passes its own --id.
            command.args(["--id", &id]);
        }
        command
            .stdin(Stdio::null())
            .stdout(open(files.console(&id))?)
            .stderr(open(files.log(&id))?);
        // Its own process group: a signal to the supervisor's terminal does not reach the VMs,
        // which outlive a supervisor restart.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().map_err(|source| VmError::Spawn {
            id: id.clone(),
            source,
        })?;
        let pid = child.id();
        let start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        let record = VmRecord {
            id: id.clone(),
            class: spec.class,
            pid,
            start_ticks,
            api_sock: sock.clone(),
            spans: spec.spans,
            origin: origin.into(),
        };
        let mut vm = ManagedVm::new(record, grant, Some(child), timeout);
        let started = Instant::now();
        loop {
            if let Some(status) = vm.exit_status() {
                return Err(VmError::Died {
                    id,
                    status,
                    log: log_tail(&files.log(&vm.record.id)),
                });
            }
            if let Ok(c) = Client::connect(&sock, timeout) {
                vm.client = Some(c);
                return Ok(vm);
            }
            if started.elapsed() > START_DEADLINE {
                vm.kill();
                return Err(VmError::Silent { id });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A warm VM made ready to hand out: its API connection and what it will be once handed
    /// out go to the claim desk, which resumes it without the supervisor's loop.
    pub fn ready(&mut self) -> Result<Ready, VmError> {
        let VmState::Warm { pool } = &self.state else {
            unreachable!("only warm VMs are made ready")
        };
        let mut record = self.record.clone();
        record.origin = format!("from_pool:{pool}");
        let described = self.describe_as(&record, &VmState::Running);
        let client = match self.client.take() {
            Some(c) => c,
            None => {
                Client::connect(&self.record.api_sock, self.timeout).map_err(|e| self.api_err(e))?
            }
        };
        Ok(Ready {
            id: record.id.clone(),
            start: self.grant,
            record,
            client,
            described,
        })
    }

    /// A warm VM the desk handed out: running at its start grant, held until the pool's next
    /// division, its connection back with the supervisor.
    pub fn handed_out(&mut self, ready: Ready) {
        self.grant = ready.start;
        self.hold = ready.start;
        self.claimed = true;
        self.record = ready.record;
        self.client = Some(ready.client);
        self.state = VmState::Running;
    }

    /// Pauses the VM and writes a Full snapshot of it to `state` and `memory`.
    pub fn snapshot(&mut self, state: &Path, memory: &Path) -> Result<(), VmError> {
        self.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#))?;
        let body = serde_json::json!({
            "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory,
        });
        self.request("PUT", "/snapshot/create", Some(&body.to_string()))?;
        Ok(())
    }

    /// A running VM with no forecast read yet.
    fn new(
        record: VmRecord,
        grant: PerResource<f64>,
        child: Option<Child>,
        timeout: Duration,
    ) -> Self {
        ManagedVm {
            hold: record.spans.map(|_, s| s.floor),
            record,
            state: VmState::Running,
            grant,
            want: PerResource::default(),
            point: PerResource::default(),
            rise: PerResource::default(),
            rose_at: PerResource::default(),
            horizon: 1,
            windows: 0,
            api_error: None,
            claimed: false,
            child,
            client: None,
            timeout,
        }
    }

    /// A VM of a previous supervisor: running if its process is still the one recorded, its
    /// grant read back from its predictor.
    pub fn adopt(record: VmRecord, timeout: Duration) -> Self {
        let mut vm = ManagedVm::new(record, PerResource::default(), None, timeout);
        if !vm.process_alive() {
            vm.state = VmState::Exited {
                reason: "its VMM ended while the supervisor was not running".into(),
            };
            return vm;
        }
        if let Some(pool) = vm.record.origin.strip_prefix("warm:") {
            vm.state = VmState::Warm { pool: pool.into() };
        }
        match vm.read_status(timeout) {
            Ok(status) => {
                let budget = &status["config"]["budget"];
                for r in Resource::ALL {
                    let key = budget_key(r);
                    vm.grant[r] = budget[key]["max"]
                        .as_f64()
                        .unwrap_or(vm.record.spans[r].ceiling);
                    vm.hold[r] = budget[key]["min"]
                        .as_f64()
                        .unwrap_or(vm.record.spans[r].floor);
                }
            }
            Err(e) => {
                // Running but not answering: it holds at most its ceiling.
                vm.grant = vm.record.spans.map(|_, s| s.ceiling);
                vm.api_error = Some(e.to_string());
            }
        }
        vm
    }

    fn process_alive(&self) -> bool {
        matches!(proc_stat(self.record.pid), Some((state, start))
            if state != 'Z' && state != 'X' && start == self.record.start_ticks)
    }

    /// How the process ended, once it has.
    fn exit_status(&mut self) -> Option<String> {
        if let Some(child) = &mut self.child {
            return match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                _ => None,
            };
        }
        (!self.process_alive()).then(|| "its process is gone".to_string())
    }

    /// Checks the process; a VM found dead becomes `Exited` and its grant is zero. True if it
    /// died now.
    pub fn check_exit(&mut self) -> bool {
        if matches!(self.state, VmState::Exited { .. }) {
            return false;
        }
        match self.exit_status() {
            Some(status) => {
                self.state = VmState::Exited {
                    reason: format!("its VMM exited: {status}"),
                };
                self.client = None;
                self.grant = PerResource::default();
                self.want = PerResource::default();
                self.point = PerResource::default();
                let _ = std::fs::remove_file(&self.record.api_sock);
                true
            }
            None => false,
        }
    }

    fn api_err(&self, source: ClientError) -> VmError {
        VmError::Api {
            id: self.record.id.clone(),
            source,
        }
    }

    /// One request on the VM's API, reconnecting if the last connection broke.
    fn request(
        &mut self,
        method: &'static str,
        path: &'static str,
        body: Option<&str>,
    ) -> Result<ClientResponse, VmError> {
        self.request_within(self.timeout, method, path, body)
    }

    /// [`ManagedVm::request`], its answer awaited at most `wait`.
    fn request_within(
        &mut self,
        wait: Duration,
        method: &'static str,
        path: &'static str,
        body: Option<&str>,
    ) -> Result<ClientResponse, VmError> {
        if self.client.is_none() {
            let c = Client::connect(&self.record.api_sock, self.timeout)
                .map_err(|e| self.api_err(e))?;
            self.client = Some(c);
        }
        let client = self.client.as_mut().expect("connected above");
        client.set_timeout(wait).map_err(|e| VmError::Api {
            id: self.record.id.clone(),
            source: e,
        })?;
        let response = call(client, &self.record.id, method, path, body);
        if matches!(response, Err(VmError::Api { .. })) {
            self.client = None;
        }
        response
    }

    fn read_status(&mut self, wait: Duration) -> Result<serde_json::Value, VmError> {
        let r = self.request_within(wait, "GET", "/predictor", None)?;
        serde_json::from_str(&r.body).map_err(|e| VmError::Status {
            id: self.record.id.clone(),
            why: e.to_string(),
        })
    }

    /// Reads the VM's forecast: per resource, the upper band of its last window's forecast;
    /// its answer awaited at most `wait`.
    fn observe(&mut self, wait: Duration) -> Result<(), VmError> {
        let status = self.read_status(wait)?;
        let windows = status["windows"].as_u64().unwrap_or(0);
        if windows == self.windows {
            return Ok(());
        }
        let forecast = &status["last"]["forecast"];
        let want = PerResource::from_fn(|r| forecast[r.name()]["upper"].as_f64());
        self.rise = PerResource::from_fn(|r| match (want[r], self.want[r]) {
            (Some(now), Some(before)) => (now - before).max(0.0),
            _ => 0.0,
        });
        for r in Resource::ALL {
            if self.rise[r] >= self.record.spans[r].step {
                self.rose_at[r] = Some(windows);
            }
        }
        // A VM just handed out went from paused to running, a rise its forecast (made while
        // it was paused, or by its template) has not seen yet: its CPU counts as ramping, so
        // for the windows the pool grants ahead slack may hold it up to its ceiling, as its
        // start grant did.
        if std::mem::take(&mut self.claimed) {
            self.rose_at[Resource::Cpu] = Some(windows);
        }
        self.want = want;
        self.point = PerResource::from_fn(|r| forecast[r.name()]["point"].as_f64());
        self.horizon = status["config"]["horizon"].as_u64().unwrap_or(1).max(1);
        self.windows = windows;
        Ok(())
    }

    /// Sets the VM's grant: its predictor's budget from `hold` (at least its floors) up to
    /// `grant`.
    pub fn set_grant(
        &mut self,
        grant: PerResource<f64>,
        hold: PerResource<f64>,
    ) -> Result<(), VmError> {
        let update = PredictorUpdate {
            budget: Some(budget_update(&self.record.spans, &grant, &hold)),
            ..PredictorUpdate::default()
        };
        let body = serde_json::to_string(&update).expect("an update serialises");
        self.request("PATCH", "/predictor", Some(&body))?;
        self.grant = grant;
        self.hold = hold;
        Ok(())
    }

    /// Kills the VMM at once (a warm VM being let go, a template after its snapshot).
    pub fn kill(&mut self) {
        // SAFETY: kill only sends a signal to the pid we recorded for this VM.
        unsafe { libc::kill(self.record.pid as i32, libc::SIGKILL) };
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
    }

    /// Stops the VMM: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if !matches!(self.state, VmState::Exited { .. }) && self.process_alive() {
            // SAFETY: kill only sends a signal to the process we checked is this VM's.
            unsafe { libc::kill(self.record.pid as i32, libc::SIGTERM) };
            let start = Instant::now();
            while self.exit_status().is_none() {
                if start.elapsed() > STOP_GRACE {
                    self.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.state = VmState::Exited {
            reason: "stopped".into(),
        };
        self.grant = PerResource::default();
        self.client = None;
    }

    /// The VM for `GET /vms`.
    pub fn describe(&self) -> serde_json::Value {
        self.describe_as(&self.record, &self.state)
    }

    /// The VM as it would be described with `record` in `state`.
    fn describe_as(&self, record: &VmRecord, state: &VmState) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": record.id,
            "class": record.class,
            "pid": record.pid,
            "api_sock": record.api_sock,
            "origin": record.origin,
            "grant": self.grant,
            "hold": self.hold,
            "want": self.want,
            "expected": self.point,
            "spans": record.spans,
            "windows": self.windows,
        });
        let state = serde_json::to_value(state).expect("a state serialises");
        if let (Some(v), Some(s)) = (v.as_object_mut(), state.as_object()) {
            v.extend(s.clone());
            if let Some(e) = &self.api_error {
                v.insert("api_error".into(), e.clone().into());
            }
        }
        v
    }
}

/// Reads the forecasts of `vms` side by side, each answer awaited at most `wait`, on at most
/// [`READERS`] threads that each take the next VM as they are free: a VM slow to answer (or
/// not answering) holds up only its own reader, so the reads take about the slowest one's time
/// up to `wait`, unless more VMs than readers are slow at once. Each VM's `api_error` says why
/// its read failed, if it did.
pub fn observe_all(vms: Vec<&mut ManagedVm>, wait: Duration) {
    let readers = vms.len().min(READERS);
    let queue = Mutex::new(vms.into_iter());
    let read = || loop {
        // Held only to take the next VM.
        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
        let Some(vm) = next else {
            return;
        };
        vm.api_error = vm.observe(wait).err().map(|e| e.to_string());
    };
    std::thread::scope(|s| {
        for _ in 1..readers {
            let spawned = std::thread::Builder::new()
                .name("host-read".into())
                .spawn_scoped(s, read);
            if let Err(e) = spawned {
                // The calling thread reads what the readers that did start leave.
                tracing::warn!("host: cannot start a forecast reader: {e}");
                break;
            }
        }
        read();
    });
}

/// The budget field of each resource in the predictor's config.
fn budget_key(r: Resource) -> &'static str {
    match r {
        Resource::Cpu => "cpu_cores",
        Resource::Mem => "memory_mib",
        Resource::Blk => "blk_mibps",
        Resource::Net => "net_mibps",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc::{channel, Receiver};

    /// How a fake API answers a request (`METHOD PATH`): status and body.
    type Answer = fn(&str) -> (u16, &'static str);

    /// An API at `sock` that records each request (`METHOD PATH BODY`, sent on the receiver)
    /// and answers it as `answer` says, or, with none, accepts connections and never answers.
    fn fake_api(sock: &Path, answer: Option<Answer>) -> Receiver<String> {
        let _ = std::fs::remove_file(sock);
        let listener = UnixListener::bind(sock).unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for stream in listener.incoming() {
                let stream = stream.unwrap();
                let Some(answer) = answer else {
                    silent.push(stream);
                    continue;
                };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                loop {
                    let mut head = String::new();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if head.is_empty() {
                            head = line.trim().trim_end_matches(" HTTP/1.1").to_string();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let (status, text) = answer(&head);
                    let _ = tx.send(format!("{head} {}", String::from_utf8(body).unwrap()));
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    out.write_all(reply.as_bytes()).unwrap();
                }
            }
        });
        rx
    }

    fn spans() -> PerResource<Span> {
        let span = |floor, ceiling, step| Span {
            floor,
            ceiling,
            step,
        };
        PerResource {
            cpu: span(0.05, 1.0, 0.01),
            mem: span(64.0, 64.0, 2.0),
            blk: span(1.0, 1024.0, 1.0),
            net: span(1.0, 1024.0, 1.0),
        }
    }

    fn record(dir: &Path, id: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            class: Class::Burstable,
            pid: std::process::id(),
            start_ticks: 0,
            api_sock: dir.join(format!("{id}.sock")),
            spans: spans(),
            origin: "from_pool:fn".into(),
        }
    }

    /// A warm VM `id` of a VMM that records its requests and answers each as `answer` says
    /// (see `fake_api`), its files in `dir`; its CPU spans 0.05 to 1 core in steps of 0.01.
    pub(in crate::host) fn fake_vm(
        dir: &Path,
        id: &str,
        answer: Answer,
    ) -> (Ready, Receiver<String>) {
        let record = record(dir, id);
        let requests = fake_api(&record.api_sock, Some(answer));
        let ready = Ready {
            id: id.into(),
            start: spans().map(|_, s| s.floor),
            client: Client::connect(&record.api_sock, Duration::from_secs(5)).unwrap(),
            record,
            described: serde_json::json!({"id": id}),
        };
        (ready, requests)
    }

    /// [`fake_vm`] of a VMM that accepts every request.
    pub(in crate::host) fn fake_ready(dir: &Path, id: &str) -> (Ready, Receiver<String>) {
        fake_vm(dir, id, |_| (204, ""))
    }

    #[test]
    fn a_vm_that_does_not_answer_holds_up_only_its_own_read() {
        let dir = std::env::temp_dir().join(format!("host-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        const STATUS: &str = r#"{"windows": 3, "config": {"horizon": 1},
                                "last": {"forecast": {"cpu": {"point": 0.3, "upper": 0.5}}}}"#;
        // Four VMMs that never answer among four that do: read one by one, the silent ones
        // alone would take four waits.
        let wait = Duration::from_millis(300);
        let mut vms: Vec<ManagedVm> = (0..8)
            .map(|i| {
                let record = record(&dir, &format!("vm{i}"));
                let answer: Answer = |_| (200, STATUS);
                fake_api(&record.api_sock, (i % 2 == 0).then_some(answer));
                ManagedVm::new(record, spans().map(|_, s| s.floor), None, wait * 10)
            })
            .collect();
        let t0 = Instant::now();
        observe_all(vms.iter_mut().collect(), wait);
        let took = t0.elapsed();
        assert!(took < wait * 3, "{took:?}");
        for (i, vm) in vms.iter().enumerate() {
            if i % 2 == 0 {
                assert_eq!(vm.api_error, None);
                assert_eq!(
                    (vm.want.cpu, vm.point.cpu, vm.windows),
                    (Some(0.5), Some(0.3), 3)
                );
            } else {
                let e = vm.api_error.as_deref().unwrap();
                assert!(e.contains(&format!("API of vm{i}")), "{e}");
                assert_eq!(vm.want.cpu, None);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_claimed_vm_gets_its_start_grant_before_it_is_resumed() {
        let dir = std::env::temp_dir().join(format!("host-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files { dir: dir.clone() };
        let (mut ready, requests) = fake_ready(&dir, "w1");
        let mut start = ready.spans().map(|_, s| s.floor);
        start.cpu = 1.0;
        let (described, _) = ready.resume(&files, start).unwrap();
        let first = requests.recv().unwrap();
        let update: serde_json::Value =
            serde_json::from_str(first.strip_prefix("PATCH /predictor ").unwrap()).unwrap();
        // Held at the grant: the predictor's allocation (its quota) moves there at once.
        assert_eq!(
            update["budget"]["cpu_cores"],
            serde_json::json!({"min": 1.0, "max": 1.0}),
            "{first}"
        );
        assert_eq!(update["budget"]["memory_mib"]["max"], 64.0, "{first}");
        assert_eq!(
            requests.recv().unwrap(),
            r#"PATCH /vm {"state": "Resumed"}"#
        );
        assert_eq!(described["grant"]["cpu"], 1.0);
        assert!((ready.lent().cpu - 0.95).abs() < 1e-9);
        assert!(files.record("w1").exists());
        // A claim that found no allowance resumes the VM at its floors, asking nothing more.
        let (mut ready, requests) = fake_ready(&dir, "w2");
        let floors = ready.spans().map(|_, s| s.floor);
        ready.resume(&files, floors).unwrap();
        assert!(requests.recv().unwrap().starts_with("PATCH /vm "));
        assert_eq!(ready.lent().cpu, 0.0);
        // A VM whose predictor does not run refuses the grant: it is resumed all the same, at
        // its floors.
        let (mut ready, requests) = fake_vm(&dir, "w3", |head| match head {
            "PATCH /predictor" => (400, r#"{"fault_message": "the predictor is not running"}"#),
            _ => (204, ""),
        });
        let (described, _) = ready.resume(&files, start).unwrap();
        assert!(requests.recv().unwrap().starts_with("PATCH /predictor "));
        assert!(requests.recv().unwrap().starts_with("PATCH /vm "));
        assert_eq!(
            (ready.lent().cpu, &described["grant"]["cpu"]),
            (0.0, &0.05.into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proc_stat_reads_this_process_and_misses_a_gone_one() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert!(start > 0);
        assert_eq!(proc_stat(u32::MAX), None);
    }

    #[test]
    fn records_survive_the_disk_and_bad_ones_are_skipped() {
        let dir = std::env::temp_dir().join(format!("host-vms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files { dir: dir.clone() };
        let span = Span {
            floor: 1.0,
            ceiling: 2.0,
            step: 1.0,
        };
        let record = VmRecord {
            id: "a".into(),
            class: Class::Guaranteed,
            pid: std::process::id(),
            start_ticks: proc_stat(std::process::id()).unwrap().1,
            api_sock: dir.join("a.sock"),
            spans: PerResource::from_fn(|_| span),
            origin: "config".into(),
        };
        write_file(&files.record("a"), &serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::write(files.record("b"), b"{not json").unwrap();
        assert_eq!(files.records().unwrap(), vec![record.clone()]);
        // This process is alive; its API socket is not there.
        let vm = ManagedVm::adopt(record.clone(), Duration::from_millis(100));
        assert_eq!(vm.state, VmState::Running);
        assert!(vm.api_error.is_some());
        let gone = VmRecord {
            start_ticks: record.start_ticks + 1,
            ..record
        };
        let vm = ManagedVm::adopt(gone, Duration::from_millis(100));
        assert!(matches!(vm.state, VmState::Exited { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
